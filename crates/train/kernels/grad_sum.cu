// Gradient sums over micro-batches (crates/train/src/grad_sum.rs), compiled to PTX by
// crates/train/build.rs with the `cuda` feature:
//
//   grad_sum_add_{f32,bf16,f16}   acc[i] <- acc[i] + (g[i] * scale + 0)   (in place; without
//                                 `scaled`: acc[i] + g[i])
//   grad_sum_copy_{f32,bf16,f16}  out[i] <- g[i] * scale + 0              (without `scaled`: g[i])
//
// acc and out are f32; the suffix names g's type, whose f32 value is exact. The operations are
// the composed candle ops' (`g.to_dtype(F32)`, `g * scale` = affine(scale, 0), `prev + g`) as IEEE
// intrinsics rounded to nearest, never contracted into an FMA, so the bits are theirs.
// Grid-stride loops over `n` elements. Without a GPU, tests/grad_sum_emulated.rs compiles this
// file against crates/model/kernels/emulation/cuda_emulation.h.
#ifndef QAT_CUDA_EMULATION
#include <stdint.h>
#endif

#include "../../model/kernels/float_io.cuh"

namespace {

template <typename G>
__device__ __forceinline__ float scaled_grad(const G* g, unsigned long long i, float scale,
                                             int scaled) {
  const float x = fio::load(g, i);
  return scaled ? __fadd_rn(__fmul_rn(x, scale), 0.0f) : x;
}

template <typename G>
__device__ void grad_sum_add(float* acc, const G* g, unsigned long long n, float scale,
                             int scaled) {
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)blockDim.x * gridDim.x) {
    acc[i] = __fadd_rn(acc[i], scaled_grad(g, i, scale, scaled));
  }
}

template <typename G>
__device__ void grad_sum_copy(float* out, const G* g, unsigned long long n, float scale,
                              int scaled) {
  for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
       i += (unsigned long long)blockDim.x * gridDim.x) {
    out[i] = scaled_grad(g, i, scale, scaled);
  }
}

}  // namespace

#define GRAD_SUM_KERNELS(SUFFIX, G)                                                          \
  extern "C" __global__ void grad_sum_add_##SUFFIX(float* acc, const G* g,                   \
                                                   unsigned long long n, float scale,        \
                                                   int scaled) {                             \
    grad_sum_add(acc, g, n, scale, scaled);                                                  \
  }                                                                                          \
  extern "C" __global__ void grad_sum_copy_##SUFFIX(float* out, const G* g,                  \
                                                    unsigned long long n, float scale,       \
                                                    int scaled) {                            \
    grad_sum_copy(out, g, n, scale, scaled);                                                 \
  }

GRAD_SUM_KERNELS(f32, float)
GRAD_SUM_KERNELS(bf16, __nv_bfloat16)
GRAD_SUM_KERNELS(f16, __half)
