// The per-block body of the neighborhood-attention forward (semantics in na2d.cuh).
//
// Written as a plain function of (params, shared memory, thread id, block id) so that two callers
// can run it: the __global__ kernel in na2d.cu, and a CPU emulator (tests/cuda_emu/na2d_emu.cpp:
// one std::thread per CUDA thread, a barrier for __syncthreads, whole-tile WMMA fragments) that
// checks the index arithmetic and the synchronisation without a GPU. So this file uses only:
// __host__ / __device__ / __forceinline__, __syncthreads(), nvcuda::wmma load/store/fill/mma (never a
// fragment's elements, whose register layout is unspecified), the conversions of to_float /
// from_float, and <cmath>. The includer provides those (na2d.cu: the CUDA headers and <mma.h>).
//
// Design (mirrors the Triton kernel kernels/triton/na2d.py):
//   * Dilation: rows/columns of residue (ry, rx) mod d form a sub-grid of nh x nw positions, an
//     ordinary dilation-1 problem; all coordinates below are sub-grid coordinates t (image row
//     ry + t*d). A dilated problem is d*d dense problems, one set of blocks each.
//   * One block = one TH x TW (8 x 8, M = 64) tile of queries of one (batch, head, residue pair),
//     128 threads (4 warps). The K/V halo of the tile -- the union of its queries' windows, rows
//     s(first row) .. s(last row) + K - 1 (at most TH + K - 1 rows, because the window start s is
//     monotone with slope <= 1), columns likewise -- is walked flattened row-major in chunks of
//     BN keys; each chunk of K and V is loaded into shared memory once and serves all 64 queries.
//   * Per chunk: S = Q K^T (fp32), mask keys outside each query's own window to -inf, online
//     softmax in base 2 (running max m and sum l per query row, fp32), O = O * alpha + P V with O
//     in shared memory (fp32). At the end out = O / l and lse = (m + log2 l) * ln 2 (natural log).
//   * fp16 / bf16: both matmuls on tensor cores (WMMA m16n16k16, fp32 accumulate; P is rounded to
//     the input type for P V, as in flash attention), BN = 64. Warp w owns query rows 16w..16w+15
//     and keeps that Q strip in registers as fragments for the whole walk.
//   * fp32: SIMT matmuls from shared memory (full fp32 products, no TF32), BN = 32.
//   * Partial tiles (image edge, or a smaller residue's sub-grid) are masked: missing queries load
//     as zeros and are never stored; missing keys (past the end of the halo) load as zeros and are
//     masked, so nothing NaN enters P V. A block whose tile lies entirely outside its residue's
//     sub-grid returns before any barrier.
//
// Expected limits: correctness first. Per block, the halo costs (TH+K-1)(TW+K-1) / K^2 times the
// useful logits (4x at K = 7, 2.4x at K = 13), as in the Triton kernel; loads are scalar (no
// vectorised or asynchronous copies, no double buffering), the softmax is SIMT from shared memory
// and each chunk takes 7 block barriers, so expect it well below the Triton kernel's rate on large
// problems. Shared memory: up to ~100 KB per block (D = 128, fp16/bf16), so 2 blocks per SM on
// H100 and 1 on A100 -- low occupancy, the main thing to tune (smaller BN, O in registers).
#pragma once

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "convert.cuh"  // to_float / from_float
#include "na2d_params.h"

