// Plain-CUDA patch_merge / patch_split kernels (no torch headers: raw pointers, element strides,
// a cudaStream_t). The torch glue lives in csrc/cuda/patch_cuda.cpp.
//
// Channels-last, f = factor:
//   patch_merge: x [B, H, W, C] -> out [B, H/f, W/f, Cout] = blocks(x) @ weight^T (+ bias),
//                blocks(x) [B*(H/f)*(W/f), f*f*C] flattens each f x f block in (i, j, c) order.
//   patch_split: y = x @ weight^T (+ bias), x [B, h, w, Cin], weight [f*f*Cout, Cin]; column
//                (i*f + j)*Cout + c of pixel (b, hi, wi) goes to out[b, hi*f + i, wi*f + j, c];
//                with skip: out = skip + lerp[c] * (y - skip).
// Both are one implicit GEMM: the regroup happens in the tile loads / the epilogue stores, never
// as a separate permute copy. Accumulation is fp32 for every input type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace megamed {
namespace cuda {

// Element strides of a 4-D channels-last view [B, H, W, C] (any strided view is fine).
struct Strides4 {
  int64_t b, h, w, c;
};

template <typename T>
struct PatchMergeParams {
  const T* x;          // [B, H, W, C], strides x_strides
  Strides4 x_strides;
  int64_t B, H, W, C;
  int64_t factor;
  const T* weight;     // [Cout, factor*factor*C], contiguous
  const T* bias;       // [Cout] or nullptr
  int64_t Cout;
  T* out;              // [B, H/f, W/f, Cout], contiguous
};

template <typename T>
struct PatchSplitParams {
  const T* x;          // [B, h, w, Cin], strides x_strides
  Strides4 x_strides;
  int64_t B, h, w, Cin;
  int64_t factor;
  const T* weight;     // [f*f*Cout, Cin], contiguous
  const T* bias;       // [f*f*Cout] or nullptr
  int64_t Cout;
  const T* skip;       // [B, h*f, w*f, Cout], strides skip_strides, or nullptr (then lerp is ignored)
  Strides4 skip_strides;
  const float* lerp;   // lerp[c * lerp_stride]; lerp_stride 0 for one scalar gate, 1 for [Cout]
  int64_t lerp_stride;
  T* out;              // [B, h*f, w*f, Cout], contiguous
};

// Enqueue on `stream`; returns the launch error (cudaSuccess if none). Instantiated for
// float, __half and __nv_bfloat16.
template <typename T>
cudaError_t launch_patch_merge(const PatchMergeParams<T>& p, cudaStream_t stream);
template <typename T>
cudaError_t launch_patch_split(const PatchSplitParams<T>& p, cudaStream_t stream);

extern template cudaError_t launch_patch_merge<float>(const PatchMergeParams<float>&, cudaStream_t);
extern template cudaError_t launch_patch_merge<__half>(const PatchMergeParams<__half>&, cudaStream_t);
extern template cudaError_t launch_patch_merge<__nv_bfloat16>(const PatchMergeParams<__nv_bfloat16>&, cudaStream_t);
extern template cudaError_t launch_patch_split<float>(const PatchSplitParams<float>&, cudaStream_t);
extern template cudaError_t launch_patch_split<__half>(const PatchSplitParams<__half>&, cudaStream_t);
extern template cudaError_t launch_patch_split<__nv_bfloat16>(const PatchSplitParams<__nv_bfloat16>&, cudaStream_t);

}  // namespace cuda
}  // namespace megamed
