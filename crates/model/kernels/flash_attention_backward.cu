// Fused causal attention backward for CUDA (bf16 / f16, tensor cores through mma.sync): the
// flash-attention backward, recomputing P = exp(scale · Q Kᵀ − lse) tile by tile, so no [t, s]
// tensor is written. Three kernels, each summing in a fixed order (no atomics, so the same inputs
// give the same bits):
//   delta one thread per query row: delta = rowsum(dO ∘ O) in f32 (one read of dO and O in their
//         16-bit type instead of f32 copies of both, their product and its sum);
//   dkdv  one block per (tile of DKDV_KEYS keys, query head, batch row), looping over the query
//         tiles: dV += Pᵀ dO, dK += dSᵀ Q · scale, for that query head alone; the caller sums the
//         heads of each kv head (one block per query head, not one per kv head looping over its
//         heads: heads / kv_heads times the blocks, each that much shorter, which spreads the
//         causal triangle's uneven work over the GPU);
//   dq    one block per (tile of DQ_ROWS query rows, head, batch row), looping over key tiles:
//         dQ += dS K · scale;
// with dP = dO Vᵀ and dS = P ∘ (dP − delta), lse from the forward kernel. Layouts as in
// flash_attention.cu; dout and out (delta's) are strided like the forward's out (element
// (batch, head, i, d) at batch · sb + head · sh + i · st + d: token-major as the forward writes
// it, so no transpose copy); lse and delta are [b, heads, t] f32; dq [b, heads, t, HD] is
// contiguous in the input type (rounded once from its f32 accumulators, what a cast of an f32 dq
// would give), the per-query-head dk and dv [b, heads, s, HD] contiguous f32.
// P and dS are rounded to the input type before their matmuls, as flash-attention does; the
// softmax, dP and dS are f32.
//
// As in the forward kernel, every product is mma.sync m16n8k16 on register fragments (the
// fragment layouts are in flash_common.cuh): each warp keeps its 16 rows of the operand it owns
// (K and V in dkdv, Q and dO in dq) as A fragments, the score-shaped tiles (S, P, dP, dS) as
// accumulators in registers, and its output rows (dK and dV, or dQ) as f32 accumulators; the
// other operands come from shared memory tiles, row-major where the product's reduction runs
// over the head dims and transposed where it runs over keys or queries.

#include "flash_common.cuh"
#include "float_io.cuh"

