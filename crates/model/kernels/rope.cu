// Rotary position embeddings ("rotate half", per-row positions) as one kernel on CUDA
// (crates/model/src/rope.rs), forward and backward: the composed ops (two table concatenations, a
// negation, a concatenation, two broadcast products and a sum, and their backward) make about
// ten passes over q and k per layer.
//
//   x, y  [b, heads, t, d] T, element (batch, head, pos, i) at batch · sb + head · sh + pos · st
//         + i, each with its own strides: the queries come as a transposed view of the projection's
//         [b, t, heads, d] output (read in place: no transpose copy), and the backward writes dx
//         in that layout again (so the projection's gradient needs no copy either)
//   cos, sin  [b, t, d/2] T, contiguous
//   y[.., i]       = x1_i · cos_i − σ · x2_i · sin_i      (x1 = x[.., :d/2], x2 = x[.., d/2:])
//   y[.., i + d/2] = x2_i · cos_i + σ · x1_i · sin_i      σ = +1 forward, −1 backward
// The backward of a rotation is the rotation by the negated angle, so the backward pass is this
// kernel on dy with σ = −1. f32 arithmetic, one rounding to T per output. Without a GPU,
// tests/rope_emulated.rs compiles this file against kernels/emulation/cuda_emulation.h and
// checks it against the CPU op.

#ifndef QAT_CUDA_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#endif

#include "float_io.cuh"

namespace {

constexpr unsigned ROPE_BLOCK = 256;

// One thread per pair (i, i + d/2), grid-stride over b · heads · t · d/2 pairs (fewer than 2^32,
// so the index arithmetic is 32-bit; the caller checks).
// Element strides (batch, head, position) of a [b, heads, t, d] operand.
struct RowStrides {
  long long sb, sh, st;
  __device__ size_t at(uint32_t batch, uint32_t head, uint32_t pos) const {
    return static_cast<size_t>(batch * sb + head * sh + pos * st);
  }
};

template <typename T>
__device__ void rope_rows(const T* __restrict__ x, const T* __restrict__ cos_t,
                          const T* __restrict__ sin_t, T* __restrict__ y, uint32_t heads,
                          uint32_t t, uint32_t half, uint32_t pairs, float sign, RowStrides xs,
                          RowStrides ys) {
  for (uint32_t p = blockIdx.x * ROPE_BLOCK + threadIdx.x; p < pairs; p += gridDim.x * ROPE_BLOCK) {
    const uint32_t i = p % half, row = p / half;  // row: (batch, head, position)
    const uint32_t pos = row % t, head = row / t % heads, batch = row / (heads * t);
    const size_t table = (static_cast<size_t>(batch) * t + pos) * half + i;
    const float c = fio::load(cos_t, table), s = sign * fio::load(sin_t, table);
    const size_t from = xs.at(batch, head, pos) + i, to = ys.at(batch, head, pos) + i;
    const float x1 = fio::load(x, from), x2 = fio::load(x, from + half);
    fio::store(y, to, x1 * c - x2 * s);
    fio::store(y, to + half, x2 * c + x1 * s);
  }
}

// x copied as it is into y (the values of a decoding step, written straight into the KV cache's
// new columns: crates/model/src/rope.rs `rope_into`): one thread per element, grid-stride over
// b · heads · t · d elements (fewer than 2^32; the caller checks), strides as rope_rows.
template <typename T>
__device__ void copy_rows(const T* __restrict__ x, T* __restrict__ y, uint32_t heads, uint32_t t,
                          uint32_t d, uint32_t elems, RowStrides xs, RowStrides ys) {
  for (uint32_t e = blockIdx.x * ROPE_BLOCK + threadIdx.x; e < elems; e += gridDim.x * ROPE_BLOCK) {
    const uint32_t i = e % d, row = e / d;
    const uint32_t pos = row % t, head = row / t % heads, batch = row / (heads * t);
    y[ys.at(batch, head, pos) + i] = x[xs.at(batch, head, pos) + i];
  }
}

}  // namespace

#define QAT_ROPE_KERNEL(SUFFIX, T)                                                             \
  extern "C" __global__ void rope_##SUFFIX(                                                    \
      const T* x, const T* cos_t, const T* sin_t, T* y, uint32_t heads, uint32_t t,           \
      uint32_t half, uint32_t pairs, float sign, long long x_sb, long long x_sh,              \
      long long x_st, long long y_sb, long long y_sh, long long y_st) {                       \
    rope_rows(x, cos_t, sin_t, y, heads, t, half, pairs, sign, RowStrides{x_sb, x_sh, x_st},  \
              RowStrides{y_sb, y_sh, y_st});                                                   \
  }                                                                                            \
  extern "C" __global__ void rope_copy_##SUFFIX(                                               \
      const T* x, T* y, uint32_t heads, uint32_t t, uint32_t d, uint32_t elems, long long x_sb, \
      long long x_sh, long long x_st, long long y_sb, long long y_sh, long long y_st) {         \
    copy_rows(x, y, heads, t, d, elems, RowStrides{x_sb, x_sh, x_st},                         \
              RowStrides{y_sb, y_sh, y_st});                                                   \
  }

QAT_ROPE_KERNEL(f32, float)
QAT_ROPE_KERNEL(bf16, __nv_bfloat16)
QAT_ROPE_KERNEL(f16, __half)
