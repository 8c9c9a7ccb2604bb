// Runs kernels/fake_quant.cu on the CPU through crates/model/kernels/emulation/cuda_emulation.h,
// for crates/quant/tests/fake_quant_emulated.rs.
//
// Usage: fake_quant_emulated IN OUT. IN (little-endian): u32 rows, u32 cols, u32 dtype (0 f32,
// 1 bf16), f32 qmax, i32 f16_scale, then rows*cols f32 (exact in the dtype). OUT: rows*cols f32.

#define QAT_CUDA_EMULATION
#include "cuda_emulation.h"
#include "../fake_quant.cu"

#include <cstdio>
#include <stdexcept>

namespace {

template <typename V>
V read_one(FILE* f) {
  V x;
  if (std::fread(&x, sizeof x, 1, f) != 1) throw std::runtime_error("input file too short");
  return x;
}

template <typename T, typename From, typename To>
void run(FILE* in, FILE* out, uint32_t rows, uint32_t cols, float qmax, int f16_scale, From from,
         To to) {
  std::vector<T> x(static_cast<size_t>(rows) * cols), y(x.size());
  for (auto& e : x) e = from(read_one<float>(in));
  emu_launch(dim3{rows, 1, 1}, dim3{BLOCK, 1, 1},
             [&] { sym_row_fake_quant(x.data(), y.data(), cols, qmax, f16_scale); });
  for (const T& e : y) {
    const float f = to(e);
    std::fwrite(&f, sizeof f, 1, out);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  try {
    FILE* in = std::fopen(argv[1], "rb");
    FILE* out = std::fopen(argv[2], "wb");
    if (!in || !out) throw std::runtime_error("cannot open the input or the output file");
    const auto rows = read_one<uint32_t>(in), cols = read_one<uint32_t>(in);
    const auto dtype = read_one<uint32_t>(in);
    const auto qmax = read_one<float>(in);
    const auto f16_scale = read_one<int32_t>(in);
    if (dtype == 0) {
      run<float>(in, out, rows, cols, qmax, f16_scale, [](float f) { return f; },
                 [](float f) { return f; });
    } else {
      run<__nv_bfloat16>(in, out, rows, cols, qmax, f16_scale, __float2bfloat16, __bfloat162float);
    }
    std::fclose(in);
    if (std::fclose(out) != 0) throw std::runtime_error("cannot write the output file");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fake_quant_emulated: %s\n", e.what());
    return 2;
  }
  return 0;
}
