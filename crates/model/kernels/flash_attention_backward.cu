// Fused causal attention backward for CUDA (bf16 / f16, tensor cores through WMMA): the
// flash-attention backward, recomputing P = exp(scale · Q Kᵀ − lse) tile by tile, so no [t, s]
// tensor is written. Two kernels, each summing in a fixed order (no atomics, so the same inputs
// give the same bits):
//   dkdv  one block per (tile of DKDV_KEYS keys, query head, batch row), looping over the query
//         tiles: dV += Pᵀ dO, dK += dSᵀ Q · scale, for that query head alone; the caller sums the
//         heads of each kv head (one block per query head, not one per kv head looping over its
//         heads: heads / kv_heads times the blocks, each that much shorter, which spreads the
//         causal triangle's uneven work over the GPU);
//   dq    one block per (tile of DQ_ROWS query rows, head, batch row), looping over key tiles:
//         dQ += dS K · scale;
// with dP = dO Vᵀ and dS = P ∘ (dP − delta), delta = rowsum(dO ∘ O) per query row (computed by
// the caller), lse from the forward kernel. Layouts as in flash_attention.cu; dout, lse and delta
// like q; dq [b, heads, t, HD] and the per-query-head dk and dv [b, heads, s, HD] are contiguous
// f32 outputs.
// P and dS are rounded to the input type before their matmuls, as flash-attention does; the
// softmax, dP and dS are f32.

#include "flash_common.cuh"

