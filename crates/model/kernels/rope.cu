// Rotary position embeddings ("rotate half", per-row positions) as one kernel for training on
// CUDA (crates/model/src/rope_grad.rs), forward and backward: the composed ops (two table
// concatenations, a negation, a concatenation, two broadcast products and a sum, and their
// backward) make about ten passes over q and k per layer.
//
//   x, y  [b, heads, t, d] T, contiguous        cos, sin  [b, t, d/2] T, contiguous
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
template <typename T>
__device__ void rope_rows(const T* __restrict__ x, const T* __restrict__ cos_t,
                          const T* __restrict__ sin_t, T* __restrict__ y, uint32_t heads,
                          uint32_t t, uint32_t half, uint32_t pairs, float sign) {
  for (uint32_t p = blockIdx.x * ROPE_BLOCK + threadIdx.x; p < pairs; p += gridDim.x * ROPE_BLOCK) {
    const uint32_t i = p % half, row = p / half;  // row: (batch, head, position)
    const uint32_t pos = row % t, batch = row / (heads * t);
    const size_t table = (static_cast<size_t>(batch) * t + pos) * half + i;
    const float c = fio::load(cos_t, table), s = sign * fio::load(sin_t, table);
    const size_t at = static_cast<size_t>(row) * 2 * half + i;
    const float x1 = fio::load(x, at), x2 = fio::load(x, at + half);
    fio::store(y, at, x1 * c - x2 * s);
    fio::store(y, at + half, x2 * c + x1 * s);
  }
}

}  // namespace

#define QAT_ROPE_KERNEL(SUFFIX, T)                                                             \
  extern "C" __global__ void rope_##SUFFIX(const T* x, const T* cos_t, const T* sin_t, T* y,   \
                                           uint32_t heads, uint32_t t, uint32_t half,         \
                                           uint32_t pairs, float sign) {                      \
    rope_rows(x, cos_t, sin_t, y, heads, t, half, pairs, sign);                                \
  }

QAT_ROPE_KERNEL(f32, float)
QAT_ROPE_KERNEL(bf16, __nv_bfloat16)
QAT_ROPE_KERNEL(f16, __half)
