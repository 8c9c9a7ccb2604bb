// Next-token negative log-likelihood and rank straight from logits (crates/model/src/token_nll.rs),
// for CUDA, in one read of the logits and with no [rows, vocab] intermediate (the composed path
// casts to f32, then log_softmax takes about eight passes over each row before the gather):
//   out[r, 0] = logsumexp(logits[r, :]) - logits[r, t]                 (f32)
//   out[r, 1] = #{ j : logits[r, j] > logits[r, t], or equal with j < t }  (0: t is the argmax)
// where t = targets[r].
//
//   logits  [rows, vocab]  f32, bf16 or f16, contiguous
//   targets [rows]         u32; a target >= vocab gives NaN (the Rust side checks them first)
//   out     [rows, 2]      f32
//
// One block of NLL_BLOCK threads per row. Each thread keeps an online (max m, sum s of exp(x - m))
// (logsumexp.cuh) and its rank count over its strided columns, in f32; the block merges them in
// a fixed tree order, so results are deterministic. NaN logits give a NaN NLL. Without a GPU,
// crates/model/tests/token_nll_emulated.rs compiles this file against
// kernels/emulation/cuda_emulation.h and checks it against an f64 computation.

#ifndef QAT_CUDA_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>
#include <stdint.h>
#endif

#include "block_reduce.cuh"
#include "float_io.cuh"
#include "logsumexp.cuh"

namespace {

constexpr unsigned NLL_BLOCK = 256;

template <typename T>
__device__ void token_nll_row(const T* __restrict__ logits, const uint32_t* __restrict__ targets,
                              float* __restrict__ out, uint32_t vocab) {
  __shared__ float red_m[NLL_BLOCK];
  __shared__ float red_s[NLL_BLOCK];
  __shared__ uint32_t red_rank[NLL_BLOCK];
  const size_t row = blockIdx.x;
  const T* z = logits + row * vocab;
  const uint32_t t = targets[row];
  const float zt = t < vocab ? fio::load(z, t) : CUDART_NAN_F;
  float m = -CUDART_INF_F, s = 0.0f;
  uint32_t rank = 0;
  for (uint32_t i = threadIdx.x; i < vocab; i += NLL_BLOCK) {
    const float x = fio::load(z, i);
    rank += (x > zt || (x == zt && i < t)) ? 1u : 0u;
    lse::fold(m, s, x);
  }
  const float logz = lse::block_logsumexp<NLL_BLOCK>(red_m, red_s, m, s);
  rank = blockred::block_reduce<NLL_BLOCK>(red_rank, rank, blockred::Sum());
  if (threadIdx.x == 0) {
    out[2 * row] = logz - zt;
    out[2 * row + 1] = static_cast<float>(rank);
  }
}

}  // namespace

extern "C" __global__ void token_nll_f32(const float* logits, const uint32_t* targets, float* out,
                                         uint32_t vocab) {
  token_nll_row(logits, targets, out, vocab);
}

extern "C" __global__ void token_nll_bf16(const __nv_bfloat16* logits, const uint32_t* targets,
                                          float* out, uint32_t vocab) {
  token_nll_row(logits, targets, out, vocab);
}

extern "C" __global__ void token_nll_f16(const __half* logits, const uint32_t* targets, float* out,
                                         uint32_t vocab) {
  token_nll_row(logits, targets, out, vocab);
}