namespace {

using flash::from_float;

constexpr int DKDV_WARPS = 2;
constexpr int DKDV_KEYS = 16 * DKDV_WARPS;  // keys per dkdv block: 16 per warp
constexpr int DKDV_QUERIES = 32;               // query rows per dkdv step
constexpr int DQ_WARPS = 4;
constexpr int DQ_ROWS = 16 * DQ_WARPS;    // query rows per dq block: 16 per warp
constexpr int DQ_COLS = 32;               // key columns per dq step

template <typename T, int HD>
__device__ void flash_backward_dkdv(const T* __restrict__ q, const T* __restrict__ k,
                                    const T* __restrict__ v, const T* __restrict__ dout,
                                    const float* __restrict__ lse,
                                    const float* __restrict__ delta, float* __restrict__ dk,
                                    float* __restrict__ dv, const uint32_t* __restrict__ pads,
                                    int heads, int kv_heads, int t, int s, long long k_sb,
                                    long long k_sh, long long v_sb, long long v_sh, float scale) {
  static_assert(HD % 16 == 0 && HD <= 128, "head_dim must be a multiple of 16, at most 128");
  __shared__ __align__(32) T k_s[DKDV_KEYS][HD];
  __shared__ __align__(32) T v_s[DKDV_KEYS][HD];
  __shared__ __align__(32) T q_s[DKDV_QUERIES][HD];
  __shared__ __align__(32) T do_s[DKDV_QUERIES][HD];
  __shared__ float lse_s[DKDV_QUERIES], delta_s[DKDV_QUERIES];
  __shared__ __align__(32) float s_s[DKDV_WARPS][16][DKDV_QUERIES];  // Sᵀ, then dPᵀ, then output slices
  __shared__ __align__(32) T p_s[DKDV_WARPS][16][DKDV_QUERIES];
  __shared__ __align__(32) T ds_s[DKDV_WARPS][16][DKDV_QUERIES];

  const int k0 = blockIdx.x * DKDV_KEYS;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int kv_head = head / (heads / kv_heads);
  const int pad = static_cast<int>(pads[batch]);
  flash::load_rows<T, HD, DKDV_KEYS>(k_s, k + batch * k_sb + kv_head * k_sh, k0, s);
  flash::load_rows<T, HD, DKDV_KEYS>(v_s, v + batch * v_sb + kv_head * v_sh, k0, s);

  flash::AccFrag dk_acc[HD / 16], dv_acc[HD / 16];
#pragma unroll
  for (int j = 0; j < HD / 16; ++j) {
    wmma::fill_fragment(dk_acc[j], 0.f);
    wmma::fill_fragment(dv_acc[j], 0.f);
  }

  // This lane's key (row r of the warp's 16) and its half of the DKDV_QUERIES query columns.
  const int r = lane / 2, half = lane % 2;
  const int key = k0 + warp * 16 + r;
  // Queries before the first one whose column reaches k0 see none of these keys.
  const int first_query = max(0, k0 - (s - t));
  const int q_begin = (first_query / DKDV_QUERIES) * DKDV_QUERIES;

  const long long row_base = (static_cast<long long>(batch) * heads + head) * t;
  for (int i0 = q_begin; i0 < t; i0 += DKDV_QUERIES) {
    __syncthreads();  // every warp is done with the previous query tile
    flash::load_rows<T, HD, DKDV_QUERIES>(q_s, q + row_base * HD, i0, t);
    flash::load_rows<T, HD, DKDV_QUERIES>(do_s, dout + row_base * HD, i0, t);
    for (int i = threadIdx.x; i < DKDV_QUERIES; i += blockDim.x) {
      lse_s[i] = i0 + i < t ? lse[row_base + i0 + i] : 0.f;
      delta_s[i] = i0 + i < t ? delta[row_base + i0 + i] : 0.f;
    }
    __syncthreads();

    // Sᵀ = K_w Qᵀ: [16 keys, DKDV_QUERIES queries].
    flash::rows_times_tile_t<T, HD, DKDV_QUERIES>(&s_s[warp][0][0], &k_s[warp * 16], q_s);
    __syncwarp();

    // Pᵀ = exp(scale · Sᵀ − lse) where visible, else 0.
    float p[DKDV_QUERIES / 2];
#pragma unroll
    for (int c = 0; c < DKDV_QUERIES / 2; ++c) {
      const int col = half * (DKDV_QUERIES / 2) + c;
      const int query = i0 + col;
      const bool seen = query < t && flash::visible(key, s - t + query, pad, s);
      p[c] = seen ? expf(s_s[warp][r][col] * scale - lse_s[col]) : 0.f;
      p_s[warp][r][col] = from_float<T>(p[c]);
    }
    __syncwarp();

    // dV += Pᵀ dO: [16 keys, HD].
    flash::accumulate_times_tile<T, HD, DKDV_QUERIES>(dv_acc, &p_s[warp][0][0], do_s);

    // dPᵀ = V_w dOᵀ: [16 keys, DKDV_QUERIES queries], into s_s (Sᵀ was read into p above).
    flash::rows_times_tile_t<T, HD, DKDV_QUERIES>(&s_s[warp][0][0], &v_s[warp * 16], do_s);
    __syncwarp();

    // dSᵀ = Pᵀ ∘ (dPᵀ − delta).
#pragma unroll
    for (int c = 0; c < DKDV_QUERIES / 2; ++c) {
      const int col = half * (DKDV_QUERIES / 2) + c;
      ds_s[warp][r][col] = from_float<T>(p[c] * (s_s[warp][r][col] - delta_s[col]));
    }
    __syncwarp();

    // dK += dSᵀ Q: [16 keys, HD] (times scale at the end).
    flash::accumulate_times_tile<T, HD, DKDV_QUERIES>(dk_acc, &ds_s[warp][0][0], q_s);
  }

  // dk, dv rows of this warp's keys (those < s), through s_s as 16 x 16 scratch.
  const long long out_base = (static_cast<long long>(batch) * heads + head) * s * HD;
  const int row0 = k0 + warp * 16;
  flash::store_rows<HD>(dk + out_base, dk_acc, &s_s[warp][0][0], row0, s, scale);
  flash::store_rows<HD>(dv + out_base, dv_acc, &s_s[warp][0][0], row0, s, 1.f);
}

template <typename T, int HD>
__device__ void flash_backward_dq(const T* __restrict__ q, const T* __restrict__ k,
                                  const T* __restrict__ v, const T* __restrict__ dout,
                                  const float* __restrict__ lse, const float* __restrict__ delta,
                                  float* __restrict__ dq, const uint32_t* __restrict__ pads,
                                  int heads, int kv_heads, int t, int s, long long k_sb,
                                  long long k_sh, long long v_sb, long long v_sh, float scale) {
  static_assert(HD % 16 == 0 && HD <= 128, "head_dim must be a multiple of 16, at most 128");
  __shared__ __align__(32) T stage[DQ_ROWS][HD];  // Q, then dO, on their way into fragments
  __shared__ __align__(32) T k_s[DQ_COLS][HD];
  __shared__ __align__(32) T v_s[DQ_COLS][HD];
  __shared__ float lse_s[DQ_ROWS], delta_s[DQ_ROWS];
  __shared__ __align__(32) float s_s[DQ_WARPS][16][DQ_COLS];  // S, then dP, then output slices
  __shared__ __align__(32) T ds_s[DQ_WARPS][16][DQ_COLS];

  const int q0 = blockIdx.x * DQ_ROWS;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int kv_head = head / (heads / kv_heads);
  const int pad = static_cast<int>(pads[batch]);
  const long long row_base = (static_cast<long long>(batch) * heads + head) * t;
  const T* k_block = k + batch * k_sb + kv_head * k_sh;
  const T* v_block = v + batch * v_sb + kv_head * v_sh;

  flash::RowsFrag<T> q_frag[HD / 16], do_frag[HD / 16];
  flash::load_rows<T, HD, DQ_ROWS>(stage, q + row_base * HD, q0, t);
  for (int i = threadIdx.x; i < DQ_ROWS; i += blockDim.x) {
    lse_s[i] = q0 + i < t ? lse[row_base + q0 + i] : 0.f;
    delta_s[i] = q0 + i < t ? delta[row_base + q0 + i] : 0.f;
  }
  __syncthreads();
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) wmma::load_matrix_sync(q_frag[kk], &stage[warp * 16][kk * 16], HD);
  __syncthreads();
  flash::load_rows<T, HD, DQ_ROWS>(stage, dout + row_base * HD, q0, t);
  __syncthreads();
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) wmma::load_matrix_sync(do_frag[kk], &stage[warp * 16][kk * 16], HD);

  flash::AccFrag dq_acc[HD / 16];
