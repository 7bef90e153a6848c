#!/usr/bin/env bash
# Compile-check the CUDA glue (csrc/cuda/*.cpp) on a machine without CUDA torch.
#
# A CPU torch wheel ships the c10/cuda and ATen/cuda headers but not the generated
# c10/cuda/impl/cuda_cmake_macros.h, so we supply that one-line header and run the host compiler
# with -fsyntax-only: this catches type/API errors against the real torch headers and the real
# CUDA headers. It cannot link (no libc10_cuda / libtorch_cuda) — only a CUDA-torch build can.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
CXX=${CXX:-g++}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ ! -f "$CUDA_HOME/include/cuda_runtime.h" ]; then
  echo "check_glue: SKIPPED (no CUDA headers in $CUDA_HOME/include)"
  exit 0
fi
TI=$("$PY" -c "import torch.utils.cpp_extension as c; print(c.include_paths()[0])")
shim=$(mktemp -d)
trap 'rm -rf "$shim"' EXIT
mkdir -p "$shim/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$shim/c10/cuda/impl/cuda_cmake_macros.h"
for f in csrc/cuda/*.cpp; do
  "$CXX" -std=c++20 -fsyntax-only -Wall -Werror -Wno-unused-parameter -DMEGAMED_TORCH_VERSION='"check"' \
    -I"$shim" -I"$TI" -I"$TI/torch/csrc/api/include" -I"$CUDA_HOME/include" -Icsrc -Ikernels/cuda "$f"
  echo "check_glue: $f OK (syntax against torch + CUDA headers; not linked)"
done
