// The CPU neighborhood-attention kernels for ONE instruction set. na2d_cpu.cpp includes this file
// once per ISA (no include guard on purpose) after defining
//   MEGAMED_NA_NS       the namespace of this copy (avx512, avx2, base)
//   MEGAMED_NA_TARGET   a function attribute enabling the ISA, e.g. __attribute__((target("avx2,fma"))),
//                       or nothing for the baseline
//   MEGAMED_NA_VBYTES   the SIMD register width in bytes (64, 32, 16)
// and picks a copy at run time from torch's own CPU capability (so ATEN_CPU_CAPABILITY applies).
// Everything that does arithmetic carries the target attribute; nothing here is shared between
// copies, so no AVX-512 instruction can leak into the baseline through an inline function.
//
// SIMD layout: one QUERY per lane. N = VBYTES / sizeof(acc) consecutive queries of a row and
// column class form a "strip". Staged rows are transposed (feature d of all columns contiguous,
// see na2d_cpu.h), so for window offset u the keys of the N lanes are N consecutive staged
// columns, one unaligned vector load:
//
//   S[a][u][l]  = sum_d Q[d][j0 + l] * K_a[d][base + u + l]       (a < k window rows, u < kw)
//   O[d][l]     = sum_{a, u} P[a][u][l] * V_a[d][base + u + l]
//
// Interior strips have kw = k and no mask. At the borders a window is clamped (shifted inward),
// so lanes disagree on their offset: lane l's window is u in [lo_l, lo_l + k) of a wider range
// kw <= 2k - 1 (at most 1.5k when only one border is in the strip), and the logits outside it are
// set to -inf before the softmax, making those probabilities exactly 0. A masked strip costs at
// most 2x an interior one, and only strips holding a query within k/2 of a border are masked.
//
// Register blocking: the logit kernel keeps G <= 8 window offsets in registers while it streams
// over d (one Q load per G FMAs); the P.V kernel keeps 8 features (one P load per 8 FMAs); the
// backward's dK/dV scatter sums each key's gradient over the strip in registers (scatter_g).
// The arithmetic uses the compiler's vector extensions (GCC and Clang); only the staging's 8x8
// transposes use AVX intrinsics.

namespace megamed::na2d::MEGAMED_NA_NS {

#define NA_FN MEGAMED_NA_TARGET
#define NA_INL MEGAMED_NA_TARGET inline __attribute__((always_inline))

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float v __attribute__((vector_size(MEGAMED_NA_VBYTES)));
  typedef int32_t m __attribute__((vector_size(MEGAMED_NA_VBYTES)));
  static constexpr int N = MEGAMED_NA_VBYTES / 4;
};
template <>
struct Vec<double> {
  typedef double v __attribute__((vector_size(MEGAMED_NA_VBYTES)));
  typedef int64_t m __attribute__((vector_size(MEGAMED_NA_VBYTES)));
  static constexpr int N = MEGAMED_NA_VBYTES / 8;
};

template <typename T>
NA_INL typename Vec<T>::v load(const T* p) {
  typename Vec<T>::v x;
  __builtin_memcpy(&x, p, sizeof x);  // an unaligned vector load
  return x;
}

template <typename T>
NA_INL void store(T* p, typename Vec<T>::v x) {
  __builtin_memcpy(p, &x, sizeof x);
}

template <typename T>
NA_INL typename Vec<T>::v splat(T s) {
  return typename Vec<T>::v{} + s;
}

// exp for float lanes: exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln(2)/2, exp(r) by a
// degree-7 polynomial (the classic single-precision minimax coefficients; ~1 ulp). Inputs below
// -87.3 (including the -inf of masked logits) give exactly 0.
NA_INL Vec<float>::v vexp(Vec<float>::v x) {
  using V = Vec<float>::v;
  using M = Vec<float>::m;
  const V lo = splat(-87.3365447504f), hi = splat(88.3762626647949f);
  V xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const V fx = xc * 1.44269504088896341f + 0.5f;
  M n = __builtin_convertvector(fx, M);      // truncates toward zero ...
  n += (__builtin_convertvector(n, V) > fx);  // ... so subtract 1 where that rounded up: floor
  const V nf = __builtin_convertvector(n, V);
  V r = xc - nf * 0.693359375f;               // x - n ln2, ln2 split in two for exactness
  r = r - nf * -2.12194440e-4f;
  V y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const V pow2n = (V)((n + 127) << 23);       // bit pattern of 2^n
  return x < lo ? V{} : y * pow2n;
}

