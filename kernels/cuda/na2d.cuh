// Plain-CUDA 2-D neighborhood attention forward (no torch headers: raw pointers, element strides,
// a cudaStream_t). The torch glue lives in csrc/cuda/na2d_cuda.cpp; the kernel in na2d.cu, its
// per-block body in na2d_block.cuh (design notes there), the parameter struct in na2d_params.h.
//
// Semantics (NATTEN, as megamed/ops/reference.py): q, k, v [B, H, W, heads, D]; query (i, j)
// attends to exactly K*K keys, rows s_i .. s_i + K - 1 with s_i = clamp(i - K/2, 0, H - K)
// (columns likewise). With dilation d, rows/columns split by residue mod d into sub-grids of
// n_r = ceil((H - r) / d) positions and the rule applies inside each sub-grid.
//
//   out [B, H, W, heads, D] = softmax(scale * q.k over the window) @ v   (input dtype)
//   lse [B, H, W, heads]    = natural-log log-sum-exp of the SCALED logits, float32
//
// Requirements (checked by megamed_na2d_fwd_cuda, which returns cudaErrorInvalidValue otherwise):
// D (head_dim) in {32, 64, 128}; the D axis contiguous (stride 1) in q, k, v and out; other
// strides arbitrary (q/k/v may be slices of one packed qkv tensor); kernel_size odd >= 1,
// dilation >= 1, kernel_size * dilation <= min(H, W).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "na2d_params.h"  // Na2dStrides, Na2dFwdParams (plain C++, shared with the CPU emulator)

namespace megamed {
namespace cuda {

// True for the head dims the kernel is instantiated for (32, 64, 128).
bool na2d_fwd_head_dim_supported(int head_dim);

// Enqueue the forward on `stream`; returns the argument or launch error (cudaSuccess if none).
// Instantiated for float (SIMT fp32 math), __half and __nv_bfloat16 (tensor cores, fp32 softmax
// and accumulation).
template <typename T>
cudaError_t megamed_na2d_fwd_cuda(const Na2dFwdParams<T>& p, cudaStream_t stream);

extern template cudaError_t megamed_na2d_fwd_cuda<float>(const Na2dFwdParams<float>&, cudaStream_t);
extern template cudaError_t megamed_na2d_fwd_cuda<__half>(const Na2dFwdParams<__half>&, cudaStream_t);
extern template cudaError_t megamed_na2d_fwd_cuda<__nv_bfloat16>(const Na2dFwdParams<__nv_bfloat16>&,
                                                                 cudaStream_t);

}  // namespace cuda
}  // namespace megamed
