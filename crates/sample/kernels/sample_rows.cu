// qat-sample's per-position math (crates/sample/src/sampler.rs) for a batch of logits rows on the
// GPU, so that a decode step copies K ids and log-probabilities per row to the host instead of
// the whole [rows, vocab] logits (crates/sample/src/device_rows.rs launches it). For each row r,
// logits z in f32, bf16 or f16:
//   max  = max_j z[j] (NaN ignored), argmax = the smallest index holding it (0 if none)
//   logZ = max + log Σ_j exp(z[j] - max)                        (f64, as log_softmax_exps)
//   lp_j = (float)(z[j] - logZ)                                 (f64 difference, rounded once)
//   top-K: the K indices of the largest lp_j in the total order of f32, largest first, ties by
//          the smaller index (as top_k_indices)
//   chosen: draws[r] < 0 → argmax; else the first j (in id order) at which the running sum of
//          w_j = exp((z[j] - max) / T) exceeds draws[r] · Σ w, argmax if none (as
//          sample_with_exps without truncation)
//   out[r] = [K ids, K lp bits (f32 as u32), chosen id, lp bits of chosen]      (2K + 2 u32)
//
//   logits [rows, vocab] T, contiguous     draws [rows] f64     out [rows, 2K + 2] u32
//
// One block of SR_BLOCK threads per row; thread t owns the contiguous ids [t·per, (t+1)·per),
// per = ceil(vocab / SR_BLOCK), so that scans over threads follow the id order. Sums are f64,
// per thread in id order, then across threads by a fixed scan: deterministic, and equal to the
// host's sequential sums up to rounding. The top-K is a radix select on the order-preserving u32
// key of lp (four passes of 8 bits with shared-memory histograms, whose integer counts do not
// depend on the order of the atomics), a collection of the keys above the threshold and of the
// first ties in id order, and a bitonic sort of (key, id). K <= SR_MAX_K. Without a GPU,
// tests/sample_rows_emulated.rs compiles this file against
// crates/model/kernels/emulation/cuda_emulation.h and checks it against the host functions.

#ifndef QAT_CUDA_EMULATION
#include <math_constants.h>
#include <stdint.h>
#endif

#include "../../model/kernels/block_reduce.cuh"
#include "../../model/kernels/float_io.cuh"

namespace {

constexpr unsigned SR_BLOCK = 512;
constexpr uint32_t SR_MAX_K = 1024;
constexpr uint32_t SR_NONE = 0xffffffffu;

// The u32 whose unsigned order is f32's total order (-NaN < -inf < ... < -0 < +0 < ... < NaN).
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t bits = __float_as_uint(f);
  return bits ^ ((bits >> 31) ? 0xffffffffu : 0x80000000u);
}

__device__ __forceinline__ uint32_t key_bits(uint32_t key) {
  return (key & 0x80000000u) ? key ^ 0x80000000u : ~key;
}

// Inclusive scan of v[0..SR_BLOCK) in place (Hillis-Steele: a fixed order of additions).
// Every thread of the block calls it; it begins and ends with a barrier.
template <typename V>
__device__ void block_scan(V* v) {
  __syncthreads();
  for (unsigned off = 1; off < SR_BLOCK; off <<= 1) {
    const V add = threadIdx.x >= off ? v[threadIdx.x - off] : V(0);
    __syncthreads();
    v[threadIdx.x] += add;
    __syncthreads();
  }
}

