// Runs kernels/rms_norm.cu on the CPU through cuda_emulation.h, for
// crates/model/tests/rms_norm_emulated.rs.
//
// Usage: rms_norm_emulated IN OUT. IN (little-endian): u32 rows, u32 n, u32 dtype (0 f32, 1 bf16,
// 2 f16), f32 eps, then rows*n f32 x, n f32 w, rows*n f32 dy, rows*n f32 delta (each exact in
// the dtype). OUT: rows*n f32 y, rows*n f32 dx, n f32 dw, then add_rms_norm(x, delta, w):
// rows*n f32 sum, rows*n f32 normed sum.

#define QAT_CUDA_EMULATION
#include "cuda_emulation.h"
#include "../rms_norm.cu"

#include "harness_io.h"

namespace {

template <typename T, typename From>
void run(FILE* in, FILE* out, uint32_t rows, uint32_t n, float eps, From from) {
  const size_t el = static_cast<size_t>(rows) * n;
  const auto x = read_floats<T>(in, el, from);
  const auto w = read_floats<T>(in, n, from);
  const auto dy = read_floats<T>(in, el, from);
  const auto delta = read_floats<T>(in, el, from);
  std::vector<T> y(el), dx(el), dw(n), added(2 * el);
  emu_launch(dim3{rows, 1, 1}, dim3{NORM_BLOCK, 1, 1},
             [&] { rms_norm_forward_row(x.data(), w.data(), y.data(), n, eps); });
  std::vector<float> row_d(rows, -1.0f);
  emu_launch(dim3{rows, 1, 1}, dim3{NORM_BLOCK, 1, 1}, [&] {
    rms_norm_backward_row(x.data(), w.data(), dy.data(), dx.data(), row_d.data(), n, eps);
  });
  const uint32_t chunks = (rows + DW_ROWS - 1) / DW_ROWS, col_blocks = (n + DW_COLS - 1) / DW_COLS;
  std::vector<float> partial(static_cast<size_t>(chunks) * n, -1.0f);
  emu_launch(dim3{col_blocks, chunks, 1}, dim3{DW_COLS, 1, 1}, [&] {
    rms_norm_dw_partial(x.data(), dy.data(), row_d.data(), partial.data(), rows, n);
  });
  emu_launch(dim3{col_blocks, 1, 1}, dim3{DW_COLS, 1, 1},
             [&] { rms_norm_dw_final(partial.data(), dw.data(), chunks, n); });
  emu_launch(dim3{rows, 1, 1}, dim3{NORM_BLOCK, 1, 1}, [&] {
    add_rms_norm_row(x.data(), delta.data(), w.data(), added.data(), rows, n, eps);
  });
  for (const auto* v : {&y, &dx, &dw, &added}) {
    std::vector<float> f(v->size());
    for (size_t i = 0; i < f.size(); ++i) f[i] = emu_to_float((*v)[i]);
    write_floats(out, f);
  }
}

}  // namespace

int main(int argc, char** argv) {
  return harness_main(argc, argv, "rms_norm_emulated", [](FILE* in, FILE* out) {
    const auto rows = read_one<uint32_t>(in), n = read_one<uint32_t>(in);
    const auto dtype = read_one<uint32_t>(in);
    const auto eps = read_one<float>(in);
    if (dtype == 0) {
      run<float>(in, out, rows, n, eps, [](float f) { return f; });
    } else if (dtype == 1) {
      run<__nv_bfloat16>(in, out, rows, n, eps, __float2bfloat16);
    } else {
      run<__half>(in, out, rows, n, eps, __float2half);
    }
  });
}
