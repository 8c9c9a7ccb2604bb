// Runs kernels/rope.cu on the CPU through cuda_emulation.h, for crates/model/tests/rope_emulated.rs.
//
// Usage: rope_emulated IN OUT. IN (little-endian): u32 b, heads, t, d, dtype (0 f32, 1 bf16,
// 2 f16), blocks (the grid, to exercise its stride), layouts (0: x and y head-major, [b, heads,
// t, d]; 1: x token-major, [b, t, heads, d], y head-major, as the forward reads a transposed
// query view; 2: x head-major, y token-major, as the backward writes dx for such a view), f32
// sign, then b*heads*t*d f32 x and b*t*d/2 f32 cos and sin (each exact in the dtype), head-major.
// OUT: b*heads*t*d f32 y, head-major; then as many of copy_rows' copy of x (same layouts).

#define QAT_CUDA_EMULATION
#include "cuda_emulation.h"
#include "../rope.cu"

#include "harness_io.h"

namespace {

template <typename T, typename From>
void run(FILE* in, FILE* out, const uint32_t* dims, uint32_t blocks, uint32_t layouts, float sign,
         From from) {
  const long long b = dims[0], heads = dims[1], t = dims[2], d = dims[3];
  const size_t el = static_cast<size_t>(b * heads * t * d), table = static_cast<size_t>(b * t * d / 2);
  const RowStrides head_major{heads * t * d, t * d, d}, token_major{t * heads * d, d, heads * d};
  const RowStrides xs = layouts == 1 ? token_major : head_major;
  const RowStrides ys = layouts == 2 ? token_major : head_major;
  // Element (batch, head, pos, i) of a head-major index, in the layout of `st`.
  const auto place = [&](size_t at, const RowStrides& st) {
    const long long i = at % d, row = at / d;
    return st.at(row / t / heads, row / t % heads, row % t) + i;
  };
  const auto x_rows = read_floats<T>(in, el, from);
  std::vector<T> x(el);
  for (size_t i = 0; i < el; ++i) x[place(i, xs)] = x_rows[i];
  const auto c = read_floats<T>(in, table, from);
  const auto s = read_floats<T>(in, table, from);
  std::vector<T> y(el);
  const uint32_t pairs = static_cast<uint32_t>(el / 2);
  emu_launch(dim3{blocks, 1, 1}, dim3{ROPE_BLOCK, 1, 1}, [&] {
    rope_rows(x.data(), c.data(), s.data(), y.data(), static_cast<uint32_t>(heads),
              static_cast<uint32_t>(t), static_cast<uint32_t>(d / 2), pairs, sign, xs, ys);
  });
  std::vector<float> f(el);
  for (size_t i = 0; i < el; ++i) f[i] = emu_to_float(y[place(i, ys)]);
  write_floats(out, f);
  std::vector<T> copy(el);
  emu_launch(dim3{blocks, 1, 1}, dim3{ROPE_BLOCK, 1, 1}, [&] {
    copy_rows(x.data(), copy.data(), static_cast<uint32_t>(heads), static_cast<uint32_t>(t),
              static_cast<uint32_t>(d), static_cast<uint32_t>(el), xs, ys);
  });
  for (size_t i = 0; i < el; ++i) f[i] = emu_to_float(copy[place(i, ys)]);
  write_floats(out, f);
}

}  // namespace

int main(int argc, char** argv) {
  return harness_main(argc, argv, "rope_emulated", [](FILE* in, FILE* out) {
    uint32_t dims[4];
    for (auto& v : dims) v = read_one<uint32_t>(in);
    const auto dtype = read_one<uint32_t>(in), blocks = read_one<uint32_t>(in);
    const auto layouts = read_one<uint32_t>(in);
    const auto sign = read_one<float>(in);
    if (dtype == 0) {
      run<float>(in, out, dims, blocks, layouts, sign, [](float f) { return f; });
    } else if (dtype == 1) {
      run<__nv_bfloat16>(in, out, dims, blocks, layouts, sign, __float2bfloat16);
    } else {
      run<__half>(in, out, dims, blocks, layouts, sign, __float2half);
    }
  });
}
