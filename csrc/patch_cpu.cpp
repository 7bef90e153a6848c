// CPU kernels for megamed::patch_merge / megamed::patch_split (semantics in patch.h).
//
// Both ops are one GEMM whose rows are regrouped pixels. Instead of materialising the regroup
// (x.view(...).permute(...).contiguous(), a full extra copy of x or of the output), each thread
// works on a tile of GEMM rows:
//   1. gather: read the tile's inputs through x's strides into a small per-thread buffer A [T, K],
//   2. GEMM:   acc[T, N] = A @ W^T with at::mm_out in x's dtype. MKL / oneDNN accumulate fp16/bf16
//      products in fp32 (bf16 uses AMX where the CPU has it) and round the tile once to x's dtype,
//      as F.linear does. It runs single-threaded inside our at::parallel_for region, so threads
//      never oversubscribe,
//   3. store:  in fp32 (fp64 for double): add bias, (patch_split) scatter into the upsampled layout
//      and blend with skip through lerp, cast to the output dtype — each output is written once.
// The output is always a fresh contiguous channels-last tensor; x and skip may be any strided view.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "patch.h"

namespace megamed {
namespace {

// GEMM rows per tile: enough tiles to keep every thread busy (4 per thread), but at least 16
// rows so BLAS amortises packing the weight, and at most 512 so the per-thread buffers stay in
// L2 (512 x K=512 fp32 is 1 MiB).
int64_t tile_rows(int64_t M) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t t = (M + 4 * threads - 1) / (4 * threads);
  return std::clamp<int64_t>((t + 7) / 8 * 8, 16, 512);
}

// dst[i] = src[i * stride] for i < n.
template <typename scalar_t>
inline void load_strided(scalar_t* __restrict__ dst, const scalar_t* __restrict__ src, int64_t n, int64_t stride) {
  if (stride == 1) {
    std::copy(src, src + n, dst);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i * stride];
  }
}

// The weight contiguous and detached: at::mm_out runs on worker threads whose autograd state is
// not ours, so nothing handed to it may require grad.
at::Tensor weight_for_gemm(const at::Tensor& weight) { return weight.detach().contiguous(); }

template <typename scalar_t>
void patch_merge_kernel(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias_acc,
                        at::Tensor& out, const MergeShape& s, int64_t f) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t sb = x.stride(0), sh = x.stride(1), sw = x.stride(2), sc = x.stride(3);
  const acc_t* bp = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t M = s.B * s.h * s.w, K = s.K, Cout = s.Cout, C = s.C;
  const int64_t T = tile_rows(M), n_tiles = (M + T - 1) / T;
  const at::Tensor wt = w.t();  // [K, Cout] view, BLAS handles the transpose

  at::parallel_for(0, n_tiles, 1, [&](int64_t t0, int64_t t1) {
    // Per-thread scratch, reused for every tile of this chunk.
    at::Tensor a = at::empty({T, K}, w.options());       // packed blocks
    at::Tensor acc = at::empty({T, Cout}, w.options());  // GEMM result
    scalar_t* ap = a.mutable_data_ptr<scalar_t>();
    const scalar_t* cp = acc.const_data_ptr<scalar_t>();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * T, rows = std::min(T, M - r0);
      // 1. gather: row r is block (b, hi, wi); its K values in (i, j, c) order are
      //    x[b, hi*f + i, wi*f + j, c].
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = r0 + r, b = row / (s.h * s.w), hi = (row / s.w) % s.h, wi = row % s.w;
        const scalar_t* src = xp + b * sb + hi * f * sh + wi * f * sw;
        scalar_t* dst = ap + r * K;
        for (int64_t i = 0; i < f; ++i)
          for (int64_t j = 0; j < f; ++j) load_strided(dst + (i * f + j) * C, src + i * sh + j * sw, C, sc);
      }
      // 2. acc[rows, Cout] = A[rows, K] @ W^T
      at::Tensor acc_rows = acc.narrow(0, 0, rows);
      at::mm_out(acc_rows, a.narrow(0, 0, rows), wt);
      // 3. store (+ bias): output rows are contiguous, row r of the tile is out row r0 + r.
      scalar_t* dst = op + r0 * Cout;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t o = 0; o < Cout; ++o)
          dst[r * Cout + o] = static_cast<scalar_t>(static_cast<acc_t>(cp[r * Cout + o]) + (bp ? bp[o] : acc_t(0)));
    }
  });
}

