// Small dense products shared by the CPU kernels: Y = X W^T (+ bias) with row-major weights,
// one row against a weight stored transposed and padded, and the vector sums they use.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace seq2seq_ext {
namespace cpu {

// Sum of the lanes of a vector.
#if defined(CPU_CAPABILITY_AVX512)
// float: by a fixed tree, that of GCC's _mm512_reduce_add_ps (the upper 256 bits plus the lower,
// the same at 128 bits, lanes 0 + 2 and 1 + 3, then those two), written out so that hsum4 can
// take four vectors through the same additions at once and give each the bits hsum gives it.
inline float hsum(const at::vec::Vectorized<float>& v) {
  const __m512 x = v;
  const __m256 t3 = _mm256_add_ps(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)),
                                  _mm512_castps512_ps256(x));
  const __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
  const __m128 t8 = _mm_add_ps(t6, _mm_permute_ps(t6, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(t8) + _mm_cvtss_f32(_mm_movehdup_ps(t8));
}
inline double hsum(const at::vec::Vectorized<double>& v) { return _mm512_reduce_add_pd(v); }
// hsum of a, b, c and d into s[0..3], with the additions of hsum for each (the same bits), in
// half the instructions of four hsums: the four vectors' halves share each shuffle and add.
inline void hsum4(const at::vec::Vectorized<float>& a, const at::vec::Vectorized<float>& b,
                  const at::vec::Vectorized<float>& c, const at::vec::Vectorized<float>& d,
                  float* s) {
  const __m512 va = a, vb = b, vc = c, vd = d;
  // per vector: upper 256 bits + lower (a's in 128-bit lanes 0-1, b's in 2-3)
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(va, vb, _MM_SHUFFLE(3, 2, 3, 2)),
                                  _mm512_shuffle_f32x4(va, vb, _MM_SHUFFLE(1, 0, 1, 0)));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(vc, vd, _MM_SHUFFLE(3, 2, 3, 2)),
                                  _mm512_shuffle_f32x4(vc, vd, _MM_SHUFFLE(1, 0, 1, 0)));
  // upper 128 + lower: a's, b's, c's and d's in 128-bit lanes 0, 1, 2 and 3
  const __m512 t6 = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)),
                                  _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)));
  const __m512 t8 = _mm512_add_ps(t6, _mm512_permute_ps(t6, _MM_SHUFFLE(1, 0, 3, 2)));
  const __m512 t10 = _mm512_add_ps(t8, _mm512_permute_ps(t8, _MM_SHUFFLE(2, 3, 0, 1)));
  const __m512i lanes = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
  _mm_storeu_ps(s, _mm512_castps512_ps128(_mm512_permutexvar_ps(lanes, t10)));
}
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
#if !defined(CPU_CAPABILITY_AVX512)
inline void hsum4(const at::vec::Vectorized<float>& a, const at::vec::Vectorized<float>& b,
                  const at::vec::Vectorized<float>& c, const at::vec::Vectorized<float>& d,
                  float* s) {
  s[0] = hsum(a);
  s[1] = hsum(b);
  s[2] = hsum(c);
  s[3] = hsum(d);
}
#endif

// A vector of T from memory of T, or of float from bfloat16 weights (widened exactly: a
// bfloat16 is the top half of a float), so that a product can read weights stored in bfloat16
// (half the bytes) and compute in float.
template <typename T>
inline at::vec::Vectorized<T> load_vec(const T* p) {
  return at::vec::Vectorized<T>::loadu(p);
}
inline at::vec::Vectorized<float> load_vec(const c10::BFloat16* p) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
#else
  float lanes[at::vec::Vectorized<float>::size()];
  for (int64_t k = 0; k < at::vec::Vectorized<float>::size(); ++k) lanes[k] = float(p[k]);
  return at::vec::Vectorized<float>::loadu(lanes);
#endif
}

// sum_i a[i] * b[i], b of T or (for float) bfloat16.
template <typename T, typename WT = T>
inline T dot(const T* a, const WT* b, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  int64_t i = 0;
  T s = 0;
  if (n >= W) {
    Vec acc(T(0));
    for (; i + W <= n; i += W) acc = at::vec::fmadd(Vec::loadu(a + i), load_vec(b + i), acc);
    s = hsum(acc);
  }
  for (; i < n; ++i) s += a[i] * static_cast<T>(b[i]);
  return s;
}

