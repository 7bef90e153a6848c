// CUDA glue for megamed::patch_merge / megamed::patch_split: checks, output allocation and the
// launch on torch's current stream. Compiled only when the torch we build against has CUDA
// (CMakeLists.txt); the kernels themselves are plain CUDA in kernels/cuda/patch.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "patch.cuh"
#include "patch.h"

namespace megamed {
namespace {

// at:: scalar types -> the CUDA types the kernels are instantiated for (same bit layout).
template <typename scalar_t>
struct CudaType;
template <>
struct CudaType<float> { using type = float; };
template <>
struct CudaType<at::Half> { using type = __half; };
template <>
struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

cuda::Strides4 strides4(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

template <typename scalar_t>
const typename CudaType<scalar_t>::type* ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const typename CudaType<scalar_t>::type*>(t.const_data_ptr<scalar_t>()) : nullptr;
}

// Calls f(scalar_t{}) for the dtypes the kernels are instantiated for.
template <typename F>
void dispatch_cuda_dtype(at::ScalarType dt, const char* op, F&& f) {
  switch (dt) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(at::Half{});
    case at::kBFloat16: return f(at::BFloat16{});
    default:
      TORCH_CHECK(false, op, " (CUDA kernel): x dtype ", dt, " is not supported on CUDA; use float32, float16 or bfloat16");
  }
}

at::Tensor patch_merge_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            int64_t factor) {
  const MergeShape s = check_patch_merge(x, weight, bias, factor);
  TORCH_CHECK(x.is_cuda(), "megamed::patch_merge (CUDA kernel): x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({s.B, s.h, s.w, s.Cout}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor w = weight.contiguous();  // x stays strided: the kernel gathers through its strides
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  dispatch_cuda_dtype(x.scalar_type(), "megamed::patch_merge", [&](auto tag) {
    using scalar_t = decltype(tag);
    using T = typename CudaType<scalar_t>::type;
    const cuda::PatchMergeParams<T> p{ptr<scalar_t>(x), strides4(x), s.B, s.H, s.W, s.C, factor,
                                      ptr<scalar_t>(w), ptr<scalar_t>(b), s.Cout,
                                      reinterpret_cast<T*>(out.mutable_data_ptr<scalar_t>())};
    C10_CUDA_CHECK(cuda::launch_patch_merge<T>(p, c10::cuda::getCurrentCUDAStream(x.device().index()).stream()));
  });
  return out;
}

at::Tensor patch_split_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            int64_t factor, const std::optional<at::Tensor>& skip,
                            const std::optional<at::Tensor>& lerp) {
  const SplitShape s = check_patch_split(x, weight, bias, factor, skip, lerp);
  TORCH_CHECK(x.is_cuda(), "megamed::patch_split (CUDA kernel): x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({s.B, s.h * factor, s.w * factor, s.Cout}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor sk = skip.has_value() ? *skip : at::Tensor();  // strided, read in the epilogue
  // The gate is read as fp32 whatever its dtype: [Cout] (stride 1) or one scalar (stride 0).
  const at::Tensor l = lerp.has_value() ? lerp->to(at::kFloat).contiguous() : at::Tensor();
  dispatch_cuda_dtype(x.scalar_type(), "megamed::patch_split", [&](auto tag) {
    using scalar_t = decltype(tag);
    using T = typename CudaType<scalar_t>::type;
    const cuda::PatchSplitParams<T> p{ptr<scalar_t>(x), strides4(x), s.B, s.h, s.w, s.Cin, factor,
                                      ptr<scalar_t>(w), ptr<scalar_t>(b), s.Cout,
                                      ptr<scalar_t>(sk), sk.defined() ? strides4(sk) : cuda::Strides4{0, 0, 0, 0},
                                      l.defined() ? l.const_data_ptr<float>() : nullptr,
                                      l.defined() && l.dim() == 1 ? 1 : 0,
                                      reinterpret_cast<T*>(out.mutable_data_ptr<scalar_t>())};
    C10_CUDA_CHECK(cuda::launch_patch_split<T>(p, c10::cuda::getCurrentCUDAStream(x.device().index()).stream()));
  });
  return out;
}

}  // namespace
}  // namespace megamed

TORCH_LIBRARY_IMPL(megamed, CUDA, m) {
  m.impl("patch_merge", &megamed::patch_merge_cuda);
  m.impl("patch_split", &megamed::patch_split_cuda);
}
