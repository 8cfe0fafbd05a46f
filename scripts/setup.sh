#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 (jax 0.11 needs it) and installs sleep_lm with its test
# extras. Finds the interpreter on PATH or under pyenv (whose python3.12 shim can exist and still
# fail); PYTHON=/path/to/python overrides the search.
set -euo pipefail
cd "$(dirname "$0")/.."

is_312() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }

find_python() {
  local cand
  for cand in "${PYTHON:-}" python3.12; do
    if [ -n "$cand" ] && is_312 "$cand"; then echo "$cand"; return; fi
  done
  for cand in "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.12*/bin/python3; do
    if [ -x "$cand" ] && is_312 "$cand"; then echo "$cand"; return; fi
  done
  for cand in python3.13 python3; do
    if is_312 "$cand"; then echo "$cand"; return; fi
  done
  return 1
}

if [ -x .venv/bin/python ] && is_312 .venv/bin/python; then
  echo "setup: reusing .venv ($(.venv/bin/python --version))"
else
  python=$(find_python) || {
    echo "setup: no Python >= 3.12 found; install one or set PYTHON=/path/to/python3.12" >&2
    exit 1
  }
  echo "setup: creating .venv with $python ($("$python" --version))"
  "$python" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -e '.[test]'
