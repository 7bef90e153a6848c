// Runs the neighborhood-attention forward's block body (kernels/cuda/na2d_block.cuh) on the CPU
// under the emulation of emu.h: one std::thread per CUDA thread, blocks one after another, shared
// memory of exactly Layout::BYTES filled with NaN bytes before every block.
//
// Built two ways (tests/test_cuda_na2d.py does the first):
//   g++ -std=c++20 -O1 -pthread -shared -fPIC -Ikernels/cuda tests/cuda_emu/na2d_emu.cpp -o na2d_emu.so
//       -> extern "C" na2d_emu_fwd / na2d_emu_smem_bytes, called through ctypes on torch tensors
//   g++ -std=c++20 -O1 -g -pthread -fsanitize=thread -DNA2D_EMU_MAIN -Ikernels/cuda tests/cuda_emu/na2d_emu.cpp
//       -> a self-checking program (naive double reference) for the sanitizers: thread catches a
//          missing __syncthreads as a data race, address catches out-of-bounds shared/global reads.
#include "emu.h"  // must come first: defines what the kernel header expects from CUDA

#include "na2d_block.cuh"

#include <memory>
#include <thread>
#include <vector>

namespace {

using megamed::cuda::Na2dFwdParams;
using megamed::cuda::Na2dStrides;
namespace na2d = megamed::cuda::na2d;

template <typename T, int HD>
void run_grid(const Na2dFwdParams<T>& p) {
  using L = na2d::Layout<T, HD>;
  const na2d::Grid g = na2d::make_grid(p.B, p.H, p.W, p.heads, p.dilation);
  unsigned char* smem = static_cast<unsigned char*>(std::aligned_alloc(128, L::BYTES));
  std::barrier<> block(na2d::kThreads);
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  for (int w = 0; w < na2d::kWarps; ++w) warps.emplace_back(std::make_unique<std::barrier<>>(32));
  std::vector<std::thread> threads;
  for (int tid = 0; tid < na2d::kThreads; ++tid) {
    threads.emplace_back([&, tid] {
      emu::ctx = {&block, warps[tid / 32].get(), tid % 32};
      for (int64_t bid = 0; bid < g.blocks; ++bid) {
        block.arrive_and_wait();  // the previous block is done everywhere
        if (tid == 0) std::memset(smem, 0xff, L::BYTES);  // NaN in every float / half / bf16
        block.arrive_and_wait();
        na2d::fwd_block<T, HD>(p, smem, tid, bid);
      }
    });
  }
  for (auto& t : threads) t.join();
  std::free(smem);
}

template <typename T>
int run_dtype(int head_dim, const Na2dFwdParams<T>& p) {
  switch (head_dim) {
    case 32: run_grid<T, 32>(p); return 0;
    case 64: run_grid<T, 64>(p); return 0;
    case 128: run_grid<T, 128>(p); return 0;
    default: return 2;
  }
}

template <typename T>
Na2dFwdParams<T> make_params(const void* q, const void* k, const void* v, const int64_t* s, void* out, float* lse,
                             int B, int H, int W, int heads, int D, int ks, int dil, float scale) {
  Na2dFwdParams<T> p;
  p.q = static_cast<const T*>(q);
  p.k = static_cast<const T*>(k);
  p.v = static_cast<const T*>(v);
  p.q_strides = {s[0], s[1], s[2], s[3]};
  p.k_strides = {s[4], s[5], s[6], s[7]};
  p.v_strides = {s[8], s[9], s[10], s[11]};
  p.out = static_cast<T*>(out);  // contiguous [B, H, W, heads, D]
  p.out_strides = {int64_t(H) * W * heads * D, int64_t(W) * heads * D, int64_t(heads) * D, D};
  p.lse = lse;                   // contiguous [B, H, W, heads]
  p.lse_strides = {int64_t(H) * W * heads, int64_t(W) * heads, heads, 1};
  p.B = B;
  p.H = H;
  p.W = W;
  p.heads = heads;
  p.head_dim = D;
  p.kernel_size = ks;
  p.dilation = dil;
  p.scale = scale;
  return p;
}

}  // namespace

