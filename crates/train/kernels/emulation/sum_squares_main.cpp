// Runs kernels/sum_squares.cu on the CPU through crates/model/kernels/emulation/cuda_emulation.h,
// for crates/train/tests/sum_squares_emulated.rs.
//
// Usage: sum_squares_emulated IN OUT. IN (little-endian): u64 n, u32 blocks (the first stage's
// grid), u32 slot, u32 slots, u32 dtype (0 f32, 1 bf16: the values rounded to it, which the
// caller gives exact), then n f32. OUT: slots f64 (the output buffer, -1 where unwritten).

#define QAT_CUDA_EMULATION
#include "cuda_emulation.h"
#include "../sum_squares.cu"
#include "harness_io.h"

int main(int argc, char** argv) {
  return harness_main(argc, argv, "sum_squares_emulated", [](FILE* in, FILE* out) {
    const auto n = read_one<uint64_t>(in);
    const auto blocks = read_one<uint32_t>(in), slot = read_one<uint32_t>(in);
    const auto slots = read_one<uint32_t>(in), dtype = read_one<uint32_t>(in);
    const auto g = read_floats<float>(in, n, [](float f) { return f; });
    std::vector<double> partial(blocks, -1.0), result(slots, -1.0);
    if (dtype == 1) {
      std::vector<__nv_bfloat16> g16(n);
      for (uint64_t i = 0; i < n; ++i) g16[i] = __float2bfloat16(g[i]);
      emu_launch(dim3{blocks, 1, 1}, dim3{SQ_BLOCK, 1, 1},
                 [&] { sum_squares_partial(g16.data(), n, partial.data()); });
    } else {
      emu_launch(dim3{blocks, 1, 1}, dim3{SQ_BLOCK, 1, 1},
                 [&] { sum_squares_partial(g.data(), n, partial.data()); });
    }
    emu_launch(dim3{1, 1, 1}, dim3{SQ_BLOCK, 1, 1},
               [&] { sum_squares_final(partial.data(), blocks, result.data(), slot); });
    if (std::fwrite(result.data(), sizeof(double), slots, out) != slots) {
      throw std::runtime_error("cannot write the output file");
    }
  });
}