namespace megamed {
namespace cuda {
namespace na2d {

constexpr int kTH = 8, kTW = 8;   // query tile (sub-grid rows x columns)
constexpr int kM = kTH * kTW;     // queries per block
constexpr int kThreads = 128;     // 4 warps; thread pairs own the softmax rows (2 * kM == kThreads)
constexpr int kWarps = kThreads / 32;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kMinusBig = -1.0e30f;  // finite "-inf" start for the running max (see online softmax)
static_assert(2 * kM == kThreads, "two threads per query row in the softmax");
static_assert(kM == 16 * kWarps, "each warp owns 16 query rows in the tensor-core path");

// ---- shared-memory layout --------------------------------------------------------------------
// Regions (byte offsets, each 128-aligned, so every WMMA tile pointer below is 32-byte aligned):
//   Ks, Vs  [BN][LDK] T       the current chunk of keys / values
//   Qs      [kM][LDK] T       query tile; tensor-core path: staged in the Ks/Vs region, then held
//                             in registers (no region of its own)
//   Ss      [kM][LDS] float   logits of the chunk (then, fp32 path, P in place)
//   Ps      [kM][LDP] T       P rounded to T for the tensor-core P V (fp32 path: aliases Ss)
//   Os      [kM][LDO] float   output accumulator
//   stats   per query row: m, l, alpha, m_new (float), window start st, su (int);
//           per thread: partial max / sum (float); per chunk key: row, column (int), K and V
//           element offsets (int64)
// Paddings: WMMA needs ld a multiple of 16 bytes (8 halves, 4 floats); +8 halves / +4 floats also
// stagger rows across banks. The SIMT path pads fp32 rows by one word (conflict-free columns).
template <typename T, int HD>
struct Layout {
  static constexpr bool kTensorCores = !std::is_same<T, float>::value;
  static constexpr int BN = kTensorCores ? 64 : 32;  // keys per chunk
  static constexpr int LDK = kTensorCores ? HD + 8 : HD + 1;
  static constexpr int LDS = kTensorCores ? BN + 4 : BN + 1;
  static constexpr int LDP = kTensorCores ? BN + 8 : LDS;
  static constexpr int LDO = kTensorCores ? HD + 4 : HD + 1;

  static constexpr size_t up(size_t x) { return (x + 127) / 128 * 128; }
  static constexpr size_t K_OFF = 0;
  static constexpr size_t V_OFF = up(K_OFF + size_t(BN) * LDK * sizeof(T));
  static constexpr size_t Q_OFF = kTensorCores ? K_OFF : up(V_OFF + size_t(BN) * LDK * sizeof(T));
  static constexpr size_t S_OFF = up((kTensorCores ? V_OFF + size_t(BN) * LDK * sizeof(T)
                                                   : Q_OFF + size_t(kM) * LDK * sizeof(T)));
  static constexpr size_t P_OFF = kTensorCores ? up(S_OFF + size_t(kM) * LDS * sizeof(float)) : S_OFF;
  static constexpr size_t O_OFF = up(kTensorCores ? P_OFF + size_t(kM) * LDP * sizeof(T)
                                                  : S_OFF + size_t(kM) * LDS * sizeof(float));
  static constexpr size_t ROWF_OFF = up(O_OFF + size_t(kM) * LDO * sizeof(float));  // 4 x kM float
  static constexpr size_t THRF_OFF = ROWF_OFF + 4 * kM * sizeof(float);             // 2 x kThreads float
  static constexpr size_t ROWI_OFF = THRF_OFF + 2 * kThreads * sizeof(float);       // 2 x kM int
  static constexpr size_t KEYI_OFF = ROWI_OFF + 2 * kM * sizeof(int);               // 2 x BN int
  static constexpr size_t KEYO_OFF = up(KEYI_OFF + 2 * BN * sizeof(int));            // 2 x BN int64
  static constexpr size_t BYTES = up(KEYO_OFF + 2 * BN * sizeof(int64_t));

