// Runs kernels/swiglu.cu on the CPU through cuda_emulation.h, for
// crates/model/tests/swiglu_emulated.rs.
//
// Usage: swiglu_emulated IN OUT. IN (little-endian): u32 n, u32 dtype (0 f32, 1 bf16, 2 f16),
// u32 blocks (the grid, to exercise its stride), then n f32 gate, n f32 up, n f32 dy (each exact
// in the dtype). OUT: n f32 y, n f32 d gate, n f32 d up.

#define QAT_CUDA_EMULATION
#include "cuda_emulation.h"
#include "../swiglu.cu"

#include "harness_io.h"

namespace {

template <typename T, typename From>
void run(FILE* in, FILE* out, uint32_t n, uint32_t blocks, From from) {
  const auto g = read_floats<T>(in, n, from);
  const auto u = read_floats<T>(in, n, from);
  const auto dy = read_floats<T>(in, n, from);
  std::vector<T> y(n), both(2 * static_cast<size_t>(n));
  emu_launch(dim3{blocks, 1, 1}, dim3{SWIGLU_BLOCK, 1, 1},
             [&] { swiglu_forward(g.data(), u.data(), y.data(), n); });
  emu_launch(dim3{blocks, 1, 1}, dim3{SWIGLU_BLOCK, 1, 1},
             [&] { swiglu_backward(g.data(), u.data(), dy.data(), both.data(), n); });
  for (const auto* v : {&y, &both}) {
    std::vector<float> f(v->size());
    for (size_t i = 0; i < f.size(); ++i) f[i] = emu_to_float((*v)[i]);
    write_floats(out, f);
  }
}

}  // namespace

int main(int argc, char** argv) {
  return harness_main(argc, argv, "swiglu_emulated", [](FILE* in, FILE* out) {
    const auto n = read_one<uint32_t>(in), dtype = read_one<uint32_t>(in);
    const auto blocks = read_one<uint32_t>(in);
    if (dtype == 0) {
      run<float>(in, out, n, blocks, [](float f) { return f; });
    } else if (dtype == 1) {
      run<__nv_bfloat16>(in, out, n, blocks, __float2bfloat16);
    } else {
      run<__half>(in, out, n, blocks, __float2half);
    }
  });
}
