// Runs kernels/grad_sum.cu on the CPU through crates/model/kernels/emulation/cuda_emulation.h, for
// crates/train/tests/grad_sum_emulated.rs.
//
// Usage: grad_sum_emulated IN OUT. IN (little-endian): u64 n, u32 blocks (the grid: fewer than n
// needs, to exercise the grid stride), u32 dtype of the gradients (0 f32, 1 bf16, 2 f16: the
// values rounded to it, which the caller gives exact), u32 steps, then per step u32 kernel (0
// grad_sum_copy into the sum, 1 grad_sum_add to it), f32 scale, i32 scaled and n f32 gradient
// values. OUT: the sum after the last step, n f32.

#define QAT_CUDA_EMULATION
#include "cuda_emulation.h"
#include "../grad_sum.cu"
#include "harness_io.h"

template <typename G>
static void run_step(uint32_t kernel, std::vector<float>& acc, const std::vector<G>& g, float scale,
                     int scaled, uint32_t blocks) {
  const uint64_t n = acc.size();
  emu_launch(dim3{blocks, 1, 1}, dim3{256, 1, 1}, [&] {
    if (kernel == 0) {
      grad_sum_copy(acc.data(), g.data(), n, scale, scaled);
    } else {
      grad_sum_add(acc.data(), g.data(), n, scale, scaled);
    }
  });
}

int main(int argc, char** argv) {
  return harness_main(argc, argv, "grad_sum_emulated", [](FILE* in, FILE* out) {
    const auto n = read_one<uint64_t>(in);
    const auto blocks = read_one<uint32_t>(in), dtype = read_one<uint32_t>(in);
    const auto steps = read_one<uint32_t>(in);
    std::vector<float> acc(n, -1.0f);
    for (uint32_t step = 0; step < steps; ++step) {
      const auto kernel = read_one<uint32_t>(in);
      const auto scale = read_one<float>(in);
      const auto scaled = read_one<int32_t>(in);
      const auto g = read_floats<float>(in, n, [](float f) { return f; });
      if (dtype == 1) {
        std::vector<__nv_bfloat16> g16(n);
        for (uint64_t i = 0; i < n; ++i) g16[i] = __float2bfloat16(g[i]);
        run_step(kernel, acc, g16, scale, scaled, blocks);
      } else if (dtype == 2) {
        std::vector<__half> g16(n);
        for (uint64_t i = 0; i < n; ++i) g16[i] = __float2half(g[i]);
        run_step(kernel, acc, g16, scale, scaled, blocks);
      } else {
        run_step(kernel, acc, g, scale, scaled, blocks);
      }
    }
    write_floats(out, acc);
  });
}