// y (M, N), a view of Y with row stride ldy, = bias (one row of N, every row) + x w: the bias
// rows written here, then BLAS accumulates into them in place. The same sums as
// addmm_out(y, bias, x, w), without its expand and copy ops (a few us a call).
template <typename T>
void addmm_over_bias_rows(at::Tensor& y, T* Y, int64_t ldy, const T* bias, const at::Tensor& x,
                          const at::Tensor& w) {
  const int64_t M = y.size(0), N = y.size(1);
  for (int64_t m = 0; m < M; ++m) std::copy(bias, bias + N, Y + m * ldy);
  y.addmm_(x, w);
}

// How far ahead the matrix-vector products ask for the weights' lines. At batch 1 a decode
// step reads every matrix of the decoder once, more bytes than L2 holds, so the rows stream
// from L3. With the L2 streamer alone the bf16 product read 6 and 12 MB of rows at 77-107%
// (mean 87%) of the rate of a float32 sum over as many bytes; asking for the lines 8 KiB ahead
// gives 95-107% (mean 99%; the two builds alternated, three pairs). The dot products walk four
// rows at a time, so the line 8 KiB ahead of a row's is the same column of a row further down
// (rows stored one after another); a prefetch past a matrix's end is harmless.
constexpr int64_t kPrefetchBytes = 8192;

inline void prefetch_line(const void* p) { __builtin_prefetch(p, 0, 3); }

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// Two float vectors from 2 * Vec::size() bfloat16 values in one load: each 32-bit lane holds
// an even-indexed value in its low half and the next odd-indexed one in its high half, so a
// shift gives the even ones as floats and a mask the odd ones (half the instructions of
// widening each half separately). Their products pair with x de-interleaved alike.
inline void load_bf16_pair(const c10::BFloat16* p, at::vec::Vectorized<float>& even,
                           at::vec::Vectorized<float>& odd) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i raw = _mm512_loadu_si512(reinterpret_cast<const void*>(p));
  even = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(0xFFFF0000u)));
#else
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(0xFFFF0000u)));
#endif
}

