// CUDA glue for the neighborhood-attention forward kernel (kernels/cuda/na2d.cu):
//
//   megamed::na2d_cuda_fwd(Tensor q, Tensor k, Tensor v, int kernel_size, int dilation, float scale)
//       -> (Tensor out, Tensor lse)
//
// q, k, v [B, H, W, heads, D] CUDA tensors (float32 / float16 / bfloat16, D in {32, 64, 128}, the D
// axis contiguous, other strides free) -> out [B, H, W, heads, D] contiguous in q's dtype and lse
// [B, H, W, heads] float32 contiguous (natural-log log-sum-exp of the scaled logits), the layout
// megamed.ops.natten documents, so any backend's backward consumes it.
//
// Compiled only with CUDA (CMakeLists.txt), so the schema is defined here, in a fragment of the
// `megamed` library, not in csrc/module.cpp: a CPU build has no such op at all (the Python backend
// megamed.ops._cuda_na then refuses with "built without CUDA"). Its fake (meta) kernel is
// registered from megamed.ops._cuda_na, named by set_python_module as torch requires.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "na2d.cuh"

namespace megamed {
namespace {

template <typename scalar_t>
struct NaCudaType;
template <>
struct NaCudaType<float> { using type = float; };
template <>
struct NaCudaType<at::Half> { using type = __half; };
template <>
struct NaCudaType<at::BFloat16> { using type = __nv_bfloat16; };

cuda::Na2dStrides na_strides(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

std::tuple<at::Tensor, at::Tensor> na2d_cuda_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 int64_t kernel_size, int64_t dilation, double scale) {
  constexpr const char* op = "megamed::na2d_cuda_fwd";
  TORCH_CHECK(q.dim() == 5, op, ": q must be [B, H, W, heads, D], got shape ", q.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"v", v}}) {
    TORCH_CHECK(t.sizes() == q.sizes(), op, ": ", name, " shape ", t.sizes(), " != q shape ", q.sizes());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(), " != q dtype ",
                q.scalar_type());
    TORCH_CHECK(t.device() == q.device(), op, ": ", name, " device ", t.device(), " != q device ", q.device());
  }
  TORCH_CHECK(q.is_cuda(), op, ": q, k, v must be CUDA tensors, got ", q.device());
  const at::ScalarType dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, ": dtype ", dt,
              " is not supported; use float32, float16 or bfloat16");
  const int64_t B = q.size(0), H = q.size(1), W = q.size(2), heads = q.size(3), D = q.size(4);
  TORCH_CHECK(cuda::na2d_fwd_head_dim_supported(static_cast<int>(D)), op, ": head dim ", D,
              " is not supported by the CUDA kernel (32, 64 or 128)");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"q", q}, {"k", k}, {"v", v}})
    TORCH_CHECK(t.stride(4) == 1, op, ": ", name, " must be contiguous along D (stride 1), got strides ",
                t.strides());
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1, op, ": kernel_size must be a positive odd int, got ",
              kernel_size);
  TORCH_CHECK(dilation >= 1, op, ": dilation must be >= 1, got ", dilation);
  TORCH_CHECK(kernel_size * dilation <= std::min(H, W), op, ": kernel_size * dilation = ", kernel_size, "*",
              dilation, " must be <= min(H, W) = ", std::min(H, W));
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(B * heads <= kIntMax && H <= kIntMax && W <= kIntMax, op, ": sizes too large: ", q.sizes());

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({B, H, W, heads}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};

  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    using T = typename NaCudaType<scalar_t>::type;
    cuda::Na2dFwdParams<T> p;
    p.q = reinterpret_cast<const T*>(q.const_data_ptr<scalar_t>());
    p.k = reinterpret_cast<const T*>(k.const_data_ptr<scalar_t>());
    p.v = reinterpret_cast<const T*>(v.const_data_ptr<scalar_t>());
    p.q_strides = na_strides(q);
    p.k_strides = na_strides(k);
    p.v_strides = na_strides(v);
    p.out = reinterpret_cast<T*>(out.mutable_data_ptr<scalar_t>());
    p.out_strides = na_strides(out);
    p.lse = lse.mutable_data_ptr<float>();
    p.lse_strides = na_strides(lse);
    p.B = static_cast<int>(B);
    p.H = static_cast<int>(H);
    p.W = static_cast<int>(W);
    p.heads = static_cast<int>(heads);
    p.head_dim = static_cast<int>(D);
    p.kernel_size = static_cast<int>(kernel_size);
    p.dilation = static_cast<int>(dilation);
    p.scale = static_cast<float>(scale);
    C10_CUDA_CHECK(cuda::megamed_na2d_fwd_cuda<T>(p, c10::cuda::getCurrentCUDAStream(q.device().index()).stream()));
  };
  switch (dt) {
    case at::kFloat: run(float{}); break;
    case at::kHalf: run(at::Half{}); break;
    default: run(at::BFloat16{}); break;
  }
  return {out, lse};
}

}  // namespace
}  // namespace megamed

TORCH_LIBRARY_FRAGMENT(megamed, m) {
  m.set_python_module("megamed.ops._cuda_na");  // where its fake kernel is registered
  m.def("na2d_cuda_fwd(Tensor q, Tensor k, Tensor v, int kernel_size, int dilation, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(megamed, CUDA, m) { m.impl("na2d_cuda_fwd", &megamed::na2d_cuda_fwd); }
