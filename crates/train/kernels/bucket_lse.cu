// The student's side of the top-K distillation loss (crates/train/src/loss/bucket_lse.rs) for
// CUDA, forward and backward, with logits in f32, bf16 or f16 (read as f32; c = 2 with `tail`,
// else 1):
//   forward   out[r, 0]     = log Σ_j exp(z[r, j])                      (all of the vocabulary)
//             out[r, 1]     = log Σ_{j ∉ ids[r, :]} exp(z[r, j])        (the tail bucket; with `tail`)
//             out[r, c + i] = z[r, ids[r, i]]                           (the top-K logits: the gather)
//   backward  dz[r, j] = g[r, 0] · exp(z[r, j] - out[r, 0])
//                      + g[r, 1] · exp(z[r, j] - out[r, 1]) · [j ∉ ids[r, :]]   (with `tail`)
//                      + Σ_{i : ids[r, i] = j} g[r, c + i]
// One pass over the logits each way, computed in f32 and rounded once to the logits' type on the
// store. The composed ops this replaces (a cast to f32, log_sum_exp twice, the [rows, vocab] -inf
// mask and its add, the gather, whose gradient is a scatter-add into a [rows, vocab] tensor of
// zeros, the sum of the two gradients, and the cast back) make about 40.
//
//   z      [rows, vocab] T, contiguous     ids [rows, k] u32, contiguous (ids >= vocab: gathered as
//                                           -inf, no gradient)
//   out    [rows, c + k] f32
//   saved  [rows, 2c + k] f32 (backward): each row's out[.., :c], then the gradient of its out
//   dz     [rows, vocab] T (backward)
//
// One block of LSE_BLOCK threads per row. The row's ids become a bitmask in shared memory
// (atomicOr, whose result does not depend on the order), so vocab <= 32 * LSE_MAX_WORDS. Sums use
// the online log-sum-exp of crates/model/kernels/logsumexp.cuh, merged in a fixed order. The
// backward writes the columns outside the ids in one loop and those of the ids in another, each
// once (top-K ids are distinct, formats/shards.md); a row whose ids repeat one (the bitmask sees
// it) has its id columns summed by one thread in id order instead. So every result is
// deterministic. Without a GPU, tests/bucket_lse_emulated.rs compiles this file against
// crates/model/kernels/emulation/cuda_emulation.h and checks it against the CPU op.

#ifndef QAT_CUDA_EMULATION
#include <math_constants.h>
#include <stdint.h>
#endif

#include "../../model/kernels/float_io.cuh"
#include "../../model/kernels/logsumexp.cuh"

