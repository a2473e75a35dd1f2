// Small dense kernels shared by the CPU GRU ops: Y = X W^T (+ bias) and the fused GRU cell.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>

namespace seq2seq_ext {
namespace cpu {

// Sum of the lanes of a vector.
#if defined(CPU_CAPABILITY_AVX512)
inline float hsum(const at::vec::Vectorized<float>& v) { return _mm512_reduce_add_ps(v); }
inline double hsum(const at::vec::Vectorized<double>& v) { return _mm512_reduce_add_pd(v); }
#elif defined(CPU_CAPABILITY_AVX2)
inline float hsum(const at::vec::Vectorized<float>& v) {
  const __m256 x = v;
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline double hsum(const at::vec::Vectorized<double>& v) {
  const __m256d x = v;
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
  s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
  return _mm_cvtsd_f64(s);
}
#else
template <typename T>
inline T hsum(const at::vec::Vectorized<T>& v) {
  T lanes[at::vec::Vectorized<T>::size()];
  v.store(lanes);
  T s = 0;
  for (int64_t k = 0; k < at::vec::Vectorized<T>::size(); ++k) s += lanes[k];
  return s;
}
#endif

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  int64_t i = 0;
  T s = 0;
  if (n >= W) {
    Vec acc(T(0));
    for (; i + W <= n; i += W) acc = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc);
    s = hsum(acc);
  }
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Y[b, n] = (accumulate ? Y[b, n] : bias[n] or 0) + sum_k X[b, k] * W[n, k].
// X is (B, K) with row stride ldx, W is (N, K) with row stride ldw, Y is (B, N) contiguous.
// Small products use vectorised dot products; large ones go to ATen's BLAS.
template <typename T>
void linear_nt(const T* X, int64_t ldx, int64_t B, int64_t K, const T* W, int64_t ldw, int64_t N,
               const T* bias, T* Y, bool accumulate) {
  if (B == 0 || N == 0) return;
  const auto dtype = c10::CppTypeToScalarType<T>::value;
  if (B >= 4 && B * N * K >= (1 << 17)) {
    auto opts = at::TensorOptions().dtype(dtype);
    at::Tensor x = at::from_blob(const_cast<T*>(X), {B, K}, {ldx, 1}, opts);
    at::Tensor w = at::from_blob(const_cast<T*>(W), {N, K}, {ldw, 1}, opts);
    at::Tensor y = at::from_blob(Y, {B, N}, opts);
    if (accumulate) {
      y.addmm_(x, w.t());
    } else if (bias) {
      at::Tensor bt = at::from_blob(const_cast<T*>(bias), {N}, opts);
      at::addmm_out(y, bt, x, w.t());
    } else {
      at::mm_out(y, x, w.t());
    }
    return;
  }
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, N * K));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* x = X + b * ldx;
      T* y = Y + b * N;
      for (int64_t n = 0; n < N; ++n) {
        const T init = accumulate ? y[n] : (bias ? bias[n] : T(0));
        y[n] = init + dot(x, W + n * ldw, K);
      }
    }
  });
}

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// nn.GRU's cell, gate order (r, z, n), b_hn inside the reset product (it is part of gh):
//   r = s(gi_r + gh_r), z = s(gi_z + gh_z), n = tanh(gi_n + r * gh_n), h' = (1 - z) n + z h.
// gi, gh are (B, 3H) contiguous; h and out are (B, H) with row strides ldh and ldo.
template <typename T>
void gru_cell(const T* gi, const T* gh, const T* h, int64_t ldh, T* out, int64_t ldo, int64_t B,
              int64_t H) {
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, H));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* a = gi + b * 3 * H;
      const T* c = gh + b * 3 * H;
      const T* hp = h + b * ldh;
      T* o = out + b * ldo;
      for (int64_t j = 0; j < H; ++j) {
        const T r = sigmoid(a[j] + c[j]);
        const T z = sigmoid(a[H + j] + c[H + j]);
        const T n = std::tanh(a[2 * H + j] + r * c[2 * H + j]);
        o[j] = (T(1) - z) * n + z * hp[j];
      }
    }
  });
}

}  // namespace cpu
}  // namespace seq2seq_ext
