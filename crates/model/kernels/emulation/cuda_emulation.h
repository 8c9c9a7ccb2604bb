// Just enough of CUDA, in host C++20, to run qat's kernels without a GPU, for tests
// (crates/model/tests/flash_attention_emulated.rs, token_nll_emulated.rs and
// causal_softmax_emulated.rs, crates/quant/tests/fake_quant_emulated.rs,
// crates/train/tests/adamw_emulated.rs and bucket_lse_emulated.rs,
// crates/sample/tests/sample_rows_emulated.rs): one host thread per CUDA thread of a block
// (blocks run one after another), std::barrier for __syncthreads / __syncwarp, warp shuffles
// through a per-warp exchange array, bf16 / f16 as 16-bit storage types rounded to nearest even,
// IEEE intrinsics as plain operations, and mma.sync m16n8k16 by the PTX ISA's register fragment
// layouts (emu_warp_mma_row).
// Shared memory (`__shared__`) becomes function-static storage, shared by the block's threads.
// What it cannot show: timing, races that barriers would hide, the hardware's accumulation order.

#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <math.h>  // fabsf, fminf, fmaxf, rintf, expf in the global namespace, as CUDA has them
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(n)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define CUDART_INF_F INFINITY
#define CUDART_NAN_F NAN

using std::min;
using std::max;

struct alignas(16) uint4 {
  uint32_t x, y, z, w;
};
inline uint4 make_uint4(uint32_t x, uint32_t y, uint32_t z, uint32_t w) { return {x, y, z, w}; }

struct __nv_bfloat16 {
  uint16_t bits;
};
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);  // nearest, ties to even (inputs here are finite)
  return {static_cast<uint16_t>(u >> 16)};
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) {
  uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct __half {
  _Float16 value;
};
inline __half __float2half(float f) { return {static_cast<_Float16>(f)}; }  // nearest, ties to even
inline __half __float2half_rn(float f) { return __float2half(f); }
inline float __half2float(__half h) { return static_cast<float>(h.value); }

inline float emu_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
inline float emu_to_float(__half x) { return __half2float(x); }
inline float emu_to_float(float x) { return x; }

// IEEE operations rounded to nearest (the host compiles them as they are written: the harnesses
// are built with -ffp-contract=off, so no FMA contraction either).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// 32-bit registers per lane that one emulated warp-wide mma exchanges (see emu_warp_mma_row).
constexpr int EMU_MMA_REGS = 4 + 2 * 16;

// The running thread's coordinates and its block's synchronization state.
struct EmuBlock {
  explicit EmuBlock(unsigned threads)
      : block(threads),
        exchange((threads + 31) / 32 * 32),
        mma_regs((threads + 31) / 32 * 32 * EMU_MMA_REGS) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) {
      warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
    }
  }
  std::barrier<> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> exchange;
  std::vector<uint32_t> mma_regs;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline thread_local EmuBlock* emu_block = nullptr;

inline void __syncthreads() { emu_block->block.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_block->warps[threadIdx.x / 32]->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  const unsigned base = threadIdx.x / 32 * 32, lane = threadIdx.x % 32;
  emu_block->exchange[base + lane] = value;
  __syncwarp();
  const float other = emu_block->exchange[base + (lane ^ static_cast<unsigned>(lane_mask))];
  __syncwarp();
  return other;
}

// Shared-memory atomics: a real atomic on the host too (the block's threads are host threads).
inline unsigned atomicOr(unsigned* address, unsigned value) {
  return std::atomic_ref<unsigned>(*address).fetch_or(value);
}
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  return std::atomic_ref<unsigned>(*address).fetch_add(value);
}

// Bit casts between f32 and u32.
inline uint32_t __float_as_uint(float f) { return std::bit_cast<uint32_t>(f); }
inline float __uint_as_float(uint32_t u) { return std::bit_cast<float>(u); }

// Runs `kernel` over the grid, one host thread per CUDA thread, one block at a time.
inline void emu_launch(dim3 grid, dim3 block, const std::function<void()>& kernel) {
  gridDim = grid;
  blockDim = block;
  const unsigned threads = block.x * block.y * block.z;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        EmuBlock state(threads);
        std::vector<std::thread> pool;
        for (unsigned i = 0; i < threads; ++i) {
          pool.emplace_back([&, i] {
            threadIdx = {i, 0, 0};
            blockIdx = {x, y, z};
            emu_block = &state;
            kernel();
          });
        }
        for (auto& th : pool) th.join();
      }
}

// A 16-bit float from its bits.
template <typename T>
inline float emu_bits_to_float(uint16_t bits);
template <>
inline float emu_bits_to_float<__nv_bfloat16>(uint16_t bits) {
  return __bfloat162float(__nv_bfloat16{bits});
}
template <>
inline float emu_bits_to_float<__half>(uint16_t bits) {
  return static_cast<float>(std::bit_cast<_Float16>(bits));
}

// N warp-wide `mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.f32` with one A fragment:
// d[j] += A · B_j for j < N, by the PTX ISA's fragment layouts (g = lane / 4, t = lane % 4):
//   A 16x16  a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9],
//            a3 = A[g+8][2t+8, 2t+9] (two 16-bit elements per register, the first in the low half)
//   B 16x8   b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]
//   C/D 16x8 d0 = D[g][2t], d1 = D[g][2t+1], d2 = D[g+8][2t], d3 = D[g+8][2t+1]
// The lanes' registers meet in the block's exchange array between two warp barriers; each lane
// then computes its own four elements per tile (f32 sums in k order, from d).
template <typename T, int N>
inline void emu_warp_mma_row(float (&d)[N][4], const uint32_t (&a)[4], const uint32_t (&b)[N][2]) {
  static_assert(4 + 2 * N <= EMU_MMA_REGS, "too many tiles for the exchange");
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  uint32_t* mine = &emu_block->mma_regs[(warp * 32 + lane) * EMU_MMA_REGS];
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  for (int j = 0; j < N; ++j) {
    mine[4 + 2 * j] = b[j][0];
    mine[5 + 2 * j] = b[j][1];
  }
  __syncwarp();
  const uint32_t* regs = &emu_block->mma_regs[warp * 32 * EMU_MMA_REGS];
  const auto element = [&](int src_lane, int reg, int high) {
    const uint32_t r = regs[src_lane * EMU_MMA_REGS + reg];
    return emu_bits_to_float<T>(static_cast<uint16_t>(high ? r >> 16 : r & 0xffffu));
  };
  const auto a_at = [&](int row, int k) {
    return element((row % 8) * 4 + (k % 8) / 2, (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0), k % 2);
  };
  const auto b_at = [&](int j, int k, int n) {
    return element(n * 4 + (k % 8) / 2, 4 + 2 * j + (k >= 8 ? 1 : 0), k % 2);
  };
  const int g = static_cast<int>(lane / 4), t = static_cast<int>(lane % 4);
  float out[N][4];
  for (int j = 0; j < N; ++j)
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
      float sum = d[j][i];
      for (int k = 0; k < 16; ++k) sum += a_at(row, k) * b_at(j, k, col);
      out[j][i] = sum;
    }
  __syncwarp();
  std::memcpy(d, out, sizeof out);
}

