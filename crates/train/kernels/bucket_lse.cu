// Row log-sum-exp of the student's logits for the top-K distillation loss
// (crates/train/src/loss/bucket_lse.rs), forward and backward, for CUDA (f32):
//   forward   out[r, 0] = log Σ_j exp(z[r, j])                      (all of the vocabulary)
//             out[r, 1] = log Σ_{j ∉ ids[r, :]} exp(z[r, j])        (the tail bucket; with `tail`)
//   backward  dz[r, j] = g[r, 0] · exp(z[r, j] - out[r, 0])
//                      + g[r, 1] · exp(z[r, j] - out[r, 1]) · [j ∉ ids[r, :]]   (with `tail`)
// One pass over the logits each way, where the composed ops (log_sum_exp twice, the [rows, vocab]
// -inf mask and its add, and their backward) make about 30.
//
//   z      [rows, vocab] f32, contiguous     ids [rows, k] u32, contiguous (ids >= vocab ignored)
//   out    [rows, c] f32, c = 2 with tail, else 1
//   saved  [rows, 2c] f32 (backward): each row's out, then the gradient g of that row
//   dz     [rows, vocab] f32 (backward)
//
// One block of LSE_BLOCK threads per row. The row's ids become a bitmask in shared memory
// (atomicOr, whose result does not depend on the order), so vocab <= 32 * LSE_MAX_WORDS. Sums use
// the online log-sum-exp of crates/model/kernels/logsumexp.cuh, merged in a fixed order:
// deterministic. Without a GPU, tests/bucket_lse_emulated.rs compiles this file against
// crates/model/kernels/emulation/cuda_emulation.h and checks it against the CPU op.

#ifndef QAT_CUDA_EMULATION
#include <math_constants.h>
#include <stdint.h>
#endif

#include "../../model/kernels/logsumexp.cuh"

namespace {

constexpr unsigned LSE_BLOCK = 256;
constexpr uint32_t LSE_MAX_WORDS = 8192;  // vocabularies up to 262,144 ids

// mask <- the bits of the row's ids (the first ceil(vocab / 32) words). Ends with a barrier.
__device__ void build_mask(uint32_t* mask, const uint32_t* ids, uint32_t k, uint32_t vocab) {
  const uint32_t words = (vocab + 31) / 32;
  for (uint32_t w = threadIdx.x; w < words; w += LSE_BLOCK) mask[w] = 0;
  __syncthreads();
  for (uint32_t i = threadIdx.x; i < k; i += LSE_BLOCK) {
    const uint32_t id = ids[i];
    if (id < vocab) atomicOr(&mask[id >> 5], 1u << (id & 31));
  }
  __syncthreads();
}

__device__ __forceinline__ bool in_mask(const uint32_t* mask, uint32_t j) {
  return (mask[j >> 5] >> (j & 31)) & 1u;
}

__device__ void bucket_lse_row(const float* __restrict__ logits, const uint32_t* __restrict__ ids,
                               float* __restrict__ out, uint32_t vocab, uint32_t k, int tail) {
  __shared__ uint32_t mask[LSE_MAX_WORDS];
  __shared__ float red_m[LSE_BLOCK];
  __shared__ float red_s[LSE_BLOCK];
  const size_t row = blockIdx.x;
  const float* z = logits + row * vocab;
  if (tail) build_mask(mask, ids + row * k, k, vocab);
  float m = -CUDART_INF_F, s = 0.0f, mt = -CUDART_INF_F, st = 0.0f;
  for (uint32_t j = threadIdx.x; j < vocab; j += LSE_BLOCK) {
    const float x = z[j];
    lse::fold(m, s, x);
    if (tail && !in_mask(mask, j)) lse::fold(mt, st, x);
  }
  const float all = lse::block_logsumexp<LSE_BLOCK>(red_m, red_s, m, s);
  if (tail) {
    const float rest = lse::block_logsumexp<LSE_BLOCK>(red_m, red_s, mt, st);
    if (threadIdx.x == 0) {
      out[2 * row] = all;
      out[2 * row + 1] = rest;
    }
  } else if (threadIdx.x == 0) {
    out[row] = all;
  }
}

__device__ void bucket_lse_backward_row(const float* __restrict__ logits,
                                        const uint32_t* __restrict__ ids,
                                        const float* __restrict__ saved, float* __restrict__ dz,
                                        uint32_t vocab, uint32_t k, int tail) {
  __shared__ uint32_t mask[LSE_MAX_WORDS];
  const size_t row = blockIdx.x;
  const uint32_t c = tail ? 2 : 1;
  const float* z = logits + row * vocab;
  const float* sv = saved + row * 2 * c;  // the forward's row, then its gradient
  float* d = dz + row * vocab;
  if (tail) build_mask(mask, ids + row * k, k, vocab);
  const float lse_all = sv[0], g_all = sv[c];
  const float lse_tail = tail ? sv[1] : 0.0f, g_tail = tail ? sv[c + 1] : 0.0f;
  for (uint32_t j = threadIdx.x; j < vocab; j += LSE_BLOCK) {
    const float x = z[j];
    float v = g_all * expf(x - lse_all);
    if (tail && !in_mask(mask, j)) v += g_tail * expf(x - lse_tail);
    d[j] = v;
  }
}

}  // namespace

extern "C" __global__ void bucket_lse_f32(const float* logits, const uint32_t* ids, float* out,
                                          uint32_t vocab, uint32_t k, int tail) {
  bucket_lse_row(logits, ids, out, vocab, k, tail);
}

extern "C" __global__ void bucket_lse_backward_f32(const float* logits, const uint32_t* ids,
                                                   const float* saved, float* dz, uint32_t vocab,
                                                   uint32_t k, int tail) {
  bucket_lse_backward_row(logits, ids, saved, dz, vocab, k, tail);
}
