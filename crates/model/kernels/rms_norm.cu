// RMSNorm with its backward pass for training on CUDA (crates/model/src/norm.rs): the values of
// qat's composed RMSNorm (crates/model/src/llama.rs), which follows HF's LlamaRMSNorm, in one
// pass over the rows forward and three short kernels backward, instead of about 20 passes of
// composed candle ops over the [rows, n] activations.
//
//   forward   d_r = sqrt(Σ_i x²[r, i] · (1/n) + eps)             (f32, per row)
//             y[r, i] = T( f32(T(x[r, i] / d_r)) · f32(w[i]) )   (T: the input type, f32 math)
//   backward  xh = x / d_r, g = dy · w (f32; the roundings to T count as identity, as the
//             composed casts' backward does)
//             dx[r, i] = (g_i − xh_i · Σ_j g_j xh_j / n) / d_r
//             dw[i] = Σ_r dy[r, i] · xh[r, i]
//
//   x, dy, y, dx  [rows, n] T, contiguous        w, dw  [n] T        row_d  [rows] f32 (scratch)
//   partial       [chunks, n] f32 (scratch: dw summed over DW_ROWS rows per chunk)
//
//   add_rms_norm (inference, crates/model/src/residual_add.rs): a residual add and the next norm,
//             sum[r, i] = T(x[r, i] + delta[r, i]) (f32 math),
//             y[r, i] = T(f32(sum[r, i]) / d_r · f32(w[i])), d_r of the rows of sum;
//             out [2, rows, n] T: sum, then y (one rounding, as candle's inference RMSNorm).
//
// One block of NORM_BLOCK threads per row for the row kernels; dw is summed per chunk of rows,
// then over the chunks, each in a fixed order: deterministic. Without a GPU,
// tests/rms_norm_emulated.rs compiles this file against kernels/emulation/cuda_emulation.h and
// checks it against the CPU op.

#ifndef QAT_CUDA_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#endif

#include "block_reduce.cuh"
#include "float_io.cuh"

