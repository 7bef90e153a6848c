// Shared, ISA-independent pieces of the CPU neighborhood-attention kernels (na2d_cpu.cpp).
//
// Semantics (megamed/ops/reference.py): q, k, v [B, H, W, heads, D]; query (i, j) attends to the
// k x k keys of its window, rows s(i) .. s(i)+k-1 with s(i) = clamp(i - k/2, 0, H - k) inside
// i's residue sub-grid (rows with the same i mod dilation), columns likewise; lse is float32
// [B, H, W, heads], the log-sum-exp of the scaled logits.
//
// The kernels work on STAGED rows: one image row of one (batch, head) copied into a small buffer
// in the accumulation type (float, or double for fp64), columns regrouped by residue class so that
// every class is a dense dilation-1 line, with zero padding around each class:
//
//   [ padl zeros | class 0: n_0 columns | padr zeros | padl zeros | class 1: n_1 columns | ... ]
//
// `pitch` is the length of a staged row; position pos[c] holds column c. Transposed staging
// (T[d * pitch + pos]) makes the d-th feature of consecutive queries/keys contiguous, which is
// what lets the kernels put one query per SIMD lane (see na2d_cpu_isa.h).
#pragma once

#include <cstdint>
#include <vector>

namespace megamed::na2d {

// Start of the window of position p on a line of n positions (n >= k), kernel k.
inline int64_t window_start(int64_t p, int64_t n, int64_t k) {
  const int64_t s = p - k / 2;
  return s < 0 ? 0 : (s > n - k ? n - k : s);
}

struct Strides5 {  // element strides of a [B, H, W, heads, D] tensor
  int64_t b, h, w, n, d;
};

// Everything a kernel needs, filled by na2d_cpu.cpp; pointers are cast to scalar_t there.
struct Problem {
  int64_t B, H, W, heads, D;
  int64_t k, dil;
  double scale;
  // inputs
  const void *q, *k_, *v;
  Strides5 sq, sk, sv;
  // forward outputs (contiguous)
  void* out = nullptr;
  float* lse_out = nullptr;
  // backward inputs / outputs
  const void *go = nullptr, *o = nullptr;
  Strides5 sgo{}, so{};
  const float* lse_in = nullptr;
  Strides5 slse{};            // d unused
  void* dq = nullptr;         // contiguous, input dtype
  void *dk_acc = nullptr, *dv_acc = nullptr;  // contiguous, accumulation dtype, zero-initialised
};

// Column layout of a staged row for `lanes` SIMD lanes (the right padding must hold the widest
// window a strip of lanes reads past the last column, see na2d_cpu_isa.h).
struct Layout {
  int64_t padl = 0, padr = 0, pitch = 0;
  std::vector<int64_t> pos;        // [W]: staged position of column c
  std::vector<int64_t> seg_start;  // [dil]: staged position of the first column of class cx
  std::vector<int64_t> seg_n;      // [dil]: columns in class cx

  Layout(int64_t W, int64_t k, int64_t dil, int64_t lanes) {
    padl = k;
    padr = 2 * k + 2 * lanes + 8;  // window (<= 2k-1) + G-block overrun (< 8) + one strip of lanes
    seg_start.resize(dil);
    seg_n.resize(dil);
    int64_t at = 0;
    for (int64_t cx = 0; cx < dil; ++cx) {
      seg_n[cx] = (W - cx + dil - 1) / dil;
      seg_start[cx] = at + padl;
      at += padl + seg_n[cx] + padr;
    }
    // a multiple of 16 elements (64 bytes) but an odd one: the kernels read 8 features (rows
    // pitch apart) at once, which a power-of-two pitch would put in the same L1 set
    pitch = (at + 15) / 16 * 16;
    if ((pitch / 16) % 2 == 0) pitch += 16;
    pos.resize(W);
    for (int64_t c = 0; c < W; ++c) pos[c] = seg_start[c % dil] + c / dil;
  }
};

// The query rows of one residue class of rows: rows ry, ry + dil, ..., n = their count.
inline int64_t class_rows(int64_t H, int64_t dil, int64_t ry) { return (H - ry + dil - 1) / dil; }

}  // namespace megamed::na2d
