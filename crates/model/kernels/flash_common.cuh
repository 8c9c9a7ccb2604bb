// Shared by flash_attention.cu (forward) and flash_attention_backward.cu: includes, 16-bit
// conversions, the visibility rule, the tile loads and the mma.sync fragments. See
// flash_attention.cu for the layouts.
//
// Without a GPU, tests compile the kernels as C++ against kernels/emulation/cuda_emulation.h (one
// host thread per CUDA thread, mma.sync by the PTX ISA's fragment layouts) and compare them with
// the CPU op: crates/model/tests/flash_attention_emulated.rs.

#pragma once

#ifndef QAT_CUDA_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>
#include <stdint.h>
#endif

namespace flash {

constexpr int VEC = 8;  // 16-bit elements per 16-byte load

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);  // round to nearest, ties to even
}
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half(x);  // round to nearest, ties to even
}

// Whether query column `query_col` (a key column: s - t + query row) of a row with `pad` padding
// columns sees key column `key`: pad..=query_col, or 0..=query_col for a padding column.
__device__ __forceinline__ bool visible(int key, int query_col, int pad, int s) {
  return key < s && key <= query_col && (key >= pad || query_col < pad);
}

// The key columns [begin, end) that queries q_first ..= q_last (of t) can see, begin a multiple
// of `cols`: from the first non-padding column (unless a query is itself a padding column: those
// see column 0) through the last query's column.
struct KeyRange {
  int begin, end;
};
__device__ __forceinline__ KeyRange key_range(int s, int t, int q_first, int q_last, int pad,
                                              int cols) {
  const int first_col = s - t + q_first;
  return {first_col >= pad ? (pad / cols) * cols : 0, s - t + q_last + 1};
}

// --- mma.sync m16n8k16 with register fragments (the forward kernel) ---
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"; g = lane / 4, t = lane % 4):
//   A 16x16  a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9],
//            a3 = A[g+8][2t+8, 2t+9] (two 16-bit elements per register, the first in the low half)
//   B 16x8   b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]
//   C/D 16x8 c0 = C[g][2t], c1 = C[g][2t+1], c2 = C[g+8][2t], c3 = C[g+8][2t+1]
// so an accumulator tile of scores, rounded and packed in pairs, is an A fragment of P with no
// trip through shared memory.

// Two elements as one 32-bit register, `lo` in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T v[2] = {from_float<T>(lo), from_float<T>(hi)};
  uint32_t r;
  __builtin_memcpy(&r, v, sizeof r);
  return r;
}