namespace {

constexpr unsigned NORM_BLOCK = 256;
constexpr unsigned DW_ROWS = 64;     // rows per partial dw sum
constexpr unsigned DW_COLS = 256;    // columns per dw block (one per thread)

// d = sqrt(mean(x²) + eps) of one row, as the composed ops compute it (sum · (1/n) + eps).
template <typename T>
__device__ float row_denominator(const T* xr, uint32_t n, float eps, float* red) {
  float sq = 0.0f;
  for (uint32_t i = threadIdx.x; i < n; i += NORM_BLOCK) {
    const float v = fio::load(xr, i);
    sq = __fadd_rn(sq, __fmul_rn(v, v));
  }
  const float sum = blockred::block_reduce<NORM_BLOCK>(red, sq, blockred::Sum());
  return sqrtf(__fadd_rn(__fmul_rn(sum, 1.0f / static_cast<float>(n)), eps));
}

template <typename T>
__device__ void rms_norm_forward_row(const T* __restrict__ x, const T* __restrict__ w,
                                     T* __restrict__ y, uint32_t n, float eps) {
  __shared__ float red[NORM_BLOCK];
  const size_t row = blockIdx.x;
  const T* xr = x + row * n;
  const float d = row_denominator(xr, n, eps, red);
  for (uint32_t i = threadIdx.x; i < n; i += NORM_BLOCK) {
    const float normed = fio::round_as(__fdiv_rn(fio::load(xr, i), d), x);
    fio::store(y, row * n + i, __fmul_rn(normed, fio::load(w, i)));
  }
}

template <typename T>
__device__ void rms_norm_backward_row(const T* __restrict__ x, const T* __restrict__ w,
                                      const T* __restrict__ dy, T* __restrict__ dx,
                                      float* __restrict__ row_d, uint32_t n, float eps) {
  __shared__ float red[NORM_BLOCK];
  const size_t row = blockIdx.x;
  const T* xr = x + row * n;
  const T* dyr = dy + row * n;
  const float d = row_denominator(xr, n, eps, red);
  float dot = 0.0f;
  for (uint32_t i = threadIdx.x; i < n; i += NORM_BLOCK) {
    const float xh = __fdiv_rn(fio::load(xr, i), d);
    dot = __fadd_rn(dot, __fmul_rn(__fmul_rn(fio::load(dyr, i), fio::load(w, i)), xh));
  }
  const float mean_dot = __fmul_rn(blockred::block_reduce<NORM_BLOCK>(red, dot, blockred::Sum()), 1.0f / static_cast<float>(n));
  for (uint32_t i = threadIdx.x; i < n; i += NORM_BLOCK) {
    const float xh = __fdiv_rn(fio::load(xr, i), d);
    const float g = __fmul_rn(fio::load(dyr, i), fio::load(w, i));
    fio::store(dx, row * n + i, __fdiv_rn(__fsub_rn(g, __fmul_rn(xh, mean_dot)), d));
  }
  if (threadIdx.x == 0) row_d[row] = d;
}

// partial[chunk, i] = Σ over the chunk's rows of dy · x / d (one thread per column).
template <typename T>
__device__ void rms_norm_dw_partial(const T* __restrict__ x, const T* __restrict__ dy,
                                    const float* __restrict__ row_d, float* __restrict__ partial,
                                    uint32_t rows, uint32_t n) {
  const uint32_t i = blockIdx.x * DW_COLS + threadIdx.x;
  const uint32_t chunk = blockIdx.y;
  if (i >= n) return;
  float acc = 0.0f;
  const uint32_t end = min(rows, (chunk + 1) * DW_ROWS);
  for (uint32_t r = chunk * DW_ROWS; r < end; ++r) {
    const size_t at = static_cast<size_t>(r) * n + i;
    acc = __fadd_rn(acc, __fmul_rn(fio::load(dy, at), __fdiv_rn(fio::load(x, at), row_d[r])));
  }
  partial[static_cast<size_t>(chunk) * n + i] = acc;
}

// dw[i] = Σ over chunks of partial[chunk, i], in chunk order.
template <typename T>
__device__ void rms_norm_dw_final(const float* __restrict__ partial, T* __restrict__ dw,
                                  uint32_t chunks, uint32_t n) {
  const uint32_t i = blockIdx.x * DW_COLS + threadIdx.x;
  if (i >= n) return;
  float acc = 0.0f;
  for (uint32_t c = 0; c < chunks; ++c) acc = __fadd_rn(acc, partial[static_cast<size_t>(c) * n + i]);
  fio::store(dw, i, acc);
}

// One row of add_rms_norm: each thread reads back only the sums it wrote itself.
template <typename T>
__device__ void add_rms_norm_row(const T* __restrict__ x, const T* __restrict__ delta,
                                 const T* __restrict__ w, T* __restrict__ out, uint32_t rows,
                                 uint32_t n, float eps) {
  __shared__ float red[NORM_BLOCK];
  const size_t row = blockIdx.x;
  const size_t at = row * n;
  T* sum = out + at;
  T* y = out + static_cast<size_t>(rows) * n + at;
  for (uint32_t i = threadIdx.x; i < n; i += NORM_BLOCK) {
    fio::store(sum, i, __fadd_rn(fio::load(x, at + i), fio::load(delta, at + i)));
  }
  const float d = row_denominator(static_cast<const T*>(sum), n, eps, red);
  for (uint32_t i = threadIdx.x; i < n; i += NORM_BLOCK) {
    fio::store(y, i, __fmul_rn(__fdiv_rn(fio::load(sum, i), d), fio::load(w, i)));
  }
}

}  // namespace

#define QAT_RMS_NORM_KERNELS(SUFFIX, T)                                                          \
  extern "C" __global__ void rms_norm_fwd_##SUFFIX(const T* x, const T* w, T* y, uint32_t n,     \
                                                   float eps) {                                 \
    rms_norm_forward_row(x, w, y, n, eps);                                                       \
  }                                                                                              \
  extern "C" __global__ void rms_norm_bwd_##SUFFIX(const T* x, const T* w, const T* dy, T* dx,   \
                                                   float* row_d, uint32_t n, float eps) {       \
    rms_norm_backward_row(x, w, dy, dx, row_d, n, eps);                                          \
  }                                                                                              \
  extern "C" __global__ void rms_norm_dw_partial_##SUFFIX(const T* x, const T* dy,               \
                                                          const float* row_d, float* partial,   \
                                                          uint32_t rows, uint32_t n) {          \
    rms_norm_dw_partial(x, dy, row_d, partial, rows, n);                                         \
  }                                                                                              \
  extern "C" __global__ void rms_norm_dw_final_##SUFFIX(const float* partial, T* dw,             \
                                                        uint32_t chunks, uint32_t n) {          \
    rms_norm_dw_final(partial, dw, chunks, n);                                                   \
  }                                                                                              \
  extern "C" __global__ void add_rms_norm_##SUFFIX(const T* x, const T* delta, const T* w,       \
                                                   T* out, uint32_t rows, uint32_t n,           \
                                                   float eps) {                                 \
    add_rms_norm_row(x, delta, w, out, rows, n, eps);                                            \
  }

QAT_RMS_NORM_KERNELS(f32, float)
QAT_RMS_NORM_KERNELS(bf16, __nv_bfloat16)
QAT_RMS_NORM_KERNELS(f16, __half)