  static_assert(HD % 16 == 0 && BN % 16 == 0, "WMMA tiles are 16 x 16");
  static_assert(!kTensorCores || Q_OFF + size_t(kM) * LDK * sizeof(T) <= S_OFF,
                "the Q staging tile must fit in the Ks/Vs region");
  static_assert(kTensorCores || P_OFF == S_OFF, "fp32 path: P overwrites S in place");
};

// ---- grid ------------------------------------------------------------------------------------
// Tiles are laid out for the largest sub-grid (residue 0: ceil(H / d) x ceil(W / d) positions);
// tiles past a smaller residue's sub-grid exit at once. Block id, fastest first:
// tile, residue pair (ry, rx), batch * heads -- neighbouring blocks share halos in L2.
struct Grid {
  int tiles_h, tiles_w;
  int64_t blocks;
};

__host__ __device__ inline Grid make_grid(int B, int H, int W, int heads, int dilation) {
  const int sub_h = (H + dilation - 1) / dilation, sub_w = (W + dilation - 1) / dilation;
  Grid g;
  g.tiles_h = (sub_h + kTH - 1) / kTH;
  g.tiles_w = (sub_w + kTW - 1) / kTW;
  g.blocks = int64_t(g.tiles_h) * g.tiles_w * dilation * dilation * B * heads;
  return g;
}

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

// First key (sub-grid coordinate) of query t's window in a sub-grid of n positions.
__device__ __forceinline__ int window_start(int t, int n, int ks) {
  const int s = t - ks / 2;
  return s < 0 ? 0 : (s > n - ks ? n - ks : s);
}

// ---- the matmuls -----------------------------------------------------------------------------
// Tensor-core path (T = __half / __nv_bfloat16). Warp w owns query rows 16w .. 16w + 15.
template <typename T, int HD>
struct TensorCoreMath {
  using L = Layout<T, HD>;
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major>;
  using FragBCol = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::col_major>;
  using FragBRow = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::row_major>;
  using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

  FragA qa[HD / 16];  // this warp's Q strip [16, HD] as HD/16 fragments

  // Qs [kM][LDK] (staged) -> registers. Collective per warp.
  __device__ __forceinline__ void load_q(const T* Qs, int warp) {
#pragma unroll
    for (int kd = 0; kd < HD / 16; ++kd)
      nvcuda::wmma::load_matrix_sync(qa[kd], Qs + 16 * warp * L::LDK + 16 * kd, L::LDK);
  }

  // Ss[16w.., 0..BN) = Q_strip Ks^T. Ks [BN][LDK] row-major is K^T [HD][BN] in column-major.
  __device__ __forceinline__ void scores(const T* Ks, float* Ss, int warp) {
#pragma unroll
    for (int nb = 0; nb < L::BN / 16; ++nb) {
      FragC acc;
      nvcuda::wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int kd = 0; kd < HD / 16; ++kd) {
        FragBCol kb;
        nvcuda::wmma::load_matrix_sync(kb, Ks + 16 * nb * L::LDK + 16 * kd, L::LDK);
        nvcuda::wmma::mma_sync(acc, qa[kd], kb, acc);
      }
      nvcuda::wmma::store_matrix_sync(Ss + 16 * warp * L::LDS + 16 * nb, acc, L::LDS, nvcuda::wmma::mem_row_major);
    }
  }

  // Os[16w.., :] += Ps[16w.., 0..BN) Vs (Vs [BN][LDK] row-major).
  __device__ __forceinline__ void accumulate(const T* Ps, const T* Vs, float* Os, int warp) {
#pragma unroll
    for (int db = 0; db < HD / 16; ++db) {
      FragC acc;
      float* o = Os + 16 * warp * L::LDO + 16 * db;
      nvcuda::wmma::load_matrix_sync(acc, o, L::LDO, nvcuda::wmma::mem_row_major);
#pragma unroll
      for (int kn = 0; kn < L::BN / 16; ++kn) {
        FragA pa;
        FragBRow vb;
        nvcuda::wmma::load_matrix_sync(pa, Ps + 16 * warp * L::LDP + 16 * kn, L::LDP);
        nvcuda::wmma::load_matrix_sync(vb, Vs + 16 * kn * L::LDK + 16 * db, L::LDK);
        nvcuda::wmma::mma_sync(acc, pa, vb, acc);
      }
      nvcuda::wmma::store_matrix_sync(o, acc, L::LDO, nvcuda::wmma::mem_row_major);
    }
  }
};

// SIMT path (T = float): thread (ty, tx) = (tid / 16, tid % 16) owns rows ty + 8i (i < 8) and
// columns tx + 16j of each output, so a warp reads 2 distinct Q/P rows (broadcast) and 16
// consecutive-bank K rows / V columns.
template <typename T, int HD>
struct SimtMath {
  using L = Layout<T, HD>;
  static_assert(kThreads == 128 && kM == 64, "8 x 16 thread grid over 64 rows");

