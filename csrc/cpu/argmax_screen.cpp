// The int8 screen of an output layer's argmax (argmax_screen.h): the copy, the int8 dot
// products (AVX512-VNNI or AVX2) and the bounds.
#include "argmax_screen.h"

#include <ATen/Parallel.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>

namespace seq2seq_ext {
namespace cpu {
namespace {

std::atomic<bool> screen_on{true};

// Relative margin for the float rounding of the exact logits and of the bounds themselves:
// K <= 1024 float32 multiply-adds err by at most about K * 2^-24 of the sum of magnitudes, far
// below this.
constexpr float kRoundingMargin = 1.0f / 1024;

// Whether the bounds hold for a state of scale h_scale (max |h| / 127): a zero state, or one
// whose scale times every nonzero row scale is a normal float. Below that the state's scale or
// its inverse leaves float's normal range, and the products' subnormal roundings are absolute
// errors the relative margin does not cover (a state of max |h| 1e-37 against rows of max 0.06
// gave other indices than the full product); such a state takes the full product.
inline bool scales_normal(const ArgmaxScreen& s, float h_scale) {
  return h_scale == 0 || h_scale * s.min_scale >= std::numeric_limits<float>::min();
}

// max |x| and sum |x| of K values, and whether they are all finite (scan, one form per ISA).
struct Scan {
  float top, l1;
  bool finite;
};

// Row v's entries of the screen besides q, from what fill_row (one form per ISA) measured: the
// row's scale, the largest |x - scale * q| over its columns, |q|_1 and sum q. x - scale * q in
// float errs from the exact difference by its two roundings, at most a few units in the last
// place of 127 * scale; the slack here is far above that, so the stored error is never below
// the exact one.
inline void finish_row(ArgmaxScreen& s, int64_t v, float scale, float max_err, int32_t q_l1,
                       int32_t q_sum) {
  s.scale[v] = scale;
  s.err[v] = max_err * (1 + 1.0f / (1 << 20)) + scale * (1.0f / (1 << 16));
  s.q_l1[v] = static_cast<float>(q_l1);
  s.q_sum[v] = q_sum;
}

#if defined(CPU_CAPABILITY_AVX512)
// dots[v] = sum_k hq[k] * q[v, k] over Kp (a multiple of 64) columns: hq unsigned, q signed,
// four rows at a time.
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void vnni_dots(
    const uint8_t* hq, const int8_t* q, int64_t V, int64_t Kp, int32_t* dots) {
  int64_t v = 0;
  for (; v + 4 <= V; v += 4) {
    const int8_t* r = q + v * Kp;
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t k = 0; k < Kp; k += 64) {
      for (int i = 0; i < 4; ++i) prefetch_line(r + i * Kp + k + kPrefetchBytes);
      const __m512i x = _mm512_loadu_si512(hq + k);
      s0 = _mm512_dpbusd_epi32(s0, x, _mm512_loadu_si512(r + k));
      s1 = _mm512_dpbusd_epi32(s1, x, _mm512_loadu_si512(r + Kp + k));
      s2 = _mm512_dpbusd_epi32(s2, x, _mm512_loadu_si512(r + 2 * Kp + k));
      s3 = _mm512_dpbusd_epi32(s3, x, _mm512_loadu_si512(r + 3 * Kp + k));
    }
    dots[v] = _mm512_reduce_add_epi32(s0);
    dots[v + 1] = _mm512_reduce_add_epi32(s1);
    dots[v + 2] = _mm512_reduce_add_epi32(s2);
    dots[v + 3] = _mm512_reduce_add_epi32(s3);
  }
  for (; v < V; ++v) {
    __m512i s = _mm512_setzero_si512();
    for (int64_t k = 0; k < Kp; k += 64)
      s = _mm512_dpbusd_epi32(s, _mm512_loadu_si512(hq + k), _mm512_loadu_si512(q + v * Kp + k));
    dots[v] = _mm512_reduce_add_epi32(s);
  }
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// The first min(n, 16) of 16 lanes.
inline __mmask16 lanes16(int64_t n) {
  return static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1);
}

// 16 values from p (n of them, the other lanes zero) as floats; bfloat16 widened exactly.
inline __m512 load16(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(lanes16(n), p); }
inline __m512 load16(const c10::BFloat16* p, int64_t n) {
  const __m256i raw = _mm256_maskz_loadu_epi16(lanes16(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <typename X>
Scan scan(const X* p, int64_t K) {
  __m512 top = _mm512_setzero_ps(), l1 = _mm512_setzero_ps(), bad = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __m512 x = load16(p + k, K - k);
    bad = _mm512_add_ps(bad, _mm512_sub_ps(x, x));  // 0 for finite x, NaN otherwise
    top = _mm512_max_ps(top, _mm512_abs_ps(x));
    l1 = _mm512_add_ps(l1, _mm512_abs_ps(x));
  }
  const float top_f = _mm512_reduce_max_ps(top);
  return {top_f, _mm512_reduce_add_ps(l1),
          _mm512_reduce_add_ps(bad) == 0 && std::isfinite(top_f)};
}

// Fills row v of the screen from its K values `w` (float32 or bfloat16); false when one is not
// finite.
template <typename W>
bool fill_row(ArgmaxScreen& s, int64_t v, const W* w) {
  const int64_t K = s.K;
  const Scan row = scan(w, K);
  if (!row.finite) return false;
  const float scale = row.top / 127;
  // any rounding to a step will do: the error is measured below
  const __m512 inv = _mm512_set1_ps(scale > 0 ? 1 / scale : 0.f);
  const __m512 sc = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-127.f),
               hi = _mm512_set1_ps(127.f);
  __m512 err = _mm512_setzero_ps();
  __m512i l1 = _mm512_setzero_si512(), sum = _mm512_setzero_si512();
  int8_t* q = s.q.data() + v * s.Kp;
  for (int64_t k = 0; k < K; k += 16) {
    const __m512 x = load16(w + k, K - k);
    __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(x, inv),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
    const __m512i qi = _mm512_cvtps_epi32(r);
    _mm512_mask_cvtepi32_storeu_epi8(q + k, lanes16(K - k), qi);
    err = _mm512_max_ps(err, _mm512_abs_ps(_mm512_sub_ps(x, _mm512_mul_ps(sc, r))));
    l1 = _mm512_add_epi32(l1, _mm512_abs_epi32(qi));
    sum = _mm512_add_epi32(sum, qi);
  }
  finish_row(s, v, scale, _mm512_reduce_max_ps(err), _mm512_reduce_add_epi32(l1),
             _mm512_reduce_add_epi32(sum));
  return true;
}
#endif


#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
// The AVX2 form of the screen. AVX2 has no VNNI: its int8 product, vpmaddubsw, multiplies
// unsigned bytes by signed ones and adds pairs into int16 with saturation. The state is stored
// signed here (hq = round(h / s_h), |hq| <= 127) and each product is taken as
// |hq_k| * (q_vk with hq_k's sign), so that a pair sums to at most 2 * 127 * 127 < 2^15: the
// same exact integer dot products as the AVX-512 form's, without its +128 offset.

// lane i of a mask of the first min(n, 8) lanes: all ones where i < n
inline __m256i lanes8(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n, 8))), idx);
}

