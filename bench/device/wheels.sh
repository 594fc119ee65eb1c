#!/usr/bin/env bash
# The wheels the device image lacks (see bench/device/README.md), downloaded here into .whl/
# (git-ignored through .git/info/exclude) for bench/device/check.sh to install there.
# The image has CUDA torch, transformers, safetensors, numpy, pillow, pytest and grpcio.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PY=${PY:-python3}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1 xfuser==0.7.0 yunchang==0.6.4 ftfy==6.3.1 wcwidth==0.9.4 einops==0.8.2 \
  tqdm==4.70.1 pytest-timeout==2.4.0
du -sh .whl
