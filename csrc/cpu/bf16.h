// Rounding to bfloat16 values on the CPU, for the kernels' bf16 products (csrc/bf16_products.h):
// the activations of a product are rounded into a float32 buffer that the float32 kernels read.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

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

// v as a bfloat16, rounded as c10::BFloat16 rounds (the top half of round_to_bf16's result).
inline c10::BFloat16 to_bf16(float v) {
  if (v != v) return c10::BFloat16(v);
  const float r = round_to_bf16(v);
  uint32_t u;
  std::memcpy(&u, &r, sizeof u);
  return c10::BFloat16(static_cast<uint16_t>(u >> 16), c10::BFloat16::from_bits());
}

// out (M, K) bfloat16, contiguous = x (M, K, row stride ldx) rounded as c10::BFloat16 rounds.
// Under AVX-512 16 lanes at a time (ATen's own conversion runs its AVX2 kernel here, at about
// half the rate on the one-step calls' rows); elsewhere ATen's copy.
template <typename T>
void narrow_rows(const T* x, int64_t ldx, int64_t M, int64_t K, c10::BFloat16* out) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * ldx;
      c10::BFloat16* o = out + m * K;
      int64_t k = 0;
      for (; k + 16 <= K; k += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + k),
                            at::vec::cvtfp32_bf16(_mm512_loadu_ps(xr + k)));
      for (; k < K; ++k) o[k] = c10::BFloat16(xr[k]);
    }
    return;
  }
#endif
  const auto f = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::from_blob(out, {M, K}, at::TensorOptions().dtype(at::kBFloat16))
      .copy_(at::from_blob(const_cast<T*>(x), {M, K}, {ldx, 1}, f));
}

// y (M, N, row stride ldy) = r (M, N) bfloat16, contiguous, widened (exact) + bias (N entries,
// or null): a bf16 GEMM's result into float32 rows in one pass, as ATen's copy then add give it.
template <typename T>
void widen_rows(const c10::BFloat16* r, int64_t M, int64_t N, const T* bias, T* y,
                int64_t ldy) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t m = 0; m < M; ++m) {
      const c10::BFloat16* rr = r + m * N;
      float* yr = y + m * ldy;
      int64_t n = 0;
      for (; n + 16 <= N; n += 16) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rr + n));
        __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
        if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + n));
        _mm512_storeu_ps(yr + n, v);
      }
      for (; n < N; ++n) yr[n] = static_cast<float>(rr[n]) + (bias ? bias[n] : 0.0f);
    }
    return;
  }
#endif
  const auto f = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor yt = at::from_blob(y, {M, N}, {ldy, 1}, f);
  yt.copy_(at::from_blob(const_cast<c10::BFloat16*>(r), {M, N},
                         at::TensorOptions().dtype(at::kBFloat16)));
  if (bias) yt.add_(at::from_blob(const_cast<T*>(bias), {N}, f));
}

// A (M, K) bfloat16 tensor of x's rows (narrow_rows).
template <typename T>
at::Tensor narrowed_rows(const T* x, int64_t ldx, int64_t M, int64_t K) {
  at::Tensor out = at::empty({M, K}, at::TensorOptions().dtype(at::kBFloat16));
  narrow_rows(x, ldx, M, K, out.mutable_data_ptr<c10::BFloat16>());
  return out;
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

// The (N, M) bfloat16 transpose of a (M, N) float32 or bfloat16 matrix with unit column stride,
// written to dst with row stride ld_dst (columns 0 to M of an (N, ld_dst) matrix: a part of a
// larger transpose), converted as c10::BFloat16 rounds. 32 x 32 blocks: a float32 block rounded
// into a local bf16 block first, then at::vec::transpose_mxn (AVX-512 shuffles).
inline void transpose_bf16_into(const at::Tensor& a, c10::BFloat16* dst, int64_t ld_dst) {
  TORCH_INTERNAL_ASSERT(a.dim() == 2 && a.stride(1) == 1);
  const int64_t M = a.size(0), N = a.size(1), lda = a.stride(0);
  constexpr int64_t kB = 32;
  const bool low = a.scalar_type() == at::kBFloat16;
  const float* src32 = low ? nullptr : a.const_data_ptr<float>();
  const c10::BFloat16* src16 = low ? a.const_data_ptr<c10::BFloat16>() : nullptr;
  c10::BFloat16 block[kB * kB];
  for (int64_t m0 = 0; m0 < M; m0 += kB) {
    const int mb = static_cast<int>(std::min(kB, M - m0));
    for (int64_t n0 = 0; n0 < N; n0 += kB) {
      const int nb = static_cast<int>(std::min(kB, N - n0));
      const c10::BFloat16* from = src16 ? src16 + m0 * lda + n0 : block;
      int64_t ld_from = lda;
      if (!src16) {
        for (int i = 0; i < mb; ++i) {
          const float* row = src32 + (m0 + i) * lda + n0;
          for (int j = 0; j < nb; ++j) block[i * kB + j] = to_bf16(row[j]);
        }
        ld_from = kB;
      }
      c10::BFloat16* to = dst + n0 * ld_dst + m0;
#if defined(CPU_CAPABILITY_AVX512)
      // full rows of 64 aligned bytes are written with streaming stores: the transpose's rows
      // land far apart, and a plain store would first read each line it fills
      if (mb == kB && reinterpret_cast<uintptr_t>(to) % 64 == 0 && (ld_dst * 2) % 64 == 0) {
        alignas(64) c10::BFloat16 t[kB * kB];
        at::vec::transpose_mxn<c10::BFloat16>(from, ld_from, t, kB, mb, nb);
        for (int j = 0; j < nb; ++j)
          _mm512_stream_si512(reinterpret_cast<__m512i*>(to + j * ld_dst),
                              _mm512_load_si512(t + j * kB));
        continue;
      }
#endif
      at::vec::transpose_mxn<c10::BFloat16>(from, ld_from, to, ld_dst, mb, nb);
    }
  }
#if defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();  // the streaming stores are visible before the transpose is read
#endif
}

// The (N, M) bfloat16 transpose of a (M, N) float32 or bfloat16 matrix with unit column stride:
// the left operand of a weight gradient's bf16 GEMM (A^T X over M rows) laid out as oneDNN
// multiplies fastest (with AMX, one thread: 1536 x 1536 x 512 in 1.7 ms against 3.7 ms on the
// transposed view).
inline at::Tensor transposed_bf16(const at::Tensor& a) {
  at::Tensor out = empty_written_once({a.size(1), a.size(0)}, a.options().dtype(at::kBFloat16));
  transpose_bf16_into(a, out.mutable_data_ptr<c10::BFloat16>(), a.size(0));
  return out;
}

}  // namespace cpu
}  // namespace seq2seq_ext