// fp64 is the checking precision, not a fast path: libm per lane.
NA_INL Vec<double>::v vexp(Vec<double>::v x) {
  for (int l = 0; l < Vec<double>::N; ++l) x[l] = std::exp(x[l]);
  return x;
}

// ------------------------------------------------------------------------------------------------
// the two inner kernels
// ------------------------------------------------------------------------------------------------

// S[a][b*G + g][:] = sum_d Q[d * pitch + :] * K[a][d * pitch + b*G + g + :]  for a < k, b < nb.
template <typename T, int G>
NA_FN void dots_g(T* __restrict__ S, const T* Q, const T* const* K, int64_t k, int64_t nb, int64_t KWP, int64_t D,
                  int64_t pitch) {
  using V = typename Vec<T>::v;
  constexpr int N = Vec<T>::N;
  for (int64_t a = 0; a < k; ++a) {
    for (int64_t b = 0; b < nb; ++b) {
      V acc[G];
      for (int g = 0; g < G; ++g) acc[g] = V{};
      const T* qp = Q;
      const T* kp = K[a] + b * G;
      for (int64_t d = 0; d < D; ++d, qp += pitch, kp += pitch) {
        const V qv = load(qp);
        for (int g = 0; g < G; ++g) acc[g] += qv * load(kp + g);
      }
      T* s = S + (a * KWP + b * G) * N;
      for (int g = 0; g < G; ++g) store(s + g * N, acc[g]);
    }
  }
}

// Window offsets are computed in nb blocks of G (G <= 8 accumulators); KWP = nb * G >= kw is the
// row length of the S / P buffers (the few offsets past kw are computed and never read).
struct Blocking {
  int64_t nb, G, KWP;
  explicit Blocking(int64_t kw) : nb((kw + 7) / 8), G((kw + nb - 1) / nb), KWP(nb * G) {}
};

template <typename T>
NA_FN void dots(T* S, const T* Q, const T* const* K, int64_t k, const Blocking& bl, int64_t D, int64_t pitch) {
  switch (bl.G) {
    case 1: return dots_g<T, 1>(S, Q, K, k, bl.nb, bl.KWP, D, pitch);
    case 2: return dots_g<T, 2>(S, Q, K, k, bl.nb, bl.KWP, D, pitch);
    case 3: return dots_g<T, 3>(S, Q, K, k, bl.nb, bl.KWP, D, pitch);
    case 4: return dots_g<T, 4>(S, Q, K, k, bl.nb, bl.KWP, D, pitch);
    case 5: return dots_g<T, 5>(S, Q, K, k, bl.nb, bl.KWP, D, pitch);
    case 6: return dots_g<T, 6>(S, Q, K, k, bl.nb, bl.KWP, D, pitch);
    case 7: return dots_g<T, 7>(S, Q, K, k, bl.nb, bl.KWP, D, pitch);
    default: return dots_g<T, 8>(S, Q, K, k, bl.nb, bl.KWP, D, pitch);
  }
}

// O[d][:] = sum_{a < k, u < kw} P[a][u][:] * X[a][d * pitch + u + :]  for d in [d0, d0 + GD).
template <typename T, int GD>
NA_FN void pv_g(T* __restrict__ O, const T* P, const T* const* X, int64_t k, int64_t kw, int64_t KWP, int64_t d0,
                int64_t pitch) {
  using V = typename Vec<T>::v;
  constexpr int N = Vec<T>::N;
  V acc[GD];
  for (int g = 0; g < GD; ++g) acc[g] = V{};
  for (int64_t a = 0; a < k; ++a) {
    const T* x = X[a] + d0 * pitch;
    const T* p = P + a * KWP * N;
    for (int64_t u = 0; u < kw; ++u) {
      const V pv = load(p + u * N);
      for (int g = 0; g < GD; ++g) acc[g] += pv * load(x + g * pitch + u);
    }
  }
  for (int g = 0; g < GD; ++g) store(O + (d0 + g) * N, acc[g]);
}

