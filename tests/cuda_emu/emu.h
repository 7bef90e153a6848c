// A CPU stand-in for the little CUDA that kernels/cuda/na2d_block.cuh uses, so its block body runs
// (slowly) without a GPU: one std::thread per CUDA thread, std::barrier for __syncthreads(), IEEE
// fp16 / bf16 conversions with round-to-nearest-even, and nvcuda::wmma m16n16k16 fragments that
// hold the whole 16 x 16 tile in lane 0 of the warp (the kernel never touches fragment elements,
// so their real register layout does not matter). The WMMA calls check the documented
// requirements: 256-bit aligned pointers and ldm a multiple of 16 bytes.
//
// What this can catch: index arithmetic, masking, missing __syncthreads (run under
// -fsanitize=thread), shared-memory and global out-of-bounds (-fsanitize=address, memory filled
// with NaN), the WMMA layouts and alignment. What it cannot: anything about real hardware speed,
// register limits, tensor-core rounding details (products are summed in fp32 here too).
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#define __device__
#define __host__
#define __forceinline__ inline

// ---- fp16 / bf16 -----------------------------------------------------------------------------
struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};

// fp16 through the compiler's _Float16 (GCC >= 12 / Clang on x86-64 and arm64): IEEE binary16,
// conversions round to nearest even like __float2half_rn.
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.x, 2);
  return float(v);
}

inline __half __float2half_rn(float f) {
  const _Float16 v = static_cast<_Float16>(f);
  __half h;
  std::memcpy(&h.x, &v, 2);
  return h;
}

inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t bits = uint32_t(b.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (std::isnan(f)) return {uint16_t((bits >> 16) | 0x40)};
  bits += 0x7fff + ((bits >> 16) & 1);  // round to nearest even
  return {uint16_t(bits >> 16)};
}

// ---- threads ---------------------------------------------------------------------------------
namespace emu {
struct ThreadCtx {
  std::barrier<>* block = nullptr;  // all threads of the block
  std::barrier<>* warp = nullptr;   // the 32 threads of this thread's warp
  int lane = 0;
};
inline thread_local ThreadCtx ctx;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emu: %s\n", what);
  std::abort();
}
}  // namespace emu

inline void __syncthreads() { emu::ctx.block->arrive_and_wait(); }

// ---- WMMA ------------------------------------------------------------------------------------
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only m16n16k16");
  float v[16][16];  // (row, col) of the tile: A is M x K, B is K x N, C is M x N
};

template <typename T>
inline void check_ptr(const T* ptr, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) emu::fail("wmma pointer not 256-bit aligned");
  if ((ldm * sizeof(T)) % 16 != 0) emu::fail("wmma ldm not a multiple of 16 bytes");
}

inline float as_float(float v) { return v; }
inline float as_float(__half v) { return __half2float(v); }
inline float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* ptr, unsigned ldm) {
  static_assert(std::is_same<Layout, row_major>::value || std::is_same<Layout, col_major>::value, "layout");
  check_ptr(ptr, ldm);
  if (emu::ctx.lane != 0) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.v[r][c] = as_float(std::is_same<Layout, row_major>::value ? ptr[r * ldm + c] : ptr[c * ldm + r]);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* ptr, unsigned ldm,
                             layout_t layout) {
  check_ptr(ptr, ldm);
  if (emu::ctx.lane != 0) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r][c] = layout == mem_row_major ? ptr[r * ldm + c] : ptr[c * ldm + r];
}

// Warp-synchronous like the real one: the warp's earlier loads are done before lane 0 writes, and
// its later loads see the write.
inline void store_matrix_sync(float* ptr, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  check_ptr(ptr, ldm);
  emu::ctx.warp->arrive_and_wait();
  if (emu::ctx.lane == 0)
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) (layout == mem_row_major ? ptr[r * ldm + c] : ptr[c * ldm + r]) = f.v[r][c];
  emu::ctx.warp->arrive_and_wait();
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float value) {
  for (auto& row : f.v)
    for (float& x : row) x = value;
}

template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  if (emu::ctx.lane != 0) return;
  float out[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i][j];
      for (int k = 0; k < 16; ++k) s += a.v[i][k] * b.v[k][j];
      out[i][j] = s;
    }
  std::memcpy(d.v, out, sizeof out);
}
}  // namespace wmma
}  // namespace nvcuda
