// SwiGLU, silu(gate) · up, with its backward, for training on CUDA (crates/model/src/swiglu.rs):
// one pass forward and one backward over the [rows, intermediate] activations, where candle's
// composed silu, multiply and their backward make about ten.
//
//   forward   y = T(silu(g) · u),                silu(g) = g / (1 + exp(-g))
//   backward  dg = T(dy · u · σ(g) · (1 + g · (1 - σ(g)))),  du = T(dy · silu(g))
//
//   g, u, dy, y  [n] T (contiguous; f32, bf16 or f16)     out  [2n] T: dg, then du
//   joined       y = T(silu(g) · u) from gu [rows, 2 inter] (gate columns, then up; inference)
// f32 arithmetic inside, one rounding to T per output. Without a GPU,
// tests/swiglu_emulated.rs compiles this file against kernels/emulation/cuda_emulation.h and
// checks it against the CPU op.

#ifndef QAT_CUDA_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#endif

#include "float_io.cuh"

namespace {

constexpr unsigned SWIGLU_BLOCK = 256;

__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

// Grid-stride over the n elements.
template <typename T>
__device__ void swiglu_forward(const T* __restrict__ g, const T* __restrict__ u,
                               T* __restrict__ y, size_t n) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * SWIGLU_BLOCK + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * SWIGLU_BLOCK) {
    const float gv = fio::load(g, i);
    fio::store(y, i, gv * sigmoid(gv) * fio::load(u, i));
  }
}

template <typename T>
__device__ void swiglu_backward(const T* __restrict__ g, const T* __restrict__ u,
                                const T* __restrict__ dy, T* __restrict__ out, size_t n) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * SWIGLU_BLOCK + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * SWIGLU_BLOCK) {
    const float gv = fio::load(g, i), d = fio::load(dy, i);
    const float s = sigmoid(gv);
    fio::store(out, i, d * fio::load(u, i) * s * (1.0f + gv * (1.0f - s)));
    fio::store(out, n + i, d * gv * s);
  }
}

// The forward over a joined gate/up projection's output gu: [rows, 2 inter], each row's gate
// columns then its up columns (inference, crates/model/src/linear.rs `fuse_frozen`); y: [rows,
// inter]. The same arithmetic as swiglu_forward, so the same bits for the same gate and up.
template <typename T>
__device__ void swiglu_joined_forward(const T* __restrict__ gu, T* __restrict__ y, size_t rows,
                                      size_t inter) {
  const size_t n = rows * inter;
  for (size_t i = static_cast<size_t>(blockIdx.x) * SWIGLU_BLOCK + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * SWIGLU_BLOCK) {
    const size_t r = i / inter, c = i - r * inter;
    const T* row = gu + r * 2 * inter;
    const float gv = fio::load(row, c);
    fio::store(y, i, gv * sigmoid(gv) * fio::load(row, inter + c));
  }
}

}  // namespace

#define QAT_SWIGLU_KERNELS(SUFFIX, T)                                                             \
  extern "C" __global__ void swiglu_fwd_##SUFFIX(const T* g, const T* u, T* y, size_t n) {       \
    swiglu_forward(g, u, y, n);                                                                   \
  }                                                                                               \
  extern "C" __global__ void swiglu_bwd_##SUFFIX(const T* g, const T* u, const T* dy, T* out,    \
                                                 size_t n) {                                     \
    swiglu_backward(g, u, dy, out, n);                                                            \
  }                                                                                               \
  extern "C" __global__ void swiglu_joined_fwd_##SUFFIX(const T* gu, T* y, size_t rows,          \
                                                        size_t inter) {                          \
    swiglu_joined_forward(gu, y, rows, inter);                                                    \
  }

QAT_SWIGLU_KERNELS(f32, float)
QAT_SWIGLU_KERNELS(bf16, __nv_bfloat16)
QAT_SWIGLU_KERNELS(f16, __half)