extern "C" {

// dtype: 0 float32, 1 float16, 2 bfloat16. strides: 12 element strides (b, h, w, heads) of q, k, v;
// D contiguous. out / lse contiguous. Returns 0, or 1 for a bad dtype, 2 for a bad head dim.
int na2d_emu_fwd(int dtype, const void* q, const void* k, const void* v, const int64_t* strides, void* out,
                 float* lse, int B, int H, int W, int heads, int D, int ks, int dil, float scale) {
  switch (dtype) {
    case 0: return run_dtype<float>(D, make_params<float>(q, k, v, strides, out, lse, B, H, W, heads, D, ks, dil, scale));
    case 1: return run_dtype<__half>(D, make_params<__half>(q, k, v, strides, out, lse, B, H, W, heads, D, ks, dil, scale));
    case 2:
      return run_dtype<__nv_bfloat16>(
          D, make_params<__nv_bfloat16>(q, k, v, strides, out, lse, B, H, W, heads, D, ks, dil, scale));
    default: return 1;
  }
}

// Dynamic shared memory one block of the real kernel asks for (-1: no such instantiation).
long na2d_emu_smem_bytes(int dtype, int D) {
#define MEGAMED_SMEM(T)                                              \
  switch (D) {                                                       \
    case 32: return long(na2d::Layout<T, 32>::BYTES);                \
    case 64: return long(na2d::Layout<T, 64>::BYTES);                \
    case 128: return long(na2d::Layout<T, 128>::BYTES);              \
    default: return -1;                                              \
  }
  switch (dtype) {
    case 0: MEGAMED_SMEM(float)
    case 1: MEGAMED_SMEM(__half)
    case 2: MEGAMED_SMEM(__nv_bfloat16)
    default: return -1;
  }
#undef MEGAMED_SMEM
}

}  // extern "C"

#ifdef NA2D_EMU_MAIN
// ---- standalone self-check for sanitizer runs ------------------------------------------------
#include <random>

namespace {

int start(int t, int n, int ks) { return std::min(std::max(t - ks / 2, 0), n - ks); }

// Naive double-precision reference, straight from the definition (independent of the kernel's tiling).
void reference(const std::vector<double>& q, const std::vector<double>& k, const std::vector<double>& v, int B,
               int H, int W, int heads, int D, int ks, int d, double scale, std::vector<double>& out,
               std::vector<double>& lse) {
  auto at = [&](int b, int i, int j, int h) { return ((int64_t(b) * H + i) * W + j) * heads + h; };
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < H; ++i)
      for (int j = 0; j < W; ++j)
        for (int h = 0; h < heads; ++h) {
          const int ri = i % d, rj = j % d, nh = (H - ri + d - 1) / d, nw = (W - rj + d - 1) / d;
          const int si = start(i / d, nh, ks), sj = start(j / d, nw, ks);
          std::vector<double> logit;
          std::vector<int64_t> key;
          for (int a = 0; a < ks; ++a)
            for (int c = 0; c < ks; ++c) {
              const int64_t kk = at(b, ri + (si + a) * d, rj + (sj + c) * d, h);
              double s = 0;
              for (int e = 0; e < D; ++e) s += q[at(b, i, j, h) * D + e] * k[kk * D + e];
              logit.push_back(s * scale);
              key.push_back(kk);
            }
          double mx = -1e300, sum = 0;
          for (double s : logit) mx = std::max(mx, s);
          for (double s : logit) sum += std::exp(s - mx);
          lse[at(b, i, j, h)] = mx + std::log(sum);
          for (int e = 0; e < D; ++e) {
            double o = 0;
            for (size_t n = 0; n < logit.size(); ++n) o += std::exp(logit[n] - mx) / sum * v[key[n] * D + e];
            out[at(b, i, j, h) * D + e] = o;
          }
        }
}

template <typename T>
T cvt(double x);
template <>
float cvt<float>(double x) { return float(x); }
template <>
__half cvt<__half>(double x) { return __float2half_rn(float(x)); }
template <>
__nv_bfloat16 cvt<__nv_bfloat16>(double x) { return __float2bfloat16_rn(float(x)); }

