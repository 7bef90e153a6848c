// Argument checks and shapes shared by the CPU and CUDA implementations of
//   megamed::patch_merge(Tensor x, Tensor weight, Tensor? bias, int factor) -> Tensor
//   megamed::patch_split(Tensor x, Tensor weight, Tensor? bias, int factor, Tensor? skip, Tensor? lerp) -> Tensor
//
// Layout is channels-last. With f = factor:
//   patch_merge: x [B, H, W, C] -> out [B, H/f, W/f, Cout]; each f x f block is flattened in
//                (row-in-block, column-in-block, channel) order = K = f*f*C values, times weight[Cout, K]^T.
//   patch_split: x [B, h, w, Cin] -> y = x @ weight^T, weight [f*f*Cout, Cin], regrouped in the same
//                order to out [B, h*f, w*f, Cout]; with skip [B, h*f, w*f, Cout] and lerp (0-d or [Cout])
//                out = skip + lerp * (y - skip).
// Every error is a Python ValueError (TORCH_CHECK_VALUE) naming the argument, like megamed.ops.patch.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace megamed {

// Rows of the implicit GEMM: one row per output block (merge) or per input pixel (split).
struct MergeShape {
  int64_t B, H, W, C;  // input
  int64_t h, w;        // H/f, W/f
  int64_t Cout, K;     // K = f*f*C
};

struct SplitShape {
  int64_t B, h, w, Cin;  // input
  int64_t Cout, N;       // N = f*f*Cout rows of weight
};

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", dt);
}

inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
              " does not match x dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
}

inline MergeShape check_patch_merge(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, int64_t factor) {
  constexpr const char* op = "megamed::patch_merge";
  TORCH_CHECK_VALUE(factor >= 1, op, ": factor must be >= 1, got ", factor);
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-D [B, H, W, C] (channels-last), got shape ", x.sizes());
  check_float_dtype(x, op, "x");
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  TORCH_CHECK_VALUE(H % factor == 0 && W % factor == 0, op, ": x spatial size (H, W) = (", H, ", ", W,
              ") must be divisible by factor ", factor);
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [Cout, factor*factor*C], got shape ", weight.sizes());
  check_like(weight, x, op, "weight");
  const int64_t K = factor * factor * C;
  TORCH_CHECK_VALUE(weight.size(1) == K, op, ": weight must be [Cout, factor*factor*C] = [Cout, ", K, "], got shape ",
              weight.sizes());
  const int64_t Cout = weight.size(0);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == Cout, op, ": bias must be [Cout] = [", Cout, "], got shape ",
                bias->sizes());
    check_like(*bias, x, op, "bias");
  }
  return {B, H, W, C, H / factor, W / factor, Cout, K};
}

inline SplitShape check_patch_split(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, int64_t factor,
                                    const std::optional<at::Tensor>& skip, const std::optional<at::Tensor>& lerp) {
  constexpr const char* op = "megamed::patch_split";
  TORCH_CHECK_VALUE(factor >= 1, op, ": factor must be >= 1, got ", factor);
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-D [B, h, w, Cin] (channels-last), got shape ", x.sizes());
  check_float_dtype(x, op, "x");
  const int64_t B = x.size(0), h = x.size(1), w = x.size(2), Cin = x.size(3);
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [factor*factor*Cout, Cin], got shape ", weight.sizes());
  check_like(weight, x, op, "weight");
  TORCH_CHECK_VALUE(weight.size(1) == Cin, op, ": weight must be [factor*factor*Cout, Cin] with Cin = ", Cin,
              " (x's last dim), got shape ", weight.sizes());
  const int64_t N = weight.size(0);
  TORCH_CHECK_VALUE(N % (factor * factor) == 0, op, ": weight.size(0) = ", N, " must be divisible by factor*factor = ",
              factor * factor);
  const int64_t Cout = N / (factor * factor);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be [factor*factor*Cout] = [", N,
                "], got shape ", bias->sizes());
    check_like(*bias, x, op, "bias");
  }
  TORCH_CHECK_VALUE(skip.has_value() == lerp.has_value(), op, ": skip and lerp must be given together (got skip ",
              skip.has_value() ? "set" : "None", ", lerp ", lerp.has_value() ? "set" : "None", ")");
  if (skip.has_value()) {
    TORCH_CHECK_VALUE(skip->dim() == 4 && skip->size(0) == B && skip->size(1) == h * factor &&
                    skip->size(2) == w * factor && skip->size(3) == Cout,
                op, ": skip must be [B, h*factor, w*factor, Cout] = [", B, ", ", h * factor, ", ", w * factor, ", ",
                Cout, "], got shape ", skip->sizes());
    check_like(*skip, x, op, "skip");
    TORCH_CHECK_VALUE(lerp->dim() == 0 || (lerp->dim() == 1 && lerp->size(0) == Cout), op,
                ": lerp must be 0-d or [Cout] = [", Cout, "], got shape ", lerp->sizes());
    // lerp is a tiny gate: any float dtype is accepted and read in the accumulation type.
    check_float_dtype(*lerp, op, "lerp");
    TORCH_CHECK_VALUE(lerp->device() == x.device(), op, ": lerp is on ", lerp->device(), " but x is on ", x.device());
  }
  return {B, h, w, Cin, Cout, N};
}

}  // namespace megamed
