// Runs kernels/fake_quant.cu on the CPU through crates/model/kernels/emulation/cuda_emulation.h,
// for crates/quant/tests/fake_quant_emulated.rs.
//
// Usage: fake_quant_emulated IN OUT. IN (little-endian): u32 rows, u32 cols, u32 dtype (0 f32,
// 1 bf16, 2 f32 in and bf16 out), f32 qmax, i32 f16_scale, then rows*cols f32 (exact in the
// input dtype). OUT: rows*cols f32.

#define QAT_CUDA_EMULATION
#include "cuda_emulation.h"
#include "../fake_quant.cu"

#include "harness_io.h"

namespace {

template <typename T, typename Out, typename From, typename To>
void run(FILE* in, FILE* out, uint32_t rows, uint32_t cols, float qmax, int f16_scale, From from,
         To to) {
  const auto x = read_floats<T>(in, static_cast<size_t>(rows) * cols, from);
  std::vector<Out> y(x.size());
  emu_launch(dim3{rows, 1, 1}, dim3{BLOCK, 1, 1},
             [&] { sym_row_fake_quant(x.data(), y.data(), cols, qmax, f16_scale); });
  std::vector<float> yf(y.size());
  for (size_t i = 0; i < y.size(); ++i) yf[i] = to(y[i]);
  write_floats(out, yf);
}

}  // namespace

int main(int argc, char** argv) {
  return harness_main(argc, argv, "fake_quant_emulated", [](FILE* in, FILE* out) {
    const auto rows = read_one<uint32_t>(in), cols = read_one<uint32_t>(in);
    const auto dtype = read_one<uint32_t>(in);
    const auto qmax = read_one<float>(in);
    const auto f16_scale = read_one<int32_t>(in);
    const auto same = [](float f) { return f; };
    if (dtype == 0) {
      run<float, float>(in, out, rows, cols, qmax, f16_scale, same, same);
    } else if (dtype == 1) {
      run<__nv_bfloat16, __nv_bfloat16>(in, out, rows, cols, qmax, f16_scale, __float2bfloat16,
                                        __bfloat162float);
    } else {
      run<float, __nv_bfloat16>(in, out, rows, cols, qmax, f16_scale, same, __bfloat162float);
    }
  });
}