// The 32-bit register at `p` (two consecutive 16-bit elements; p 4-byte aligned).
template <typename T>
__device__ __forceinline__ uint32_t pair_at(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

#ifndef QAT_CUDA_EMULATION
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

// d[j] += A · B_j for the N tiles B_j (16 x 8 each) of one row of tiles: the warp's A fragment
// times N B fragments (b[j] = {b0, b1}).
template <typename T, int N>
__device__ __forceinline__ void warp_mma_row(float (&d)[N][4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[N][2]) {
#ifdef QAT_CUDA_EMULATION
  emu_warp_mma_row<T, N>(d, a, b);
#else
#pragma unroll
  for (int j = 0; j < N; ++j) mma_16816<T>(d[j], a, b[j][0], b[j][1]);
#endif
}

// Elements of padding per shared-memory tile row, so that the fragment reads of a warp (8 rows
// by 4 consecutive 32-bit words) hit 32 distinct banks.
constexpr int PAD = 8;

// Rows row0 .. row0 + ROWS of a [*, HD] matrix at `src` (rows `stride` elements apart, each row
// contiguous; stride and src 16-byte aligned) into shared memory as they are (`dst[row][d]`) or
// transposed (`dst[d][row]`), zeros for rows at or past `limit`; 16-byte global loads by all the
// block's threads (blockDim.x a multiple of 32; ROWS and HD multiples of 16).
//
// As they are: thread i loads chunk i % (HD / 8) of row i / (HD / 8) and stores it whole (a
// quarter warp writes one 128-byte row: no bank conflict). Transposed, each of a chunk's 8
// elements goes to another tile row, whose starts are (ROWS + PAD) / 2 words apart, a multiple
// of 4 banks: with that mapping the 8 chunks of a warp's row would hit one bank (8-way conflicts
// for HD 64, 16-way for 128). Instead a warp takes 16 rows by 2 adjacent chunks (one 32-byte
// sector per row in global memory), and its second half stores the chunk's elements in the order
// 4..7, 0..3: at each store the two halves are 16 banks apart and the 16 rows of a half span 8
// consecutive banks (two 16-bit elements per word), so every store is one wavefront.
template <typename T, int HD, int ROWS, bool TRANSPOSE>
__device__ __forceinline__ void load_tile(T (*dst)[(TRANSPOSE ? ROWS : HD) + PAD], const T* src,
                                          long long stride, int row0, int limit) {
  static_assert(ROWS % 16 == 0 && HD % 16 == 0, "tiles of 16 rows by 16 columns");
  for (int i = threadIdx.x; i < ROWS * HD / VEC; i += blockDim.x) {
    int r, col, half = 0;
    if (TRANSPOSE) {
      const int unit = i / 32, lane = i % 32;  // a warp's unit: 16 rows by 2 chunks
      half = lane / 16;
      r = (unit % (ROWS / 16)) * 16 + lane % 16;
      col = ((unit / (ROWS / 16)) * 2 + half) * VEC;
    } else {
      r = i / (HD / VEC);
      col = (i % (HD / VEC)) * VEC;
    }
    uint4 x = make_uint4(0, 0, 0, 0);
    if (row0 + r < limit) {
      x = *reinterpret_cast<const uint4*>(src + (row0 + r) * stride + col);
    }
    if (TRANSPOSE) {
      T v[VEC];
      __builtin_memcpy(v, &x, sizeof x);
#pragma unroll
      for (int c = 0; c < VEC; ++c) dst[col + (c ^ (half * 4))][r] = half ? v[c ^ 4] : v[c];
    } else {
      *reinterpret_cast<uint4*>(&dst[r][col]) = x;
    }
  }
}

// A fragments (one per 16 of the HD columns) of a warp's rows r0 + g and r0 + g + 8 of a
// [*, HD] matrix in global memory (rows `stride` elements apart, each row contiguous; `r0` the
// warp's first row; zeros at or past limit).
template <typename T, int HD>
__device__ __forceinline__ void load_row_frags(uint32_t (&f)[HD / 16][4], const T* base,
                                               long long stride, int r0, int limit) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int ra = r0 + g, rb = ra + 8;
  const T* row_a = base + ra * stride;
  const T* row_b = base + rb * stride;
#pragma unroll
  for (int c = 0; c < HD / 16; ++c) {
    const int d = c * 16 + 2 * t;
    f[c][0] = ra < limit ? pair_at(row_a + d) : 0u;
    f[c][1] = rb < limit ? pair_at(row_b + d) : 0u;
    f[c][2] = ra < limit ? pair_at(row_a + d + 8) : 0u;
    f[c][3] = rb < limit ? pair_at(row_b + d + 8) : 0u;
  }
}

// B fragments of N 8-column tiles from a shared-memory tile whose rows are B's columns:
// B_j[k][n] = tile[8j + n][k0 + k] for k < 16.
template <typename T, int N, int LD>
__device__ __forceinline__ void b_frags(uint32_t (&b)[N][2], const T (*tile)[LD], int k0) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    b[j][0] = pair_at(&tile[j * 8 + g][k0 + 2 * t]);
    b[j][1] = pair_at(&tile[j * 8 + g][k0 + 8 + 2 * t]);
  }
}