// 8 values from p (n of them, the other lanes zero) as floats; bfloat16 widened exactly.
inline __m256 load8(const float* p, int64_t n) {
  return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lanes8(n));
}
inline __m256 load8(const c10::BFloat16* p, int64_t n) {
  alignas(16) uint16_t raw[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(raw, p, static_cast<size_t>(std::min<int64_t>(n, 8)) * sizeof(uint16_t));
  const __m128i r = _mm_load_si128(reinterpret_cast<const __m128i*>(raw));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(r), 16));
}

inline __m256 abs8(__m256 x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }

inline float hmax8(__m256 x) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline int32_t hsum8(__m256i x) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// The 8 values x rounded to the nearest integer (ties to even), stored as int8 into the first
// min(n, 8) bytes of out; |x| <= 127 after the clamp.
inline __m256i store_rounded8(__m256 r, int8_t* out, int64_t n) {
  const __m256i qi = _mm256_cvtps_epi32(r);
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), qi);
  for (int64_t i = 0; i < std::min<int64_t>(n, 8); ++i) out[i] = static_cast<int8_t>(lanes[i]);
  return qi;
}

template <typename X>
Scan scan(const X* p, int64_t K) {
  __m256 top = _mm256_setzero_ps(), l1 = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    const __m256 x = load8(p + k, K - k);
    bad = _mm256_add_ps(bad, _mm256_sub_ps(x, x));  // 0 for finite x, NaN otherwise
    top = _mm256_max_ps(top, abs8(x));
    l1 = _mm256_add_ps(l1, abs8(x));
  }
  const float top_f = hmax8(top);
  return {top_f, hsum(at::vec::Vectorized<float>(l1)),
          hsum(at::vec::Vectorized<float>(bad)) == 0 && std::isfinite(top_f)};
}