// One case: q, k, v are strided views of one packed [B, H, W, 3, heads, D] tensor (like a qkv
// projection); inputs are rounded to T first, so the reference sees exactly what the kernel sees.
template <typename T>
double max_error(int dtype, int B, int H, int W, int heads, int D, int ks, int d, double* lse_err) {
  std::mt19937 gen(1234 + H * 31 + W * 7 + D + ks + d);
  std::normal_distribution<double> nd;
  const int64_t n = int64_t(B) * H * W * heads * D;
  std::vector<T> qkv(3 * n);
  std::vector<double> x[3];
  for (auto& xi : x) xi.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t tok = i / (heads * D), rest = i % (heads * D);
    for (int w = 0; w < 3; ++w) {
      const T val = cvt<T>(nd(gen));
      qkv[tok * 3 * heads * D + w * heads * D + rest] = val;
      x[w][i] = nvcuda::wmma::as_float(val);
    }
  }
  const int64_t sw = 3 * int64_t(heads) * D, sh = sw * W, sb = sh * H;
  const int64_t strides[12] = {sb, sh, sw, D, sb, sh, sw, D, sb, sh, sw, D};
  std::vector<T> out(n, cvt<T>(NAN));
  std::vector<float> lse(n / D, NAN);
  const double scale = 1.0 / std::sqrt(double(D));
  if (na2d_emu_fwd(dtype, qkv.data(), qkv.data() + heads * D, qkv.data() + 2 * heads * D, strides, out.data(),
                   lse.data(), B, H, W, heads, D, ks, d, float(scale)) != 0)
    emu::fail("na2d_emu_fwd refused the case");
  std::vector<double> ref_out(n), ref_lse(n / D);
  reference(x[0], x[1], x[2], B, H, W, heads, D, ks, d, scale, ref_out, ref_lse);
  double err = 0, lerr = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double o = nvcuda::wmma::as_float(out[i]);
    err = std::isnan(o) ? INFINITY : std::max(err, std::fabs(o - ref_out[i]));
    if (std::isinf(err)) break;
  }
  for (int64_t i = 0; i < n / D; ++i) lerr = std::isnan(lse[i]) ? INFINITY : std::max(lerr, std::fabs(lse[i] - ref_lse[i]));
  *lse_err = lerr;
  return err;
}

}  // namespace

int main() {
  struct Case {
    int dtype, B, H, W, heads, D, ks, d;
  };
  // small, but with partial tiles, borders (H = k, k + 1), dilation with uneven residues, k = 13,
  // several chunks per halo, and every dtype / head dim
  const Case cases[] = {
      {0, 1, 9, 11, 1, 32, 3, 1},  {1, 1, 9, 11, 1, 32, 3, 1},  {2, 1, 9, 11, 1, 32, 3, 1},
      {0, 1, 7, 8, 2, 64, 7, 1},   {1, 2, 8, 9, 1, 64, 7, 1},   {2, 1, 13, 19, 1, 128, 3, 2},
      {1, 1, 14, 13, 1, 32, 13, 1}, {0, 1, 11, 10, 1, 128, 3, 3}, {1, 1, 20, 18, 1, 64, 5, 1},
  };
  const double tol[3] = {2e-5, 2e-2, 8e-2};  // vs the double reference on inputs rounded to the dtype
  int failed = 0;
  for (const Case& c : cases) {
    double lerr = 0, err = 0;
    if (c.dtype == 0) err = max_error<float>(0, c.B, c.H, c.W, c.heads, c.D, c.ks, c.d, &lerr);
    if (c.dtype == 1) err = max_error<__half>(1, c.B, c.H, c.W, c.heads, c.D, c.ks, c.d, &lerr);
    if (c.dtype == 2) err = max_error<__nv_bfloat16>(2, c.B, c.H, c.W, c.heads, c.D, c.ks, c.d, &lerr);
    const bool ok = err <= tol[c.dtype] && lerr <= 1e-4;
    failed += !ok;
    std::printf("%s dtype=%d B=%d %dx%d heads=%d D=%d k=%d d=%d: max|out err|=%.3g max|lse err|=%.3g\n",
                ok ? "ok  " : "FAIL", c.dtype, c.B, c.H, c.W, c.heads, c.D, c.ks, c.d, err, lerr);
  }
  return failed ? 1 : 0;
}
#endif