// linear_nt's dot products for float rows against bfloat16 weights: per block of 2 * Vec::size()
// columns one load of the weights and the block of x de-interleaved once per call (xd: even
// columns, then odd ones), two FMA chains per output. Rows go four at a time where there are
// four (two outputs of all four per pass: each weight block is loaded and widened once for the
// four rows, which re-read no weights from cache), else one at a time (four outputs per pass).
// Either way an output is hsum(even chain + odd chain) + the columns past the last block, one at
// a time, then its initial value plus that: the same operations, so the same bits, whatever the
// number of rows (linear_nt_bf16_one); the last N % 4 outputs of a row are dot's.
inline void linear_nt_bf16(const float* X, int64_t ldx, int64_t B, int64_t K,
                           const c10::BFloat16* W, int64_t ldw, int64_t N, const float* bias,
                           float* Y, bool accumulate) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t Wd = Vec::size();
  constexpr int64_t P = 2 * Wd;
  constexpr int64_t kRows = 4;
  const int64_t Kb = K - K % P, N4 = N - N % 4;
  std::vector<float> xd(B * Kb);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < Kb; k += P)
      for (int64_t j = 0; j < Wd; ++j) {
        xd[b * Kb + k + j] = X[b * ldx + k + 2 * j];
        xd[b * Kb + k + Wd + j] = X[b * ldx + k + 2 * j + 1];
      }
  auto tail = [&](const float* x, const c10::BFloat16* w) {
    float r = 0;
    for (int64_t k = Kb; k < K; ++k) r += static_cast<float>(w[k]) * x[k];
    return r;
  };
  auto put = [&](int64_t b, int64_t n, float r) {
    float* y = Y + b * N;
    const float init = accumulate ? y[n] : (bias ? bias[n] : 0.f);
    y[n] = init + r;
  };
  // one weight row's block: its even values against xv, its odd ones against xw
  auto fma_block = [&](const c10::BFloat16* w, int64_t k, const Vec& xv, const Vec& xw,
                       Vec& even_acc, Vec& odd_acc) {
    Vec e, o;
    prefetch_line(reinterpret_cast<const char*>(w + k) + kPrefetchBytes);
    load_bf16_pair(w + k, e, o);
    even_acc = at::vec::fmadd(e, xv, even_acc);
    odd_acc = at::vec::fmadd(o, xw, odd_acc);
  };
  auto one_row = [&](int64_t b) {
    const float* x = X + b * ldx;
    const float* xe = xd.data() + b * Kb;
    for (int64_t n = 0; n < N4; n += 4) {
      const c10::BFloat16* w[4] = {W + n * ldw, W + (n + 1) * ldw, W + (n + 2) * ldw,
                                   W + (n + 3) * ldw};
      Vec a[4], c[4];
      for (int i = 0; i < 4; ++i) a[i] = c[i] = Vec(0.f);
      for (int64_t k = 0; k < Kb; k += P) {
        const Vec xv = Vec::loadu(xe + k);
        const Vec xw = Vec::loadu(xe + k + Wd);
        for (int i = 0; i < 4; ++i) fma_block(w[i], k, xv, xw, a[i], c[i]);
      }
      float r[4];
      hsum4(a[0] + c[0], a[1] + c[1], a[2] + c[2], a[3] + c[3], r);
      for (int i = 0; i < 4; ++i) put(b, n + i, r[i] + tail(x, w[i]));
    }
  };
  auto four_rows = [&](int64_t b0) {
    for (int64_t n = 0; n < N4; n += 2) {
      const c10::BFloat16* w[2] = {W + n * ldw, W + (n + 1) * ldw};
      Vec a[2][kRows], c[2][kRows];
      for (int o = 0; o < 2; ++o)
        for (int j = 0; j < kRows; ++j) a[o][j] = c[o][j] = Vec(0.f);
      for (int64_t k = 0; k < Kb; k += P) {
        Vec e[2], d[2];
        for (int o = 0; o < 2; ++o) {
          prefetch_line(reinterpret_cast<const char*>(w[o] + k) + kPrefetchBytes);
          load_bf16_pair(w[o] + k, e[o], d[o]);
        }
        for (int j = 0; j < kRows; ++j) {
          const float* xe = xd.data() + (b0 + j) * Kb + k;
          const Vec xv = Vec::loadu(xe);
          const Vec xw = Vec::loadu(xe + Wd);
          for (int o = 0; o < 2; ++o) {
            a[o][j] = at::vec::fmadd(e[o], xv, a[o][j]);
            c[o][j] = at::vec::fmadd(d[o], xw, c[o][j]);
          }
        }
      }
      for (int o = 0; o < 2; ++o) {
        float r[kRows];
        hsum4(a[o][0] + c[o][0], a[o][1] + c[o][1], a[o][2] + c[o][2], a[o][3] + c[o][3], r);
        for (int j = 0; j < kRows; ++j) put(b0 + j, n + o, r[j] + tail(X + (b0 + j) * ldx, w[o]));
      }
    }
  };
  const int64_t groups = B / kRows, singles = B % kRows;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, kRows * N * K));
  at::parallel_for(0, groups + singles, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b0 = g < groups ? g * kRows : groups * kRows + (g - groups);
      const int64_t rows = g < groups ? kRows : 1;
      if (rows == kRows) {
        four_rows(b0);
      } else {
        one_row(b0);
      }
      for (int64_t b = b0; b < b0 + rows; ++b)
        for (int64_t n = N4; n < N; ++n) put(b, n, dot(X + b * ldx, W + n * ldw, K));
    }
  });
}

// linear_nt_bf16's value for one output in a block of four, by the same operations: the row w
// against x (K values; xe: its first K - K % (2 * Vec::size()) values de-interleaved as there).
inline float linear_nt_bf16_one(const float* x, const float* xe, const c10::BFloat16* w,
                                int64_t K) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t Wd = Vec::size();
  constexpr int64_t P = 2 * Wd;
  const int64_t Kb = K - K % P;
  Vec even_acc(0.f), odd_acc(0.f);
  for (int64_t k = 0; k < Kb; k += P) {
    Vec e, o;
    load_bf16_pair(w + k, e, o);
    even_acc = at::vec::fmadd(e, Vec::loadu(xe + k), even_acc);
    odd_acc = at::vec::fmadd(o, Vec::loadu(xe + k + Wd), odd_acc);
  }
  float tail = 0;
  for (int64_t k = Kb; k < K; ++k) tail += static_cast<float>(w[k]) * x[k];
  return hsum(even_acc + odd_acc) + tail;
}