// Fills row v of the screen from its K values `w` (float32 or bfloat16); false when one is not
// finite.
template <typename W>
bool fill_row(ArgmaxScreen& s, int64_t v, const W* w) {
  const int64_t K = s.K;
  const Scan row = scan(w, K);
  if (!row.finite) return false;
  const float scale = row.top / 127;
  // any rounding to a step will do: the error is measured below
  const __m256 inv = _mm256_set1_ps(scale > 0 ? 1 / scale : 0.f);
  const __m256 sc = _mm256_set1_ps(scale), lo = _mm256_set1_ps(-127.f),
               hi = _mm256_set1_ps(127.f);
  __m256 err = _mm256_setzero_ps();
  __m256i l1 = _mm256_setzero_si256(), sum = _mm256_setzero_si256();
  int8_t* q = s.q.data() + v * s.Kp;
  for (int64_t k = 0; k < K; k += 8) {
    const __m256 x = load8(w + k, K - k);
    __m256 r = _mm256_round_ps(_mm256_mul_ps(x, inv),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
    const __m256i qi = store_rounded8(r, q + k, K - k);
    err = _mm256_max_ps(err, abs8(_mm256_sub_ps(x, _mm256_mul_ps(sc, r))));
    l1 = _mm256_add_epi32(l1, _mm256_abs_epi32(qi));
    sum = _mm256_add_epi32(sum, qi);
  }
  finish_row(s, v, scale, hmax8(err), hsum8(l1), hsum8(sum));
  return true;
}

// dots[v] = sum_k hq[k] * q[v, k] over Kp (a multiple of 64) columns, both signed, four rows
// at a time: |hq| times q with hq's sign (vpsignb) in vpmaddubsw, the int16 pairs summed into
// int32 lanes by vpmaddwd.
void avx2_dots(const int8_t* hq, const int8_t* q, int64_t V, int64_t Kp, int32_t* dots) {
  const __m256i ones = _mm256_set1_epi16(1);
  auto term = [&](__m256i acc, __m256i a, __m256i h, const int8_t* r) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r));
    const __m256i signed_q = _mm256_sign_epi8(w, h);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, signed_q), ones));
  };
  int64_t v = 0;
  for (; v + 4 <= V; v += 4) {
    const int8_t* r = q + v * Kp;
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t k = 0; k < Kp; k += 32) {
      if (k % 64 == 0)
        for (int i = 0; i < 4; ++i) prefetch_line(r + i * Kp + k + kPrefetchBytes);
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hq + k));
      const __m256i a = _mm256_abs_epi8(h);
      s0 = term(s0, a, h, r + k);
      s1 = term(s1, a, h, r + Kp + k);
      s2 = term(s2, a, h, r + 2 * Kp + k);
      s3 = term(s3, a, h, r + 3 * Kp + k);
    }
    dots[v] = hsum8(s0);
    dots[v + 1] = hsum8(s1);
    dots[v + 2] = hsum8(s2);
    dots[v + 3] = hsum8(s3);
  }
  for (; v < V; ++v) {
    __m256i s = _mm256_setzero_si256();
    for (int64_t k = 0; k < Kp; k += 32) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hq + k));
      s = term(s, _mm256_abs_epi8(h), h, q + v * Kp + k);
    }
    dots[v] = hsum8(s);
  }
}
#endif

}  // namespace

bool argmax_screen_usable() {
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
  static const bool usable = __builtin_cpu_supports("avx512vnni") &&
                             __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512f");
  return usable;
#elif defined(CPU_CAPABILITY_AVX2) && defined(__GNUC__)
  static const bool usable = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return usable;
#else
  return false;
#endif
}

bool argmax_screen_enabled() { return screen_on.load(std::memory_order_relaxed); }

void set_argmax_screen(bool on) { screen_on.store(on, std::memory_order_relaxed); }

