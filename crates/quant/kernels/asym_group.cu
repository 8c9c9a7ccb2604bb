// crates/quant/kernels/asym_group.cu: BitDistiller's asymmetric per-group fake quantization
// (`asym_group`, crates/quant/src/asym.rs) as CUDA kernels (crates/quant/src/fused_asym.rs),
// compiled to PTX by crates/quant/build.rs with the `cuda` feature. One warp per group of
// `group` consecutive elements (any length; lanes stride over it), 8 groups per block.
//
// Forward (asym_group_fq_f32, _f32_bf16: the f32 result rounded once to bf16 on the store), the
// composed path's f32 operations in its order, as IEEE intrinsics (never contracted into FMAs):
//   range = max - min;  scale = f16(min(max(range, 1e-5) / M, 65504));
//   zero  = clamp(-rint(min / scale), 0, M);  code = clamp(rint(x / scale) + zero, 0, M);
//   out   = (code - zero) * scale + 0
// Backward of BitDistiller's min/max gradient (asym_group_minmax_grad_f32, _bf16: the incoming
// gradient's type), formats/scheme.md "Gradients":
//   dx_i = inside_i * g_i + k_i * S,   S = sum_j g_j * a_j,   a_j = (code_j - zero) - inside_j * x_j / scale,
//   k_i  = ([x_i = max] / n_max - [x_i = min] / n_min) * [range >= 1e-5] / M
// S is summed per lane in index order and then over the lanes by a fixed xor tree:
// deterministic, but not the composed ops' order (the CPU op and the tests allow for that).
// Without a GPU, crates/quant/tests/asym_group_emulated.rs compiles this file against
// crates/model/kernels/emulation/cuda_emulation.h and checks it against the CPU op.
#ifndef QAT_CUDA_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#endif

#include "../../model/kernels/block_reduce.cuh"
#include "../../model/kernels/float_io.cuh"

namespace {

constexpr unsigned ASYM_BLOCK = 256;  // 8 warps, one group each
constexpr unsigned ASYM_GROUPS_PER_BLOCK = ASYM_BLOCK / 32;

// candle's maximum / minimum (clamp is maximum, then minimum): the first operand unless the
// second is strictly larger / smaller.
__device__ __forceinline__ float cmax(float a, float b) { return a < b ? b : a; }
__device__ __forceinline__ float cmin(float a, float b) { return a > b ? b : a; }

// One group's quantizer: its max, min, scale and zero point.
struct AsymGroup {
  float mx, mn, scale, zero;
};

__device__ __forceinline__ AsymGroup asym_group_params(const float* x, unsigned group, unsigned lane, float m) {
  float mx, mn;
  blockred::warp_max_min(x, group, lane, mx, mn);
  const float range = __fsub_rn(mx, mn);
  const float scale = __half2float(__float2half_rn(cmin(__fdiv_rn(cmax(range, 1e-5f), m), 65504.0f)));
  const float zero = cmin(cmax(-rintf(__fdiv_rn(mn, scale)), 0.0f), m);
  return AsymGroup{mx, mn, scale, zero};
}

// rint(x / scale) + zero: the code before its clamp to [0, M].
__device__ __forceinline__ float unclamped_code(float x, const AsymGroup& q) {
  return __fadd_rn(rintf(__fdiv_rn(x, q.scale)), q.zero);
}

template <typename Out>
__device__ void asym_group_fq(const float* __restrict__ x, Out* __restrict__ out, size_t groups,
                              unsigned group, float m) {
  const size_t gi = static_cast<size_t>(blockIdx.x) * ASYM_GROUPS_PER_BLOCK + threadIdx.x / 32;
  if (gi >= groups) return;  // the whole warp
  const unsigned lane = threadIdx.x % 32;
  const float* xg = x + gi * group;
  Out* og = out + gi * group;
  const AsymGroup q = asym_group_params(xg, group, lane, m);
  for (unsigned i = lane; i < group; i += 32) {
    const float code = cmin(cmax(unclamped_code(xg[i], q), 0.0f), m);
    fio::store(og, i, __fadd_rn(__fmul_rn(__fsub_rn(code, q.zero), q.scale), 0.0f));
  }
}

template <typename G>
__device__ void asym_group_minmax_grad(const float* __restrict__ x, const G* __restrict__ g,
                                       float* __restrict__ dx, size_t groups, unsigned group,
                                       float m) {
  const size_t gi = static_cast<size_t>(blockIdx.x) * ASYM_GROUPS_PER_BLOCK + threadIdx.x / 32;
  if (gi >= groups) return;
  const unsigned lane = threadIdx.x % 32;
  const float* xg = x + gi * group;
  const G* gg = g + gi * group;
  float* dg = dx + gi * group;
  const AsymGroup q = asym_group_params(xg, group, lane, m);
  float s = 0.0f, n_max = 0.0f, n_min = 0.0f;
  for (unsigned i = lane; i < group; i += 32) {
    const float xi = xg[i], u = __fdiv_rn(xi, q.scale), v = __fadd_rn(rintf(u), q.zero);
    const float code = cmin(cmax(v, 0.0f), m);
    const float inside = (v >= 0.0f && v <= m) ? 1.0f : 0.0f;
    const float a = __fsub_rn(__fsub_rn(code, q.zero), __fmul_rn(inside, u));
    s = __fadd_rn(s, __fmul_rn(fio::load(gg, i), a));
    n_max = __fadd_rn(n_max, xi == q.mx ? 1.0f : 0.0f);
    n_min = __fadd_rn(n_min, xi == q.mn ? 1.0f : 0.0f);
  }
  s = blockred::warp_reduce(s, blockred::Sum());
  n_max = blockred::warp_reduce(n_max, blockred::Sum());
  n_min = blockred::warp_reduce(n_min, blockred::Sum());
  const float live = __fsub_rn(q.mx, q.mn) >= 1e-5f ? 1.0f : 0.0f;
  for (unsigned i = lane; i < group; i += 32) {
    const float xi = xg[i], v = unclamped_code(xi, q);
    const float inside = (v >= 0.0f && v <= m) ? 1.0f : 0.0f;
    const float k = __fdiv_rn(
        __fmul_rn(__fsub_rn(__fdiv_rn(xi == q.mx ? 1.0f : 0.0f, n_max),
                            __fdiv_rn(xi == q.mn ? 1.0f : 0.0f, n_min)),
                  live),
        m);
    dg[i] = __fadd_rn(__fmul_rn(fio::load(gg, i), inside), __fmul_rn(s, k));
  }
}

}  // namespace

extern "C" __global__ void asym_group_fq_f32(const float* x, float* out, size_t groups,
                                             unsigned group, float m) {
  asym_group_fq(x, out, groups, group, m);
}

extern "C" __global__ void asym_group_fq_f32_bf16(const float* x, __nv_bfloat16* out,
                                                  size_t groups, unsigned group, float m) {
  asym_group_fq(x, out, groups, group, m);
}

extern "C" __global__ void asym_group_minmax_grad_f32(const float* x, const float* g, float* dx,
                                                      size_t groups, unsigned group, float m) {
  asym_group_minmax_grad(x, g, dx, groups, group, m);
}

extern "C" __global__ void asym_group_minmax_grad_bf16(const float* x, const __nv_bfloat16* g,
                                                       float* dx, size_t groups, unsigned group,
                                                       float m) {
  asym_group_minmax_grad(x, g, dx, groups, group, m);
}