template <typename T>
__device__ void sample_row(const T* __restrict__ logits, const double* __restrict__ draws,
                           uint32_t* __restrict__ out, uint32_t vocab, uint32_t k,
                           double temperature) {
  __shared__ float red_max[SR_BLOCK];
  __shared__ uint32_t red_arg[SR_BLOCK];
  __shared__ double sums[SR_BLOCK];
  __shared__ uint32_t count_above[SR_BLOCK];
  __shared__ uint32_t count_tied[SR_BLOCK];
  __shared__ uint32_t hist[256];
  __shared__ uint64_t sel[SR_MAX_K];
  __shared__ uint32_t threshold, want;
  __shared__ double log_z;

  const size_t row = blockIdx.x;
  const unsigned t = threadIdx.x;
  const T* z = logits + row * vocab;
  uint32_t* o = out + row * (2 * static_cast<size_t>(k) + 2);
  const uint32_t per = (vocab + SR_BLOCK - 1) / SR_BLOCK;
  const uint32_t lo = min(t * per, vocab), hi = min(lo + per, vocab);

  // The maximum and the first index holding it.
  float m = -CUDART_INF_F;
  uint32_t arg = SR_NONE;
  for (uint32_t j = lo; j < hi; ++j) {
    const float x = fio::load(z, j);
    if (x > m) {
      m = x;
      arg = j;
    }
  }
  red_max[t] = m;
  red_arg[t] = arg;
  __syncthreads();
  for (unsigned s = SR_BLOCK / 2; s > 0; s >>= 1) {
    if (t < s) {
      const float other = red_max[t + s];
      if (other > red_max[t] || (other == red_max[t] && red_arg[t + s] < red_arg[t])) {
        red_max[t] = other;
        red_arg[t] = red_arg[t + s];
      }
    }
    __syncthreads();
  }
  const double row_max = red_max[0];
  const uint32_t argmax = red_arg[0] == SR_NONE ? 0 : red_arg[0];

  // log Z from the f64 sum of exp(z - max).
  double s = 0.0;
  for (uint32_t j = lo; j < hi; ++j) s += exp(static_cast<double>(fio::load(z, j)) - row_max);
  sums[t] = s;
  block_scan(sums);
  if (t == 0) log_z = row_max + log(sums[SR_BLOCK - 1]);
  __syncthreads();
  const double lz = log_z;
  const auto lp = [&](uint32_t j) {
    return static_cast<float>(static_cast<double>(fio::load(z, j)) - lz);
  };

  if (k > 0) {
    // Radix select of the K-th largest key, 8 bits at a time from the top: `threshold` holds
    // the digits found so far, `want` how many keys equal to them on those digits to take.
    if (t == 0) {
      threshold = 0;
      want = k;
    }
    uint32_t mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
      if (t < 256) hist[t] = 0;
      __syncthreads();
      const uint32_t prefix = threshold, w = want;  // rewritten only after the scan below
      for (uint32_t j = lo; j < hi; ++j) {
        const uint32_t key = order_key(lp(j));
        if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
      }
      __syncthreads();
      // Counts of digits >= d (a scan from the top digit down), then the one digit d with
      // above(d + 1) < want <= above(d).
      count_above[t] = t < 256 ? hist[255 - t] : 0;
      block_scan(count_above);  // count_above[i] = keys with digit >= 255 - i
      if (t < 256) {
        const uint32_t above_incl = count_above[t];
        const uint32_t above_excl = t > 0 ? count_above[t - 1] : 0;
        if (above_excl < w && w <= above_incl) {
          threshold = prefix | ((255u - t) << shift);
          want = w - above_excl;
        }
      }
      mask |= 255u << shift;
      __syncthreads();
    }
    const uint32_t th = threshold, tied_wanted = want;

    // Positions: keys above the threshold first (k - tied_wanted of them), then the first
    // tied_wanted ties in id order.
    uint32_t n_above = 0, n_tied = 0;
    for (uint32_t j = lo; j < hi; ++j) {
      const uint32_t key = order_key(lp(j));
      n_above += key > th;
      n_tied += key == th;
    }
    count_above[t] = n_above;
    count_tied[t] = n_tied;
    block_scan(count_above);
    block_scan(count_tied);
    uint32_t pos_above = count_above[t] - n_above, pos_tied = count_tied[t] - n_tied;
    const uint32_t first_tied = k - tied_wanted;
    for (uint32_t j = lo; j < hi; ++j) {
      const uint32_t key = order_key(lp(j));
      const uint64_t packed = (static_cast<uint64_t>(~key) << 32) | j;
      if (key > th) {
        sel[pos_above++] = packed;
      } else if (key == th && pos_tied < tied_wanted) {
        sel[first_tied + pos_tied++] = packed;
      }
    }
    uint32_t padded = 1;
    while (padded < k) padded <<= 1;
    for (uint32_t i = k + t; i < padded; i += SR_BLOCK) sel[i] = ~0ull;
    __syncthreads();
    // Bitonic sort, ascending in (~key, id): largest key first, smaller id first among ties.
    for (uint32_t size = 2; size <= padded; size <<= 1) {
      for (uint32_t stride = size / 2; stride > 0; stride >>= 1) {
        for (uint32_t i = t; i < padded; i += SR_BLOCK) {
          const uint32_t partner = i ^ stride;
          if (partner > i) {
            const uint64_t a = sel[i], b = sel[partner];
            if (((i & size) == 0) == (a > b)) {
              sel[i] = b;
              sel[partner] = a;
            }
          }
        }
        __syncthreads();
      }
    }
    for (uint32_t i = t; i < k; i += SR_BLOCK) {
      o[i] = static_cast<uint32_t>(sel[i]);
      o[k + i] = key_bits(~static_cast<uint32_t>(sel[i] >> 32));
    }
  }

  // The next token.
  const double u = draws[row];
  uint32_t chosen = argmax;
  if (u >= 0.0) {
    if (temperature != 1.0) {
      double w = 0.0;
      for (uint32_t j = lo; j < hi; ++j) {
        w += exp((static_cast<double>(fio::load(z, j)) - row_max) / temperature);
      }
      sums[t] = w;  // the barrier after log_z ended every read of the first scan
      block_scan(sums);
    }
    const double target = u * sums[SR_BLOCK - 1];
    double acc = t > 0 ? sums[t - 1] : 0.0;
    uint32_t hit = SR_NONE;
    for (uint32_t j = lo; j < hi && hit == SR_NONE; ++j) {
      const double d = static_cast<double>(fio::load(z, j)) - row_max;
      acc += temperature != 1.0 ? exp(d / temperature) : exp(d);
      if (acc > target) hit = j;
    }
    // The first hit in id order: the smallest. (red_arg's last reads, the argmax, were followed
    // by the barriers of the log Z scan.)
    hit = blockred::block_reduce<SR_BLOCK>(red_arg, hit, blockred::Min());
    if (hit != SR_NONE) chosen = hit;
  }
  if (t == 0) {
    o[2 * k] = chosen;
    o[2 * k + 1] = __float_as_uint(lp(chosen));
  }
}

}  // namespace

#define SAMPLE_ROWS_KERNEL(T, NAME)                                                        \
  extern "C" __global__ void sample_rows_##NAME(const T* logits, const double* draws,     \
                                                uint32_t* out, uint32_t vocab, uint32_t k, \
                                                double temperature) {                      \
    sample_row(logits, draws, out, vocab, k, temperature);                                 \
  }

SAMPLE_ROWS_KERNEL(float, f32)
SAMPLE_ROWS_KERNEL(__nv_bfloat16, bf16)
SAMPLE_ROWS_KERNEL(__half, f16)
