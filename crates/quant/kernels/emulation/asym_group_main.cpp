// Runs kernels/asym_group.cu on the CPU through crates/model/kernels/emulation/cuda_emulation.h,
// for crates/quant/tests/asym_group_emulated.rs.
//
// Usage: asym_group_emulated IN OUT. IN (little-endian): u64 n, u32 group (divides n), u32 m (the
// largest code), u32 mode (0: the forward, f32 out; 1: the forward, bf16 out; 2: the min/max
// gradient of an f32 incoming gradient; 3: of a bf16 one, whose values the caller gives exact),
// then n f32 weights and, in modes 2 and 3, n f32 incoming gradients. OUT: n f32 (the output,
// bf16 widened; or the gradient).

#define QAT_CUDA_EMULATION
#include "cuda_emulation.h"
#include "../asym_group.cu"
#include "harness_io.h"

int main(int argc, char** argv) {
  return harness_main(argc, argv, "asym_group_emulated", [](FILE* in, FILE* out) {
    const auto n = read_one<uint64_t>(in);
    const auto group = read_one<uint32_t>(in), m = read_one<uint32_t>(in);
    const auto mode = read_one<uint32_t>(in);
    if (group == 0 || n % group != 0) throw std::runtime_error("group must divide n");
    const auto same = [](float f) { return f; };
    const auto x = read_floats<float>(in, n, same);
    const size_t groups = n / group;
    const dim3 grid{static_cast<unsigned>((groups + ASYM_GROUPS_PER_BLOCK - 1) / ASYM_GROUPS_PER_BLOCK), 1, 1};
    const dim3 block{ASYM_BLOCK, 1, 1};
    const float mf = static_cast<float>(m);
    std::vector<float> result(n);
    if (mode == 0) {
      emu_launch(grid, block, [&] { asym_group_fq(x.data(), result.data(), groups, group, mf); });
    } else if (mode == 1) {
      std::vector<__nv_bfloat16> o(n);
      emu_launch(grid, block, [&] { asym_group_fq(x.data(), o.data(), groups, group, mf); });
      for (size_t i = 0; i < n; ++i) result[i] = emu_to_float(o[i]);
    } else {
      const auto g = read_floats<float>(in, n, same);
      if (mode == 3) {
        std::vector<__nv_bfloat16> g16(n);
        for (size_t i = 0; i < n; ++i) g16[i] = __float2bfloat16(g[i]);
        emu_launch(grid, block, [&] {
          asym_group_minmax_grad(x.data(), g16.data(), result.data(), groups, group, mf);
        });
      } else {
        emu_launch(grid, block, [&] {
          asym_group_minmax_grad(x.data(), g.data(), result.data(), groups, group, mf);
        });
      }
    }
    write_floats(out, result);
  });
}
