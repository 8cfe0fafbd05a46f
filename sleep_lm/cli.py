"""What every command line of sleep_lm shares: user errors as one line and exit status 2.

A `UserError` (a config value, the workdir, a checkpoint), an OSError (a full disk, an
unwritable folder) and a bad flag or `--config.X=...` override print `error: ...` on stderr and
exit with status 2. With `--debug` they keep their traceback. Any other exception is a bug and
keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags

from sleep_lm.errors import UserError


def _debug(argv) -> bool:
  return any(a in ("--debug", "--debug=true", "--debug=True") for a in argv)


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if _debug(argv):
      raise
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    _fail(" ".join(lines[:1] + lines[-1:]) if len(lines) > 1 else str(e))
  except (AttributeError, KeyError, TypeError, ValueError) as e:   # a --config.X override
    if _debug(argv):
      raise
    overrides = [a for a in argv if a.startswith("--config.")]
    cause = str(e).strip().strip('"').splitlines()[0] if str(e).strip() else type(e).__name__
    _fail(f"cannot apply the config ({' '.join(overrides) or 'no overrides'}): {cause}")


def run(main: Callable[[list[str]], object]) -> None:
  """`app.run(main)` with user errors in flags, config and main reported as one line."""
  def guarded(argv):
    try:
      return main(argv)
    except (UserError, OSError) as e:
      if flags.FLAGS.debug:
        raise
      if isinstance(e, OSError) and e.strerror:
        _fail(f"{e.strerror}: {e.filename}" if e.filename else e.strerror)
      _fail(str(e))
  app.run(guarded, flags_parser=_parse_flags)


def define_debug_flag() -> None:
  flags.DEFINE_bool("debug", False, "Show the traceback of user errors too.")
