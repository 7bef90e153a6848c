// Neighborhood-attention forward: the __global__ kernel and its host launcher (semantics in
// na2d.cuh; the block body and its design notes in na2d_block.cuh).
//
// Instantiations: head dim 32, 64, 128 x {float, __half, __nv_bfloat16} (9 kernels), chosen at run
// time from p.head_dim. fp16/bf16 use WMMA tensor cores (bf16 WMMA needs sm_80+; we build sm_80 and
// sm_90 only). Shared memory is dynamic (above the 48 KB default for D = 64/128), so each launch
// first raises the kernel's limit with cudaFuncSetAttribute.
#include <mma.h>

#include "na2d.cuh"
#include "na2d_block.cuh"

namespace megamed {
namespace cuda {
namespace {

template <typename T, int HD>
__global__ void __launch_bounds__(na2d::kThreads) na2d_fwd_kernel(const Na2dFwdParams<T> p) {
  extern __shared__ __align__(128) unsigned char smem[];
  na2d::fwd_block<T, HD>(p, smem, static_cast<int>(threadIdx.x), static_cast<int64_t>(blockIdx.x));
}

template <typename T, int HD>
cudaError_t launch(const Na2dFwdParams<T>& p, cudaStream_t stream) {
  const na2d::Grid g = na2d::make_grid(p.B, p.H, p.W, p.heads, p.dilation);
  if (g.blocks == 0) return cudaSuccess;
  if (g.blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;  // grid.x limit
  constexpr size_t bytes = na2d::Layout<T, HD>::BYTES;
  cudaError_t err = cudaFuncSetAttribute(na2d_fwd_kernel<T, HD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  na2d_fwd_kernel<T, HD><<<static_cast<unsigned>(g.blocks), na2d::kThreads, bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

bool na2d_fwd_head_dim_supported(int head_dim) { return head_dim == 32 || head_dim == 64 || head_dim == 128; }

template <typename T>
cudaError_t megamed_na2d_fwd_cuda(const Na2dFwdParams<T>& p, cudaStream_t stream) {
  // The glue checks all of this with messages; here only so a bad call cannot read out of bounds.
  if (p.B < 0 || p.heads < 0 || p.kernel_size < 1 || p.kernel_size % 2 == 0 || p.dilation < 1 ||
      int64_t(p.kernel_size) * p.dilation > (p.H < p.W ? p.H : p.W))
    return cudaErrorInvalidValue;
  switch (p.head_dim) {
    case 32: return launch<T, 32>(p, stream);
    case 64: return launch<T, 64>(p, stream);
    case 128: return launch<T, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

template cudaError_t megamed_na2d_fwd_cuda<float>(const Na2dFwdParams<float>&, cudaStream_t);
template cudaError_t megamed_na2d_fwd_cuda<__half>(const Na2dFwdParams<__half>&, cudaStream_t);
template cudaError_t megamed_na2d_fwd_cuda<__nv_bfloat16>(const Na2dFwdParams<__nv_bfloat16>&, cudaStream_t);

}  // namespace cuda
}  // namespace megamed
