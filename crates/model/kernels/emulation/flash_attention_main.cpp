// Runs kernels/flash_attention.cu and kernels/flash_attention_backward.cu on the CPU through
// cuda_emulation.h, for crates/model/tests/flash_attention_emulated.rs.
//
// Usage: flash_attention_emulated IN OUT. IN (little-endian): 12 i64 — mode (0 forward,
// 1 forward and backward), dtype (0 bf16, 1 f16), batch, heads, kv_heads, t, s, head_dim, k_sb,
// k_sh, v_sb, v_sh — then i64 k_len, i64 v_len, f32 scale, batch u32 pads, q as
// batch*heads*t*head_dim f32, k as k_len f32, v as v_len f32 (k and v: flat buffers the
// (batch, kv head) blocks lie in at the given strides), and in mode 1 dout like q. Values must be
// exact in the dtype. OUT, all f32: the output (like q); in mode 1 then dq (like q, rounded to the
// dtype by the kernel) and dk, dv (batch*kv_heads*s*head_dim each, contiguous). Inside, as in the
// Rust caller, the output is token-major ([batch, t, heads, head_dim]) and delta comes from the
// delta kernel; the backward runs with dout head-major and token-major, which must agree bit for
// bit.

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
  // The output token-major, [b, t, heads, HD], as the Rust caller has the kernel write it.
  std::vector<T> o(b * heads * t * HD);
  const long long o_sb = t * heads * HD, o_sh = HD, o_st = heads * HD;
  std::vector<float> lse(b * heads * t);
  const int ih = static_cast<int>(heads), ikv = static_cast<int>(kv_heads);
  const int it = static_cast<int>(t), is = static_cast<int>(s);
  const auto grid = [](long long n, int per_block, long long y, long long z) {
    return dim3{static_cast<unsigned>((n + per_block - 1) / per_block), static_cast<unsigned>(y),
                static_cast<unsigned>(z)};
  };
  emu_launch(grid(heads / kv_heads * t, BR<HD>, kv_heads, b), dim3{WARPS * 32, 1, 1}, [&] {
    flash_forward<T, HD>(q.data(), k.data(), v.data(), o.data(), lse.data(), pads.data(), ih,
                         ikv, it, is, h[8], h[9], h[10], h[11], o_sb, o_sh, o_st, scale);
  });
  const auto write = [&](const std::vector<float>& x) { write_floats(out, x); };
  // Token-major element (batch, head, i) of a [b, heads, t, HD] row index.
  const auto token_major = [&](long long row) {
    const long long i = row % t, head = row / t % heads, batch = row / t / heads;
    return batch * o_sb + head * o_sh + i * o_st;
  };
  std::vector<float> of(o.size());
  for (long long row = 0; row < b * heads * t; ++row)
    for (int d = 0; d < HD; ++d) of[row * HD + d] = emu_to_float(o[token_major(row) + d]);
  write(of);
  if (mode == 0) return;

  // The backward pass with dout in the layout given by its strides: dq, then dk and dv.
  const int rows = static_cast<int>(b * heads * t);
  const auto backward = [&](const std::vector<T>& dout, long long do_sb, long long do_sh,
                            long long do_st) {
    std::vector<float> delta(rows);
    emu_launch(dim3{static_cast<unsigned>((rows + 127) / 128), 1, 1}, dim3{128, 1, 1}, [&] {
      flash_backward_delta<T>(dout.data(), o.data(), delta.data(), ih, it, HD, do_sb, do_sh,
                              do_st, o_sb, o_sh, o_st, rows);
    });
    std::vector<T> dq_t(q.size());
    std::vector<float> dk_heads(b * heads * s * HD), dv_heads(dk_heads.size());
    emu_launch(grid(s, DKDV_KEYS, heads, b), dim3{DKDV_WARPS * 32, 1, 1}, [&] {
      flash_backward_dkdv<T, HD>(q.data(), k.data(), v.data(), dout.data(), lse.data(),
                                 delta.data(), dk_heads.data(), dv_heads.data(), pads.data(), ih,
                                 ikv, it, is, h[8], h[9], h[10], h[11], do_sb, do_sh, do_st,
                                 scale);
    });
    emu_launch(grid(t, DQ_ROWS, heads, b), dim3{DQ_WARPS * 32, 1, 1}, [&] {
      flash_backward_dq<T, HD>(q.data(), k.data(), v.data(), dout.data(), lse.data(),
                               delta.data(), dq_t.data(), pads.data(), ih, ikv, it, is, h[8],
                               h[9], h[10], h[11], do_sb, do_sh, do_st, scale);
    });
    // The per-query-head dk and dv summed over the heads of each kv head, as the Rust caller
    // does.
    const long long rep = heads / kv_heads, block = s * HD;
    std::vector<float> grads(q.size() + 2 * b * kv_heads * block, 0.f);
    for (size_t i = 0; i < q.size(); ++i) grads[i] = emu_to_float(dq_t[i]);
    float* dk = grads.data() + q.size();
    float* dv = dk + b * kv_heads * block;
    for (long long bh = 0; bh < b * heads; ++bh) {
      const long long to = (bh / heads * kv_heads + bh % heads / rep) * block;
      for (long long i = 0; i < block; ++i) {
        dk[to + i] += dk_heads[bh * block + i];
        dv[to + i] += dv_heads[bh * block + i];
      }
    }
    return grads;
  };
  // dout as it comes (head-major, [batch, heads, t, head_dim]: a gradient that arrives
  // transposed, which the Rust caller passes as it is) and token-major like the output; both
  // must give the same bits.
  const auto dout = read_as<T>(in, b * heads * t * HD);
  std::vector<T> dout_tm(dout.size());
  for (long long row = 0; row < rows; ++row)
    for (int d = 0; d < HD; ++d) dout_tm[token_major(row) + d] = dout[row * HD + d];
  const auto grads = backward(dout, heads * t * HD, t * HD, HD);
  if (backward(dout_tm, o_sb, o_sh, o_st) != grads) {
    throw std::runtime_error("the backward pass differs between dout's two layouts");
  }
  write(grads);
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
