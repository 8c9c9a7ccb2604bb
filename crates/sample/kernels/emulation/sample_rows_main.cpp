// Runs kernels/sample_rows.cu on the CPU through crates/model/kernels/emulation/cuda_emulation.h,
// for crates/sample/tests/sample_rows_emulated.rs.
//
// Usage: sample_rows_emulated IN OUT. IN (little-endian): u32 rows, u32 vocab, u32 k, u32 dtype
// (0 f32, 1 bf16, 2 f16: the logits are rounded to it and the kernel runs on that type), f64
// temperature, rows f64 draws, rows*vocab f32 logits. OUT: rows*(2k+2) u32, the kernel's output.

#define QAT_CUDA_EMULATION
#include "cuda_emulation.h"
#include "../sample_rows.cu"

#include "harness_io.h"

template <typename T>
static void run(FILE* in, FILE* out, uint32_t rows, uint32_t vocab, uint32_t k) {
  const auto temperature = read_one<double>(in);
  std::vector<double> draws(rows);
  for (auto& d : draws) d = read_one<double>(in);
  const auto to_t = [](float f) {
    if constexpr (std::is_same_v<T, float>) {
      return f;
    } else if constexpr (std::is_same_v<T, __half>) {
      return __float2half_rn(f);
    } else {
      return __float2bfloat16_rn(f);
    }
  };
  const auto z = read_floats<T>(in, static_cast<size_t>(rows) * vocab, to_t);
  std::vector<uint32_t> result(static_cast<size_t>(rows) * (2 * k + 2), 0xdeadbeefu);
  emu_launch(dim3{rows, 1, 1}, dim3{SR_BLOCK, 1, 1}, [&] {
    sample_row(z.data(), draws.data(), result.data(), vocab, k, temperature);
  });
  if (std::fwrite(result.data(), sizeof(uint32_t), result.size(), out) != result.size()) {
    throw std::runtime_error("cannot write the output file");
  }
}

int main(int argc, char** argv) {
  return harness_main(argc, argv, "sample_rows_emulated", [](FILE* in, FILE* out) {
    const auto rows = read_one<uint32_t>(in), vocab = read_one<uint32_t>(in);
    const auto k = read_one<uint32_t>(in), dtype = read_one<uint32_t>(in);
    if (dtype == 0) {
      run<float>(in, out, rows, vocab, k);
    } else if (dtype == 1) {
      run<__nv_bfloat16>(in, out, rows, vocab, k);
    } else if (dtype == 2) {
      run<__half>(in, out, rows, vocab, k);
    } else {
      throw std::runtime_error("dtype must be 0 (f32), 1 (bf16) or 2 (f16)");
    }
  });
}
