// Fused causal attention forward for CUDA (bf16 / f16, tensor cores through mma.sync): the
// flash-attention recipe, so the [t, s] score matrix is never written to memory.
//
// Semantics are those of crates/model/src/attention (the CPU op), which the Rust tests check this
// kernel against on a GPU:
//   q   [b, heads, t, HD]      contiguous
//   k,v [b, kv_heads, s, HD]   each (batch, kv head) block row-major [s, HD], blocks at strides
//                              (k_sb, k_sh) / (v_sb, v_sh) elements; 16-byte aligned
//   out [b, heads, t, HD]      element (batch, head, i, d) at batch · o_sb + head · o_sh + i · o_st
//                              + d (callers write it token-major, [b, t, heads, HD], which the
//                              output projection reads without a transpose copy); strides even,
//                              may be null: not written
//   lse [b, heads, t] f32      log Σ exp(scaled scores) per query row (may be null: not written)
// Query row i is key column c = s - t + i. It sees key columns pads[b]..=c, or 0..=c when c is
// itself a padding column (c < pads[b]; its output is discarded by callers, this keeps the
// softmax finite). Query head h reads kv head h / (heads / kv_heads).
//
// The query rows of the heads that share a kv head are packed head-major (row r is query r % t
// of head kv_head · rep + r / t, where rep = heads / kv_heads: consecutive in q's layout), and one
// block of WARPS warps handles BR = 16 * WARPS packed rows of one (batch row, kv head). With long
// chunks that is 64 queries of one head, as usual; in decoding (t = 1) it is all rep query heads
// of a kv head in one block, which reads the cached keys and values once for them, not once per
// query head. Each warp owns 16 rows (a warp without any skips the arithmetic), whose Q fragments
// it keeps in registers. Per tile of BC key columns (K row-major
// and V transposed in shared memory, rows padded by 8 elements so the fragment reads of a warp
// hit distinct banks): S = Q Kᵀ by mma.sync m16n8k16 (f32 accumulation) into registers, the
// online softmax in f32 on those registers (each row's values are spread over the 4 lanes of a
// lane group, whose max and sum take two shuffles), P rounded to the input type (as
// flash-attention does) and packed straight into the A fragments of O += P V, whose f32
// accumulators stay in registers too (lane 4g + t holds columns 8j + 2t, 8j + 2t + 1 of rows g
// and g + 8 of its warp's 16, for every j < HD / 8). No score or partial output goes through
// shared memory.

#include "flash_common.cuh"

namespace {

using flash::pack2;

constexpr int WARPS = 4;
constexpr int BC = 64;  // key columns per tile

// Row tiles of 16 per warp: two for head dims up to 64, whose B fragments (read from shared
// memory) then serve both, halving the shared-memory reads per mma (ptxas, sm_90, hd 64: 254
// registers, no spills); one for wider heads, which would spill.
template <int HD>
constexpr int ROW_TILES = HD <= 64 ? 2 : 1;

// Packed query rows per block.
template <int HD>
constexpr int BR = 16 * ROW_TILES<HD> * WARPS;

template <typename T, int HD>
__device__ void flash_forward(const T* __restrict__ q, const T* __restrict__ k,
                              const T* __restrict__ v, T* __restrict__ out,
                              float* __restrict__ lse, const uint32_t* __restrict__ pads,
                              int heads, int kv_heads, int t, int s, long long k_sb,
                              long long k_sh, long long v_sb, long long v_sh, long long o_sb,
                              long long o_sh, long long o_st, float scale) {
  static_assert(HD % 16 == 0 && HD <= 128, "head_dim must be a multiple of 16, at most 128");
  constexpr int MT = ROW_TILES<HD>;
  __shared__ __align__(16) T k_s[BC][HD + flash::PAD];   // keys, row-major
  __shared__ __align__(16) T vt_s[HD][BC + flash::PAD];  // values, transposed

  const int row_block = blockIdx.x * BR<HD>;  // this block's first packed row
  const int kv_head = blockIdx.y;
  const int batch = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, tq = lane % 4;
  const int rows = heads / kv_heads * t;  // packed rows of this kv head
  const int pad = static_cast<int>(pads[batch]);
  const long long row_base = (static_cast<long long>(batch) * heads + kv_head * (heads / kv_heads)) * t;
  const T* q_block = q + row_base * HD;
  const T* k_block = k + batch * k_sb + kv_head * k_sh;
  const T* v_block = v + batch * v_sb + kv_head * v_sh;

  // This warp's row tiles: rows r0 (lane row g) and r1 = r0 + 8 (g + 8) of each, packed, and
  // their key columns. A tile past the last row is skipped by the whole warp (`live`).
  const int warp_row = row_block + warp * 16 * MT;
  bool live[MT];
  int r0[MT], r1[MT], col0[MT], col1[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    live[mt] = warp_row + mt * 16 < rows;
    r0[mt] = warp_row + mt * 16 + g;
    r1[mt] = r0[mt] + 8;
    col0[mt] = s - t + r0[mt] % t;
    col1[mt] = s - t + r1[mt] % t;
  }
  const bool warp_has_rows = live[0];

  // Q fragments straight from global memory (zeros for rows past the last), one per 16 head dims.
  uint32_t q_frag[MT][HD / 16][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    flash::load_row_frags<T, HD>(q_frag[mt], q_block, HD, warp_row + mt * 16, rows);
  }

  float m[MT][2], l[MT][2];
  float o[MT][HD / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    m[mt][0] = m[mt][1] = -CUDART_INF_F;
    l[mt][0] = l[mt][1] = 0.f;
    flash::zero_acc(o[mt]);
  }

  // The block's queries: one run of one head's, or (rows of two or more heads) all of them.
  const int last_row = min(row_block + BR<HD>, rows) - 1;
  const bool one_head = row_block / t == last_row / t;
  const flash::KeyRange keys = flash::key_range(s, t, one_head ? row_block % t : 0,
                                                one_head ? last_row % t : t - 1, pad, BC);
  for (int k0 = keys.begin; k0 < keys.end; k0 += BC) {
    __syncthreads();  // every warp is done with the previous tile
    flash::load_tile<T, HD, BC, false>(k_s, k_block, HD, k0, s);
    flash::load_tile<T, HD, BC, true>(vt_s, v_block, HD, k0, s);
    __syncthreads();
    if (!warp_has_rows) continue;  // the whole warp: it still meets the block's barriers

    // S = Q Kᵀ: BC / 8 tiles of 16 x 8 per row tile, accumulated over the head dims.
    float sc[MT][BC / 8][4];
    flash::rows_times_tile_t_multi<T, HD>(sc, q_frag, k_s, live);

#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if (!live[mt]) continue;
      // Online softmax of rows r0 (elements 0, 1 of each tile) and r1 (elements 2, 3).
      float tile_max[2] = {-CUDART_INF_F, -CUDART_INF_F};
#pragma unroll
      for (int j = 0; j < BC / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = k0 + j * 8 + 2 * tq + (e & 1);
          const bool seen = flash::visible(key, e < 2 ? col0[mt] : col1[mt], pad, s);
          sc[mt][j][e] = seen ? sc[mt][j][e] * scale : -CUDART_INF_F;
          tile_max[e / 2] = fmaxf(tile_max[e / 2], sc[mt][j][e]);
        }
      }
      float alpha[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
        tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
        const float m_new = fmaxf(m[mt][h], tile_max[h]);
        // Nothing visible yet (m_new = -inf): keep everything as it is (all p are 0).
        alpha[h] = m_new == -CUDART_INF_F ? 1.f : expf(m[mt][h] - m_new);
        m[mt][h] = m_new;
      }
      float tile_sum[2] = {0.f, 0.f};
#pragma unroll
      for (int j = 0; j < BC / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float p = sc[mt][j][e] == -CUDART_INF_F ? 0.f : expf(sc[mt][j][e] - m[mt][e / 2]);
          tile_sum[e / 2] += p;
          sc[mt][j][e] = p;
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        tile_sum[h] += __shfl_xor_sync(0xffffffffu, tile_sum[h], 1);
        tile_sum[h] += __shfl_xor_sync(0xffffffffu, tile_sum[h], 2);
        l[mt][h] = l[mt][h] * alpha[h] + tile_sum[h];
      }
#pragma unroll
      for (int j = 0; j < HD / 8; ++j) {
        o[mt][j][0] *= alpha[0];
        o[mt][j][1] *= alpha[0];
        o[mt][j][2] *= alpha[1];
        o[mt][j][3] *= alpha[1];
      }
    }