// x's first Kb columns de-interleaved per block of 2 * Vec::size(): the even columns, then the
// odd ones (linear_nt_bf16's order).
inline void deinterleave_blocks(const float* x, int64_t Kb, float* xe) {
  constexpr int64_t Wd = at::vec::Vectorized<float>::size();
  for (int64_t k = 0; k < Kb; k += 2 * Wd)
    for (int64_t j = 0; j < Wd; ++j) {
      xe[k + j] = x[k + 2 * j];
      xe[k + Wd + j] = x[k + 2 * j + 1];
    }
}
#endif

// R weight rows' products with the row x (K values): two accumulators a row (even and odd
// vectors of k) and the columns past the last whole vector one at a time; r[i] for row w[i].
// Four rows give eight independent FMA chains, enough to hide the FMA latency.
template <int R, typename T, typename WT>
inline void row_sums(const T* x, const WT* const* w, int64_t K, T* r) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t Wd = Vec::size();
  const int64_t K_vec = K - K % Wd;
  Vec a[R], c[R];
  for (int i = 0; i < R; ++i) a[i] = c[i] = Vec(T(0));
  int64_t k = 0;
  for (; k + 2 * Wd <= K_vec; k += 2 * Wd) {
    const Vec xv = Vec::loadu(x + k);
    const Vec xw = Vec::loadu(x + k + Wd);
    for (int i = 0; i < R; ++i)
      prefetch_line(reinterpret_cast<const char*>(w[i] + k) + kPrefetchBytes);
    for (int i = 0; i < R; ++i) a[i] = at::vec::fmadd(load_vec(w[i] + k), xv, a[i]);
    for (int i = 0; i < R; ++i) c[i] = at::vec::fmadd(load_vec(w[i] + k + Wd), xw, c[i]);
  }
  if (k < K_vec) {
    const Vec xv = Vec::loadu(x + k);
    for (int i = 0; i < R; ++i) a[i] = at::vec::fmadd(load_vec(w[i] + k), xv, a[i]);
  }
  if constexpr (R == 4 && std::is_same_v<T, float>) {
    hsum4(a[0] + c[0], a[1] + c[1], a[2] + c[2], a[3] + c[3], r);
  } else {
    for (int i = 0; i < R; ++i) r[i] = hsum(a[i] + c[i]);
  }
  for (int64_t k = K_vec; k < K; ++k)
    for (int i = 0; i < R; ++i) r[i] += static_cast<T>(w[i][k]) * x[k];
}

// Whether linear_nt gives a product of B rows to BLAS (else its own dot products, whose value
// for one output linear_nt_value repeats).
template <typename T, typename WT>
inline bool linear_nt_blas(int64_t B, int64_t N, int64_t K) {
  return std::is_same_v<T, WT> && B >= 4 && B * N * K >= (1 << 17);
}

// Y[b, n] = (accumulate ? Y[b, n] : bias[n] or 0) + sum_k X[b, k] * W[n, k].
// X is (B, K) with row stride ldx, W is (N, K) with row stride ldw, Y is (B, N) contiguous.
// Small products use vectorised dot products; large ones go to ATen's BLAS. W may be bfloat16
// for a float product (WT): always the dot products then, reading half the bytes.
template <typename T, typename WT = T>
void linear_nt(const T* X, int64_t ldx, int64_t B, int64_t K, const WT* W, int64_t ldw, int64_t N,
               const T* bias, T* Y, bool accumulate) {
  if (B == 0 || N == 0) return;
  const auto dtype = c10::CppTypeToScalarType<T>::value;
  if (linear_nt_blas<T, WT>(B, N, K)) {
    auto opts = at::TensorOptions().dtype(dtype);
    at::Tensor x = at::from_blob(const_cast<T*>(X), {B, K}, {ldx, 1}, opts);
    at::Tensor w = at::from_blob(const_cast<WT*>(W), {N, K}, {ldw, 1}, opts);
    at::Tensor y = at::from_blob(Y, {B, N}, opts);
    if (accumulate) {
      y.addmm_(x, w.t());
    } else if (bias) {
      addmm_over_bias_rows<T>(y, Y, N, bias, x, w.t());
    } else {
      at::mm_out(y, x, w.t());
    }
    return;
  }
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<WT, c10::BFloat16>) {
    linear_nt_bf16(X, ldx, B, K, W, ldw, N, bias, Y, accumulate);
    return;
  }