// The A fragment (rounded to T) of columns 16kk .. 16kk + 16 of accumulator tiles: tiles 2kk and
// 2kk + 1 (the C layout of two 16 x 8 tiles is the A layout of one 16 x 16 block).
template <typename T, int N>
__device__ __forceinline__ void a_frag_of(uint32_t (&a)[4], const float (&acc)[N][4], int kk) {
  a[0] = pack2<T>(acc[2 * kk][0], acc[2 * kk][1]);
  a[1] = pack2<T>(acc[2 * kk][2], acc[2 * kk][3]);
  a[2] = pack2<T>(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
  a[3] = pack2<T>(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

// Zeroes N accumulator tiles.
template <int N>
__device__ __forceinline__ void zero_acc(float (&acc)[N][4]) {
#pragma unroll
  for (int j = 0; j < N; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
}

// acc = A Bᵀ for a warp's 16 rows: A its HD / 16 fragments of HD columns, B the shared tile
// (rows: acc's N * 8 columns, each of HD elements, row-major with leading dimension LD).
template <typename T, int HD, int N, int LD>
__device__ __forceinline__ void rows_times_tile_t(float (&acc)[N][4],
                                                  const uint32_t (&a)[HD / 16][4],
                                                  const T (*tile)[LD]) {
  zero_acc(acc);
#pragma unroll
  for (int c = 0; c < HD / 16; ++c) {
    uint32_t b[N][2];
    b_frags(b, tile, c * 16);
    warp_mma_row<T, N>(acc, a[c], b);
  }
}

// acc += A B for a warp's 16 rows: A the accumulator tiles `x` (K columns, rounded to T), B the
// shared tile stored transposed (rows: acc's N * 8 columns, each of K elements).
template <typename T, int K, int N, int LD>
__device__ __forceinline__ void accumulate_times_tile(float (&acc)[N][4], const float (&x)[K / 8][4],
                                                      const T (*tile_t)[LD]) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    a_frag_of<T>(a, x, kk);
    uint32_t b[N][2];
    b_frags(b, tile_t, kk * 16);
    warp_mma_row<T, N>(acc, a, b);
  }
}


// The products above for a warp that owns MT row tiles of 16 (A operands a[mt], accumulators
// acc[mt]): each B fragment is read from shared memory once and used for all MT tiles, which
// divides the shared-memory reads per mma by MT. Row tiles with `live[mt]` false (past the last
// row; the same for the whole warp) are skipped.
template <typename T, int HD, int N, int LD, int MT>
__device__ __forceinline__ void rows_times_tile_t_multi(float (&acc)[MT][N][4],
                                                        const uint32_t (&a)[MT][HD / 16][4],
                                                        const T (*tile)[LD],
                                                        const bool (&live)[MT]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) zero_acc(acc[mt]);
#pragma unroll
  for (int c = 0; c < HD / 16; ++c) {
    uint32_t b[N][2];
    b_frags(b, tile, c * 16);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if (live[mt]) warp_mma_row<T, N>(acc[mt], a[mt][c], b);
    }
  }
}

template <typename T, int K, int N, int LD, int MT>
__device__ __forceinline__ void accumulate_times_tile_multi(float (&acc)[MT][N][4],
                                                            const float (&x)[MT][K / 8][4],
                                                            const T (*tile_t)[LD],
                                                            const bool (&live)[MT]) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t b[N][2];
    b_frags(b, tile_t, kk * 16);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if (!live[mt]) continue;
      uint32_t a[4];
      a_frag_of<T>(a, x[mt], kk);
      warp_mma_row<T, N>(acc[mt], a, b);
    }
  }
}

// Two consecutive outputs: f32 as they are, 16-bit types rounded once (what a cast of the f32
// values would give) and stored as one 32-bit word.
__device__ __forceinline__ void store_pair(float* p, float a, float b) {
  p[0] = a;
  p[1] = b;
}
template <typename T>
__device__ __forceinline__ void store_pair(T* p, float a, float b) {
  *reinterpret_cast<uint32_t*>(p) = pack2<T>(a, b);
}

// `scale` times a warp's accumulator rows r0 + g and r0 + g + 8 (HD / 8 tiles of 16 x 8) into the
// row-major [*, HD] matrix `dst` (f32, or the input type), rows at or past `limit` skipped.
template <int HD, typename OUT>
__device__ __forceinline__ void store_acc_rows(OUT* dst, const float (&acc)[HD / 8][4], int r0,
                                               int limit, float scale) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = r0 + g + 8 * h;
    if (row >= limit) continue;
    OUT* out = dst + static_cast<long long>(row) * HD + 2 * t;
#pragma unroll
    for (int j = 0; j < HD / 8; ++j) {
      store_pair(out + j * 8, acc[j][2 * h] * scale, acc[j][2 * h + 1] * scale);
    }
  }
}

}  // namespace flash
