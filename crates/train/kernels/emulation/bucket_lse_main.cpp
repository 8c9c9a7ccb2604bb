// Runs kernels/bucket_lse.cu on the CPU through crates/model/kernels/emulation/cuda_emulation.h,
// for crates/train/tests/bucket_lse_emulated.rs.
//
// Usage: bucket_lse_emulated IN OUT. IN (little-endian): u32 rows, u32 vocab, u32 k, u32 tail,
// rows*k u32 ids, rows*vocab f32 logits, rows*c f32 upstream gradients (c = 1 + tail).
// OUT: rows*c f32 forward outputs, then rows*vocab f32 gradients of the logits (the backward
// kernel fed with the forward's outputs and the given upstream gradients).

#define QAT_CUDA_EMULATION
#include "cuda_emulation.h"
#include "../bucket_lse.cu"

#include "harness_io.h"

int main(int argc, char** argv) {
  return harness_main(argc, argv, "bucket_lse_emulated", [](FILE* in, FILE* out) {
    const auto rows = read_one<uint32_t>(in), vocab = read_one<uint32_t>(in);
    const auto k = read_one<uint32_t>(in), tail = read_one<uint32_t>(in);
    const uint32_t c = tail ? 2 : 1;
    std::vector<uint32_t> ids(static_cast<size_t>(rows) * k);
    for (auto& id : ids) id = read_one<uint32_t>(in);
    const auto same = [](float f) { return f; };
    const auto z = read_floats<float>(in, static_cast<size_t>(rows) * vocab, same);
    const auto g = read_floats<float>(in, static_cast<size_t>(rows) * c, same);
    std::vector<float> lse(static_cast<size_t>(rows) * c, -1.0f);
    emu_launch(dim3{rows, 1, 1}, dim3{LSE_BLOCK, 1, 1}, [&] {
      bucket_lse_row(z.data(), ids.data(), lse.data(), vocab, k, static_cast<int>(tail));
    });
    std::vector<float> saved;
    for (uint32_t r = 0; r < rows; ++r) {
      for (uint32_t i = 0; i < c; ++i) saved.push_back(lse[r * c + i]);
      for (uint32_t i = 0; i < c; ++i) saved.push_back(g[r * c + i]);
    }
    std::vector<float> dz(z.size(), -1.0f);
    emu_launch(dim3{rows, 1, 1}, dim3{LSE_BLOCK, 1, 1}, [&] {
      bucket_lse_backward_row(z.data(), ids.data(), saved.data(), dz.data(), vocab, k,
                              static_cast<int>(tail));
    });
    write_floats(out, lse);
    write_floats(out, dz);
  });
}