std::shared_ptr<const ArgmaxScreen> make_argmax_screen(const at::Tensor& w) {
  TORCH_INTERNAL_ASSERT(w.dim() == 2 && w.is_contiguous() &&
                        (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16));
  const int64_t V = w.size(0), K = w.size(1);
  if (!argmax_screen_enabled() || !argmax_screen_usable() || !argmax_screen_pays(V, K))
    return nullptr;
  auto s = std::make_shared<ArgmaxScreen>();
  s->V = V;
  s->K = K;
  s->Kp = (K + 63) / 64 * 64;
  s->q.assign(V * s->Kp, 0);
  s->scale.resize(V);
  s->err.resize(V);
  s->q_l1.resize(V);
  s->q_sum.resize(V);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  std::atomic<bool> finite{true};
  at::parallel_for(0, V, 64, [&](int64_t v0, int64_t v1) {
    for (int64_t v = v0; v < v1; ++v) {
      const bool ok = w.scalar_type() == at::kFloat
                          ? fill_row(*s, v, w.const_data_ptr<float>() + v * K)
                          : fill_row(*s, v, w.const_data_ptr<c10::BFloat16>() + v * K);
      if (!ok) finite.store(false, std::memory_order_relaxed);
    }
  });
  if (!finite.load()) return nullptr;
  s->min_scale = std::numeric_limits<float>::infinity();
  for (const float scale : s->scale)
    if (scale > 0) s->min_scale = std::min(s->min_scale, scale);
  return s;
#else
  return nullptr;  // not reached: argmax_screen_usable() is false
#endif
}

bool argmax_candidates(const ArgmaxScreen& s, const float* h, const float* bias,
                       ScreenScratch& scratch, std::vector<int64_t>& rows) {
#if defined(CPU_CAPABILITY_AVX512)
  const int64_t V = s.V, K = s.K, Kp = s.Kp;
  const Scan state = scan(h, K);
  if (!state.finite) return false;
  // |h|_1 summed in float: a relative error of at most K * 2^-24, inside the margin
  const float h_l1 = state.l1;
  const float h_scale = state.top / 127;
  if (!scales_normal(s, h_scale)) return false;
  // hq = round(h / h_scale) + 128 as bytes (the zero padding: hq = 0, stored as 128)
  scratch.hq.assign(Kp, 128);
  const __m512 inv = _mm512_set1_ps(h_scale > 0 ? 1 / h_scale : 0.f);
  for (int64_t k = 0; k < K; k += 16) {
    const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(load16(h + k, K - k), inv),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(r), _mm512_set1_epi32(128));
    _mm512_mask_cvtepi32_storeu_epi8(scratch.hq.data() + k, lanes16(K - k), q);
  }
  // h - h_scale * hq: at most half a step, and a little more from the product's rounding
  const float h_err = h_scale * (0.5f + kRoundingMargin);
  scratch.dots.resize(V);
  scratch.upper.resize(V);
  vnni_dots(scratch.hq.data(), s.q.data(), V, Kp, scratch.dots.data());
  const __m512 hs = _mm512_set1_ps(h_scale), hl1 = _mm512_set1_ps(h_l1),
               herr = _mm512_set1_ps(h_err), margin = _mm512_set1_ps(kRoundingMargin),
               c128 = _mm512_set1_ps(128);
  __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t v = 0; v < V; v += 16) {
    const __mmask16 m = lanes16(V - v);
    // the unsigned state counts each q_vk 128 times too many
    const __m512i dot = _mm512_sub_epi32(
        _mm512_maskz_loadu_epi32(m, scratch.dots.data() + v),
        _mm512_slli_epi32(_mm512_maskz_loadu_epi32(m, s.q_sum.data() + v), 7));
    const __m512 b = _mm512_maskz_loadu_ps(m, bias + v);
    const __m512 sc = _mm512_maskz_loadu_ps(m, s.scale.data() + v);
    const __m512 ql1 = _mm512_maskz_loadu_ps(m, s.q_l1.data() + v);
    const __m512 approx =
        _mm512_add_ps(b, _mm512_mul_ps(_mm512_mul_ps(sc, hs), _mm512_cvtepi32_ps(dot)));
    const __m512 magnitude = _mm512_add_ps(
        _mm512_abs_ps(b),
        _mm512_mul_ps(_mm512_mul_ps(sc, c128), _mm512_add_ps(hl1, _mm512_mul_ps(ql1, hs))));
    const __m512 bound = _mm512_add_ps(
        _mm512_add_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, s.err.data() + v), hl1),
                      _mm512_mul_ps(_mm512_mul_ps(sc, ql1), herr)),
        _mm512_mul_ps(margin, magnitude));
    _mm512_mask_storeu_ps(scratch.upper.data() + v, m, _mm512_add_ps(approx, bound));
    // a NaN lower bound leaves `best` as it is (max_ps returns its second operand)
    best = _mm512_mask_max_ps(best, m, _mm512_sub_ps(approx, bound), best);
  }
  const float best_lower = _mm512_reduce_max_ps(best);
  if (!std::isfinite(best_lower)) return false;
  // the rows whose upper bound is not below best_lower (a NaN one included)
  rows.clear();
  const __m512 lower = _mm512_set1_ps(best_lower);
  for (int64_t v = 0; v < V; v += 16) {
    const __mmask16 m = lanes16(V - v);
    uint32_t hit = _mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, scratch.upper.data() + v),
                                           lower, _CMP_NLT_UQ);
    for (; hit != 0; hit &= hit - 1) rows.push_back(v + __builtin_ctz(hit));
  }
  return true;
