// Runs kernels/bucket_lse.cu on the CPU through crates/model/kernels/emulation/cuda_emulation.h,
// for crates/train/tests/bucket_lse_emulated.rs.
//
// Usage: bucket_lse_emulated IN OUT. IN (little-endian): u32 rows, u32 vocab, u32 k, u32 tail,
// u32 dtype (0 f32, 1 bf16: the logits are rounded to it and the kernels run on that type),
// rows*k u32 ids, rows*vocab f32 logits, rows*(c+k) f32 upstream gradients (c = 1 + tail).
// OUT: rows*(c+k) f32 forward outputs, then rows*vocab gradients of the logits as f32 (the
// backward kernel fed with the forward's log-sum-exps and the given upstream gradients).

#define QAT_CUDA_EMULATION
#include "cuda_emulation.h"
#include "../bucket_lse.cu"

#include "harness_io.h"

#include <type_traits>

template <typename T>
static void run(FILE* in, FILE* out, uint32_t rows, uint32_t vocab, uint32_t k, uint32_t tail) {
  const uint32_t c = tail ? 2 : 1, cols = c + k;
  std::vector<uint32_t> ids(static_cast<size_t>(rows) * k);
  for (auto& id : ids) id = read_one<uint32_t>(in);
  const auto to_t = [](float f) {
    if constexpr (std::is_same_v<T, float>) {
      return f;
    } else {
      return __float2bfloat16_rn(f);
    }
  };
  const auto z = read_floats<T>(in, static_cast<size_t>(rows) * vocab, to_t);
  const auto same = [](float f) { return f; };
  const auto g = read_floats<float>(in, static_cast<size_t>(rows) * cols, same);
  std::vector<float> fwd(static_cast<size_t>(rows) * cols, -1.0f);
  emu_launch(dim3{rows, 1, 1}, dim3{LSE_BLOCK, 1, 1}, [&] {
    bucket_lse_row(z.data(), ids.data(), fwd.data(), vocab, k, static_cast<int>(tail));
  });
  std::vector<float> saved;
  for (uint32_t r = 0; r < rows; ++r) {
    for (uint32_t i = 0; i < c; ++i) saved.push_back(fwd[r * cols + i]);
    for (uint32_t i = 0; i < cols; ++i) saved.push_back(g[r * cols + i]);
  }
  std::vector<T> dz(z.size(), to_t(-1.0f));
  emu_launch(dim3{rows, 1, 1}, dim3{LSE_BLOCK, 1, 1}, [&] {
    bucket_lse_backward_row(z.data(), ids.data(), saved.data(), dz.data(), vocab, k,
                            static_cast<int>(tail));
  });
  std::vector<float> dz_f32;
  for (const T& x : dz) dz_f32.push_back(emu_to_float(x));
  write_floats(out, fwd);
  write_floats(out, dz_f32);
}

int main(int argc, char** argv) {
  return harness_main(argc, argv, "bucket_lse_emulated", [](FILE* in, FILE* out) {
    const auto rows = read_one<uint32_t>(in), vocab = read_one<uint32_t>(in);
    const auto k = read_one<uint32_t>(in), tail = read_one<uint32_t>(in);
    const auto dtype = read_one<uint32_t>(in);
    if (dtype == 0) {
      run<float>(in, out, rows, vocab, k, tail);
    } else if (dtype == 1) {
      run<__nv_bfloat16>(in, out, rows, vocab, k, tail);
    } else {
      throw std::runtime_error("dtype must be 0 (f32) or 1 (bf16)");
    }
  });
}
