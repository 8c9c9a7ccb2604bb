// Runs kernels/adamw.cu on the CPU through crates/model/kernels/emulation/cuda_emulation.h, for
// crates/train/tests/adamw_emulated.rs.
//
// Usage: adamw_emulated IN OUT. IN (little-endian): u64 n, u64 steps, u32 mode (0: the three
// kernels one after another, 1: adamw_step_f32, all in one pass, 2: adamw_step_f32_gbf16, the
// gradients rounded to bf16, which the caller gives exact), n f32 initial weights, then
// per step 10 f64 constants (beta1, 1 - beta1, beta2, 1 - beta2, 1 / bc1, 1 / bc2, eps, lr,
// 1 - lr * weight_decay, grad_scale), two i32 (1: weight decay; 1: gradients scaled by
// grad_scale) and n f32 gradients. The constants are cast to f32 as the Rust launcher casts them.
// OUT: w, m, v after the last step, n f32 each.

#define QAT_CUDA_EMULATION
#include "cuda_emulation.h"
#include "../adamw.cu"
#include "harness_io.h"

int main(int argc, char** argv) {
  return harness_main(argc, argv, "adamw_emulated", [](FILE* in, FILE* out) {
    const auto n = read_one<uint64_t>(in), steps = read_one<uint64_t>(in);
    const auto mode = read_one<uint32_t>(in);
    const auto same = [](float f) { return f; };
    auto w = read_floats<float>(in, n, same);
    std::vector<float> m(n, 0.f), v(n, 0.f);
    const dim3 grid{static_cast<unsigned>(std::min<uint64_t>((n + 255) / 256, 65535)), 1, 1};
    for (uint64_t step = 0; step < steps; ++step) {
      double c[10];
      for (auto& x : c) x = read_one<double>(in);
      const int decayed = read_one<int32_t>(in), scaled = read_one<int32_t>(in);
      const auto g = read_floats<float>(in, n, same);
      const auto f = [&](int i) { return static_cast<float>(c[i]); };
      if (mode == 2) {
        std::vector<__nv_bfloat16> g16(n);
        for (uint64_t i = 0; i < n; ++i) g16[i] = __float2bfloat16(g[i]);
        emu_launch(grid, dim3{256, 1, 1}, [&] {
          adamw_step(w.data(), m.data(), v.data(), g16.data(), n, f(0), f(1), f(2), f(3), f(9),
                     scaled, f(4), f(5), f(6), f(7), f(8), decayed);
        });
        continue;
      }
      if (mode == 1) {
        emu_launch(grid, dim3{256, 1, 1}, [&] {
          adamw_step_f32(w.data(), m.data(), v.data(), g.data(), n, f(0), f(1), f(2), f(3), f(9),
                         scaled, f(4), f(5), f(6), f(7), f(8), decayed);
        });
        continue;
      }
      emu_launch(grid, dim3{256, 1, 1},
                 [&] { adamw_moment_f32(m.data(), g.data(), n, f(0), f(1), 0, f(9), scaled); });
      emu_launch(grid, dim3{256, 1, 1},
                 [&] { adamw_moment_f32(v.data(), g.data(), n, f(2), f(3), 1, f(9), scaled); });
      emu_launch(grid, dim3{256, 1, 1}, [&] {
        adamw_weight_f32(w.data(), m.data(), v.data(), n, f(4), f(5), f(6), f(7), f(8), decayed);
      });
    }
    write_floats(out, w);
    write_floats(out, m);
    write_floats(out, v);
  });
}