template <typename scalar_t>
void patch_split_kernel(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias_acc,
                        const at::Tensor& skip, const at::Tensor& lerp_acc, at::Tensor& out, const SplitShape& s,
                        int64_t f) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t xb = x.stride(0), xh = x.stride(1), xw = x.stride(2), xc = x.stride(3);
  const acc_t* bp = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
  const bool blend = skip.defined();
  const scalar_t* sp = blend ? skip.const_data_ptr<scalar_t>() : nullptr;
  const int64_t kb = blend ? skip.stride(0) : 0, kh = blend ? skip.stride(1) : 0, kw = blend ? skip.stride(2) : 0,
                kc = blend ? skip.stride(3) : 0;
  const acc_t* lp = blend ? lerp_acc.const_data_ptr<acc_t>() : nullptr;
  const int64_t lc = blend && lerp_acc.dim() == 1 ? 1 : 0;  // 0-d lerp: same gate for every channel
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t M = s.B * s.h * s.w, Cin = s.Cin, N = s.N, Cout = s.Cout;
  const int64_t H = s.h * f, W = s.w * f;  // output spatial size
  const int64_t T = tile_rows(M), n_tiles = (M + T - 1) / T;
  const at::Tensor wt = w.t();  // [Cin, N]

  at::parallel_for(0, n_tiles, 1, [&](int64_t t0, int64_t t1) {
    at::Tensor a = at::empty({T, Cin}, w.options());  // input pixels of the tile
    at::Tensor acc = at::empty({T, N}, w.options());  // their f*f*Cout outputs each
    scalar_t* ap = a.mutable_data_ptr<scalar_t>();
    const scalar_t* cp = acc.const_data_ptr<scalar_t>();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * T, rows = std::min(T, M - r0);
      // 1. gather: row r is input pixel (b, hi, wi).
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = r0 + r, b = row / (s.h * s.w), hi = (row / s.w) % s.h, wi = row % s.w;
        load_strided(ap + r * Cin, xp + b * xb + hi * xh + wi * xw, Cin, xc);
      }
      // 2. acc[rows, N] = A[rows, Cin] @ W^T
      at::Tensor acc_rows = acc.narrow(0, 0, rows);
      at::mm_out(acc_rows, a.narrow(0, 0, rows), wt);
      // 3. scatter: column n = (i*f + j)*Cout + c of row (b, hi, wi) lands at
      //    out[b, hi*f + i, wi*f + j, c]; fused bias and skip + lerp * (y - skip).
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = r0 + r, b = row / (s.h * s.w), hi = (row / s.w) % s.h, wi = row % s.w;
        for (int64_t i = 0; i < f; ++i) {
          for (int64_t j = 0; j < f; ++j) {
            const int64_t n0 = (i * f + j) * Cout, y = hi * f + i, xo = wi * f + j;
            const scalar_t* src = cp + r * N + n0;
            scalar_t* dst = op + ((b * H + y) * W + xo) * Cout;
            if (blend) {
              const scalar_t* sk = sp + b * kb + y * kh + xo * kw;
              for (int64_t c = 0; c < Cout; ++c) {
                const acc_t v = static_cast<acc_t>(src[c]) + (bp ? bp[n0 + c] : acc_t(0));
                const acc_t k = static_cast<acc_t>(sk[c * kc]);
                dst[c] = static_cast<scalar_t>(k + lp[c * lc] * (v - k));
              }
            } else {
              for (int64_t c = 0; c < Cout; ++c)
                dst[c] = static_cast<scalar_t>(static_cast<acc_t>(src[c]) + (bp ? bp[n0 + c] : acc_t(0)));
            }
          }
        }
      }
    }
  });
}

at::Tensor optional_to_acc(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  return t.has_value() ? t->detach().to(acc).contiguous() : at::Tensor();
}

}  // namespace

at::Tensor patch_merge_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           int64_t factor) {
  const MergeShape s = check_patch_merge(x, weight, bias, factor);
  TORCH_CHECK(x.device().is_cpu(), "megamed::patch_merge (CPU kernel): x must be on CPU, got ", x.device());
  at::Tensor out = at::empty({s.B, s.h, s.w, s.Cout}, x.options());
  if (out.numel() == 0) return out;
  const auto acc = at::toOpMathType(x.scalar_type());
  const at::Tensor w = weight_for_gemm(weight), bias_acc = optional_to_acc(bias, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "megamed::patch_merge", [&] {
    patch_merge_kernel<scalar_t>(x, w, bias_acc, out, s, factor);
  });
  return out;
}

at::Tensor patch_split_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           int64_t factor, const std::optional<at::Tensor>& skip,
                           const std::optional<at::Tensor>& lerp) {
  const SplitShape s = check_patch_split(x, weight, bias, factor, skip, lerp);
  TORCH_CHECK(x.device().is_cpu(), "megamed::patch_split (CPU kernel): x must be on CPU, got ", x.device());
  at::Tensor out = at::empty({s.B, s.h * factor, s.w * factor, s.Cout}, x.options());
  if (out.numel() == 0) return out;
  const auto acc = at::toOpMathType(x.scalar_type());
  const at::Tensor w = weight_for_gemm(weight), bias_acc = optional_to_acc(bias, acc);
  const at::Tensor lerp_acc = optional_to_acc(lerp, acc);
  const at::Tensor skip_t = skip.has_value() ? skip->detach() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "megamed::patch_split", [&] {
    patch_split_kernel<scalar_t>(x, w, bias_acc, skip_t, lerp_acc, out, s, factor);
  });
  return out;
}

}  // namespace megamed

TORCH_LIBRARY_IMPL(megamed, CPU, m) {
  m.impl("patch_merge", &megamed::patch_merge_cpu);
  m.impl("patch_split", &megamed::patch_split_cpu);
}
