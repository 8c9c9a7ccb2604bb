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

}  // namespace flash
