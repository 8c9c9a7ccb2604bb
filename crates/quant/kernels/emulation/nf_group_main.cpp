// Runs kernels/nf_group.cu on the CPU through crates/model/kernels/emulation/cuda_emulation.h, for
// crates/quant/tests/nf_group_emulated.rs.
//
// Usage: nf_group_emulated IN OUT. IN (little-endian): u64 n, u32 group (divides n), u32 grid (1:
// NF3, 0: NF4), u32 bf16 (1: bf16 output), then n f32 weights. OUT: n f32 (bf16 widened).

#define QAT_CUDA_EMULATION
#include "cuda_emulation.h"
#include "../nf_group.cu"
#include "harness_io.h"

int main(int argc, char** argv) {
  return harness_main(argc, argv, "nf_group_emulated", [](FILE* in, FILE* out) {
    const auto n = read_one<uint64_t>(in);
    const auto group = read_one<uint32_t>(in), nf3 = read_one<uint32_t>(in);
    const auto bf16 = read_one<uint32_t>(in);
    if (group == 0 || n % group != 0) throw std::runtime_error("group must divide n");
    const auto x = read_floats<float>(in, n, [](float f) { return f; });
    const size_t groups = n / group;
    const dim3 grid{static_cast<unsigned>((groups + NF_GROUPS_PER_BLOCK - 1) / NF_GROUPS_PER_BLOCK), 1, 1};
    std::vector<float> result(n);
    if (bf16) {
      std::vector<__nv_bfloat16> o(n);
      emu_launch(grid, dim3{NF_BLOCK, 1, 1},
                 [&] { nf_group_fq(x.data(), o.data(), groups, group, static_cast<int>(nf3)); });
      for (size_t i = 0; i < n; ++i) result[i] = emu_to_float(o[i]);
    } else {
      emu_launch(grid, dim3{NF_BLOCK, 1, 1},
                 [&] { nf_group_fq(x.data(), result.data(), groups, group, static_cast<int>(nf3)); });
    }
    write_floats(out, result);
  });
}
