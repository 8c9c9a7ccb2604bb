// Σ g² of one gradient tensor into one slot of a per-step f64 buffer (crates/train/src/
// sum_squares.rs), for the global gradient norm on CUDA: one read of the gradient, where the
// composed `g.sqr().sum_all()` writes and reads an f32 copy of it.
//
//   sum_squares_partial_f32  grid of at most PARTIALS blocks; each thread sums x² of a grid-stride
//                            slice in f64; each block writes its f64 sum to partial[block]
//                            (_bf16, _f16: the same over 16-bit gradients)
//   sum_squares_final        one block: out[slot] = Σ partial[0 .. blocks], in a fixed order
// Both reductions are fixed trees: deterministic. Without a GPU, tests/sum_squares_emulated.rs
// compiles this file against crates/model/kernels/emulation/cuda_emulation.h.

#ifndef QAT_CUDA_EMULATION
#include <stdint.h>
#endif

#include "../../model/kernels/block_reduce.cuh"
#include "../../model/kernels/float_io.cuh"

namespace {

constexpr unsigned SQ_BLOCK = 256;

template <typename T>
__device__ void sum_squares_partial(const T* __restrict__ g, unsigned long long n,
                                    double* __restrict__ partial) {
  __shared__ double red[SQ_BLOCK];
  double acc = 0.0;
  for (unsigned long long i = blockIdx.x * (unsigned long long)SQ_BLOCK + threadIdx.x; i < n;
       i += (unsigned long long)SQ_BLOCK * gridDim.x) {
    const double x = fio::load(g, i);  // exact for f32, bf16 and f16
    acc += x * x;
  }
  const double total = blockred::block_reduce<SQ_BLOCK>(red, acc, blockred::Sum());
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

__device__ void sum_squares_final(const double* __restrict__ partial, unsigned blocks,
                                  double* __restrict__ out, unsigned slot) {
  __shared__ double red[SQ_BLOCK];
  double acc = 0.0;
  for (unsigned i = threadIdx.x; i < blocks; i += SQ_BLOCK) acc += partial[i];
  const double total = blockred::block_reduce<SQ_BLOCK>(red, acc, blockred::Sum());
  if (threadIdx.x == 0) out[slot] = total;
}

}  // namespace

extern "C" __global__ void sum_squares_partial_f32(const float* g, unsigned long long n,
                                                   double* partial) {
  sum_squares_partial(g, n, partial);
}

// The same for the bf16 / f16 gradients of f32 weights cast to 16 bits in the forward pass.
extern "C" __global__ void sum_squares_partial_bf16(const __nv_bfloat16* g, unsigned long long n,
                                                    double* partial) {
  sum_squares_partial(g, n, partial);
}

extern "C" __global__ void sum_squares_partial_f16(const __half* g, unsigned long long n,
                                                   double* partial) {
  sum_squares_partial(g, n, partial);
}

extern "C" __global__ void sum_squares_final_f64(const double* partial, unsigned blocks,
                                                 double* out, unsigned slot) {
  sum_squares_final(partial, blocks, out, slot);
}
