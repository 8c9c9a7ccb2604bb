// Runs kernels/swiglu.cu on the CPU through cuda_emulation.h, for
// crates/model/tests/swiglu_emulated.rs.
//
// Usage: swiglu_emulated IN OUT. IN (little-endian): u32 n, u32 dtype (0 f32, 1 bf16, 2 f16),
// u32 blocks (the grid, to exercise its stride), u32 inter (a divisor of n), then n f32 gate, n
// f32 up, n f32 dy (each exact in the dtype). OUT: n f32 y, n f32 d gate, n f32 d up, then n f32
// y of swiglu_joined_forward over the same gate and up joined as [n / inter, 2 inter] rows.

#define QAT_CUDA_EMULATION
#include "cuda_emulation.h"
#include "../swiglu.cu"

#include "harness_io.h"

namespace {

template <typename T, typename From>
void run(FILE* in, FILE* out, uint32_t n, uint32_t blocks, uint32_t inter, From from) {
  const auto g = read_floats<T>(in, n, from);
  const auto u = read_floats<T>(in, n, from);
  const auto dy = read_floats<T>(in, n, from);
  std::vector<T> y(n), both(2 * static_cast<size_t>(n));
  emu_launch(dim3{blocks, 1, 1}, dim3{SWIGLU_BLOCK, 1, 1},
             [&] { swiglu_forward(g.data(), u.data(), y.data(), n); });
  emu_launch(dim3{blocks, 1, 1}, dim3{SWIGLU_BLOCK, 1, 1},
             [&] { swiglu_backward(g.data(), u.data(), dy.data(), both.data(), n); });
  const size_t rows = n / inter;
  std::vector<T> gu(2 * static_cast<size_t>(n)), y_joined(n);
  for (size_t r = 0; r < rows; ++r) {
    for (size_t c = 0; c < inter; ++c) {
      gu[r * 2 * inter + c] = g[r * inter + c];
      gu[r * 2 * inter + inter + c] = u[r * inter + c];
    }
  }
  emu_launch(dim3{blocks, 1, 1}, dim3{SWIGLU_BLOCK, 1, 1},
             [&] { swiglu_joined_forward(gu.data(), y_joined.data(), rows, inter); });
  for (const auto* v : {&y, &both, &y_joined}) {
    std::vector<float> f(v->size());
    for (size_t i = 0; i < f.size(); ++i) f[i] = emu_to_float((*v)[i]);
    write_floats(out, f);
  }
}

}  // namespace

int main(int argc, char** argv) {
  return harness_main(argc, argv, "swiglu_emulated", [](FILE* in, FILE* out) {
    const auto n = read_one<uint32_t>(in), dtype = read_one<uint32_t>(in);
    const auto blocks = read_one<uint32_t>(in), inter = read_one<uint32_t>(in);
    if (inter == 0 || n % inter != 0) throw std::runtime_error("inter must divide n");
    if (dtype == 0) {
      run<float>(in, out, n, blocks, inter, [](float f) { return f; });
    } else if (dtype == 1) {
      run<__nv_bfloat16>(in, out, n, blocks, inter, __float2bfloat16);
    } else {
      run<__half>(in, out, n, blocks, inter, __float2half);
    }
  });
}
