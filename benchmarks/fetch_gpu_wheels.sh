#!/usr/bin/env bash
# Download the Python packages the GPU check needs and a bare CUDA machine may lack, as wheels,
# into .whl/ at the repository root (git-ignored). benchmarks/gpu_check.py installs them from there
# (pip --no-index --no-deps --target, a temporary folder) before its sections: carry .whl to the
# machine with the checkout.
#
#   diffusers           the B0a rows (DDPMPipeline) of the benchmark matrix
#   importlib_metadata  needed by diffusers (8.x: its only need, zipp, is on the machine)
#
# The rest of diffusers' needs (huggingface-hub >= 1.32, safetensors >= 0.8, numpy, Pillow, regex,
# requests, filelock) are on the H200 image this project is lent (see its package list).
# Usage: bash benchmarks/fetch_gpu_wheels.sh [PYTHON_VERSION]   (default 3.12, the H200 image's)
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-3.12}"
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 importlib_metadata==8.7.0
ls -l .whl
