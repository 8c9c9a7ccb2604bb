// A block-wide reduction in a fixed tree order, for the one-block-per-row (or per-chunk) kernels:
// causal_softmax.cu, rms_norm.cu and token_nll.cu here, crates/quant/kernels/fake_quant.cu,
// crates/sample/kernels/sample_rows.cu and crates/train/kernels/sum_squares.cu; and a warp-wide
// one for the one-warp-per-group kernels (crates/quant/kernels/asym_group.cu, nf_group.cu). The
// pairs are combined in the same order every run, so results are deterministic. Under QAT_CUDA_EMULATION
// (tests) the CUDA names come from kernels/emulation/cuda_emulation.h.

#pragma once

#ifndef QAT_CUDA_EMULATION
#include <stdint.h>
#endif

namespace blockred {

struct Sum {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const {
    return a + b;
  }
};

// fmaxf: a NaN operand yields the other one.
struct Max {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

struct Min {
  __device__ __forceinline__ uint32_t operator()(uint32_t a, uint32_t b) const {
    return min(a, b);
  }
};

// fminf: a NaN operand yields the other one.
struct MinF {
  __device__ __forceinline__ float operator()(float a, float b) const { return fminf(a, b); }
};

// op over every thread's v, folded from the halves of the block down; `red` is BLOCK values of
// shared memory, BLOCK = blockDim.x a power of two. Call with every thread of the block; ends
// with a barrier, so `red` can be reused right after.
template <unsigned BLOCK, typename V, typename Op>
__device__ V block_reduce(V* red, V v, Op op) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (unsigned k = BLOCK / 2; k > 0; k >>= 1) {
    if (threadIdx.x < k) red[threadIdx.x] = op(red[threadIdx.x], red[threadIdx.x + k]);
    __syncthreads();
  }
  const V result = red[0];
  __syncthreads();
  return result;
}

// op over the 32 lanes of a warp by a fixed xor tree; every lane gets the result. Call with
// every lane of the warp.
template <typename Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
  for (int m = 16; m > 0; m >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}

// The largest and the smallest of x[0 .. n) into every lane of the warp, each lane reading
// elements lane, lane + 32, ... (call with the whole warp).
__device__ __forceinline__ void warp_max_min(const float* x, unsigned n, unsigned lane, float& mx,
                                             float& mn) {
  mx = -INFINITY;
  mn = INFINITY;
  for (unsigned i = lane; i < n; i += 32) {
    mx = fmaxf(mx, x[i]);
    mn = fminf(mn, x[i]);
  }
  mx = warp_reduce(mx, Max());
  mn = warp_reduce(mn, MinF());
}

}  // namespace blockred
