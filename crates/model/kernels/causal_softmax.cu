// The composed attention's softmax with its scale and its mask inside
// (crates/model/src/causal_softmax.rs), for CUDA: the scores of a chunk of t queries over s key
// columns, rows [b, heads, t] flattened,
// each row r of batch row b = r / rows_per_batch and query i = r % t (query column q = s - t + i).
// The row's visible keys are [pad_b, q] when q >= pad_b, else [0, q] (a padding query, whose output
// is discarded: causal, so its softmax stays finite), as KvCache::next_mask masks them:
//   forward   y[j] = exp(c·x[j] - m) / Σ_visible exp(c·x[k] - m) on the visible keys, 0 elsewhere
//             (c = the scale, m = the visible maximum of c·x)
//   backward  dx[j] = c · y[j] · (g[j] - Σ_k g[k] · y[k])       (0 wherever y is)
// This replaces the composed ops' scaling, their mask tensor, its broadcast add (a read and a
// write of every score), and the backward's five passes (g·y, its row sums, g - dot, the product) with one read
// and one write forward and two reads and a write backward. f32 arithmetic, T = f32, bf16 or f16
// storage rounded once per store; one block of CS_BLOCK threads per row, reductions in a fixed
// tree order (block_reduce.cuh: deterministic). Without a GPU, tests/causal_softmax_emulated.rs compiles this file
// against kernels/emulation/cuda_emulation.h and checks it against the CPU op.
//
//   x, y, g, dx  [rows, s] T, contiguous      pads  [batch] u32

#ifndef QAT_CUDA_EMULATION
#include <math_constants.h>
#include <stdint.h>
#endif

#include "block_reduce.cuh"
#include "float_io.cuh"

namespace {

constexpr unsigned CS_BLOCK = 256;

// The visible key range [lo, hi) of row `row`.
__device__ __forceinline__ void visible(uint32_t row, uint32_t rows_per_batch, uint32_t t,
                                        uint32_t s, const uint32_t* pads, uint32_t& lo,
                                        uint32_t& hi) {
  const uint32_t pad = pads[row / rows_per_batch];
  const uint32_t q = s - t + row % t;
  lo = q >= pad ? pad : 0;
  hi = q + 1;
}

template <typename T>
__device__ void causal_softmax_row(const T* __restrict__ x, T* __restrict__ y,
                                   const uint32_t* __restrict__ pads, uint32_t rows_per_batch,
                                   uint32_t t, uint32_t s, float scale) {
  __shared__ float red[CS_BLOCK];
  const size_t row = blockIdx.x;
  const T* xr = x + row * s;
  T* yr = y + row * s;
  uint32_t lo, hi;
  visible(static_cast<uint32_t>(row), rows_per_batch, t, s, pads, lo, hi);
  float m = -CUDART_INF_F;
  for (uint32_t j = lo + threadIdx.x; j < hi; j += CS_BLOCK) {
    m = fmaxf(m, scale * fio::load(xr, j));
  }
  m = blockred::block_reduce<CS_BLOCK>(red, m, blockred::Max());
  float sum = 0.0f;
  for (uint32_t j = lo + threadIdx.x; j < hi; j += CS_BLOCK) {
    sum += expf(scale * fio::load(xr, j) - m);
  }
  const float inv = 1.0f / blockred::block_reduce<CS_BLOCK>(red, sum, blockred::Sum());
  for (uint32_t j = threadIdx.x; j < s; j += CS_BLOCK) {
    const float v = j >= lo && j < hi ? expf(scale * fio::load(xr, j) - m) * inv : 0.0f;
    fio::store(yr, j, v);
  }
}

template <typename T>
__device__ void softmax_backward_row(const T* __restrict__ y, const T* __restrict__ g,
                                     T* __restrict__ dx, uint32_t s, float scale) {
  __shared__ float red[CS_BLOCK];
  const size_t row = blockIdx.x;
  const T* yr = y + row * s;
  const T* gr = g + row * s;
  T* dr = dx + row * s;
  float dot = 0.0f;
  for (uint32_t j = threadIdx.x; j < s; j += CS_BLOCK) dot += fio::load(gr, j) * fio::load(yr, j);
  dot = blockred::block_reduce<CS_BLOCK>(red, dot, blockred::Sum());
  for (uint32_t j = threadIdx.x; j < s; j += CS_BLOCK) {
    fio::store(dr, j, scale * fio::load(yr, j) * (fio::load(gr, j) - dot));
  }
}

}  // namespace

#define CAUSAL_SOFTMAX_KERNELS(T, NAME)                                                         \
  extern "C" __global__ void causal_softmax_##NAME(const T* x, T* y, const uint32_t* pads,     \
                                                   uint32_t rows_per_batch, uint32_t t,         \
                                                   uint32_t s, float scale) {                   \
    causal_softmax_row(x, y, pads, rows_per_batch, t, s, scale);                                \
  }                                                                                             \
  extern "C" __global__ void softmax_backward_##NAME(const T* y, const T* g, T* dx, uint32_t s, \
                                                     float scale) {                             \
    softmax_backward_row(y, g, dx, s, scale);                                                   \
  }

CAUSAL_SOFTMAX_KERNELS(float, f32)
CAUSAL_SOFTMAX_KERNELS(__nv_bfloat16, bf16)
CAUSAL_SOFTMAX_KERNELS(__half, f16)