#pragma unroll
  for (int j = 0; j < HD / 16; ++j) wmma::fill_fragment(dq_acc[j], 0.f);

  const int r = lane / 2, half = lane % 2;
  const int row = warp * 16 + r;  // within the block
  const int query_col = s - t + q0 + row;
  const float row_lse = lse_s[row], row_delta = delta_s[row];
  const flash::KeyRange keys = flash::key_range(s, t, q0, DQ_ROWS, pad, DQ_COLS);
  for (int k0 = keys.begin; k0 < keys.end; k0 += DQ_COLS) {
    __syncthreads();  // every warp is done with the previous key tile
    flash::load_rows<T, HD, DQ_COLS>(k_s, k_block, k0, s);
    flash::load_rows<T, HD, DQ_COLS>(v_s, v_block, k0, s);
    __syncthreads();

    // S = Q Kᵀ: [16 queries, DQ_COLS keys].
    flash::rows_times_tile_t<T, HD, DQ_COLS>(&s_s[warp][0][0], q_frag, k_s);
    __syncwarp();
    float p[DQ_COLS / 2];
#pragma unroll
    for (int c = 0; c < DQ_COLS / 2; ++c) {
      const int col = half * (DQ_COLS / 2) + c;
      const bool seen = q0 + row < t && flash::visible(k0 + col, query_col, pad, s);
      p[c] = seen ? expf(s_s[warp][r][col] * scale - row_lse) : 0.f;
    }
    __syncwarp();

    // dP = dO Vᵀ: [16 queries, DQ_COLS keys], into s_s.
    flash::rows_times_tile_t<T, HD, DQ_COLS>(&s_s[warp][0][0], do_frag, v_s);
    __syncwarp();
#pragma unroll
    for (int c = 0; c < DQ_COLS / 2; ++c) {
      const int col = half * (DQ_COLS / 2) + c;
      ds_s[warp][r][col] = from_float<T>(p[c] * (s_s[warp][r][col] - row_delta));
    }
    __syncwarp();

    // dQ += dS K: [16 queries, HD] (times scale at the end).
    flash::accumulate_times_tile<T, HD, DQ_COLS>(dq_acc, &ds_s[warp][0][0], k_s);
  }

  flash::store_rows<HD>(dq + row_base * HD, dq_acc, &s_s[warp][0][0], q0 + warp * 16, t, scale);
}

}  // namespace

#define FLASH_BACKWARD(T, TNAME, HD)                                                            \
  extern "C" __global__ void __launch_bounds__(DKDV_WARPS * 32)                                \
      flash_attention_bwd_dkdv_##TNAME##_hd##HD(                                               \
          const T* q, const T* k, const T* v, const T* dout, const float* lse,                 \
          const float* delta, float* dk, float* dv, const uint32_t* pads, int heads,           \
          int kv_heads, int t, int s, long long k_sb, long long k_sh, long long v_sb,          \
          long long v_sh, float scale) {                                                       \
    flash_backward_dkdv<T, HD>(q, k, v, dout, lse, delta, dk, dv, pads, heads, kv_heads, t, s, \
                               k_sb, k_sh, v_sb, v_sh, scale);                                 \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(DQ_WARPS * 32)                                  \
      flash_attention_bwd_dq_##TNAME##_hd##HD(                                                 \
          const T* q, const T* k, const T* v, const T* dout, const float* lse,                 \
          const float* delta, float* dq, const uint32_t* pads, int heads, int kv_heads, int t, \
          int s, long long k_sb, long long k_sh, long long v_sb, long long v_sh,               \
          float scale) {                                                                       \
    flash_backward_dq<T, HD>(q, k, v, dout, lse, delta, dq, pads, heads, kv_heads, t, s, k_sb, \
                             k_sh, v_sb, v_sh, scale);                                         \
  }

FLASH_BACKWARD(__nv_bfloat16, bf16, 32)
FLASH_BACKWARD(__nv_bfloat16, bf16, 64)
FLASH_BACKWARD(__nv_bfloat16, bf16, 96)
FLASH_BACKWARD(__nv_bfloat16, bf16, 128)
FLASH_BACKWARD(__half, f16, 32)
FLASH_BACKWARD(__half, f16, 64)
FLASH_BACKWARD(__half, f16, 96)
FLASH_BACKWARD(__half, f16, 128)