namespace {

constexpr int DKDV_WARPS = 4;
constexpr int DKDV_KEYS = 16 * DKDV_WARPS;  // keys per dkdv block: 16 per warp
constexpr int DQ_WARPS = 4;
constexpr int DQ_ROWS = 16 * DQ_WARPS;  // query rows per dq block: 16 per warp

// Key columns per dq step: fewer for wide heads (three tiles of them must fit the 48 KB of static
// shared memory).
template <int HD>
constexpr int DQ_COLS = HD <= 64 ? 64 : 32;

// Query rows per dkdv step: fewer for wide heads, whose shared tiles and registers are larger.
template <int HD>
constexpr int DKDV_QUERIES = HD <= 64 ? 64 : 32;

template <typename T, int HD>
__device__ void flash_backward_dkdv(const T* __restrict__ q, const T* __restrict__ k,
                                    const T* __restrict__ v, const T* __restrict__ dout,
                                    const float* __restrict__ lse,
                                    const float* __restrict__ delta, float* __restrict__ dk,
                                    float* __restrict__ dv, const uint32_t* __restrict__ pads,
                                    int heads, int kv_heads, int t, int s, long long k_sb,
                                    long long k_sh, long long v_sb, long long v_sh,
                                    long long do_sb, long long do_sh, long long do_st,
                                    float scale) {
  static_assert(HD % 16 == 0 && HD <= 128, "head_dim must be a multiple of 16, at most 128");
  constexpr int BQ = DKDV_QUERIES<HD>;
  constexpr int PAD = flash::PAD;
  __shared__ __align__(16) T q_s[BQ][HD + PAD];    // Q rows (Sᵀ = K Qᵀ)
  __shared__ __align__(16) T qt_s[HD][BQ + PAD];   // Q transposed (dK += dSᵀ Q)
  __shared__ __align__(16) T do_s[BQ][HD + PAD];   // dO rows (dPᵀ = V dOᵀ)
  __shared__ __align__(16) T dot_s[HD][BQ + PAD];  // dO transposed (dV += Pᵀ dO)
  __shared__ float lse_s[BQ], delta_s[BQ];

  const int k0 = blockIdx.x * DKDV_KEYS;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, tq = lane % 4;
  const int kv_head = head / (heads / kv_heads);
  const int pad = static_cast<int>(pads[batch]);

  // This warp's keys (rows g and g + 8 of its 16) as A fragments of K and V.
  const int key0 = k0 + warp * 16;
  uint32_t k_frag[HD / 16][4], v_frag[HD / 16][4];
  flash::load_row_frags<T, HD>(k_frag, k + batch * k_sb + kv_head * k_sh, HD, key0, s);
  flash::load_row_frags<T, HD>(v_frag, v + batch * v_sb + kv_head * v_sh, HD, key0, s);
  const int keys[2] = {key0 + g, key0 + g + 8};

  float dk_acc[HD / 8][4], dv_acc[HD / 8][4];
  flash::zero_acc(dk_acc);
  flash::zero_acc(dv_acc);

  // Queries before the first one whose column reaches k0 see none of these keys.
  const int first_query = max(0, k0 - (s - t));
  const int q_begin = (first_query / BQ) * BQ;
  const long long row_base = (static_cast<long long>(batch) * heads + head) * t;
  const T* q_rows = q + row_base * HD;
  const T* do_rows = dout + batch * do_sb + head * do_sh;
  for (int i0 = q_begin; i0 < t; i0 += BQ) {
    __syncthreads();  // every warp is done with the previous query tile
    flash::load_tile<T, HD, BQ, false>(q_s, q_rows, HD, i0, t);
    flash::load_tile<T, HD, BQ, true>(qt_s, q_rows, HD, i0, t);
    flash::load_tile<T, HD, BQ, false>(do_s, do_rows, do_st, i0, t);
    flash::load_tile<T, HD, BQ, true>(dot_s, do_rows, do_st, i0, t);
    for (int i = threadIdx.x; i < BQ; i += blockDim.x) {
      lse_s[i] = i0 + i < t ? lse[row_base + i0 + i] : 0.f;
      delta_s[i] = i0 + i < t ? delta[row_base + i0 + i] : 0.f;
    }
    __syncthreads();

    // Sᵀ = K Qᵀ: [16 keys, BQ queries], then Pᵀ = exp(scale · Sᵀ − lse) where visible, else 0.
    float p[BQ / 8][4];
    flash::rows_times_tile_t<T, HD>(p, k_frag, q_s);
#pragma unroll
    for (int j = 0; j < BQ / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = j * 8 + 2 * tq + (e & 1);
        const int query = i0 + col;
        const bool seen = query < t && flash::visible(keys[e / 2], s - t + query, pad, s);
        p[j][e] = seen ? expf(p[j][e] * scale - lse_s[col]) : 0.f;
      }
    }

    // dV += Pᵀ dO: [16 keys, HD], reducing over the queries.
    flash::accumulate_times_tile<T, BQ>(dv_acc, p, dot_s);

    // dPᵀ = V dOᵀ: [16 keys, BQ queries]; dSᵀ = Pᵀ ∘ (dPᵀ − delta), in place of P.
    float dp[BQ / 8][4];
    flash::rows_times_tile_t<T, HD>(dp, v_frag, do_s);
#pragma unroll
    for (int j = 0; j < BQ / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) p[j][e] *= dp[j][e] - delta_s[j * 8 + 2 * tq + (e & 1)];
    }

    // dK += dSᵀ Q: [16 keys, HD] (times scale at the end).
    flash::accumulate_times_tile<T, BQ>(dk_acc, p, qt_s);
  }

  // dk, dv rows of this warp's keys (those < s) of this query head.
  const long long out_base = (static_cast<long long>(batch) * heads + head) * s * HD;
  flash::store_acc_rows<HD>(dk + out_base, dk_acc, key0, s, scale);
  flash::store_acc_rows<HD>(dv + out_base, dv_acc, key0, s, 1.f);
}

