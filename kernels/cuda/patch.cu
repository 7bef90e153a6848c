// Tiled implicit-GEMM kernels for patch_merge / patch_split (semantics in patch.cuh).
//
// One kernel, out[M, N] = A[M, K] @ W[N, K]^T, with the op-specific parts in an `Op` struct:
//   row_offset(m) / col_offset(k): where A[m, k] lives in x (the regroup happens in the loads),
//   store(m, n, acc):              where out[m, n] goes, plus bias and the skip/lerp blend.
// Block tile 64 x 64 output, K in steps of 16, 256 threads, each thread 4 x 4 outputs kept in
// registers. Tiles are staged in shared memory as fp32 (so fp16/bf16 accumulate in fp32),
// k-major so the inner product reads rows of both tiles. A thread owns rows ty + 16*i and columns
// tx + 16*j: neighbouring threads read neighbouring shared-memory words (no bank conflicts) and
// write neighbouring channels (coalesced stores).
#include "patch.cuh"
#include "convert.cuh"

namespace megamed {
namespace cuda {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256;
constexpr int kTM = kBM / 16, kTN = kBN / 16;  // outputs per thread along M and N

// patch_merge: row m = block (b, hi, wi) of the [B, H/f, W/f] grid; column k = (i, j, c).
template <typename T>
struct MergeOp {
  PatchMergeParams<T> p;
  __device__ int64_t row_offset(int64_t m) const {
    const int64_t h = p.H / p.factor, w = p.W / p.factor;
    const int64_t b = m / (h * w), hi = (m / w) % h, wi = m % w;
    return b * p.x_strides.b + hi * p.factor * p.x_strides.h + wi * p.factor * p.x_strides.w;
  }
  __device__ int64_t col_offset(int64_t k) const {
    const int64_t c = k % p.C, j = (k / p.C) % p.factor, i = k / (p.C * p.factor);
    return i * p.x_strides.h + j * p.x_strides.w + c * p.x_strides.c;
  }
  // Output rows are the blocks in order, so out is simply [M, Cout] row-major.
  __device__ void store(int64_t m, int64_t n, float acc) const {
    if (p.bias) acc += to_float(p.bias[n]);
    p.out[m * p.Cout + n] = from_float<T>(acc);
  }
};

// patch_split: row m = input pixel (b, hi, wi); column n = (i*f + j)*Cout + c of the output block.
template <typename T>
struct SplitOp {
  PatchSplitParams<T> p;
  __device__ int64_t row_offset(int64_t m) const {
    const int64_t b = m / (p.h * p.w), hi = (m / p.w) % p.h, wi = m % p.w;
    return b * p.x_strides.b + hi * p.x_strides.h + wi * p.x_strides.w;
  }
  __device__ int64_t col_offset(int64_t k) const { return k * p.x_strides.c; }
  __device__ void store(int64_t m, int64_t n, float acc) const {
    if (p.bias) acc += to_float(p.bias[n]);
    const int64_t f = p.factor, b = m / (p.h * p.w), hi = (m / p.w) % p.h, wi = m % p.w;
    const int64_t c = n % p.Cout, j = (n / p.Cout) % f, i = n / (p.Cout * f);
    const int64_t y = hi * f + i, x = wi * f + j;
    if (p.skip) {  // fused lerp epilogue: skip + lerp * (y - skip)
      const Strides4 s = p.skip_strides;
      const float k = to_float(p.skip[b * s.b + y * s.h + x * s.w + c * s.c]);
      acc = k + p.lerp[c * p.lerp_stride] * (acc - k);
    }
    p.out[((b * p.h * f + y) * p.w * f + x) * p.Cout + c] = from_float<T>(acc);
  }
};

template <typename T, typename Op>
__global__ void __launch_bounds__(kThreads)
    patch_gemm_kernel(const T* __restrict__ x, const T* __restrict__ weight, int64_t M, int64_t N, int64_t K, Op op) {
  __shared__ float a_tile[kBK][kBM + 1];  // +1: the transposing store would hit one bank 16 times
  __shared__ float w_tile[kBK][kBN + 1];

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM, n0 = static_cast<int64_t>(blockIdx.y) * kBN;

  // Loading: thread tid fetches column kk = tid % 16 of rows tid / 16 + 16*l, l < 4, of both
  // tiles (16 consecutive threads read 16 consecutive k: coalesced along channels). The rows'
  // base offsets into x do not depend on k, so they are computed once.
  const int load_k = tid % kBK, load_r = tid / kBK;
  int64_t a_row[kBM / 16];
#pragma unroll
  for (int l = 0; l < kBM / 16; ++l) {
    const int64_t m = m0 + load_r + 16 * l;
    a_row[l] = m < M ? op.row_offset(m) : -1;
  }

  float acc[kTM][kTN] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
    const int64_t k = k0 + load_k;
    const int64_t a_col = k < K ? op.col_offset(k) : 0;
#pragma unroll
    for (int l = 0; l < kBM / 16; ++l)
      a_tile[load_k][load_r + 16 * l] = (a_row[l] >= 0 && k < K) ? to_float(x[a_row[l] + a_col]) : 0.f;
#pragma unroll
    for (int l = 0; l < kBN / 16; ++l) {
      const int64_t n = n0 + load_r + 16 * l;
      w_tile[load_k][load_r + 16 * l] = (n < N && k < K) ? to_float(weight[n * K + k]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float a[kTM], w[kTN];
#pragma unroll
      for (int i = 0; i < kTM; ++i) a[i] = a_tile[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < kTN; ++j) w[j] = w_tile[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < kTM; ++i)
#pragma unroll
        for (int j = 0; j < kTN; ++j) acc[i][j] = fmaf(a[i], w[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    const int64_t m = m0 + ty + 16 * i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      const int64_t n = n0 + tx + 16 * j;
      if (n < N) op.store(m, n, acc[i][j]);
    }
  }
}

template <typename T, typename Op>
cudaError_t launch(const T* x, const T* weight, int64_t M, int64_t N, int64_t K, const Op& op, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  // M tiles on grid.x (limit 2^31 - 1), N tiles on grid.y (limit 65535 -> N < 4.2M channels).
  const dim3 grid(static_cast<unsigned>((M + kBM - 1) / kBM), static_cast<unsigned>((N + kBN - 1) / kBN));
  if ((N + kBN - 1) / kBN > 65535) return cudaErrorInvalidConfiguration;
  patch_gemm_kernel<T, Op><<<grid, kThreads, 0, stream>>>(x, weight, M, N, K, op);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_patch_merge(const PatchMergeParams<T>& p, cudaStream_t stream) {
  const int64_t M = p.B * (p.H / p.factor) * (p.W / p.factor), K = p.factor * p.factor * p.C;
  return launch(p.x, p.weight, M, p.Cout, K, MergeOp<T>{p}, stream);
}

template <typename T>
cudaError_t launch_patch_split(const PatchSplitParams<T>& p, cudaStream_t stream) {
  const int64_t M = p.B * p.h * p.w, N = p.factor * p.factor * p.Cout;
  return launch(p.x, p.weight, M, N, p.Cin, SplitOp<T>{p}, stream);
}

template cudaError_t launch_patch_merge<float>(const PatchMergeParams<float>&, cudaStream_t);
template cudaError_t launch_patch_merge<__half>(const PatchMergeParams<__half>&, cudaStream_t);
template cudaError_t launch_patch_merge<__nv_bfloat16>(const PatchMergeParams<__nv_bfloat16>&, cudaStream_t);
template cudaError_t launch_patch_split<float>(const PatchSplitParams<float>&, cudaStream_t);
template cudaError_t launch_patch_split<__half>(const PatchSplitParams<__half>&, cudaStream_t);
template cudaError_t launch_patch_split<__nv_bfloat16>(const PatchSplitParams<__nv_bfloat16>&, cudaStream_t);

}  // namespace cuda
}  // namespace megamed
