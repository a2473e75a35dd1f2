// Small dense products shared by the CPU kernels: Y = X W^T (+ bias) with row-major weights,
// one row against a weight stored transposed and padded, and the vector sums they use.
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
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t Wd = Vec::size();
  const int64_t K_vec = K - K % Wd;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, N * K));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* x = X + b * ldx;
      T* y = Y + b * N;
      int64_t n = 0;
      // four outputs at a time: the x loads are shared and the four FMA chains run in parallel
      for (; n + 4 <= N; n += 4) {
        const T* w0 = W + n * ldw;
        const T* w1 = w0 + ldw;
        const T* w2 = w1 + ldw;
        const T* w3 = w2 + ldw;
        Vec a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
        for (int64_t k = 0; k < K_vec; k += Wd) {
          const Vec xv = Vec::loadu(x + k);
          a0 = at::vec::fmadd(Vec::loadu(w0 + k), xv, a0);
          a1 = at::vec::fmadd(Vec::loadu(w1 + k), xv, a1);
          a2 = at::vec::fmadd(Vec::loadu(w2 + k), xv, a2);
          a3 = at::vec::fmadd(Vec::loadu(w3 + k), xv, a3);
        }
        T r[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
        for (int64_t k = K_vec; k < K; ++k) {
          r[0] += w0[k] * x[k];
          r[1] += w1[k] * x[k];
          r[2] += w2[k] * x[k];
          r[3] += w3[k] * x[k];
        }
        for (int i = 0; i < 4; ++i) {
          const T init = accumulate ? y[n + i] : (bias ? bias[n + i] : T(0));
          y[n + i] = init + r[i];
        }
      }
      for (; n < N; ++n) {
        const T init = accumulate ? y[n] : (bias ? bias[n] : T(0));
        y[n] = init + dot(x, W + n * ldw, K);
      }
    }
  });
}

// One row of a product with a weight stored transposed and padded: y[n] = init[n] + sum_k
// x[k] * Wt[k, n] for n < Np, where Wt is (K, Np) with Np a multiple of the vector width and
// init is y itself (accumulate), a bias of Np entries, or null (zero). Each block of NV output
// vectors stays in registers over k: no horizontal sums, unlike a row-major weight's dots.
template <typename T, int NV>
inline void t_block(const T* x, int64_t K, const T* Wt, int64_t ldw, const T* init, T* y) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  Vec a[NV];
  for (int u = 0; u < NV; ++u) a[u] = init ? Vec::loadu(init + u * W) : Vec(T(0));
  for (int64_t k = 0; k < K; ++k) {
    const Vec xv(x[k]);
    const T* w = Wt + k * ldw;
    for (int u = 0; u < NV; ++u) a[u] = at::vec::fmadd(Vec::loadu(w + u * W), xv, a[u]);
  }
  for (int u = 0; u < NV; ++u) a[u].store(y + u * W);
}

template <typename T>
void linear_t_row(const T* x, int64_t K, const T* Wt, int64_t Np, const T* bias, T* y,
                  bool accumulate) {
  constexpr int64_t W = at::vec::Vectorized<T>::size();
  const T* init = accumulate ? y : bias;
  auto at_n = [&](int64_t n) { return init ? init + n : nullptr; };
  int64_t n = 0;
  for (; n + 4 * W <= Np; n += 4 * W) t_block<T, 4>(x, K, Wt + n, Np, at_n(n), y + n);
  switch ((Np - n) / W) {
    case 3: t_block<T, 3>(x, K, Wt + n, Np, at_n(n), y + n); break;
    case 2: t_block<T, 2>(x, K, Wt + n, Np, at_n(n), y + n); break;
    case 1: t_block<T, 1>(x, K, Wt + n, Np, at_n(n), y + n); break;
    default: break;
  }
}

}  // namespace cpu
}  // namespace seq2seq_ext