template <typename T, int HD>
__device__ void flash_backward_dq(const T* __restrict__ q, const T* __restrict__ k,
                                  const T* __restrict__ v, const T* __restrict__ dout,
                                  const float* __restrict__ lse, const float* __restrict__ delta,
                                  T* __restrict__ dq, const uint32_t* __restrict__ pads,
                                  int heads, int kv_heads, int t, int s, long long k_sb,
                                  long long k_sh, long long v_sb, long long v_sh,
                                  long long do_sb, long long do_sh, long long do_st,
                                  float scale) {
  static_assert(HD % 16 == 0 && HD <= 128, "head_dim must be a multiple of 16, at most 128");
  constexpr int PAD = flash::PAD;
  constexpr int BC = DQ_COLS<HD>;
  __shared__ __align__(16) T k_s[BC][HD + PAD];   // keys, row-major (S = Q Kᵀ)
  __shared__ __align__(16) T kt_s[HD][BC + PAD];  // keys, transposed (dQ += dS K)
  __shared__ __align__(16) T v_s[BC][HD + PAD];   // values, row-major (dP = dO Vᵀ)

  const int q0 = blockIdx.x * DQ_ROWS;
  const int head = blockIdx.y;
  const int batch = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, tq = lane % 4;
  const int kv_head = head / (heads / kv_heads);
  const int pad = static_cast<int>(pads[batch]);
  const long long row_base = (static_cast<long long>(batch) * heads + head) * t;
  const T* k_block = k + batch * k_sb + kv_head * k_sh;
  const T* v_block = v + batch * v_sb + kv_head * v_sh;

  // This warp's query rows (g and g + 8 of its 16) as A fragments of Q and dO.
  const int row0 = q0 + warp * 16;
  uint32_t q_frag[HD / 16][4], do_frag[HD / 16][4];
  flash::load_row_frags<T, HD>(q_frag, q + row_base * HD, HD, row0, t);
  flash::load_row_frags<T, HD>(do_frag, dout + batch * do_sb + head * do_sh, do_st, row0, t);
  const int rows[2] = {row0 + g, row0 + g + 8};
  float row_lse[2], row_delta[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_lse[h] = rows[h] < t ? lse[row_base + rows[h]] : 0.f;
    row_delta[h] = rows[h] < t ? delta[row_base + rows[h]] : 0.f;
  }

  float dq_acc[HD / 8][4];
  flash::zero_acc(dq_acc);

  const flash::KeyRange keys = flash::key_range(s, t, q0, min(q0 + DQ_ROWS, t) - 1, pad, BC);
  for (int k0 = keys.begin; k0 < keys.end; k0 += BC) {
    __syncthreads();  // every warp is done with the previous key tile
    flash::load_tile<T, HD, BC, false>(k_s, k_block, HD, k0, s);
    flash::load_tile<T, HD, BC, true>(kt_s, k_block, HD, k0, s);
    flash::load_tile<T, HD, BC, false>(v_s, v_block, HD, k0, s);
    __syncthreads();

    // S = Q Kᵀ, then P = exp(scale · S − lse) where visible, else 0.
    float p[BC / 8][4];
    flash::rows_times_tile_t<T, HD>(p, q_frag, k_s);
#pragma unroll
    for (int j = 0; j < BC / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e / 2;
        const int key = k0 + j * 8 + 2 * tq + (e & 1);
        const bool seen = rows[h] < t && flash::visible(key, s - t + rows[h], pad, s);
        p[j][e] = seen ? expf(p[j][e] * scale - row_lse[h]) : 0.f;
      }
    }

    // dP = dO Vᵀ; dS = P ∘ (dP − delta), in place of P.
    float dp[BC / 8][4];
    flash::rows_times_tile_t<T, HD>(dp, do_frag, v_s);
#pragma unroll
    for (int j = 0; j < BC / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) p[j][e] *= dp[j][e] - row_delta[e / 2];
    }

    // dQ += dS K: [16 queries, HD] (times scale at the end).
    flash::accumulate_times_tile<T, BC>(dq_acc, p, kt_s);
  }

  flash::store_acc_rows<HD>(dq + row_base * HD, dq_acc, row0, t, scale);
}

