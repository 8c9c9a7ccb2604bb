// Runs kernels/rope.cu on the CPU through cuda_emulation.h, for crates/model/tests/rope_emulated.rs.
//
// Usage: rope_emulated IN OUT. IN (little-endian): u32 b, heads, t, d, dtype (0 f32, 1 bf16,
// 2 f16), blocks (the grid, to exercise its stride), f32 sign, then b*heads*t*d f32 x and
// b*t*d/2 f32 cos and sin (each exact in the dtype). OUT: b*heads*t*d f32 y.

#define QAT_CUDA_EMULATION
#include "cuda_emulation.h"
#include "../rope.cu"

#include "harness_io.h"

namespace {

template <typename T, typename From>
void run(FILE* in, FILE* out, const uint32_t* dims, uint32_t blocks, float sign, From from) {
  const uint32_t b = dims[0], heads = dims[1], t = dims[2], d = dims[3];
  const size_t el = static_cast<size_t>(b) * heads * t * d, table = static_cast<size_t>(b) * t * d / 2;
  const auto x = read_floats<T>(in, el, from);
  const auto c = read_floats<T>(in, table, from);
  const auto s = read_floats<T>(in, table, from);
  std::vector<T> y(el);
  const uint32_t pairs = static_cast<uint32_t>(el / 2);
  emu_launch(dim3{blocks, 1, 1}, dim3{ROPE_BLOCK, 1, 1},
             [&] { rope_rows(x.data(), c.data(), s.data(), y.data(), heads, t, d / 2, pairs, sign); });
  std::vector<float> f(el);
  for (size_t i = 0; i < el; ++i) f[i] = emu_to_float(y[i]);
  write_floats(out, f);
}

}  // namespace

int main(int argc, char** argv) {
  return harness_main(argc, argv, "rope_emulated", [](FILE* in, FILE* out) {
    uint32_t dims[4];
    for (auto& v : dims) v = read_one<uint32_t>(in);
    const auto dtype = read_one<uint32_t>(in), blocks = read_one<uint32_t>(in);
    const auto sign = read_one<float>(in);
    if (dtype == 0) {
      run<float>(in, out, dims, blocks, sign, [](float f) { return f; });
    } else if (dtype == 1) {
      run<__nv_bfloat16>(in, out, dims, blocks, sign, __float2bfloat16);
    } else {
      run<__half>(in, out, dims, blocks, sign, __float2half);
    }
  });
}
