// Runs kernels/token_nll.cu on the CPU through cuda_emulation.h, for
// crates/model/tests/token_nll_emulated.rs.
//
// Usage: token_nll_emulated IN OUT. IN (little-endian): u32 rows, u32 vocab, u32 dtype (0 f32,
// 1 bf16, 2 f16), rows u32 targets, then rows*vocab f32 logits (exact in the dtype).
// OUT: rows*2 f32 (nll, rank per row).

#define QAT_CUDA_EMULATION
#include "cuda_emulation.h"
#include "../token_nll.cu"

#include "harness_io.h"

namespace {

template <typename T, typename From>
void run(FILE* in, FILE* out, uint32_t rows, uint32_t vocab, From from) {
  std::vector<uint32_t> targets(rows);
  for (auto& t : targets) t = read_one<uint32_t>(in);
  const auto z = read_floats<T>(in, static_cast<size_t>(rows) * vocab, from);
  std::vector<float> y(2 * static_cast<size_t>(rows));
  emu_launch(dim3{rows, 1, 1}, dim3{NLL_BLOCK, 1, 1},
             [&] { token_nll_row(z.data(), targets.data(), y.data(), vocab); });
  write_floats(out, y);
}

}  // namespace

int main(int argc, char** argv) {
  return harness_main(argc, argv, "token_nll_emulated", [](FILE* in, FILE* out) {
    const auto rows = read_one<uint32_t>(in), vocab = read_one<uint32_t>(in);
    const auto dtype = read_one<uint32_t>(in);
    if (dtype == 0) {
      run<float>(in, out, rows, vocab, [](float f) { return f; });
    } else if (dtype == 1) {
      run<__nv_bfloat16>(in, out, rows, vocab, __float2bfloat16);
    } else {
      run<__half>(in, out, rows, vocab, __float2half);
    }
  });
}
