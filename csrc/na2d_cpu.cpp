// CPU kernels for 2-D neighborhood attention, forward and backward:
//
//   megamed::na2d_cpp_fwd(q, k, v, kernel_size, dilation, scale) -> (out, lse)
//   megamed::na2d_cpp_bwd(grad_out, q, k, v, out, lse, kernel_size, dilation, scale) -> (dq, dk, dv)
//
// q, k, v, out, grad_out: [B, H, W, heads, D], any strides (e.g. slices of a packed qkv
// projection), fp32 / fp64 / fp16 / bf16; lse: float32 [B, H, W, heads], the log-sum-exp of the
// scaled logits (the layout megamed.ops.natten documents, so either op pairs with any other
// backend's). Outputs are fresh contiguous tensors in the input dtype (lse float32). Arithmetic is
// in float32 (float64 for fp64 inputs).
//
// Work is split with at::parallel_for (torch's own thread pool and thread count):
//   forward:  over (batch * head, query row); each thread walks a contiguous range of rows, so a
//             ring of the k window rows of K/V, staged once, slides down the image (one new row
//             staged per query row);
//   backward: over blocks of query rows, in two race-free phases (see na2d_cpu_isa.h).
// The arithmetic lives in na2d_cpu_isa.h, compiled here once per instruction set (AVX-512, AVX2,
// baseline) and chosen at run time from at::get_cpu_capability(), i.e. what torch itself uses
// (ATEN_CPU_CAPABILITY=avx2/default lowers it); fp64 always runs the baseline copy.
//
// Autograd and fake (meta) kernels are registered from Python: megamed/ops/_cpp.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "na2d_cpu.h"

#if !defined(__GNUC__)
#error "na2d_cpu.cpp uses GCC/Clang vector extensions"
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // the AVX staging transposes (used only inside target-attributed functions)
#define MEGAMED_NA_X86 1
#define MEGAMED_NA_NS avx512
#define MEGAMED_NA_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define MEGAMED_NA_VBYTES 64
#include "na2d_cpu_isa.h"
#undef MEGAMED_NA_NS
#undef MEGAMED_NA_TARGET
#undef MEGAMED_NA_VBYTES

#define MEGAMED_NA_NS avx2
#define MEGAMED_NA_TARGET __attribute__((target("avx2,fma,f16c")))
#define MEGAMED_NA_VBYTES 32
#include "na2d_cpu_isa.h"
#undef MEGAMED_NA_NS
#undef MEGAMED_NA_TARGET
#undef MEGAMED_NA_VBYTES
#else
#define MEGAMED_NA_X86 0
#endif

#define MEGAMED_NA_NS base
#define MEGAMED_NA_TARGET
#define MEGAMED_NA_VBYTES 16
#include "na2d_cpu_isa.h"
#undef MEGAMED_NA_NS
#undef MEGAMED_NA_TARGET
#undef MEGAMED_NA_VBYTES

