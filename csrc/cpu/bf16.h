// Rounding to bfloat16 values on the CPU, for the kernels' bf16 products (csrc/bf16_products.h):
// the activations of a product are rounded into a float32 buffer that the float32 kernels read.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace seq2seq_ext {
namespace cpu {

// v rounded to the nearest bfloat16 value (ties to even), as c10::BFloat16 rounds, in a form
// the compiler vectorizes (the backward rounds millions of values per call at hidden 512).
inline float round_to_bf16(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  float out;
  std::memcpy(&out, &r, sizeof out);
  return v != v ? v : out;  // NaN stays NaN
}
inline double round_to_bf16(double v) {
  return static_cast<float>(c10::BFloat16(static_cast<float>(v)));
}

// X (M, K), row stride ldx, rounded to bfloat16 values into buf (row stride K); returns buf.
template <typename T>
const T* rounded_to_bf16(const T* X, int64_t ldx, int64_t M, int64_t K, std::vector<T>& buf) {
  buf.resize(M * K);
  T* out = buf.data();
  for (int64_t m = 0; m < M; ++m) {
    const T* x = X + m * ldx;
    T* o = out + m * K;
    for (int64_t k = 0; k < K; ++k) o[k] = round_to_bf16(x[k]);
  }
  return out;
}

}  // namespace cpu
}  // namespace seq2seq_ext
