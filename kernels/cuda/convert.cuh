// float <-> storage-type conversions shared by the plain-CUDA kernels (patch.cu, na2d_block.cuh).
// Include after <cuda_fp16.h> and <cuda_bf16.h> (or, in tests/cuda_emu, the emulator's stand-ins).
#pragma once

namespace megamed {
namespace cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// round to nearest even, like the conversions torch's own kernels use
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

}  // namespace cuda
}  // namespace megamed
