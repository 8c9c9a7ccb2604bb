// Runs kernels/flash_attention.cu on the CPU through cuda_emulation.h, for
// crates/model/tests/flash_attention_emulated.rs.
//
// Usage: flash_attention_emulated IN OUT. IN (little-endian): 11 i64 — dtype (0 bf16, 1 f16),
// batch, heads, kv_heads, t, s, head_dim, k_sb, k_sh, v_sb, v_sh — then i64 k_len, i64 v_len,
// f32 scale, batch u32 pads, q as batch*heads*t*head_dim f32, k as k_len f32, v as v_len f32
// (k and v: flat buffers the (batch, kv head) blocks lie in at the given strides). The values
// must be exact in the dtype. OUT: the output, batch*heads*t*head_dim f32.

#define QAT_CUDA_EMULATION
#include "cuda_emulation.h"
#include "../flash_attention.cu"

#include <cstdio>
#include <stdexcept>
#include <string>

namespace {

template <typename V>
V read_one(FILE* f) {
  V x;
  if (std::fread(&x, sizeof x, 1, f) != 1) throw std::runtime_error("input file too short");
  return x;
}

template <typename T>
std::vector<T> read_as(FILE* f, size_t n) {
  std::vector<T> out(n);
  for (auto& x : out) x = from_float<T>(read_one<float>(f));
  return out;
}

// The kernel body for one head dim, as the extern "C" kernels instantiate it.
template <typename T>
decltype(&flash_forward<T, 64>) pick(long long head_dim) {
  switch (head_dim) {
    case 32: return &flash_forward<T, 32>;
    case 64: return &flash_forward<T, 64>;
    case 96: return &flash_forward<T, 96>;
    case 128: return &flash_forward<T, 128>;
  }
  throw std::runtime_error("head_dim " + std::to_string(head_dim) + " has no kernel");
}

template <typename T>
void run(FILE* in, FILE* out, const long long* h) {
  const long long b = h[1], heads = h[2], kv_heads = h[3], t = h[4], s = h[5], hd = h[6];
  const long long k_len = read_one<long long>(in), v_len = read_one<long long>(in);
  const float scale = read_one<float>(in);
  std::vector<uint32_t> pads(b);
  for (auto& p : pads) p = read_one<uint32_t>(in);
  const auto q = read_as<T>(in, b * heads * t * hd);
  const auto k = read_as<T>(in, k_len);
  const auto v = read_as<T>(in, v_len);
  std::vector<T> o(b * heads * t * hd);
  const auto kernel = pick<T>(hd);
  const dim3 grid{static_cast<unsigned>((t + BR - 1) / BR), static_cast<unsigned>(heads),
                  static_cast<unsigned>(b)};
  emu_launch(grid, dim3{WARPS * 32, 1, 1}, [&] {
    kernel(q.data(), k.data(), v.data(), o.data(), pads.data(), static_cast<int>(heads),
           static_cast<int>(kv_heads), static_cast<int>(t), static_cast<int>(s), h[7], h[8], h[9],
           h[10], scale);
  });
  for (const T& x : o) {
    const float f = emu_to_float(x);
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
    long long h[11];
    for (auto& x : h) x = read_one<long long>(in);
    if (h[0] == 0) {
      run<__nv_bfloat16>(in, out, h);
    } else {
      run<__half>(in, out, h);
    }
    std::fclose(in);
    if (std::fclose(out) != 0) throw std::runtime_error("cannot write the output file");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "flash_attention_emulated: %s\n", e.what());
    return 2;
  }
  return 0;
}