  __device__ __forceinline__ void load_q(const T*, int) {}  // Q stays in Qs

  __device__ __forceinline__ void scores(const float* Qs, const float* Ks, float* Ss, int tid) {
    const int ty = tid / 16, tx = tid % 16;
    float acc[8][L::BN / 16] = {};
    for (int dd = 0; dd < HD; ++dd) {
      float a[8], b[L::BN / 16];
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = Qs[(ty + 8 * i) * L::LDK + dd];
#pragma unroll
      for (int j = 0; j < L::BN / 16; ++j) b[j] = Ks[(tx + 16 * j) * L::LDK + dd];
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < L::BN / 16; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < L::BN / 16; ++j) Ss[(ty + 8 * i) * L::LDS + tx + 16 * j] = acc[i][j];
  }

  __device__ __forceinline__ void accumulate(const float* Ps, const float* Vs, float* Os, int tid) {
    const int ty = tid / 16, tx = tid % 16;
    float acc[8][HD / 16];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < HD / 16; ++j) acc[i][j] = Os[(ty + 8 * i) * L::LDO + tx + 16 * j];
    for (int n = 0; n < L::BN; ++n) {
      float p[8], v[HD / 16];
#pragma unroll
      for (int i = 0; i < 8; ++i) p[i] = Ps[(ty + 8 * i) * L::LDP + n];
#pragma unroll
      for (int j = 0; j < HD / 16; ++j) v[j] = Vs[n * L::LDK + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < HD / 16; ++j) acc[i][j] = fmaf(p[i], v[j], acc[i][j]);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < HD / 16; ++j) Os[(ty + 8 * i) * L::LDO + tx + 16 * j] = acc[i][j];
  }
};

// ---- the block -------------------------------------------------------------------------------
// Every __syncthreads() below is reached by all kThreads threads (no early exit after the first).
template <typename T, int HD>
__device__ __forceinline__ void fwd_block(const Na2dFwdParams<T>& p, unsigned char* smem, int tid, int64_t bid) {
  using L = Layout<T, HD>;
  constexpr int BN = L::BN;
  const int d = p.dilation, ks = p.kernel_size;

  // which tile, residue pair, batch and head
  const Grid g = make_grid(p.B, p.H, p.W, p.heads, d);
  const int64_t tiles = int64_t(g.tiles_h) * g.tiles_w;
  const int tile = int(bid % tiles);
  const int64_t rest = bid / tiles;
  const int res = int(rest % (d * d));
  const int64_t bh = rest / (d * d);
  const int64_t b = bh / p.heads;
  const int head = int(bh % p.heads);
  const int ry = res / d, rx = res % d;
  const int nh = (p.H - ry + d - 1) / d, nw = (p.W - rx + d - 1) / d;  // this residue's sub-grid
  const int t0 = (tile / g.tiles_w) * kTH, u0 = (tile % g.tiles_w) * kTW;
  if (t0 >= nh || u0 >= nw) return;  // block-uniform, before any barrier

  // halo = union of the tile's windows: rows h0 .. h1-1, columns w0 .. w1-1 (sub-grid coords)
  const int h0 = window_start(t0, nh, ks);
  const int h1 = window_start(imin(t0 + kTH - 1, nh - 1), nh, ks) + ks;
  const int w0 = window_start(u0, nw, ks);
  const int w1 = window_start(imin(u0 + kTW - 1, nw - 1), nw, ks) + ks;
  const int hw = w1 - w0;
  const int n_halo = (h1 - h0) * hw;

  T* Ks = reinterpret_cast<T*>(smem + L::K_OFF);
  T* Vs = reinterpret_cast<T*>(smem + L::V_OFF);
  T* Qs = reinterpret_cast<T*>(smem + L::Q_OFF);
  float* Ss = reinterpret_cast<float*>(smem + L::S_OFF);
  T* Ps = reinterpret_cast<T*>(smem + L::P_OFF);
  float* Os = reinterpret_cast<float*>(smem + L::O_OFF);
  float* m_s = reinterpret_cast<float*>(smem + L::ROWF_OFF);  // running max (base 2), per row
  float* l_s = m_s + kM;                                       // running sum
  float* alpha_s = l_s + kM;                                   // this chunk's rescale factor
  float* mnew_s = alpha_s + kM;                                // this chunk's new max
  float* pmax_s = reinterpret_cast<float*>(smem + L::THRF_OFF);  // per thread: partial max
  float* psum_s = pmax_s + kThreads;                               // per thread: partial sum
  int* st_s = reinterpret_cast<int*>(smem + L::ROWI_OFF);  // window start row; -1: no query here
  int* su_s = st_s + kM;                                    // window start column
  int* kr_s = reinterpret_cast<int*>(smem + L::KEYI_OFF);  // chunk key row; -1: past the halo
  int* kc_s = kr_s + BN;                                    // chunk key column
  int64_t* koff_s = reinterpret_cast<int64_t*>(smem + L::KEYO_OFF);  // element offset of the key in k
  int64_t* voff_s = koff_s + BN;                                      // ... and in v

  // per-row state; query row r of the tile is (t0 + r / kTW, u0 + r % kTW)
  if (tid < kM) {
    const int t = t0 + tid / kTW, u = u0 + tid % kTW;
    const bool ok = t < nh && u < nw;
    st_s[tid] = ok ? window_start(t, nh, ks) : -1;
    su_s[tid] = ok ? window_start(u, nw, ks) : -1;
    m_s[tid] = kMinusBig;
    l_s[tid] = 0.0f;
  }
  // the query tile (zeros for missing queries) and a zero accumulator
  for (int i = tid; i < kM * HD; i += kThreads) {
    const int r = i / HD, c = i % HD;
    const int t = t0 + r / kTW, u = u0 + r % kTW;
    T val = from_float<T>(0.0f);
    if (t < nh && u < nw)
      val = p.q[b * p.q_strides.b + int64_t(ry + t * d) * p.q_strides.h + int64_t(rx + u * d) * p.q_strides.w +
                int64_t(head) * p.q_strides.n + c];
    Qs[r * L::LDK + c] = val;
    Os[r * L::LDO + c] = 0.0f;
  }
  __syncthreads();

  typename std::conditional<L::kTensorCores, TensorCoreMath<T, HD>, SimtMath<T, HD>>::type math;
  const int warp = tid / 32;
  math.load_q(Qs, warp);  // tensor cores: Q strip into registers; the staging area is reused below
  __syncthreads();

  const float qk_scale = p.scale * kLog2e;  // logits in base 2: exp(x) = exp2(x * log2 e)
  const int row = tid / 2, half = tid % 2;  // softmax: two threads per query row, BN/2 columns each
  constexpr int kCols = BN / 2;

  for (int c0 = 0; c0 < n_halo; c0 += BN) {
    // 0. where the chunk's keys are
    if (tid < BN) {
      const int hk = c0 + tid;
      if (hk < n_halo) {
        const int kr = h0 + hk / hw, kc = w0 + hk % hw;
        const int64_t img_r = ry + kr * d, img_c = rx + kc * d;
        kr_s[tid] = kr;
        kc_s[tid] = kc;
        koff_s[tid] = b * p.k_strides.b + img_r * p.k_strides.h + img_c * p.k_strides.w + int64_t(head) * p.k_strides.n;
        voff_s[tid] = b * p.v_strides.b + img_r * p.v_strides.h + img_c * p.v_strides.w + int64_t(head) * p.v_strides.n;
      } else {
        kr_s[tid] = -1;
        kc_s[tid] = -1;
        koff_s[tid] = 0;
        voff_s[tid] = 0;
      }
    }
    __syncthreads();

    // 1. the chunk of K and V (zeros past the halo: P is 0 there, and 0 * 0 is not NaN)
    for (int i = tid; i < BN * HD; i += kThreads) {
      const int n = i / HD, c = i % HD;
      const bool ok = kr_s[n] >= 0;
      Ks[n * L::LDK + c] = ok ? p.k[koff_s[n] + c] : from_float<T>(0.0f);
      Vs[n * L::LDK + c] = ok ? p.v[voff_s[n] + c] : from_float<T>(0.0f);
    }
    __syncthreads();

    // 2. S = Q K^T (raw dot products)
    if constexpr (L::kTensorCores) {
      math.scores(Ks, Ss, warp);
    } else {
      math.scores(Qs, Ks, Ss, tid);
    }
    __syncthreads();

    // 3a. scale to base 2, mask to the query's own window, partial row max
    {
      const int st = st_s[row], su = su_s[row];
      float mx = -INFINITY;
      for (int j = 0; j < kCols; ++j) {
        const int n = half * kCols + j;
        const int kr = kr_s[n], kc = kc_s[n];
        // st = -1: no query in this row; kr = -1: no key (past the halo)
        const bool in = st >= 0 && kr >= 0 && kr >= st && kr < st + ks && kc >= su && kc < su + ks;
        const float s = in ? Ss[row * L::LDS + n] * qk_scale : -INFINITY;
        Ss[row * L::LDS + n] = s;
        mx = fmaxf(mx, s);
      }
      pmax_s[tid] = mx;
    }
    __syncthreads();

    // 3b. new running max, P = exp2(S - m_new) (0 where masked), partial row sum. m starts at a
    // finite -1e30, so a row with nothing unmasked yet gives alpha = 1 and P = 0, never NaN; the
    // first real logit then makes alpha = exp2(-1e30 - m) = 0.
    {
      const float m_old = m_s[row];
      const float m_new = fmaxf(m_old, fmaxf(pmax_s[2 * row], pmax_s[2 * row + 1]));
      float sum = 0.0f;
      for (int j = 0; j < kCols; ++j) {
        const int n = half * kCols + j;
        const float pv = exp2f(Ss[row * L::LDS + n] - m_new);
        Ps[row * L::LDP + n] = from_float<T>(pv);  // fp32 path: in place over S (same thread, same element)
        sum += pv;
      }
      psum_s[tid] = sum;
      if (half == 0) {
        alpha_s[row] = exp2f(m_old - m_new);
        mnew_s[row] = m_new;
      }
    }
    __syncthreads();

    // 3c. rescale the accumulator and the row sums by alpha; commit the new max
    for (int i = tid; i < kM * HD; i += kThreads) {
      const int r = i / HD, c = i % HD;
      Os[r * L::LDO + c] *= alpha_s[r];
    }
    if (tid < kM) {
      l_s[tid] = l_s[tid] * alpha_s[tid] + psum_s[2 * tid] + psum_s[2 * tid + 1];
      m_s[tid] = mnew_s[tid];
    }
    __syncthreads();

    // 4. O += P V
    if constexpr (L::kTensorCores) {
      math.accumulate(Ps, Vs, Os, warp);
    } else {
      math.accumulate(Ps, Vs, Os, tid);
    }
    __syncthreads();
  }

  // out = O / l, lse = (m + log2 l) * ln 2, for the queries that exist
  for (int i = tid; i < kM * HD; i += kThreads) {
    const int r = i / HD, c = i % HD;
    if (st_s[r] < 0) continue;
    const int t = t0 + r / kTW, u = u0 + r % kTW;
    const float l = l_s[r];
    const float o = Os[r * L::LDO + c] / (l > 0.0f ? l : 1.0f);
    p.out[b * p.out_strides.b + int64_t(ry + t * d) * p.out_strides.h + int64_t(rx + u * d) * p.out_strides.w +
          int64_t(head) * p.out_strides.n + c] = from_float<T>(o);
  }
  if (tid < kM && st_s[tid] >= 0) {
    const int t = t0 + tid / kTW, u = u0 + tid % kTW;
    const float l = l_s[tid];
    p.lse[b * p.lse_strides.b + int64_t(ry + t * d) * p.lse_strides.h + int64_t(rx + u * d) * p.lse_strides.w +
          int64_t(head) * p.lse_strides.n] = (m_s[tid] + log2f(l > 0.0f ? l : 1.0f)) * kLn2;
  }
}

}  // namespace na2d
}  // namespace cuda
}  // namespace megamed