template <typename T>
NA_FN void pv(T* O, const T* P, const T* const* X, int64_t k, int64_t kw, int64_t KWP, int64_t D, int64_t pitch) {
  int64_t d0 = 0;
  for (; d0 + 8 <= D; d0 += 8) pv_g<T, 8>(O, P, X, k, kw, KWP, d0, pitch);
  switch (D - d0) {
    case 7: return pv_g<T, 7>(O, P, X, k, kw, KWP, d0, pitch);
    case 6: return pv_g<T, 6>(O, P, X, k, kw, KWP, d0, pitch);
    case 5: return pv_g<T, 5>(O, P, X, k, kw, KWP, d0, pitch);
    case 4: return pv_g<T, 4>(O, P, X, k, kw, KWP, d0, pitch);
    case 3: return pv_g<T, 3>(O, P, X, k, kw, KWP, d0, pitch);
    case 2: return pv_g<T, 2>(O, P, X, k, kw, KWP, d0, pitch);
    case 1: return pv_g<T, 1>(O, P, X, k, kw, KWP, d0, pitch);
    default: return;
  }
}

// ------------------------------------------------------------------------------------------------
// staging: one image row of one (batch, head) into the accumulation type
// ------------------------------------------------------------------------------------------------

#if MEGAMED_NA_VBYTES >= 32
// 8 x 8 float blocks transposed in registers (AVX): the staging of fp32/fp16/bf16 rows whose
// features are contiguous, ~3x faster than element by element.
NA_INL __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
NA_INL __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
NA_INL __m256 load8(const c10::BFloat16* p) {  // bf16 is the top half of an fp32
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

NA_INL void transpose8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// columns [jj0, jj0 + 8) of class cx (staged positions seg + jj), features [d0, d0 + 8)
template <typename scalar_t>
NA_INL void stage_block8(float* __restrict__ dst, const scalar_t* src, int64_t csw, int64_t pitch, float f) {
  __m256 r[8];
  const __m256 fv = _mm256_set1_ps(f);
  for (int i = 0; i < 8; ++i) r[i] = _mm256_mul_ps(load8(src + i * csw), fv);
  transpose8(r);
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + i * pitch, r[i]);
}
#endif

// dst[d * pitch + pos[c]] = src[c][d] * f  (transposed: lanes = columns)
template <typename scalar_t, typename T>
NA_FN void stage_t(T* __restrict__ dst, const scalar_t* src, int64_t sw, int64_t sd, const Layout& L, int64_t W,
                   int64_t D, T f) {
  const int64_t pitch = L.pitch;
#if MEGAMED_NA_VBYTES >= 32
  if constexpr (std::is_same_v<T, float>) {
    if (sd == 1) {
      // class by class: its columns cx, cx + dil, ... are consecutive staged positions
      const int64_t dil = static_cast<int64_t>(L.seg_n.size());
      for (int64_t cx = 0; cx < dil; ++cx) {
        const int64_t n = L.seg_n[cx], csw = sw * dil;
        const scalar_t* s0 = src + cx * sw;
        T* o0 = dst + L.seg_start[cx];
        int64_t jj = 0;
        for (; jj + 8 <= n; jj += 8) {
          int64_t d = 0;
          for (; d + 8 <= D; d += 8) stage_block8(o0 + d * pitch + jj, s0 + jj * csw + d, csw, pitch, f);
          for (int64_t i = 0; i < 8; ++i)
            for (int64_t dd = d; dd < D; ++dd) o0[dd * pitch + jj + i] = static_cast<T>(s0[(jj + i) * csw + dd]) * f;
        }
        for (; jj < n; ++jj)
          for (int64_t d = 0; d < D; ++d) o0[d * pitch + jj] = static_cast<T>(s0[jj * csw + d]) * f;
      }
      return;
    }
  }
#endif
  for (int64_t c = 0; c < W; ++c) {
    const scalar_t* s = src + c * sw;
    T* o = dst + L.pos[c];
    for (int64_t d = 0; d < D; ++d) o[d * pitch] = static_cast<T>(s[d * sd]) * f;
  }
}

// dst[pos[c] * D + d] = src[c][d] * f  (row-major: one column's features contiguous)
template <typename scalar_t, typename T>
NA_FN void stage_n(T* __restrict__ dst, const scalar_t* src, int64_t sw, int64_t sd, const Layout& L, int64_t W,
                   int64_t D, T f) {
  for (int64_t c = 0; c < W; ++c) {
    const scalar_t* s = src + c * sw;
    T* o = dst + L.pos[c] * D;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(s[d * sd]) * f;
  }
}

template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

// ------------------------------------------------------------------------------------------------
// strips: which lanes are clamped, the window range they span
// ------------------------------------------------------------------------------------------------

template <typename T>
struct Strip {
  static constexpr int N = Vec<T>::N;
  int64_t nreal;       // lanes holding real queries (the rest repeat the last one's window; ignored)
  bool masked;         // some lane's window is clamped: logits outside [lo_l, lo_l + k) are -inf
  int64_t umin, kw;    // window offsets of the strip: u in [0, kw) <-> unclamped offset u + umin
  int64_t lo[N];       // lane l's window is u in [lo[l], lo[l] + k)

