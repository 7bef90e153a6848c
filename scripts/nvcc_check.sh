#!/usr/bin/env bash
# Compile every framework-free CUDA kernel under kernels/ for sm_90 (compile only: CI has no GPU
# and no CUDA torch). Skips with a printed reason only where nvcc is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || true)}
[ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc
if [ -z "$NVCC" ]; then
  echo "nvcc-check: SKIPPED (nvcc not found on PATH or in /usr/local/cuda/bin)"
  exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
n=0
for f in $(find kernels -name '*.cu' | sort); do
  "$NVCC" -c -std=c++17 -O3 -Werror all-warnings \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -Ikernels/cuda "$f" -o "$out/$(basename "$f").o"
  echo "nvcc-check: compiled $f for sm_80 and sm_90"
  n=$((n+1))
done
echo "nvcc-check: $n CUDA source(s) compiled"