    // O += P V: P's A fragment for keys 16kk .. 16kk + 16 is score tiles 2kk and 2kk + 1.
    flash::accumulate_times_tile_multi<T, BC>(o, sc, vt_s, live);
  }

#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int query = h == 0 ? r0[mt] : r1[mt];  // packed row: the layout's row past row_base
      if (query >= rows) continue;
      if (lse != nullptr && tq == 0) {
        // The log of the softmax denominator, in units of the scaled scores (for the backward).
        lse[row_base + query] = m[mt][h] + logf(l[mt][h]);
      }
      if (out != nullptr) {
        const float inv = l[mt][h] > 0.f ? 1.f / l[mt][h] : 0.f;
        const int head = kv_head * (heads / kv_heads) + query / t;
        T* out_row = out + batch * o_sb + head * o_sh + (query % t) * o_st;
#pragma unroll
        for (int j = 0; j < HD / 8; ++j) {
          *reinterpret_cast<uint32_t*>(out_row + j * 8 + 2 * tq) =
              pack2<T>(o[mt][j][2 * h] * inv, o[mt][j][2 * h + 1] * inv);
        }
      }
    }
  }
}

}  // namespace

#define FLASH_FORWARD(NAME, T, HD)                                                              \
  extern "C" __global__ void __launch_bounds__(WARPS * 32)                                     \
      NAME(const T* q, const T* k, const T* v, T* out, float* lse, const uint32_t* pads,       \
           int heads, int kv_heads, int t, int s, long long k_sb, long long k_sh,              \
           long long v_sb, long long v_sh, long long o_sb, long long o_sh, long long o_st,     \
           float scale) {                                                                      \
    flash_forward<T, HD>(q, k, v, out, lse, pads, heads, kv_heads, t, s, k_sb, k_sh, v_sb,     \
                         v_sh, o_sb, o_sh, o_st, scale);                                       \
  }

FLASH_FORWARD(flash_attention_fwd_bf16_hd32, __nv_bfloat16, 32)
FLASH_FORWARD(flash_attention_fwd_bf16_hd64, __nv_bfloat16, 64)
FLASH_FORWARD(flash_attention_fwd_bf16_hd96, __nv_bfloat16, 96)
FLASH_FORWARD(flash_attention_fwd_bf16_hd128, __nv_bfloat16, 128)
FLASH_FORWARD(flash_attention_fwd_f16_hd32, __half, 32)
FLASH_FORWARD(flash_attention_fwd_f16_hd64, __half, 64)
FLASH_FORWARD(flash_attention_fwd_f16_hd96, __half, 96)
FLASH_FORWARD(flash_attention_fwd_f16_hd128, __half, 128)
