// Runs kernels/flash_attention.cu and kernels/flash_attention_backward.cu on the CPU through
// cuda_emulation.h, for crates/model/tests/flash_attention_emulated.rs.
//
// Usage: flash_attention_emulated IN OUT. IN (little-endian): 12 i64 — mode (0 forward,
// 1 forward and backward), dtype (0 bf16, 1 f16), batch, heads, kv_heads, t, s, head_dim, k_sb,
// k_sh, v_sb, v_sh — then i64 k_len, i64 v_len, f32 scale, batch u32 pads, q as
// batch*heads*t*head_dim f32, k as k_len f32, v as v_len f32 (k and v: flat buffers the
// (batch, kv head) blocks lie in at the given strides), and in mode 1 dout like q. Values must be
// exact in the dtype. OUT, all f32: the output (like q); in mode 1 then dq (like q) and dk, dv
// (batch*kv_heads*s*head_dim each, contiguous). delta = rowsum(dout ∘ out) is computed here in f32
// from the output rounded to the dtype, as the Rust caller does.

#define QAT_CUDA_EMULATION
#include "cuda_emulation.h"
#include "../flash_attention.cu"
#include "../flash_attention_backward.cu"

#include "harness_io.h"

namespace {

template <typename T>
std::vector<T> read_as(FILE* f, size_t n) {
  return read_floats<T>(f, n, flash::from_float<T>);
}

template <typename T, int HD>
void run_head_dim(FILE* in, FILE* out, const long long* h) {
  const long long mode = h[0], b = h[2], heads = h[3], kv_heads = h[4], t = h[5], s = h[6];
  const long long k_len = read_one<long long>(in), v_len = read_one<long long>(in);
  const float scale = read_one<float>(in);
  std::vector<uint32_t> pads(b);
  for (auto& p : pads) p = read_one<uint32_t>(in);
  const auto q = read_as<T>(in, b * heads * t * HD);
  const auto k = read_as<T>(in, k_len);
  const auto v = read_as<T>(in, v_len);
  std::vector<T> o(b * heads * t * HD);
  std::vector<float> lse(b * heads * t);
  const int ih = static_cast<int>(heads), ikv = static_cast<int>(kv_heads);
  const int it = static_cast<int>(t), is = static_cast<int>(s);
  const auto grid = [](long long n, int per_block, long long y, long long z) {
    return dim3{static_cast<unsigned>((n + per_block - 1) / per_block), static_cast<unsigned>(y),
                static_cast<unsigned>(z)};
  };
  emu_launch(grid(heads / kv_heads * t, BR, kv_heads, b), dim3{WARPS * 32, 1, 1}, [&] {
    flash_forward<T, HD>(q.data(), k.data(), v.data(), o.data(), lse.data(), pads.data(), ih,
                         ikv, it, is, h[8], h[9], h[10], h[11], scale);
  });
  const auto write = [&](const std::vector<float>& x) { write_floats(out, x); };
  std::vector<float> of(o.size());
  for (size_t i = 0; i < o.size(); ++i) of[i] = emu_to_float(o[i]);
  write(of);
  if (mode == 0) return;

  const auto dout = read_as<T>(in, b * heads * t * HD);
  std::vector<float> delta(b * heads * t, 0.f);
  for (size_t row = 0; row < delta.size(); ++row)
    for (int d = 0; d < HD; ++d) delta[row] += emu_to_float(dout[row * HD + d]) * of[row * HD + d];
  std::vector<float> dq(q.size()), dk_heads(b * heads * s * HD), dv_heads(dk_heads.size());
  emu_launch(grid(s, DKDV_KEYS, heads, b), dim3{DKDV_WARPS * 32, 1, 1}, [&] {
    flash_backward_dkdv<T, HD>(q.data(), k.data(), v.data(), dout.data(), lse.data(),
                               delta.data(), dk_heads.data(), dv_heads.data(), pads.data(), ih,
                               ikv, it, is, h[8], h[9], h[10], h[11], scale);
  });
  // The per-query-head dk and dv summed over the heads of each kv head, as the Rust caller does.
  const long long rep = heads / kv_heads, block = s * HD;
  std::vector<float> dk(b * kv_heads * block, 0.f), dv(dk.size(), 0.f);
  for (long long bh = 0; bh < b * heads; ++bh) {
    const long long to = (bh / heads * kv_heads + bh % heads / rep) * block;
    for (long long i = 0; i < block; ++i) {
      dk[to + i] += dk_heads[bh * block + i];
      dv[to + i] += dv_heads[bh * block + i];
    }
  }
  emu_launch(grid(t, DQ_ROWS, heads, b), dim3{DQ_WARPS * 32, 1, 1}, [&] {
    flash_backward_dq<T, HD>(q.data(), k.data(), v.data(), dout.data(), lse.data(), delta.data(),
                             dq.data(), pads.data(), ih, ikv, it, is, h[8], h[9], h[10], h[11],
                             scale);
  });
  write(dq);
  write(dk);
  write(dv);
}

template <typename T>
void run(FILE* in, FILE* out, const long long* h) {
  switch (h[7]) {
    case 32: return run_head_dim<T, 32>(in, out, h);
    case 64: return run_head_dim<T, 64>(in, out, h);
    case 96: return run_head_dim<T, 96>(in, out, h);
    case 128: return run_head_dim<T, 128>(in, out, h);
  }
  throw std::runtime_error("head_dim " + std::to_string(h[7]) + " has no kernel");
}

}  // namespace

int main(int argc, char** argv) {
  return harness_main(argc, argv, "flash_attention_emulated", [](FILE* in, FILE* out) {
    long long h[12];
    for (auto& x : h) x = read_one<long long>(in);
    if (h[1] == 0) {
      run<__nv_bfloat16>(in, out, h);
    } else {
      run<__half>(in, out, h);
    }
  });
}
