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

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

template <typename T>
inline at::vec::Vectorized<T> vsigmoid(const at::vec::Vectorized<T>& x) {
  const at::vec::Vectorized<T> one(T(1));
  return one / (one + x.neg().exp());
}

// tanh(x) = expm1(2x) / (expm1(2x) + 2): one expm1 instead of Sleef's costlier tanh, accurate
// near 0 (no cancellation) and saturating exactly: beyond the clamp tanh rounds to +-1 in T.
template <typename T>
inline at::vec::Vectorized<T> vtanh(const at::vec::Vectorized<T>& x) {
  using Vec = at::vec::Vectorized<T>;
  constexpr T lim = std::is_same_v<T, float> ? T(10) : T(20);
  const Vec two(T(2));
  const Vec m = (at::vec::clamp(x, Vec(-lim), Vec(lim)) * two).expm1();
  return m / (m + two);
}

// nn.GRU's cell, gate order (r, z, n), b_hn inside the reset product (it is part of gh):
//   r = s(gi_r + gh_r), z = s(gi_z + gh_z), n = tanh(gi_n + r * gh_n), h' = (1 - z) n + z h.
// gi, gh are (B, 3H) contiguous; h and out are (B, H) with row strides ldh and ldo. When `saved`
// is given it receives (B, 4H) = [r, z, n, gh_n] for the backward.
template <typename T>
void gru_cell(const T* gi, const T* gh, const T* h, int64_t ldh, T* out, int64_t ldo, int64_t B,
              int64_t H, T* saved = nullptr) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, H));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* a = gi + b * 3 * H;
      const T* c = gh + b * 3 * H;
      const T* hp = h + b * ldh;
      T* o = out + b * ldo;
      T* s = saved ? saved + b * 4 * H : nullptr;
      int64_t j = 0;
      for (; j + W <= H; j += W) {
        const Vec r = vsigmoid(Vec::loadu(a + j) + Vec::loadu(c + j));
        const Vec z = vsigmoid(Vec::loadu(a + H + j) + Vec::loadu(c + H + j));
        const Vec ghn = Vec::loadu(c + 2 * H + j);
        const Vec n = vtanh(Vec::loadu(a + 2 * H + j) + r * ghn);
        (n + z * (Vec::loadu(hp + j) - n)).store(o + j);
        if (s) {
          r.store(s + j);
          z.store(s + H + j);
          n.store(s + 2 * H + j);
          ghn.store(s + 3 * H + j);
        }
      }
      for (; j < H; ++j) {
        const T r = sigmoid(a[j] + c[j]);
        const T z = sigmoid(a[H + j] + c[H + j]);
        const T ghn = c[2 * H + j];
        const T n = std::tanh(a[2 * H + j] + r * ghn);
        o[j] = n + z * (hp[j] - n);
        if (s) {
          s[j] = r;
          s[H + j] = z;
          s[2 * H + j] = n;
          s[3 * H + j] = ghn;
        }
      }
    }
  });
}

// nn.LSTM's cell, gate order (i, f, g, o):
//   i = s(gi_i + gh_i), f = s(gi_f + gh_f), g = tanh(gi_g + gh_g), o = s(gi_o + gh_o),
//   c' = f c + i g, h' = o tanh(c').
// gi, gh are (B, 4H) contiguous (each already holding its bias); c is (B, H) with row stride ldc;
// h_out and c_out are (B, H) with row strides ldo.
template <typename T>
void lstm_cell(const T* gi, const T* gh, const T* c, int64_t ldc, T* h_out, T* c_out,
               int64_t ldo, int64_t B, int64_t H) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, H));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* a = gi + b * 4 * H;
      const T* r = gh + b * 4 * H;
      const T* cp = c + b * ldc;
      T* ho = h_out + b * ldo;
      T* co = c_out + b * ldo;
      int64_t j = 0;
      for (; j + W <= H; j += W) {
        const Vec i = vsigmoid(Vec::loadu(a + j) + Vec::loadu(r + j));
        const Vec f = vsigmoid(Vec::loadu(a + H + j) + Vec::loadu(r + H + j));
        const Vec g = vtanh(Vec::loadu(a + 2 * H + j) + Vec::loadu(r + 2 * H + j));
        const Vec o = vsigmoid(Vec::loadu(a + 3 * H + j) + Vec::loadu(r + 3 * H + j));
        const Vec cn = f * Vec::loadu(cp + j) + i * g;
        cn.store(co + j);
        (o * vtanh(cn)).store(ho + j);
      }
      for (; j < H; ++j) {
        const T i = sigmoid(a[j] + r[j]);
        const T f = sigmoid(a[H + j] + r[H + j]);
        const T g = std::tanh(a[2 * H + j] + r[2 * H + j]);
        const T o = sigmoid(a[3 * H + j] + r[3 * H + j]);
        const T cn = f * cp[j] + i * g;
        co[j] = cn;
        ho[j] = o * std::tanh(cn);
      }
    }
  });
}

}  // namespace cpu
}  // namespace seq2seq_ext
