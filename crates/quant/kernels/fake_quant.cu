// crates/quant/kernels/fake_quant.cu: CUDA kernels of the fused symmetric per-row fake quantization
// (crates/quant/src/fused.rs), compiled to PTX by crates/quant/build.rs with the `cuda` feature.
//
// Same arithmetic as the CPU kernel, so the same values: per row, scale = max|x| / qmax (true
// f32 division), optionally rounded to the nearest f16 (ties to even, saturating at 65504);
// q = clamp(rint(x / scale), -qmax, qmax) (rint: ties to even); out = q * scale + 0 (zeros +0);
// an all-zero row (scale 0) gives zeros. bf16 rows are computed in f32 and rounded back to bf16
// (nearest even), as the composed path's to_dtype does; so are f32 rows whose output is bf16
// (sym_row_fake_quant_f32_bf16: quantize, then cast, in one pass). Built without
// --use_fast_math, so `/` is IEEE division. NOT YET RUN ON HARDWARE at the time of writing: `make pipeline-gpu` checks it
// end to end (RTN perplexities on cuda must equal the CPU ones). Without a GPU,
// crates/quant/tests/fake_quant_emulated.rs compiles this file as C++ against
// crates/model/kernels/emulation/cuda_emulation.h and checks it bit for bit against the CPU kernel.
#ifndef QAT_CUDA_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#endif

#include "../../model/kernels/block_reduce.cuh"
#include "../../model/kernels/float_io.cuh"

#define BLOCK 256

// One block of BLOCK threads per row of `cols` elements; grid = rows. Out may be a narrower type
// than In (f32 master weights quantized straight into bf16 compute weights): the f32 result is
// rounded once, on the store.
template <typename In, typename Out>
__device__ void sym_row_fake_quant(const In *x, Out *out, uint32_t cols, float qmax, int f16_scale) {
    const size_t row = blockIdx.x;
    const In *xr = x + row * cols;
    Out *outr = out + row * cols;
    __shared__ float red[BLOCK];
    float amax = 0.0f;
    for (uint32_t i = threadIdx.x; i < cols; i += BLOCK) {
        amax = fmaxf(amax, fabsf(fio::load(xr, i)));
    }
    float scale = blockred::block_reduce<BLOCK>(red, amax, blockred::Max()) / qmax;
    if (f16_scale) {
        scale = __half2float(__float2half_rn(fminf(scale, 65504.0f)));
    }
    for (uint32_t i = threadIdx.x; i < cols; i += BLOCK) {
        float v = 0.0f;
        if (scale != 0.0f) {
            float q = rintf(fio::load(xr, i) / scale);
            q = fminf(fmaxf(q, -qmax), qmax);
            v = q * scale + 0.0f;
        }
        fio::store(outr, i, v);
    }
}

extern "C" __global__ void sym_row_fake_quant_f32(const float *x, float *out, uint32_t cols, float qmax, int f16_scale) {
    sym_row_fake_quant(x, out, cols, qmax, f16_scale);
}

extern "C" __global__ void sym_row_fake_quant_bf16(const __nv_bfloat16 *x, __nv_bfloat16 *out, uint32_t cols, float qmax, int f16_scale) {
    sym_row_fake_quant(x, out, cols, qmax, f16_scale);
}

// f32 master weights to bf16 compute weights in one pass: the values of the f32 kernel followed
// by candle's f32 -> bf16 cast (nearest, ties to even).
extern "C" __global__ void sym_row_fake_quant_f32_bf16(const float *x, __nv_bfloat16 *out, uint32_t cols, float qmax, int f16_scale) {
    sym_row_fake_quant(x, out, cols, qmax, f16_scale);
}