#elif defined(CPU_CAPABILITY_AVX2)
  const int64_t V = s.V, K = s.K, Kp = s.Kp;
  const Scan state = scan(h, K);
  if (!state.finite) return false;
  const float h_l1 = state.l1;
  const float h_scale = state.top / 127;
  if (!scales_normal(s, h_scale)) return false;
  // hq = round(h / h_scale), signed (the zero padding: 0)
  scratch.hq.assign(Kp, 0);
  int8_t* hq = reinterpret_cast<int8_t*>(scratch.hq.data());
  const __m256 inv = _mm256_set1_ps(h_scale > 0 ? 1 / h_scale : 0.f);
  const __m256 lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  for (int64_t k = 0; k < K; k += 8) {
    const __m256 r = _mm256_round_ps(_mm256_mul_ps(load8(h + k, K - k), inv),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    store_rounded8(_mm256_min_ps(_mm256_max_ps(r, lo), hi), hq + k, K - k);
  }
  const float h_err = h_scale * (0.5f + kRoundingMargin);
  scratch.dots.resize(V);
  scratch.upper.resize(V);
  avx2_dots(hq, s.q.data(), V, Kp, scratch.dots.data());
  const __m256 hs = _mm256_set1_ps(h_scale), hl1 = _mm256_set1_ps(h_l1),
               herr = _mm256_set1_ps(h_err), margin = _mm256_set1_ps(kRoundingMargin),
               c128 = _mm256_set1_ps(128);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  __m256 best = _mm256_set1_ps(neg_inf);
  for (int64_t v = 0; v < V; v += 8) {
    const __m256i m = lanes8(V - v);
    const __m256 mf = _mm256_castsi256_ps(m);
    const __m256 dot = _mm256_cvtepi32_ps(
        _mm256_maskload_epi32(reinterpret_cast<const int*>(scratch.dots.data() + v), m));
    const __m256 b = _mm256_maskload_ps(bias + v, m);
    const __m256 sc = _mm256_maskload_ps(s.scale.data() + v, m);
    const __m256 ql1 = _mm256_maskload_ps(s.q_l1.data() + v, m);
    const __m256 approx = _mm256_add_ps(b, _mm256_mul_ps(_mm256_mul_ps(sc, hs), dot));
    // the same bound as the AVX-512 form's (its 128 bounds the signed products here too)
    const __m256 magnitude = _mm256_add_ps(
        abs8(b), _mm256_mul_ps(_mm256_mul_ps(sc, c128),
                               _mm256_add_ps(hl1, _mm256_mul_ps(ql1, hs))));
    const __m256 bound = _mm256_add_ps(
        _mm256_add_ps(_mm256_mul_ps(_mm256_maskload_ps(s.err.data() + v, m), hl1),
                      _mm256_mul_ps(_mm256_mul_ps(sc, ql1), herr)),
        _mm256_mul_ps(margin, magnitude));
    _mm256_maskstore_ps(scratch.upper.data() + v, m, _mm256_add_ps(approx, bound));
    // lanes past V and NaN lower bounds leave `best` as it is (max_ps returns its second
    // operand when either is NaN)
    const __m256 lower = _mm256_blendv_ps(_mm256_set1_ps(neg_inf),
                                          _mm256_sub_ps(approx, bound), mf);
    best = _mm256_max_ps(lower, best);
  }
  const float best_lower = hmax8(best);
  if (!std::isfinite(best_lower)) return false;
  // the rows whose upper bound is not below best_lower (a NaN one included)
  rows.clear();
  const __m256 lower = _mm256_set1_ps(best_lower);
  for (int64_t v = 0; v < V; v += 8) {
    const __m256i m = lanes8(V - v);
    const __m256 up = _mm256_maskload_ps(scratch.upper.data() + v, m);
    uint32_t hit = static_cast<uint32_t>(_mm256_movemask_ps(
        _mm256_and_ps(_mm256_cmp_ps(up, lower, _CMP_NLT_UQ), _mm256_castsi256_ps(m))));
    for (; hit != 0; hit &= hit - 1) rows.push_back(v + __builtin_ctz(hit));
  }
  return true;
#else
  (void)s, (void)h, (void)bias, (void)scratch, (void)rows;
  return false;
#endif
}

}  // namespace cpu
}  // namespace seq2seq_ext
