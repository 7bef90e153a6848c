// Parameters of the neighborhood-attention forward (see na2d.cuh for the semantics). Plain C++ with
// no CUDA includes, so the CPU emulator of the kernel body (tests/cuda_emu) can use it too.
#pragma once

#include <cstdint>

namespace megamed {
namespace cuda {

// Element strides of a [B, H, W, heads, D] tensor (or of lse [B, H, W, heads]) along its first
// four axes; the D axis must have stride 1.
struct Na2dStrides {
  int64_t b, h, w, n;
};

template <typename T>
struct Na2dFwdParams {
  const T* q;
  const T* k;
  const T* v;
  Na2dStrides q_strides, k_strides, v_strides;
  T* out;                   // [B, H, W, heads, D], D contiguous
  Na2dStrides out_strides;
  float* lse;               // [B, H, W, heads]
  Na2dStrides lse_strides;
  int B, H, W, heads, head_dim;
  int kernel_size, dilation;
  float scale;              // multiplies q.k (the caller's default is head_dim ** -0.5)
};

}  // namespace cuda
}  // namespace megamed
