#!/usr/bin/env bash
# On the GPU machine, which reaches no package registry: install the wheels carried in .whl/
# (the packages gpu.md lists as missing there: ml-collections, tensorflow-datasets, grain, ...,
# and fla for the kernel benchmark) into /tmp/site. Then run with PYTHONPATH=/tmp/site:.
# Make .whl/ on a machine with a registry (cp312, manylinux):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
#     ml-collections==1.1.0 tensorflow-datasets==4.9.10 array-record==0.8.6 grain==0.2.18 \
#     dm-tree==0.1.10 immutabledict==4.3.1 simple_parsing==0.1.9 termcolor==3.3.0 toml==0.10.2 \
#     docstring-parser==0.18.0 tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 \
#     portpicker==1.6.0 fla-core==0.6.0 flash-linear-attention==0.6.0
#   pip wheel --no-deps -w .whl promise==2.3
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