#endif
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, N * K));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* x = X + b * ldx;
      T* y = Y + b * N;
      int64_t n = 0;
      // four outputs at a time: the x loads are shared and the FMA chains run in parallel
      for (; n + 4 <= N; n += 4) {
        const WT* w[4] = {W + n * ldw, W + (n + 1) * ldw, W + (n + 2) * ldw, W + (n + 3) * ldw};
        T r[4];
        row_sums<4>(x, w, K, r);
        for (int64_t i = 0; i < 4; ++i) {
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

// What linear_nt adds to output n's starting value for the row x (a product it does not give
// to BLAS), by the same operations, so the same bits. xe: x de-interleaved
// (deinterleave_blocks) when W is bfloat16.
template <typename T, typename WT>
T linear_nt_value(const T* x, const float* xe, int64_t K, const WT* W, int64_t ldw, int64_t N,
                  int64_t n) {
  const WT* w = W + n * ldw;
  if (n >= N - N % 4) return dot(x, w, K);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<WT, c10::BFloat16>) return linear_nt_bf16_one(x, xe, w, K);
#endif
  T r;
  (void)xe;
  row_sums<1>(x, &w, K, &r);
  return r;
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

// MR rows of a product with a weight stored transposed and padded (as linear_t_row), NV output
// vectors wide: MR * NV accumulators in registers over k, so that each vector of Wt loaded
// serves MR rows (linear_t_row loads it once per row) and MR * NV independent FMA chains hide
// the FMA latency. init: rows of stride ldinit (0: one row for all, a bias), or null (zero).
template <typename T, int MR, int NV>
inline void t_block_rows(const T* X, int64_t ldx, int64_t K, const T* Wt, int64_t ldw,
                         const T* init, int64_t ldinit, T* Y, int64_t ldy) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  Vec a[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int u = 0; u < NV; ++u)
      a[r][u] = init ? Vec::loadu(init + r * ldinit + u * W) : Vec(T(0));
  for (int64_t k = 0; k < K; ++k) {
    const T* w = Wt + k * ldw;
    Vec wv[NV];
    for (int u = 0; u < NV; ++u) wv[u] = Vec::loadu(w + u * W);
    for (int r = 0; r < MR; ++r) {
      const Vec xv(X[r * ldx + k]);
      for (int u = 0; u < NV; ++u) a[r][u] = at::vec::fmadd(wv[u], xv, a[r][u]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int u = 0; u < NV; ++u) a[r][u].store(Y + r * ldy + u * W);
}

// Y[m, :Np] = init + X[m, :K] Wt for the M rows of X (row stride ldx) into Y (row stride ldy),
// Wt (K, Np) as for linear_t_row: blocks of four rows through t_block_rows, the rest a row at a
// time.
template <typename T>
void linear_t_rows(const T* X, int64_t ldx, int64_t M, int64_t K, const T* Wt, int64_t Np,
                   const T* bias, T* Y, int64_t ldy, bool accumulate) {
  constexpr int64_t W = at::vec::Vectorized<T>::size();
  constexpr int MR = 4;
  int64_t m = 0;
  for (; m + MR <= M; m += MR) {
    const T* x = X + m * ldx;
    T* y = Y + m * ldy;
    const T* init = accumulate ? y : bias;
    const int64_t ldi = accumulate ? ldy : 0;
    auto at_n = [&](int64_t n) { return init ? init + n : nullptr; };
    int64_t n = 0;
    for (; n + 3 * W <= Np; n += 3 * W)
      t_block_rows<T, MR, 3>(x, ldx, K, Wt + n, Np, at_n(n), ldi, y + n, ldy);
    switch ((Np - n) / W) {
      case 2: t_block_rows<T, MR, 2>(x, ldx, K, Wt + n, Np, at_n(n), ldi, y + n, ldy); break;
      case 1: t_block_rows<T, MR, 1>(x, ldx, K, Wt + n, Np, at_n(n), ldi, y + n, ldy); break;
      default: break;
    }
  }
  for (; m < M; ++m) linear_t_row<T>(X + m * ldx, K, Wt, Np, bias, Y + m * ldy, accumulate);
}

}  // namespace cpu
}  // namespace seq2seq_ext
