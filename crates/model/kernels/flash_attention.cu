// Fused causal attention forward for CUDA (bf16 / f16, tensor cores through WMMA): the
// flash-attention recipe, so the [t, s] score matrix is never written to memory.
//
// Semantics are those of crates/model/src/attention (the CPU op), which the Rust tests check this
// kernel against on a GPU:
//   q   [b, heads, t, HD]      contiguous
//   k,v [b, kv_heads, s, HD]   each (batch, kv head) block row-major [s, HD], blocks at strides
//                              (k_sb, k_sh) / (v_sb, v_sh) elements; 16-byte aligned
//   out [b, heads, t, HD]      contiguous (may be null: not written)
//   lse [b, heads, t] f32      log Σ exp(scaled scores) per query row (may be null: not written)
// Query row i is key column c = s - t + i. It sees key columns pads[b]..=c, or 0..=c when c is
// itself a padding column (c < pads[b]; its output is discarded by callers, this keeps the
// softmax finite). Query head h reads kv head h / (heads / kv_heads).
//
// One block of WARPS warps handles BR = 16 * WARPS query rows of one (batch row, head); each warp
// owns 16 rows. Per tile of BC key columns: S = Q Kᵀ on tensor cores (f32 accumulation) into
// shared memory, the online softmax in f32 (two lanes per row, running max m and sum l), P
// rounded to the input type (as flash-attention does), O += P V on tensor cores. Each lane keeps
// HD / 2 of its row's output accumulators in registers: within every 16-column slice of the
// output, lane 2r + half owns columns half * 8 .. half * 8 + 8 of row r.

#include "flash_common.cuh"

namespace {

using flash::from_float;

constexpr int WARPS = 4;
constexpr int BR = 16 * WARPS;  // query rows per block
constexpr int BC = 32;          // key columns per tile

template <typename T, int HD>
__device__ void flash_forward(const T* __restrict__ q, const T* __restrict__ k,
                              const T* __restrict__ v, T* __restrict__ out,
                              float* __restrict__ lse, const uint32_t* __restrict__ pads,
                              int heads, int kv_heads, int t, int s, long long k_sb,
                              long long k_sh, long long v_sb, long long v_sh, float scale) {
  static_assert(HD % 16 == 0 && HD <= 128, "head_dim must be a multiple of 16, at most 128");
  __shared__ __align__(32) T q_s[BR][HD];
  __shared__ __align__(32) T k_s[BC][HD];
  __shared__ __align__(32) T v_s[BC][HD];
  __shared__ __align__(32) float s_s[WARPS][16][BC];  // scores, then P V slices (16 x 16)
  __shared__ __align__(32) T p_s[WARPS][16][BC];

  const int q0 = blockIdx.x * BR;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int kv_head = head / (heads / kv_heads);
  const int pad = static_cast<int>(pads[batch]);
  const T* q_block = q + (static_cast<long long>(batch) * heads + head) * t * HD;
  const T* k_block = k + batch * k_sb + kv_head * k_sh;
  const T* v_block = v + batch * v_sb + kv_head * v_sh;

  // This block's query rows into shared memory (zeros past t), then into fragments.
  flash::load_rows<T, HD, BR>(q_s, q_block, q0, t);
  __syncthreads();
  flash::RowsFrag<T> q_frag[HD / 16];
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
    wmma::load_matrix_sync(q_frag[kk], &q_s[warp * 16][kk * 16], HD);
  }

  const int row = lane / 2, half = lane % 2;
  const int query_col = s - t + q0 + warp * 16 + row;  // this lane's row as a key column
  float m = -CUDART_INF_F, l = 0.f;
  float acc[HD / 2];
#pragma unroll
  for (int i = 0; i < HD / 2; ++i) acc[i] = 0.f;