// delta[row] = Σ_d dout[row, d] · out[row, d] in f32 for the rows = b · heads · t query rows
// (row = (batch · heads + head) · t + i, as lse), one thread per row in a grid-stride loop, the
// head dims in order (16-byte loads; hd a multiple of 8).
template <typename T>
__device__ void flash_backward_delta(const T* __restrict__ dout, const T* __restrict__ out,
                                     float* __restrict__ delta, int heads, int t, int hd,
                                     long long do_sb, long long do_sh, long long do_st,
                                     long long o_sb, long long o_sh, long long o_st, int rows) {
  for (int row = blockIdx.x * blockDim.x + threadIdx.x; row < rows; row += gridDim.x * blockDim.x) {
    const int i = row % t, head = row / t % heads, batch = row / t / heads;
    const T* d = dout + batch * do_sb + head * do_sh + i * do_st;
    const T* o = out + batch * o_sb + head * o_sh + i * o_st;
    float acc = 0.f;
    for (int c = 0; c < hd; c += flash::VEC) {
      const uint4 dv = *reinterpret_cast<const uint4*>(d + c);
      const uint4 ov = *reinterpret_cast<const uint4*>(o + c);
      T de[flash::VEC], oe[flash::VEC];
      __builtin_memcpy(de, &dv, sizeof dv);
      __builtin_memcpy(oe, &ov, sizeof ov);
#pragma unroll
      for (int e = 0; e < flash::VEC; ++e) acc += fio::load(de, e) * fio::load(oe, e);
    }
    delta[row] = acc;
  }
}

}  // namespace

#define FLASH_BACKWARD(T, TNAME, HD)                                                            \
  extern "C" __global__ void __launch_bounds__(DKDV_WARPS * 32)                                \
      flash_attention_bwd_dkdv_##TNAME##_hd##HD(                                               \
          const T* q, const T* k, const T* v, const T* dout, const float* lse,                 \
          const float* delta, float* dk, float* dv, const uint32_t* pads, int heads,           \
          int kv_heads, int t, int s, long long k_sb, long long k_sh, long long v_sb,          \
          long long v_sh, long long do_sb, long long do_sh, long long do_st, float scale) {    \
    flash_backward_dkdv<T, HD>(q, k, v, dout, lse, delta, dk, dv, pads, heads, kv_heads, t, s, \
                               k_sb, k_sh, v_sb, v_sh, do_sb, do_sh, do_st, scale);            \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(DQ_WARPS * 32)                                  \
      flash_attention_bwd_dq_##TNAME##_hd##HD(                                                 \
          const T* q, const T* k, const T* v, const T* dout, const float* lse,                 \
          const float* delta, T* dq, const uint32_t* pads, int heads, int kv_heads, int t,     \
          int s, long long k_sb, long long k_sh, long long v_sb, long long v_sh,               \
          long long do_sb, long long do_sh, long long do_st, float scale) {                    \
    flash_backward_dq<T, HD>(q, k, v, dout, lse, delta, dq, pads, heads, kv_heads, t, s, k_sb, \
                             k_sh, v_sb, v_sh, do_sb, do_sh, do_st, scale);                    \
  }

#define FLASH_DELTA(T, TNAME)                                                                   \
  extern "C" __global__ void flash_attention_bwd_delta_##TNAME(                                \
      const T* dout, const T* out, float* delta, int heads, int t, int hd, long long do_sb,    \
      long long do_sh, long long do_st, long long o_sb, long long o_sh, long long o_st,        \
      int rows) {                                                                              \
    flash_backward_delta<T>(dout, out, delta, heads, t, hd, do_sb, do_sh, do_st, o_sb, o_sh,   \
                            o_st, rows);                                                       \
  }

FLASH_DELTA(__nv_bfloat16, bf16)
FLASH_DELTA(__half, f16)

FLASH_BACKWARD(__nv_bfloat16, bf16, 32)
FLASH_BACKWARD(__nv_bfloat16, bf16, 64)
FLASH_BACKWARD(__nv_bfloat16, bf16, 96)
FLASH_BACKWARD(__nv_bfloat16, bf16, 128)
FLASH_BACKWARD(__half, f16, 32)
FLASH_BACKWARD(__half, f16, 64)
FLASH_BACKWARD(__half, f16, 96)
FLASH_BACKWARD(__half, f16, 128)