namespace {

constexpr unsigned LSE_BLOCK = 256;
constexpr uint32_t LSE_MAX_WORDS = 8192;  // vocabularies up to 262,144 ids

// mask <- the bits of the row's ids (the first ceil(vocab / 32) words); *repeated <- whether an
// id occurs twice. Ends with a barrier.
__device__ void build_mask(uint32_t* mask, unsigned* repeated, const uint32_t* ids, uint32_t k,
                           uint32_t vocab) {
  const uint32_t words = (vocab + 31) / 32;
  for (uint32_t w = threadIdx.x; w < words; w += LSE_BLOCK) mask[w] = 0;
  if (threadIdx.x == 0) *repeated = 0;
  __syncthreads();
  for (uint32_t i = threadIdx.x; i < k; i += LSE_BLOCK) {
    const uint32_t id = ids[i];
    if (id < vocab) {
      const uint32_t bit = 1u << (id & 31);
      if (atomicOr(&mask[id >> 5], bit) & bit) atomicOr(repeated, 1u);
    }
  }
  __syncthreads();
}

__device__ __forceinline__ bool in_mask(const uint32_t* mask, uint32_t j) {
  return (mask[j >> 5] >> (j & 31)) & 1u;
}

template <typename T>
__device__ void bucket_lse_row(const T* __restrict__ logits, const uint32_t* __restrict__ ids,
                               float* __restrict__ out, uint32_t vocab, uint32_t k, int tail) {
  __shared__ uint32_t mask[LSE_MAX_WORDS];
  __shared__ unsigned repeated;
  __shared__ float red_m[LSE_BLOCK];
  __shared__ float red_s[LSE_BLOCK];
  const size_t row = blockIdx.x;
  const uint32_t c = tail ? 2 : 1;
  const T* z = logits + row * vocab;
  const uint32_t* id = ids + row * k;
  float* o = out + row * (c + k);
  if (tail) build_mask(mask, &repeated, id, k, vocab);
  float m = -CUDART_INF_F, s = 0.0f, mt = -CUDART_INF_F, st = 0.0f;
  for (uint32_t j = threadIdx.x; j < vocab; j += LSE_BLOCK) {
    const float x = fio::load(z, j);
    lse::fold(m, s, x);
    if (tail && !in_mask(mask, j)) lse::fold(mt, st, x);
  }
  for (uint32_t i = threadIdx.x; i < k; i += LSE_BLOCK) {
    const uint32_t j = id[i];
    o[c + i] = j < vocab ? fio::load(z, j) : -CUDART_INF_F;
  }
  const float all = lse::block_logsumexp<LSE_BLOCK>(red_m, red_s, m, s);
  if (tail) {
    const float rest = lse::block_logsumexp<LSE_BLOCK>(red_m, red_s, mt, st);
    if (threadIdx.x == 0) {
      o[0] = all;
      o[1] = rest;
    }
  } else if (threadIdx.x == 0) {
    o[0] = all;
  }
}

template <typename T>
__device__ void bucket_lse_backward_row(const T* __restrict__ logits,
                                        const uint32_t* __restrict__ ids,
                                        const float* __restrict__ saved, T* __restrict__ dz,
                                        uint32_t vocab, uint32_t k, int tail) {
  __shared__ uint32_t mask[LSE_MAX_WORDS];
  __shared__ unsigned repeated;
  const size_t row = blockIdx.x;
  const uint32_t c = tail ? 2 : 1;
  const T* z = logits + row * vocab;
  const uint32_t* id = ids + row * k;
  const float* sv = saved + row * (2 * c + k);  // the forward's lse, their gradient, the ids'
  const float* g_ids = sv + 2 * c;
  T* d = dz + row * vocab;
  build_mask(mask, &repeated, id, k, vocab);
  const float lse_all = sv[0], g_all = sv[c];
  const float lse_tail = tail ? sv[1] : 0.0f, g_tail = tail ? sv[c + 1] : 0.0f;
  // The columns outside the ids: both log-sum-exps' terms.
  for (uint32_t j = threadIdx.x; j < vocab; j += LSE_BLOCK) {
    if (in_mask(mask, j)) continue;
    const float x = fio::load(z, j);
    float v = g_all * expf(x - lse_all);
    if (tail) v += g_tail * expf(x - lse_tail);
    fio::store(d, j, v);
  }
  // The ids' columns: the first log-sum-exp's term (they are not in the tail) plus the gathered
  // logits' gradients.
  if (!repeated) {
    for (uint32_t i = threadIdx.x; i < k; i += LSE_BLOCK) {
      const uint32_t j = id[i];
      if (j < vocab) fio::store(d, j, g_all * expf(fio::load(z, j) - lse_all) + g_ids[i]);
    }
  } else if (threadIdx.x == 0) {
    for (uint32_t i = 0; i < k; ++i) {
      const uint32_t j = id[i];
      bool first = j < vocab;
      for (uint32_t e = 0; first && e < i; ++e) first = id[e] != j;
      if (!first) continue;
      float v = g_all * expf(fio::load(z, j) - lse_all);
      for (uint32_t e = i; e < k; ++e) {
        if (id[e] == j) v += g_ids[e];
      }
      fio::store(d, j, v);
    }
  }
}

}  // namespace

#define BUCKET_LSE_KERNELS(T, NAME)                                                              \
  extern "C" __global__ void bucket_lse_##NAME(const T* logits, const uint32_t* ids, float* out, \
                                               uint32_t vocab, uint32_t k, int tail) {           \
    bucket_lse_row(logits, ids, out, vocab, k, tail);                                            \
  }                                                                                              \
  extern "C" __global__ void bucket_lse_backward_##NAME(const T* logits, const uint32_t* ids,    \
                                                        const float* saved, T* dz,               \
                                                        uint32_t vocab, uint32_t k, int tail) {  \
    bucket_lse_backward_row(logits, ids, saved, dz, vocab, k, tail);                             \
  }

BUCKET_LSE_KERNELS(float, f32)
BUCKET_LSE_KERNELS(__nv_bfloat16, bf16)
BUCKET_LSE_KERNELS(__half, f16)