  // Queries j0 .. j0+N-1 of a column class of n columns, kernel k.
  NA_INL Strip(int64_t j0, int64_t n, int64_t k) {
    nreal = std::min<int64_t>(N, n - j0);
    int64_t raw[N];
    masked = false;
    for (int l = 0; l < N; ++l) {
      // offset of lane l's window start from its unclamped start j - k/2 (0 in the interior)
      raw[l] = l < nreal ? window_start(j0 + l, n, k) - (j0 + l) + k / 2 : raw[nreal - 1];
      masked |= l < nreal && raw[l] != 0;
    }
    umin = 0;
    int64_t umax = k;
    if (masked) {
      umin = raw[0];
      umax = raw[0] + k;
      for (int l = 1; l < nreal; ++l) {
        umin = std::min(umin, raw[l]);
        umax = std::max(umax, raw[l] + k);
      }
    }
    kw = umax - umin;
    for (int l = 0; l < N; ++l) lo[l] = masked ? raw[l] - umin : 0;
  }
};

// ------------------------------------------------------------------------------------------------
// forward: rows [t0, t1) of the flattened (batch*head, row) order
// ------------------------------------------------------------------------------------------------

template <typename scalar_t>
NA_FN void forward_rows(const Problem& P, const Layout& L, const int64_t* order, int64_t t0, int64_t t1) {
  using T = acc_of<scalar_t>;
  using V = typename Vec<T>::v;
  using M = typename Vec<T>::m;
  constexpr int N = Vec<T>::N;
  const int64_t H = P.H, W = P.W, heads = P.heads, D = P.D, k = P.k, dil = P.dil, pitch = L.pitch;
  const int64_t kwp_max = 2 * k + (2 * k + 7) / 8 + 8;  // >= Blocking(kw).KWP for kw <= 2k - 1
  // per-thread scratch, allocated once per chunk (pads stay zero: staging writes data positions only)
  std::vector<T> kt(k * D * pitch), vt(k * D * pitch), qt(D * pitch), S(k * kwp_max * N), O(D * N);
  std::vector<int64_t> tag(k, -1);  // staged row (bh * H + row) held by each ring slot
  std::vector<const T*> Kr(k), Vr(k), Ks(k), Vs(k);
  const auto* q = static_cast<const scalar_t*>(P.q);
  const auto* kk = static_cast<const scalar_t*>(P.k_);
  const auto* v = static_cast<const scalar_t*>(P.v);
  auto* out = static_cast<scalar_t*>(P.out);
  const T scale = static_cast<T>(P.scale);
  const V ninf = splat(-std::numeric_limits<T>::infinity());

  for (int64_t t = t0; t < t1; ++t) {
    const int64_t bh = t / H, i = order[t % H], b = bh / heads, h = bh % heads;
    const int64_t ry = i % dil, p = i / dil, s = window_start(p, class_rows(H, dil, ry), k);
    // K / V window rows: a ring of k slots indexed by sub-row mod k; moving to the next query
    // row of the same class stages one new row.
    for (int64_t a = 0; a < k; ++a) {
      const int64_t sub = s + a, slot = sub % k, r = ry + sub * dil, key = bh * H + r;
      if (tag[slot] != key) {
        stage_t(kt.data() + slot * D * pitch, kk + b * P.sk.b + r * P.sk.h + h * P.sk.n, P.sk.w, P.sk.d, L, W, D,
                T(1));
        stage_t(vt.data() + slot * D * pitch, v + b * P.sv.b + r * P.sv.h + h * P.sv.n, P.sv.w, P.sv.d, L, W, D,
                T(1));
        tag[slot] = key;
      }
      Kr[a] = kt.data() + slot * D * pitch;
      Vr[a] = vt.data() + slot * D * pitch;
    }
    stage_t(qt.data(), q + b * P.sq.b + i * P.sq.h + h * P.sq.n, P.sq.w, P.sq.d, L, W, D, scale);

    for (int64_t cx = 0; cx < dil; ++cx) {
      const int64_t n = L.seg_n[cx], seg = L.seg_start[cx];
      for (int64_t j0 = 0; j0 < n; j0 += N) {
        const Strip<T> st(j0, n, k);
        const Blocking bl(st.kw);
        const int64_t base = seg + j0 - k / 2 + st.umin;  // staged position of lane 0's offset u = 0
        for (int64_t a = 0; a < k; ++a) {
          Ks[a] = Kr[a] + base;
          Vs[a] = Vr[a] + base;
        }
        dots(S.data(), qt.data() + seg + j0, Ks.data(), k, bl, D, pitch);
        // softmax over the k*kw logits of each lane: max, then exp and sum
        V lo, hi;
        for (int l = 0; l < N; ++l) {
          lo[l] = T(st.lo[l]);
          hi[l] = T(st.lo[l] + k);
        }
        V mx = ninf;
        for (int64_t a = 0; a < k; ++a) {
          for (int64_t u = 0; u < st.kw; ++u) {
            T* sp = S.data() + (a * bl.KWP + u) * N;
            V x = load(sp);
            if (st.masked) {
              const V uf = splat(T(u));
              const M in = (uf >= lo) & (uf < hi);
              x = in ? x : ninf;
              store(sp, x);
            }
            mx = x > mx ? x : mx;
          }
        }
        V sum = V{};
        for (int64_t a = 0; a < k; ++a) {
          for (int64_t u = 0; u < st.kw; ++u) {
            T* sp = S.data() + (a * bl.KWP + u) * N;
            const V e = vexp(load(sp) - mx);
            store(sp, e);
            sum += e;
          }
        }
        pv(O.data(), S.data(), Vs.data(), k, st.kw, bl.KWP, D, pitch);  // unnormalised
        const V inv = splat(T(1)) / sum;
        for (int64_t l = 0; l < st.nreal; ++l) {
          const int64_t c = cx + (j0 + l) * dil, row = (b * H + i) * W + c;
          scalar_t* dst = out + row * heads * D + h * D;
          const T w = inv[l];
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(O[d * N + l] * w);
          P.lse_out[row * heads + h] = static_cast<float>(mx[l] + std::log(sum[l]));
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// backward: query rows [p0, p1) of row class ry of one (batch, head)
// ------------------------------------------------------------------------------------------------
//
// Strategy: recompute P = exp(S - lse) per strip of queries (the forward's lse, any backend's),
// then per query
//   dP = dO . V^T,  dS = P * (dP - delta) with delta = rowsum(dO * O),  dQ = scale * dS . K
// written once (each query belongs to exactly one strip), and dK += scale * dS^T Q,
// dV += P^T dO SCATTERED from each query into its window's keys. The scatter targets per-thread
// accumulators of the staged key rows (a ring of k rows), added into the global fp32/fp64
// dK / dV when a row leaves the ring. Races are avoided by partitioning, not atomics: a block
// of R >= 2k - 2 consecutive query rows touches key rows [first - (k-1), last + (k-1)], so
// blocks b and b+2 of the same (batch, head, row class) never share a key row; even blocks run
// in one parallel_for, odd blocks in a second one.

// The dK / dV scatter of one strip and one window row, key by key: key e (staged position
// base + e) collects the lanes l whose window holds it (offset u = e - l), so each key's gradient
// is summed in registers and stored once per strip instead of once per (query, key) pair.
//   dK[e][d] += sum_l dS[e - l][l] * q_l[d],   dV[e][d] += sum_l P[e - l][l] * dO_l[d]
// (dS, P: [KWP][N] rows of this window row; q, dO: row-major staged [lane][D]; GD vectors of
// features per pass, starting at feature d0.)
template <typename T, int GD>
NA_FN void scatter_g(T* __restrict__ dK, T* __restrict__ dV, const T* dS, const T* P, const T* q, const T* go,
                     const Strip<T>& st, int64_t k, int64_t D, int64_t d0) {
  using V = typename Vec<T>::v;
  constexpr int N = Vec<T>::N;
  const int64_t keys = st.nreal + st.kw - 1;
  for (int64_t e = 0; e < keys; ++e) {
    V ak[GD], av[GD];
    for (int g = 0; g < GD; ++g) ak[g] = av[g] = V{};
    const int64_t l0 = std::max<int64_t>(0, e - st.kw + 1), l1 = std::min<int64_t>(st.nreal, e + 1);
    for (int64_t l = l0; l < l1; ++l) {
      const int64_t u = e - l;
      if (u < st.lo[l] || u >= st.lo[l] + k) continue;
      const T ws = dS[u * N + l], wp = P[u * N + l];
      const T* ql = q + l * D + d0;
      const T* gl = go + l * D + d0;
      for (int g = 0; g < GD; ++g) {
        ak[g] += ws * load(ql + g * N);
        av[g] += wp * load(gl + g * N);
      }
    }
    T* tk = dK + e * D + d0;
    T* tv = dV + e * D + d0;
    for (int g = 0; g < GD; ++g) {
      store(tk + g * N, load(tk + g * N) + ak[g]);
      store(tv + g * N, load(tv + g * N) + av[g]);
    }
  }
}

// features that do not fill a vector
template <typename T>
NA_FN void scatter_tail(T* __restrict__ dK, T* __restrict__ dV, const T* dS, const T* P, const T* q, const T* go,
                        const Strip<T>& st, int64_t k, int64_t D, int64_t d0) {
  constexpr int N = Vec<T>::N;
  const int64_t keys = st.nreal + st.kw - 1;
  for (int64_t e = 0; e < keys; ++e) {
    const int64_t l0 = std::max<int64_t>(0, e - st.kw + 1), l1 = std::min<int64_t>(st.nreal, e + 1);
    for (int64_t l = l0; l < l1; ++l) {
      const int64_t u = e - l;
      if (u < st.lo[l] || u >= st.lo[l] + k) continue;
      const T ws = dS[u * N + l], wp = P[u * N + l];
      for (int64_t d = d0; d < D; ++d) {
        dK[e * D + d] += ws * q[l * D + d];
        dV[e * D + d] += wp * go[l * D + d];
      }
    }
  }
}

template <typename T>
NA_FN void scatter(T* dK, T* dV, const T* dS, const T* P, const T* q, const T* go, const Strip<T>& st, int64_t k,
                   int64_t D) {
  constexpr int N = Vec<T>::N;
  constexpr int GMAX = MEGAMED_NA_VBYTES >= 64 ? 8 : 4;  // 2 * GMAX accumulators stay in registers
  int64_t d0 = 0;
  for (; d0 + GMAX * N <= D; d0 += GMAX * N) scatter_g<T, GMAX>(dK, dV, dS, P, q, go, st, k, D, d0);
  const int64_t rest = (D - d0) / N;
  switch (rest) {
    case 7: scatter_g<T, 7>(dK, dV, dS, P, q, go, st, k, D, d0); break;
    case 6: scatter_g<T, 6>(dK, dV, dS, P, q, go, st, k, D, d0); break;
    case 5: scatter_g<T, 5>(dK, dV, dS, P, q, go, st, k, D, d0); break;
    case 4: scatter_g<T, 4>(dK, dV, dS, P, q, go, st, k, D, d0); break;
    case 3: scatter_g<T, 3>(dK, dV, dS, P, q, go, st, k, D, d0); break;
    case 2: scatter_g<T, 2>(dK, dV, dS, P, q, go, st, k, D, d0); break;
    case 1: scatter_g<T, 1>(dK, dV, dS, P, q, go, st, k, D, d0); break;
    default: break;
  }
  d0 += rest * N;
  if (d0 < D) scatter_tail(dK, dV, dS, P, q, go, st, k, D, d0);
}

// dst[c * sc + d] += acc[pos[c] * D + d]: a staged key row's gradient into the global accumulator.
template <typename T>
NA_FN void flush_row(T* __restrict__ dst, const T* acc, const Layout& L, int64_t W, int64_t D, int64_t sc) {
  for (int64_t c = 0; c < W; ++c) {
    const T* s = acc + L.pos[c] * D;
    T* t = dst + c * sc;
    for (int64_t d = 0; d < D; ++d) t[d] += s[d];
  }
}

template <typename scalar_t>
NA_FN void backward_block(const Problem& P, const Layout& L, int64_t bh, int64_t ry, int64_t p0, int64_t p1) {
  using T = acc_of<scalar_t>;
  using V = typename Vec<T>::v;
  using M = typename Vec<T>::m;
  constexpr int N = Vec<T>::N;
  const int64_t H = P.H, W = P.W, heads = P.heads, D = P.D, k = P.k, dil = P.dil, pitch = L.pitch;
  const int64_t b = bh / heads, h = bh % heads, nr = class_rows(H, dil, ry);
  const int64_t kwp_max = 2 * k + (2 * k + 7) / 8 + 8;  // >= Blocking(kw).KWP for kw <= 2k - 1
  std::vector<T> kt(k * D * pitch), vt(k * D * pitch), dk(k * pitch * D), dv(k * pitch * D);
  std::vector<T> qt(D * pitch), got(D * pitch), qn(pitch * D), gon(pitch * D), lse(pitch), delta(pitch);
  std::vector<T> S(k * kwp_max * N), dP(k * kwp_max * N), O(D * N);
  std::vector<int64_t> tag(k, -1);  // key row held by each ring slot
  std::vector<const T*> Kr(k), Vr(k), Ks(k), Vs(k);
  std::vector<T*> dKr(k), dVr(k);
  const auto* q = static_cast<const scalar_t*>(P.q);
  const auto* kk = static_cast<const scalar_t*>(P.k_);
  const auto* v = static_cast<const scalar_t*>(P.v);
  const auto* go = static_cast<const scalar_t*>(P.go);
  const auto* o = static_cast<const scalar_t*>(P.o);
  auto* dq = static_cast<scalar_t*>(P.dq);
  auto* dk_acc = static_cast<T*>(P.dk_acc);
  auto* dv_acc = static_cast<T*>(P.dv_acc);
  const T scale = static_cast<T>(P.scale);
  const V ninf = splat(-std::numeric_limits<T>::infinity());

  auto flush = [&](int64_t slot) {
    const int64_t off = (((b * H + tag[slot]) * W) * heads + h) * D;
    flush_row(dk_acc + off, dk.data() + slot * pitch * D, L, W, D, heads * D);
    flush_row(dv_acc + off, dv.data() + slot * pitch * D, L, W, D, heads * D);
  };

  for (int64_t p = p0; p < p1; ++p) {
    const int64_t i = ry + p * dil, s = window_start(p, nr, k);
    for (int64_t a = 0; a < k; ++a) {
      const int64_t sub = s + a, slot = sub % k, r = ry + sub * dil;
      if (tag[slot] != r) {
        if (tag[slot] >= 0) flush(slot);
        stage_t(kt.data() + slot * D * pitch, kk + b * P.sk.b + r * P.sk.h + h * P.sk.n, P.sk.w, P.sk.d, L, W, D,
                T(1));
        stage_t(vt.data() + slot * D * pitch, v + b * P.sv.b + r * P.sv.h + h * P.sv.n, P.sv.w, P.sv.d, L, W, D,
                T(1));
        for (int64_t cx = 0; cx < dil; ++cx) {
          std::fill_n(dk.data() + (slot * pitch + L.seg_start[cx]) * D, L.seg_n[cx] * D, T(0));
          std::fill_n(dv.data() + (slot * pitch + L.seg_start[cx]) * D, L.seg_n[cx] * D, T(0));
        }
        tag[slot] = r;
      }
      Kr[a] = kt.data() + slot * D * pitch;
      Vr[a] = vt.data() + slot * D * pitch;
      dKr[a] = dk.data() + slot * pitch * D;
      dVr[a] = dv.data() + slot * pitch * D;
    }
    // the query row: q (scaled) and dO in both layouts, lse and delta = rowsum(dO * O)
    const scalar_t* qrow = q + b * P.sq.b + i * P.sq.h + h * P.sq.n;
    const scalar_t* grow = go + b * P.sgo.b + i * P.sgo.h + h * P.sgo.n;
    stage_t(qt.data(), qrow, P.sq.w, P.sq.d, L, W, D, scale);
    stage_n(qn.data(), qrow, P.sq.w, P.sq.d, L, W, D, scale);
    stage_t(got.data(), grow, P.sgo.w, P.sgo.d, L, W, D, T(1));
    stage_n(gon.data(), grow, P.sgo.w, P.sgo.d, L, W, D, T(1));
    for (int64_t c = 0; c < W; ++c) {
      const scalar_t* orow = o + b * P.so.b + i * P.so.h + c * P.so.w + h * P.so.n;
      const T* g = gon.data() + L.pos[c] * D;
      T acc = 0;
      for (int64_t d = 0; d < D; ++d) acc += g[d] * static_cast<T>(orow[d * P.so.d]);
      delta[L.pos[c]] = acc;
      lse[L.pos[c]] = static_cast<T>(P.lse_in[b * P.slse.b + i * P.slse.h + c * P.slse.w + h * P.slse.n]);
    }

    for (int64_t cx = 0; cx < dil; ++cx) {
      const int64_t n = L.seg_n[cx], seg = L.seg_start[cx];
      for (int64_t j0 = 0; j0 < n; j0 += N) {
        const Strip<T> st(j0, n, k);
        const Blocking bl(st.kw);
        const int64_t base = seg + j0 - k / 2 + st.umin;
        for (int64_t a = 0; a < k; ++a) {
          Ks[a] = Kr[a] + base;
          Vs[a] = Vr[a] + base;
        }
        dots(S.data(), qt.data() + seg + j0, Ks.data(), k, bl, D, pitch);    // scale * q.k
        dots(dP.data(), got.data() + seg + j0, Vs.data(), k, bl, D, pitch);  // dO.v
        V lo, hi;
        for (int l = 0; l < N; ++l) {
          lo[l] = T(st.lo[l]);
          hi[l] = T(st.lo[l] + k);
        }
        const V lv = load(lse.data() + seg + j0), dl = load(delta.data() + seg + j0);
        for (int64_t a = 0; a < k; ++a) {
          for (int64_t u = 0; u < st.kw; ++u) {
            const int64_t e = (a * bl.KWP + u) * N;
            V x = load(S.data() + e);
            if (st.masked) {
              const V uf = splat(T(u));
              const M in = (uf >= lo) & (uf < hi);
              x = in ? x : ninf;
            }
            const V pr = vexp(x - lv);
            store(S.data() + e, pr);                             // P
            store(dP.data() + e, pr * (load(dP.data() + e) - dl));  // dS (without the scale)
          }
        }
        // dQ = scale * dS . K, one write per query
        pv(O.data(), dP.data(), Ks.data(), k, st.kw, bl.KWP, D, pitch);
        for (int64_t l = 0; l < st.nreal; ++l) {
          const int64_t c = cx + (j0 + l) * dil;
          scalar_t* dst = dq + (((b * H + i) * W + c) * heads + h) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(O[d * N + l] * scale);
        }
        // dK += dS^T (scale q), dV += P^T dO into the staged key rows of the strip's windows
        for (int64_t a = 0; a < k; ++a)
          scatter(dKr[a] + base * D, dVr[a] + base * D, dP.data() + a * bl.KWP * N, S.data() + a * bl.KWP * N,
                  qn.data() + (seg + j0) * D, gon.data() + (seg + j0) * D, st, k, D);
      }
    }
  }
  for (int64_t slot = 0; slot < k; ++slot)
    if (tag[slot] >= 0) flush(slot);
}

// ------------------------------------------------------------------------------------------------
// entry points (plain functions: the parallel_for lambdas call the target-attributed workers)
// ------------------------------------------------------------------------------------------------

template <typename scalar_t>
void forward(const Problem& P) {
  const Layout L(P.W, P.k, P.dil, Vec<acc_of<scalar_t>>::N);
  // rows in class-major order (ry, then p), so a thread's consecutive rows share window rows
  std::vector<int64_t> order;
  order.reserve(P.H);
  for (int64_t ry = 0; ry < P.dil; ++ry)
    for (int64_t i = ry; i < P.H; i += P.dil) order.push_back(i);
  const int64_t rows = P.B * P.heads * P.H;
  at::parallel_for(0, rows, 1, [&](int64_t t0, int64_t t1) { forward_rows<scalar_t>(P, L, order.data(), t0, t1); });
}

template <typename scalar_t>
void backward(const Problem& P) {
  const Layout L(P.W, P.k, P.dil, Vec<acc_of<scalar_t>>::N);
  struct Block {
    int64_t bh, ry, p0, p1;
  };
  // blocks of >= 2k - 2 query rows (see backward_block); a few per thread when there are few
  // (batch, head, class) sequences, else one per sequence (fewer halo rows to restage)
  const int64_t seqs = P.B * P.heads * P.dil, threads = at::get_num_threads();
  const int64_t want = std::max<int64_t>(1, (4 * threads + seqs - 1) / seqs);
  const int64_t rmin = std::max<int64_t>(1, 2 * P.k - 2);
  std::vector<Block> phase[2];
  for (int64_t bh = 0; bh < P.B * P.heads; ++bh) {
    for (int64_t ry = 0; ry < P.dil; ++ry) {
      const int64_t nr = class_rows(P.H, P.dil, ry);
      const int64_t nb = std::clamp<int64_t>(want, 1, std::max<int64_t>(1, nr / rmin));
      for (int64_t blk = 0; blk < nb; ++blk) phase[blk % 2].push_back({bh, ry, blk * nr / nb, (blk + 1) * nr / nb});
    }
  }
  for (const auto& ph : phase) {
    at::parallel_for(0, static_cast<int64_t>(ph.size()), 1, [&](int64_t b0, int64_t b1) {
      for (int64_t x = b0; x < b1; ++x) backward_block<scalar_t>(P, L, ph[x].bh, ph[x].ry, ph[x].p0, ph[x].p1);
    });
  }
}

#undef NA_FN
#undef NA_INL

}  // namespace megamed::na2d::MEGAMED_NA_NS
