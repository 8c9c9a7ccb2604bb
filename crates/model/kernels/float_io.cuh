// Loads and stores of f32, bf16 and f16 elements as f32, for the element-wise and row-wise
// kernels (token_nll.cu, rms_norm.cu, swiglu.cu, rope.cu here, crates/quant/kernels/fake_quant.cu,
// and the gradient reads of crates/train/kernels/adamw.cu and sum_squares.cu): arithmetic in f32, one rounding to the storage type
// (nearest, ties to even) per store. Under QAT_CUDA_EMULATION (tests) the types come from
// kernels/emulation/cuda_emulation.h.

#pragma once

#ifndef QAT_CUDA_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#endif

namespace fio {

__device__ __forceinline__ float load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16* p, size_t i) {
  return __bfloat162float(p[i]);
}
__device__ __forceinline__ float load(const __half* p, size_t i) { return __half2float(p[i]); }

__device__ __forceinline__ void store(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, size_t i, float v) {
  p[i] = __float2bfloat16_rn(v);
}
__device__ __forceinline__ void store(__half* p, size_t i, float v) { p[i] = __float2half_rn(v); }

// v rounded to the type T of `like` and back (the identity for f32).
__device__ __forceinline__ float round_as(float v, const float*) { return v; }
__device__ __forceinline__ float round_as(float v, const __nv_bfloat16*) {
  return __bfloat162float(__float2bfloat16_rn(v));
}
__device__ __forceinline__ float round_as(float v, const __half*) {
  return __half2float(__float2half_rn(v));
}

}  // namespace fio
