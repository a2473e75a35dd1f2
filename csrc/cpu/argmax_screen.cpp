// The int8 screen of an output layer's argmax (argmax_screen.h): the copy, the VNNI dot
// products and the bounds.
#include "argmax_screen.h"

#include <ATen/Parallel.h>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

namespace seq2seq_ext {
namespace cpu {
namespace {

std::atomic<bool> screen_on{true};

// Relative margin for the float rounding of the exact logits and of the bounds themselves:
// K <= 1024 float32 multiply-adds err by at most about K * 2^-24 of the sum of magnitudes, far
// below this.
constexpr float kRoundingMargin = 1.0f / 1024;

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

// max |x| and sum |x| of the K values at p, and whether they are all finite.
struct Scan {
  float top, l1;
  bool finite;
};
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
  s.scale[v] = scale;
  // x - scale * q in float errs from the exact difference by its two roundings, at most a
  // few units in the last place of 127 * scale; the slack here is far above that, so the
  // stored error is never below the exact one
  s.err[v] = _mm512_reduce_max_ps(err) * (1 + 1.0f / (1 << 20)) + scale * (1.0f / (1 << 16));
  s.q_l1[v] = static_cast<float>(_mm512_reduce_add_epi32(l1));
  s.q_sum[v] = _mm512_reduce_add_epi32(sum);
  return true;
}
#endif

}  // namespace

bool argmax_screen_usable() {
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
  static const bool usable = __builtin_cpu_supports("avx512vnni") &&
                             __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512f");
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
#if defined(CPU_CAPABILITY_AVX512)
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
#else
  (void)s, (void)h, (void)bias, (void)scratch, (void)rows;
  return false;
#endif
}

}  // namespace cpu
}  // namespace seq2seq_ext
