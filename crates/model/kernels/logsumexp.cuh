// Online log-sum-exp for one-block-per-row CUDA kernels: each thread folds its columns into a
// pair (m, s) = (running max, sum of exp(x - m)), and the block merges the pairs in a fixed tree
// order, so results are deterministic. Shared by kernels/token_nll.cu (this crate) and
// crates/train/kernels/bucket_lse.cu; under QAT_CUDA_EMULATION (tests) the includes come from
// kernels/emulation/cuda_emulation.h.

#pragma once

#ifndef QAT_CUDA_EMULATION
#include <math_constants.h>
#endif

namespace lse {

// (m, s) <- the pair for the union of the columns behind (m, s) and (m2, s2). A pair with
// m = -inf stands for no columns (or only -inf ones): s is 0 there. A NaN in either pair makes
// the result NaN.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  if (m != m || s2 != s2) {
    m = m + m2;  // NaN stays NaN
    s = s + s2;
  } else if (m2 == -CUDART_INF_F) {
    return;
  } else if (m == -CUDART_INF_F) {
    m = m2;
    s = s2;
  } else if (m2 > m) {
    s = s * expf(m - m2) + s2;
    m = m2;
  } else {
    s = s + s2 * expf(m2 - m);
  }
}

// Folds one value into (m, s); a NaN makes the pair NaN for good.
__device__ __forceinline__ void fold(float& m, float& s, float x) {
  if (x != x) {
    m = x;
    s = x;
  } else {
    merge(m, s, x, 1.0f);
  }
}

// log Σ exp over the columns of every thread's (m, s), for all threads of a block of BLOCK
// threads (a power of two); red_m and red_s are BLOCK floats of shared memory. Call with every
// thread; ends with a barrier, so the scratch can be reused right after.
template <unsigned BLOCK>
__device__ float block_logsumexp(float* red_m, float* red_s, float m, float s) {
  red_m[threadIdx.x] = m;
  red_s[threadIdx.x] = s;
  __syncthreads();
  for (unsigned k = BLOCK / 2; k > 0; k >>= 1) {
    if (threadIdx.x < k) {
      float a = red_m[threadIdx.x], b = red_s[threadIdx.x];
      merge(a, b, red_m[threadIdx.x + k], red_s[threadIdx.x + k]);
      red_m[threadIdx.x] = a;
      red_s[threadIdx.x] = b;
    }
    __syncthreads();
  }
  const float result = red_m[0] + logf(red_s[0]);
  __syncthreads();
  return result;
}

}  // namespace lse