  const flash::KeyRange keys = flash::key_range(s, t, q0, BR, pad, BC);
  for (int k0 = keys.begin; k0 < keys.end; k0 += BC) {
    __syncthreads();  // every warp is done with the previous tile
    flash::load_rows<T, HD, BC>(k_s, k_block, k0, s);
    flash::load_rows<T, HD, BC>(v_s, v_block, k0, s);
    __syncthreads();

    // S = Q Kᵀ for this warp's 16 rows.
    flash::rows_times_tile_t<T, HD, BC>(&s_s[warp][0][0], q_frag, k_s);
    __syncwarp();

    // Online softmax: this lane takes columns half * BC/2 .. of its row.
    float x[BC / 2];
    float tile_max = -CUDART_INF_F;
#pragma unroll
    for (int c = 0; c < BC / 2; ++c) {
      const int col = half * (BC / 2) + c;
      const int key = k0 + col;
      x[c] = flash::visible(key, query_col, pad, s) ? s_s[warp][row][col] * scale : -CUDART_INF_F;
      tile_max = fmaxf(tile_max, x[c]);
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    const float m_new = fmaxf(m, tile_max);
    // Nothing visible yet (m_new = -inf): keep everything as it is (all p are 0).
    const float alpha = m_new == -CUDART_INF_F ? 1.f : expf(m - m_new);
    float tile_sum = 0.f;
#pragma unroll
    for (int c = 0; c < BC / 2; ++c) {
      const float p = x[c] == -CUDART_INF_F ? 0.f : expf(x[c] - m_new);
      tile_sum += p;
      p_s[warp][row][half * (BC / 2) + c] = from_float<T>(p);
    }
    tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, 1);
    l = l * alpha + tile_sum;
    m = m_new;
#pragma unroll
    for (int i = 0; i < HD / 2; ++i) acc[i] *= alpha;
    __syncwarp();

    // O += P V, one 16-column slice of the output at a time, through s_s as scratch.
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> p_frag[BC / 16];
#pragma unroll
    for (int kk = 0; kk < BC / 16; ++kk) {
      wmma::load_matrix_sync(p_frag[kk], &p_s[warp][0][kk * 16], BC);
    }
    float* scratch = &s_s[warp][0][0];
#pragma unroll
    for (int j = 0; j < HD / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> o_frag;
      wmma::fill_fragment(o_frag, 0.f);
#pragma unroll
      for (int kk = 0; kk < BC / 16; ++kk) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> v_frag;
        wmma::load_matrix_sync(v_frag, &v_s[kk * 16][j * 16], HD);
        wmma::mma_sync(o_frag, p_frag[kk], v_frag, o_frag);
      }
      wmma::store_matrix_sync(scratch, o_frag, 16, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int c = 0; c < 8; ++c) acc[j * 8 + c] += scratch[row * 16 + half * 8 + c];
      __syncwarp();
    }
  }

  const int query = q0 + warp * 16 + row;
  if (lse != nullptr && query < t && half == 0) {
    // The log of the softmax denominator, in units of the scaled scores (for the backward pass).
    lse[(static_cast<long long>(batch) * heads + head) * t + query] = m + logf(l);
  }
  if (out != nullptr && query < t) {
    const float inv = l > 0.f ? 1.f / l : 0.f;
    T* out_row = out + ((static_cast<long long>(batch) * heads + head) * t + query) * HD;
#pragma unroll
    for (int j = 0; j < HD / 16; ++j) {
      __align__(16) T y[8];
#pragma unroll
      for (int c = 0; c < 8; ++c) y[c] = from_float<T>(acc[j * 8 + c] * inv);
      *reinterpret_cast<uint4*>(out_row + j * 16 + half * 8) = *reinterpret_cast<const uint4*>(y);
    }
  }
}

}  // namespace

#define FLASH_FORWARD(NAME, T, HD)                                                              \
  extern "C" __global__ void __launch_bounds__(WARPS * 32)                                     \
      NAME(const T* q, const T* k, const T* v, T* out, float* lse, const uint32_t* pads,       \
           int heads, int kv_heads, int t, int s, long long k_sb, long long k_sh,              \
           long long v_sb, long long v_sh, float scale) {                                      \
    flash_forward<T, HD>(q, k, v, out, lse, pads, heads, kv_heads, t, s, k_sb, k_sh, v_sb,     \
                         v_sh, scale);                                                         \
  }

FLASH_FORWARD(flash_attention_fwd_bf16_hd32, __nv_bfloat16, 32)
FLASH_FORWARD(flash_attention_fwd_bf16_hd64, __nv_bfloat16, 64)
FLASH_FORWARD(flash_attention_fwd_bf16_hd96, __nv_bfloat16, 96)
FLASH_FORWARD(flash_attention_fwd_bf16_hd128, __nv_bfloat16, 128)
FLASH_FORWARD(flash_attention_fwd_f16_hd32, __half, 32)
FLASH_FORWARD(flash_attention_fwd_f16_hd64, __half, 64)
FLASH_FORWARD(flash_attention_fwd_f16_hd96, __half, 96)
FLASH_FORWARD(flash_attention_fwd_f16_hd128, __half, 128)
