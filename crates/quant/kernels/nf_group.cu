// crates/quant/kernels/nf_group.cu: NormalFloat fake quantization per group (NF3, BitDistiller's
// "n2f3", and NF4; crates/quant/src/nf.rs) as one CUDA kernel (crates/quant/src/fused_nf.rs),
// compiled to PTX by crates/quant/build.rs with the `cuda` feature. One warp per group of
// `group` consecutive elements (any length), 8 groups per block. Per group, as the composed path
// in f32: NF3 scales f16(min(|max|, 65504)) for x >= 0 and f16(min(|min|, 65504)) below; NF4 one
// scale f16(min(max |x|, 65504)); u = x / s (0 where s = 0); the level index counts the
// thresholds u passes (NF3: u >= T, NF4: u > T); out = level * s. The levels and thresholds are
// nf.rs's f32 constants (generated from it; the tests compare every value with the composed
// path). The gradient is the identity (STE), so there is no backward kernel. Without a GPU,
// crates/quant/tests/nf_group_emulated.rs compiles this file against
// crates/model/kernels/emulation/cuda_emulation.h.
#ifndef QAT_CUDA_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#endif

#include "../../model/kernels/block_reduce.cuh"
#include "../../model/kernels/float_io.cuh"

namespace {

constexpr unsigned NF_BLOCK = 256;  // 8 warps, one group each
constexpr unsigned NF_GROUPS_PER_BLOCK = NF_BLOCK / 32;

__device__ __forceinline__ float nf3_level(int i) {
  switch (i) {
    case 0: return -1.0f;
    case 1: return -0.53502274f;
    case 2: return -0.2469314f;
    case 3: return 0.0f;
    case 4: return 0.18333752f;
    case 5: return 0.38199395f;
    case 6: return 0.62298566f;
    default: return 1.0f;
  }
}

__device__ __forceinline__ float nf4_level(int i) {
  switch (i) {
    case 0: return -1.0f;
    case 1: return -0.6961928f;
    case 2: return -0.52507305f;
    case 3: return -0.3949175f;
    case 4: return -0.28444138f;
    case 5: return -0.18477343f;
    case 6: return -0.091050036f;
    case 7: return 0.0f;
    case 8: return 0.0795803f;
    case 9: return 0.1609302f;
    case 10: return 0.2461123f;
    case 11: return 0.33791524f;
    case 12: return 0.44070983f;
    case 13: return 0.562617f;
    case 14: return 0.72295684f;
    default: return 1.0f;
  }
}

__device__ __forceinline__ int nf3_index(float u) {
  return (u >= -0.76751137f) +
         (u >= -0.39097708f) +
         (u >= -0.1234657f) +
         (u >= 0.09166876f) +
         (u >= 0.28266573f) +
         (u >= 0.5024898f) +
         (u >= 0.8114928f);
}

__device__ __forceinline__ int nf4_index(float u) {
  return (u > -0.84809643f) +
         (u > -0.6106329f) +
         (u > -0.45999527f) +
         (u > -0.33967942f) +
         (u > -0.2346074f) +
         (u > -0.13791174f) +
         (u > -0.045525018f) +
         (u > 0.03979015f) +
         (u > 0.120255254f) +
         (u > 0.20352125f) +
         (u > 0.29201376f) +
         (u > 0.38931254f) +
         (u > 0.5016634f) +
         (u > 0.6427869f) +
         (u > 0.8614784f);
}

// A scale as the packed model stores it: f16, saturating at 65504.
__device__ __forceinline__ float nf_f16_scale(float a) {
  return __half2float(__float2half_rn(a > 65504.0f ? 65504.0f : a));
}

template <typename Out>
__device__ void nf_group_fq(const float* __restrict__ x, Out* __restrict__ out, size_t groups,
                            unsigned group, int nf3) {
  const size_t gi = static_cast<size_t>(blockIdx.x) * NF_GROUPS_PER_BLOCK + threadIdx.x / 32;
  if (gi >= groups) return;  // the whole warp
  const unsigned lane = threadIdx.x % 32;
  const float* xg = x + gi * group;
  Out* og = out + gi * group;
  float mx, mn;
  blockred::warp_max_min(xg, group, lane, mx, mn);
  const float s_pos = nf_f16_scale(nf3 ? fabsf(mx) : fmaxf(fabsf(mx), fabsf(mn)));
  const float s_neg = nf3 ? nf_f16_scale(fabsf(mn)) : s_pos;
  for (unsigned i = lane; i < group; i += 32) {
    const float xi = xg[i];
    const float s = xi >= 0.0f ? s_pos : s_neg;
    const float u = s == 0.0f ? 0.0f : __fdiv_rn(xi, s);
    const float level = nf3 ? nf3_level(nf3_index(u)) : nf4_level(nf4_index(u));
    fio::store(og, i, __fmul_rn(level, s));
  }
}

}  // namespace

extern "C" __global__ void nf_group_fq_f32(const float* x, float* out, size_t groups,
                                           unsigned group, int nf3) {
  nf_group_fq(x, out, groups, group, nf3);
}

extern "C" __global__ void nf_group_fq_f32_bf16(const float* x, __nv_bfloat16* out, size_t groups,
                                                unsigned group, int nf3) {
  nf_group_fq(x, out, groups, group, nf3);
}
