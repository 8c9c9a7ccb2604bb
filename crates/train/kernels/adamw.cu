// crates/train/kernels/adamw.cu: AdamW's update as in-place kernels (crates/train/src/adamw_kernels.rs),
// compiled to PTX by crates/train/build.rs with the `cuda` feature.
//
// The same f32 operations in the same order as the composed candle ops of the reference path
// (and the CPU kernels), so the same bits: every product and sum is an IEEE intrinsic rounded to
// nearest (`__fmul_rn`, `__fadd_rn`, ...), which nvcc never contracts into an FMA; `+ 0.0f` where
// candle's affine ops add 0 (it turns -0 into +0). Grid-stride loops over `n` elements.
// Without a GPU, crates/train/tests/adamw_emulated.rs compiles this file as C++ against
// crates/model/kernels/emulation/cuda_emulation.h and checks its bits against the composed ops.
#ifndef QAT_CUDA_EMULATION
#include <stdint.h>
#endif

#include "../../model/kernels/float_io.cuh"

// m <- (m * decay + 0) + (g * gain + 0), with g * g for g when `square` (the second moment);
// with `scaled`, g is first g * grad_scale + 0 (gradient clipping's scaling, folded in).
extern "C" __global__ void adamw_moment_f32(float *m, const float *g, unsigned long long n,
                                            float decay, float gain, int square, float grad_scale,
                                            int scaled) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)blockDim.x * gridDim.x) {
        const float g0 = scaled ? __fadd_rn(__fmul_rn(g[i], grad_scale), 0.0f) : g[i];
        const float gi = square ? __fmul_rn(g0, g0) : g0;
        m[i] = __fadd_rn(__fadd_rn(__fmul_rn(m[i], decay), 0.0f), __fadd_rn(__fmul_rn(gi, gain), 0.0f));
    }
}

// w <- [w * decay + 0 if decayed] - ((m * inv_bc1 + 0) / (sqrt(v * inv_bc2 + 0) * 1 + eps)) * lr + 0.
extern "C" __global__ void adamw_weight_f32(float *w, const float *m, const float *v,
                                            unsigned long long n, float inv_bc1, float inv_bc2,
                                            float eps, float lr, float decay, int decayed) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)blockDim.x * gridDim.x) {
        const float m_hat = __fadd_rn(__fmul_rn(m[i], inv_bc1), 0.0f);
        const float v_hat = __fadd_rn(__fmul_rn(v[i], inv_bc2), 0.0f);
        const float denominator = __fadd_rn(__fmul_rn(__fsqrt_rn(v_hat), 1.0f), eps);
        const float update = __fdiv_rn(m_hat, denominator);
        const float kept = decayed ? __fadd_rn(__fmul_rn(w[i], decay), 0.0f) : w[i];
        w[i] = __fsub_rn(kept, __fadd_rn(__fmul_rn(update, lr), 0.0f));
    }
}

// The three kernels above in one pass, for CUDA training: per element, the first moment, the
// second moment and then the weight, each with exactly the operations of its own kernel (so the
// same bits), reading w, m, v and g once and writing w, m and v once (28 bytes per parameter
// instead of 40; 26 with a 16-bit gradient: the bf16 gradient of a weight whose forward pass
// casts it to bf16 stays bf16, and its f32 value is exact).
template <typename G>
__device__ void adamw_step(float *w, float *m, float *v, const G *g, unsigned long long n,
                           float decay1, float gain1, float decay2, float gain2, float grad_scale,
                           int scaled, float inv_bc1, float inv_bc2, float eps, float lr,
                           float decay, int decayed) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)blockDim.x * gridDim.x) {
        const float gi = fio::load(g, i);  // a 16-bit gradient's exact value
        const float g0 = scaled ? __fadd_rn(__fmul_rn(gi, grad_scale), 0.0f) : gi;
        const float m1 = __fadd_rn(__fadd_rn(__fmul_rn(m[i], decay1), 0.0f), __fadd_rn(__fmul_rn(g0, gain1), 0.0f));
        const float g2 = __fmul_rn(g0, g0);
        const float v1 = __fadd_rn(__fadd_rn(__fmul_rn(v[i], decay2), 0.0f), __fadd_rn(__fmul_rn(g2, gain2), 0.0f));
        m[i] = m1;
        v[i] = v1;
        const float m_hat = __fadd_rn(__fmul_rn(m1, inv_bc1), 0.0f);
        const float v_hat = __fadd_rn(__fmul_rn(v1, inv_bc2), 0.0f);
        const float denominator = __fadd_rn(__fmul_rn(__fsqrt_rn(v_hat), 1.0f), eps);
        const float update = __fdiv_rn(m_hat, denominator);
        const float kept = decayed ? __fadd_rn(__fmul_rn(w[i], decay), 0.0f) : w[i];
        w[i] = __fsub_rn(kept, __fadd_rn(__fmul_rn(update, lr), 0.0f));
    }
}

#define ADAMW_STEP(NAME, G)                                                                        \
    extern "C" __global__ void NAME(float *w, float *m, float *v, const G *g,                      \
                                    unsigned long long n, float decay1, float gain1, float decay2, \
                                    float gain2, float grad_scale, int scaled, float inv_bc1,      \
                                    float inv_bc2, float eps, float lr, float decay, int decayed) { \
        adamw_step(w, m, v, g, n, decay1, gain1, decay2, gain2, grad_scale, scaled, inv_bc1,       \
                   inv_bc2, eps, lr, decay, decayed);                                              \
    }

ADAMW_STEP(adamw_step_f32, float)
ADAMW_STEP(adamw_step_f32_gbf16, __nv_bfloat16)
ADAMW_STEP(adamw_step_f32_gf16, __half)
