#!/usr/bin/env bash
# On the GPU machine, which reaches no package registry: install the wheels carried in .whl/
# (the packages gpu.md lists as missing there: ml-collections, tensorflow-datasets, grain, ...,
# and fla for the kernel benchmark) into /tmp/site. Then run with PYTHONPATH=/tmp/site:.
# Make .whl/ on a machine with a registry: scripts/gpu_wheels.sh (the list of wheels is there).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
