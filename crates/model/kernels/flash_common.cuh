// Shared by flash_attention.cu (forward) and flash_attention_backward.cu: includes, 16-bit
// conversions, the visibility rule and the tile loads. See flash_attention.cu for the layouts.
//
// Without a GPU, tests compile the kernels as C++ against kernels/emulation/cuda_emulation.h (one
// host thread per CUDA thread, WMMA by its documented semantics) and compare them with the CPU
// op: crates/model/tests/flash_attention_emulated.rs.

#pragma once

#ifndef QAT_CUDA_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>
#include <mma.h>
#include <stdint.h>
#endif

using namespace nvcuda;

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

// The key columns [begin, end) that query rows q0 .. q0 + rows (of t) can see, begin a multiple
// of `cols`: from the first non-padding column (unless a row is itself a padding column: those
// see column 0) through the last row's column.
struct KeyRange {
  int begin, end;
};
__device__ __forceinline__ KeyRange key_range(int s, int t, int q0, int rows, int pad, int cols) {
  const int first_col = s - t + q0;
  return {first_col >= pad ? (pad / cols) * cols : 0, s - t + min(q0 + rows, t)};
}

// Rows row0 .. row0 + ROWS of a row-major [*, HD] matrix at `src` into `dst` (shared memory),
// zeros for rows at or past `limit`, with 16-byte loads by all the block's threads.
template <typename T, int HD, int ROWS>
__device__ __forceinline__ void load_rows(T (*dst)[HD], const T* src, int row0, int limit) {
  for (int i = threadIdx.x; i < ROWS * HD / VEC; i += blockDim.x) {
    const int r = i / (HD / VEC), col = (i % (HD / VEC)) * VEC;
    uint4 x = make_uint4(0, 0, 0, 0);
    if (row0 + r < limit) {
      x = *reinterpret_cast<const uint4*>(src + static_cast<long long>(row0 + r) * HD + col);
    }
    *reinterpret_cast<uint4*>(&dst[r][col]) = x;
  }
}

// Writes `scale` times the f32 rows of a warp's 16 x 16 slice (`scratch`, row-major) into the
// row-major [*, HD] f32 matrix `dst` at rows row0.., columns col0..; rows at or past `limit` are
// skipped. Lane 2r + h writes row r, columns h * 8 .. h * 8 + 8.
template <int HD>
__device__ __forceinline__ void store_slice(float* dst, const float* scratch, int row0, int col0,
                                            int limit, float scale) {
  const int lane = threadIdx.x % 32, r = lane / 2, h = lane % 2;
  if (row0 + r < limit) {
    float* out = dst + static_cast<long long>(row0 + r) * HD + col0 + h * 8;
#pragma unroll
    for (int c = 0; c < 8; ++c) out[c] = scratch[r * 16 + h * 8 + c] * scale;
  }
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

// --- WMMA 16x16x16 fragments (the backward kernels) ---

template <typename T>
using RowsFrag = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
using AccFrag = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// Column block kk of a warp's 16 rows of HD values: held as HD / 16 fragments, or read from
// shared memory ([16][HD] row-major) into `tmp`.
template <typename T, int HD>
__device__ __forceinline__ const RowsFrag<T>& rows_block(const RowsFrag<T> (&rows)[HD / 16], int kk,
                                                         RowsFrag<T>&) {
  return rows[kk];
}
template <typename T, int HD>
__device__ __forceinline__ const RowsFrag<T>& rows_block(const T (*rows)[HD], int kk,
                                                         RowsFrag<T>& tmp) {
  wmma::load_matrix_sync(tmp, &rows[0][kk * 16], HD);
  return tmp;
}

// dst = A tileᵀ, f32 [16][COLS] row-major: A a warp's 16 rows of HD values (see rows_block),
// tile [COLS][HD] in shared memory, read column-major so that B[d][n] = tile[n][d].
template <typename T, int HD, int COLS, typename Rows>
__device__ __forceinline__ void rows_times_tile_t(float* dst, const Rows& a, const T (*tile)[HD]) {
#pragma unroll
  for (int j = 0; j < COLS / 16; ++j) {
    AccFrag acc;
    wmma::fill_fragment(acc, 0.f);
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      RowsFrag<T> tmp;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
      wmma::load_matrix_sync(b, &tile[j * 16][kk * 16], HD);
      wmma::mma_sync(acc, rows_block<T, HD>(a, kk, tmp), b, acc);
    }
    wmma::store_matrix_sync(dst + j * 16, acc, COLS, wmma::mem_row_major);
  }
}

// acc[j] += A tile[:, 16j .. 16j + 16] for every j < HD / 16: A a warp's [16][K] in shared
// memory (row-major, leading dimension K), tile [K][HD] in shared memory.
template <typename T, int HD, int K>
__device__ __forceinline__ void accumulate_times_tile(AccFrag (&acc)[HD / 16], const T* a,
                                                      const T (*tile)[HD]) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    RowsFrag<T> a_frag;
    wmma::load_matrix_sync(a_frag, a + kk * 16, K);
#pragma unroll
    for (int j = 0; j < HD / 16; ++j) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
      wmma::load_matrix_sync(b, &tile[kk * 16][j * 16], HD);
      wmma::mma_sync(acc[j], a_frag, b, acc[j]);
    }
  }
}

// Writes `scale` times a warp's 16 rows of HD accumulators into the row-major [*, HD] f32 matrix
// `dst` at rows row0.. (those below `limit`), through `scratch` (16 x 16 f32 of the warp's own).
template <int HD>
__device__ __forceinline__ void store_rows(float* dst, const AccFrag (&acc)[HD / 16],
                                           float* scratch, int row0, int limit, float scale) {
#pragma unroll
  for (int j = 0; j < HD / 16; ++j) {
    __syncwarp();
    wmma::store_matrix_sync(scratch, acc[j], 16, wmma::mem_row_major);
    __syncwarp();
    store_slice<HD>(dst, scratch, row0, j * 16, limit, scale);
  }
  __syncwarp();
}

}  // namespace flash