namespace megamed::na2d {
namespace {

enum class Isa { base, avx2, avx512 };

// torch's capability (respects ATEN_CPU_CAPABILITY), confirmed against the features our
// target attributes enable.
Isa pick_isa() {
#if MEGAMED_NA_X86
  const std::string cap = at::get_cpu_capability();
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (cap == "AVX512" && avx512) return Isa::avx512;
  if ((cap == "AVX512" || cap == "AVX2") && avx2) return Isa::avx2;
#endif
  return Isa::base;
}

Isa isa() {
  static const Isa chosen = pick_isa();
  return chosen;
}

const char* isa_name(Isa i) { return i == Isa::avx512 ? "avx512" : i == Isa::avx2 ? "avx2" : "base"; }

// fp64 is a checking precision: it runs the baseline copy only (2 lanes), which keeps a third of
// the template instantiations out of the build and tests the baseline on every machine.
template <typename scalar_t>
void run_forward(const Problem& P) {
#if MEGAMED_NA_X86
  if constexpr (!std::is_same_v<scalar_t, double>) {
    switch (isa()) {
      case Isa::avx512: return avx512::forward<scalar_t>(P);
      case Isa::avx2: return avx2::forward<scalar_t>(P);
      default: break;
    }
  }
#endif
  base::forward<scalar_t>(P);
}

template <typename scalar_t>
void run_backward(const Problem& P) {
#if MEGAMED_NA_X86
  if constexpr (!std::is_same_v<scalar_t, double>) {
    switch (isa()) {
      case Isa::avx512: return avx512::backward<scalar_t>(P);
      case Isa::avx2: return avx2::backward<scalar_t>(P);
      default: break;
    }
  }
#endif
  base::backward<scalar_t>(P);
}

// ---------------------------------------------------------------------------------------------
// argument checks: ValueError naming the argument, like megamed.ops.natten.check_na_args
// ---------------------------------------------------------------------------------------------

constexpr const char* kFwd = "megamed::na2d_cpp_fwd";
constexpr const char* kBwd = "megamed::na2d_cpp_bwd";

void check_like_q(const at::Tensor& t, const at::Tensor& q, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == q.sizes(), op, ": ", name, " shape ", t.sizes(), " != q shape ", q.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == q.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(), " != q dtype ",
                    q.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ", q.device());
}

void check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t kernel_size, int64_t dilation,
                const char* op) {
  TORCH_CHECK_VALUE(q.dim() == 5, op, ": q must be [B, H, W, heads, D], got shape ", q.sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
                    ": q must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK_VALUE(q.device().is_cpu(), op, ": q must be a CPU tensor, got ", q.device());
  check_like_q(k, q, op, "k");
  check_like_q(v, q, op, "v");
  TORCH_CHECK_VALUE(kernel_size >= 1 && kernel_size % 2 == 1, op, ": kernel_size must be a positive odd int, got ",
                    kernel_size);
  TORCH_CHECK_VALUE(dilation >= 1, op, ": dilation must be a positive int, got ", dilation);
  // every residue class of rows (columns) must hold a whole window: ceil((H - d + 1) / d) >= k
  const int64_t H = q.size(1), W = q.size(2);
  TORCH_CHECK_VALUE(kernel_size * dilation <= std::min(H, W), op, ": kernel_size * dilation = ", kernel_size, "*",
                    dilation, " must be <= min(H, W) = ", std::min(H, W), " (q is ", q.sizes(), ")");
}

Strides5 strides5(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

// Test hook: MEGAMED_NA_CPP_POISON=1 fills the outputs the kernels write element by element with
// NaN first, so an element a kernel forgets shows up (megamed.flags.NA_CPP_POISON_ENV).
bool poison() {
  const char* s = std::getenv("MEGAMED_NA_CPP_POISON");
  return s != nullptr && s[0] != '\0' && std::strcmp(s, "0") != 0;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> na2d_cpp_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                int64_t kernel_size, int64_t dilation, double scale) {
  check_args(q, k, v, kernel_size, dilation, kFwd);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty(q.sizes().slice(0, 4), q.options().dtype(at::kFloat));
  if (poison()) {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
    lse.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  if (lse.numel() == 0) return {out, lse};
  if (q.size(4) == 0) {  // no features: every logit is 0, so lse = log(k^2)
    lse.fill_(std::log(static_cast<double>(kernel_size * kernel_size)));
    return {out, lse};
  }
  Problem P{};
  P.B = q.size(0), P.H = q.size(1), P.W = q.size(2), P.heads = q.size(3), P.D = q.size(4);
  P.k = kernel_size, P.dil = dilation, P.scale = scale;
  P.q = q.const_data_ptr(), P.k_ = k.const_data_ptr(), P.v = v.const_data_ptr();
  P.sq = strides5(q), P.sk = strides5(k), P.sv = strides5(v);
  P.out = out.mutable_data_ptr(), P.lse_out = lse.mutable_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), kFwd, [&] { run_forward<scalar_t>(P); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> na2d_cpp_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                                            const at::Tensor& k, const at::Tensor& v,
                                                            const at::Tensor& out, const at::Tensor& lse,
                                                            int64_t kernel_size, int64_t dilation, double scale) {
  check_args(q, k, v, kernel_size, dilation, kBwd);
  check_like_q(grad_out, q, kBwd, "grad_out");
  check_like_q(out, q, kBwd, "out");
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat, kBwd, ": lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.sizes() == q.sizes().slice(0, 4), kBwd, ": lse must be [B, H, W, heads] = ",
                    q.sizes().slice(0, 4), ", got shape ", lse.sizes());
  TORCH_CHECK_VALUE(lse.device() == q.device(), kBwd, ": lse is on ", lse.device(), " but q is on ", q.device());
  // dK / dV are sums over the queries of a window: accumulated in float32 (float64), zeroed here
  const auto acc = at::toOpMathType(q.scalar_type());
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::zeros(q.sizes(), q.options().dtype(acc));
  at::Tensor dv = at::zeros(q.sizes(), q.options().dtype(acc));
  if (poison()) dq.fill_(std::numeric_limits<double>::quiet_NaN());
  if (q.numel() == 0) {
    dq.zero_();
    return {dq, dk.to(q.scalar_type()), dv.to(q.scalar_type())};
  }
  Problem P{};
  P.B = q.size(0), P.H = q.size(1), P.W = q.size(2), P.heads = q.size(3), P.D = q.size(4);
  P.k = kernel_size, P.dil = dilation, P.scale = scale;
  P.q = q.const_data_ptr(), P.k_ = k.const_data_ptr(), P.v = v.const_data_ptr();
  P.sq = strides5(q), P.sk = strides5(k), P.sv = strides5(v);
  P.go = grad_out.const_data_ptr(), P.o = out.const_data_ptr();
  P.sgo = strides5(grad_out), P.so = strides5(out);
  P.lse_in = lse.const_data_ptr<float>();
  P.slse = {lse.stride(0), lse.stride(1), lse.stride(2), lse.stride(3), 0};
  P.dq = dq.mutable_data_ptr(), P.dk_acc = dk.mutable_data_ptr(), P.dv_acc = dv.mutable_data_ptr();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), kBwd, [&] { run_backward<scalar_t>(P); });
  return {dq, dk.to(q.scalar_type()), dv.to(q.scalar_type())};
}

std::string na2d_cpp_isa() { return isa_name(isa()); }

}  // namespace megamed::na2d

// The namespace's one TORCH_LIBRARY is in module.cpp; these schemas join it.
TORCH_LIBRARY_FRAGMENT(megamed, m) {
  m.set_python_module("megamed.ops._cpp");  // where the fake kernels and autograd are registered
  m.def("na2d_cpp_fwd(Tensor q, Tensor k, Tensor v, int kernel_size, int dilation, float scale) -> (Tensor, Tensor)");
  m.def("na2d_cpp_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int kernel_size, "
        "int dilation, float scale) -> (Tensor, Tensor, Tensor)");
  // which instruction-set copy of the kernels this machine runs ("avx512", "avx2" or "base")
  m.def("na2d_cpp_isa() -> str", &megamed::na2d::na2d_cpp_isa);
}

TORCH_LIBRARY_IMPL(megamed, CPU, m) {
  m.impl("na2d_cpp_fwd", &megamed::na2d::na2d_cpp_fwd);
  m.impl("na2d_cpp_bwd", &megamed::na2d::na2d_cpp_bwd);
}
