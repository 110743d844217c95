#!/usr/bin/env bash
# The wheels a bare GPU machine lacks for scripts/device/check.py, into .whl/ (ignored by git): that machine has
# Python 3.12 with torch, transformers, accelerate, safetensors, numpy and Pillow, but no diffusers and no internet.
# Then, there:  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#               PYTHONPATH=/tmp/site python3 scripts/device/check.py --out gpu_check.json
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl diffusers==0.42.1 importlib_metadata==10.2.0
du -sh .whl
