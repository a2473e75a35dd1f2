// One core's arithmetic peak: float32 FMAs (AVX-512, and AVX2 for CPUs without it) and bf16
// dot products (AVX512-BF16), each over twelve independent accumulators so that the FMA units,
// not their latency, set the rate. A GEMM cannot run faster than this; RESULTS.md divides the
// rates a target would need by these figures.
//
//   make peak-flops       # or: g++ -O2 -Wno-psabi tools/peak_flops.cpp -o peak && ./peak [iterations]
//
// Each figure is the best of five runs of the loop; run it on an otherwise idle core
// (`taskset -c 1`).
#include <immintrin.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

constexpr int kAccumulators = 12;

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// The timed loop: twelve accumulators `acc`, each updated by STEP(acc[i]) `iters` times; the
// result is GFLOP/s at FLOPS floating-point operations an update. Written as a macro so that
// each instance is compiled inside its own target("...") function.
#define PEAK_LOOP(VEC, INIT, STEP, FLOPS)                                       \
  VEC acc[kAccumulators];                                                      \
  for (int i = 0; i < kAccumulators; ++i) acc[i] = INIT;                       \
  auto start = std::chrono::steady_clock::now();                               \
  for (long n = 0; n < iters; ++n) {                                           \
    _Pragma("GCC unroll 12") for (int i = 0; i < kAccumulators; ++i) acc[i] = \
        STEP(acc[i]);                                                          \
  }                                                                            \
  double s = seconds_since(start);                                             \
  alignas(64) float lanes[sizeof(VEC) / sizeof(float)];                        \
  volatile float sink = 0;                                                     \
  for (int i = 0; i < kAccumulators; ++i) {                                    \
    std::memcpy(lanes, &acc[i], sizeof(VEC));                                  \
    sink = sink + lanes[0];                                                    \
  }                                                                            \
  return iters * double(kAccumulators) * (FLOPS) / s / 1e9;

__attribute__((target("avx2,fma"))) double avx2_f32(long iters) {
  const __m256 x = _mm256_set1_ps(1.0000001f), y = _mm256_set1_ps(0.9999999f);
#define STEP(a) _mm256_fmadd_ps(a, x, y)
  PEAK_LOOP(__m256, _mm256_set1_ps(1.f), STEP, 2.0 * 8)
#undef STEP
}

__attribute__((target("avx512f"))) double avx512_f32(long iters) {
  const __m512 x = _mm512_set1_ps(1.0000001f), y = _mm512_set1_ps(0.9999999f);
#define STEP(a) _mm512_fmadd_ps(a, x, y)
  PEAK_LOOP(__m512, _mm512_set1_ps(1.f), STEP, 2.0 * 16)
#undef STEP
}

// vdpbf16ps: 16 float32 lanes, each adding two bf16 products: 64 FLOP an instruction
__attribute__((target("avx512f,avx512bf16"))) double avx512_bf16(long iters) {
  const __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80);  // bf16 1.0
#define STEP(a) _mm512_dpbf16_ps(a, x, x)
  PEAK_LOOP(__m512, _mm512_setzero_ps(), STEP, 2.0 * 32)
#undef STEP
}

#undef PEAK_LOOP

double best_of_five(double (*f)(long), long iters) {
  double best = 0;
  for (int r = 0; r < 5; ++r) {
    double g = f(iters);
    if (g > best) best = g;
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  const long iters = argc > 1 ? std::atol(argv[1]) : 50000000;
  __builtin_cpu_init();
  std::printf("one thread, GFLOP/s:");
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    std::printf(" float32 AVX2 FMA %.1f;", best_of_five(avx2_f32, iters));
  if (__builtin_cpu_supports("avx512f"))
    std::printf(" float32 AVX-512 FMA %.1f;", best_of_five(avx512_f32, iters));
  if (__builtin_cpu_supports("avx512bf16"))
    std::printf(" bf16 AVX512-BF16 dot product %.1f;", best_of_five(avx512_bf16, iters));
  std::printf("\n");
  return 0;
}
