// Runs kernels/causal_softmax.cu on the CPU through cuda_emulation.h, for
// tests/causal_softmax_emulated.rs.
//
// Usage: causal_softmax_emulated IN OUT. IN (little-endian): u32 batch, u32 rows_per_batch, u32 t,
// u32 s, u32 dtype (0 f32, 1 bf16: x and g are rounded to it and the kernels run on that type),
// f32 scale, batch u32 pads, rows*s f32 scores x, rows*s f32 upstream gradients g. OUT: rows*s
// f32 y (the forward), then rows*s f32 dx (the backward fed with that y and g).

#define QAT_CUDA_EMULATION
#include "cuda_emulation.h"
#include "../causal_softmax.cu"

#include "harness_io.h"

template <typename T>
static void run(FILE* in, FILE* out, uint32_t batch, uint32_t rows_per_batch, uint32_t t,
                uint32_t s) {
  const auto scale = read_one<float>(in);
  std::vector<uint32_t> pads(batch);
  for (auto& p : pads) p = read_one<uint32_t>(in);
  const auto to_t = [](float f) {
    if constexpr (std::is_same_v<T, float>) {
      return f;
    } else {
      return __float2bfloat16_rn(f);
    }
  };
  const uint32_t rows = batch * rows_per_batch;
  const auto x = read_floats<T>(in, static_cast<size_t>(rows) * s, to_t);
  const auto g = read_floats<T>(in, static_cast<size_t>(rows) * s, to_t);
  std::vector<T> y(x.size(), to_t(-1.0f)), dx(x.size(), to_t(-1.0f));
  emu_launch(dim3{rows, 1, 1}, dim3{CS_BLOCK, 1, 1}, [&] {
    causal_softmax_row(x.data(), y.data(), pads.data(), rows_per_batch, t, s, scale);
  });
  emu_launch(dim3{rows, 1, 1}, dim3{CS_BLOCK, 1, 1}, [&] {
    softmax_backward_row(y.data(), g.data(), dx.data(), s, scale);
  });
  std::vector<float> yf, dxf;
  for (const T& v : y) yf.push_back(emu_to_float(v));
  for (const T& v : dx) dxf.push_back(emu_to_float(v));
  write_floats(out, yf);
  write_floats(out, dxf);
}

int main(int argc, char** argv) {
  return harness_main(argc, argv, "causal_softmax_emulated", [](FILE* in, FILE* out) {
    const auto batch = read_one<uint32_t>(in), rows_per_batch = read_one<uint32_t>(in);
    const auto t = read_one<uint32_t>(in), s = read_one<uint32_t>(in);
    const auto dtype = read_one<uint32_t>(in);
    if (dtype == 0) {
      run<float>(in, out, batch, rows_per_batch, t, s);
    } else if (dtype == 1) {
      run<__nv_bfloat16>(in, out, batch, rows_per_batch, t, s);
    } else {
      throw std::runtime_error("dtype must be 0 (f32) or 1 (bf16)");
    }
  });
}
