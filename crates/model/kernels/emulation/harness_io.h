// The file handling the emulation harnesses share (flash_attention_main.cpp, and
// crates/quant/kernels/emulation/fake_quant_main.cpp): little-endian binary input, f32 output,
// errors as one line on stderr and exit status 2.

#pragma once

#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

// One value of type V from `f`.
template <typename V>
V read_one(FILE* f) {
  V x;
  if (std::fread(&x, sizeof x, 1, f) != 1) throw std::runtime_error("input file too short");
  return x;
}

// `n` f32 values from `f`, each converted by `convert`.
template <typename T, typename Convert>
std::vector<T> read_floats(FILE* f, size_t n, Convert convert) {
  std::vector<T> out(n);
  for (auto& x : out) x = convert(read_one<float>(f));
  return out;
}

inline void write_floats(FILE* f, const std::vector<float>& x) {
  if (std::fwrite(x.data(), sizeof(float), x.size(), f) != x.size()) {
    throw std::runtime_error("cannot write the output file");
  }
}

// `name IN OUT`: runs `body(in, out)` on the opened files; 0 on success, 2 with a message else.
inline int harness_main(int argc, char** argv, const char* name,
                        const std::function<void(FILE*, FILE*)>& body) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", name);
    return 2;
  }
  try {
    FILE* in = std::fopen(argv[1], "rb");
    FILE* out = std::fopen(argv[2], "wb");
    if (!in || !out) throw std::runtime_error("cannot open the input or the output file");
    body(in, out);
    std::fclose(in);
    if (std::fclose(out) != 0) throw std::runtime_error("cannot write the output file");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", name, e.what());
    return 2;
  }
  return 0;
}
