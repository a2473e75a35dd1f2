// Dropout masks for the drop-in layers, cheap on the CPU.
//
// What it buys: a decoder called once per token draws a fresh mask at every call. Drawn as
// uniform_().lt_(1 - p).div_(1 - p), a mask of 64 x 32 costs about 17 us on one core, most of
// a one-step layer call's arithmetic at the seeds' sizes: three kernels, and a Mersenne Twister
// draw per element under the generator's lock. Here one 64-bit seed is taken from the default
// CPU generator (so torch.manual_seed reproduces the masks and every call gets new ones), and
// each pair of elements takes the two 24-bit halves of one SplitMix64 output of its index (a
// counter-based stream: the output of index i depends on the seed and i alone), written in one
// pass. An element is kept when its 24-bit uniform in [0, 1) is below 1 - p, as uniform_ then
// lt_ decide. Other devices take the three-kernel draw.
#include "dropout_mask.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>

#include <mutex>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace seq2seq_ext {
namespace {

// SplitMix64: the counter's increment and the two mixing multipliers (the scalar and the
// AVX-512 draws share them)
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
constexpr uint64_t kMix1 = 0xBF58476D1CE4E5B9ull;
constexpr uint64_t kMix2 = 0x94D049BB133111EBull;

inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * kMix1;
  z = (z ^ (z >> 27)) * kMix2;
  return z ^ (z >> 31);
}

#if defined(CPU_CAPABILITY_AVX512)
// The float mask's pairs [0, pairs) eight at a time (64-bit lanes, AVX512DQ's 64-bit multiply):
// the same SplitMix64 outputs and decisions as the scalar loop, 16 elements a store. Each
// lane's two halves land as the pair's two floats: its low 32 bits (z >> 40) are element 2j,
// its high 32 bits ((z >> 8) & 0xFFFFFF) element 2j + 1. A 24-bit value u is kept when
// u * 2^-24 < keep, that is u < keep * 2^24 (both sides exact in float). Returns the pairs done.
int64_t keep_pairs_avx512(uint64_t seed, float keep, float scale, float* out, int64_t pairs) {
  const __m512i golden = _mm512_set1_epi64(static_cast<int64_t>(kGolden));
  const __m512i m1 = _mm512_set1_epi64(static_cast<int64_t>(kMix1));
  const __m512i m2 = _mm512_set1_epi64(static_cast<int64_t>(kMix2));
  const __m512i low24 = _mm512_set1_epi64(0xFFFFFF);
  const __m512i base = _mm512_set1_epi64(static_cast<int64_t>(seed));
  const __m512 limit = _mm512_set1_ps(keep * 16777216.0f);
  const __m512 kept = _mm512_set1_ps(scale);
  __m512i index = _mm512_set_epi64(8, 7, 6, 5, 4, 3, 2, 1);  // pair j's counter is j + 1
  const __m512i step = _mm512_set1_epi64(8);
  int64_t j = 0;
  for (; j + 8 <= pairs; j += 8) {
    __m512i z = _mm512_add_epi64(base, _mm512_mullo_epi64(index, golden));
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)), m1);
    z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)), m2);
    z = _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
    const __m512i low = _mm512_and_si512(_mm512_srli_epi64(z, 8), low24);
    const __m512i halves = _mm512_or_si512(_mm512_srli_epi64(z, 40), _mm512_slli_epi64(low, 32));
    const __mmask16 keep_lanes = _mm512_cmp_ps_mask(_mm512_cvtepi32_ps(halves), limit, _CMP_LT_OQ);
    _mm512_storeu_ps(out + 2 * j, _mm512_maskz_mov_ps(keep_lanes, kept));
    index = _mm512_add_epi64(index, step);
  }
  return j;
}
#endif

uint64_t cpu_seed() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return at::check_generator<at::CPUGeneratorImpl>(gen)->random64();
}

}  // namespace

at::Tensor dropout_keep_mask(at::IntArrayRef shape, double p, const at::TensorOptions& options) {
  TORCH_CHECK(p > 0 && p < 1, "dropout_keep_mask: p must be in (0, 1), got ", p);
  if (!options.device().is_cpu())
    return at::empty(shape, options).uniform_().lt_(1 - p).div_(1 - p);
  at::Tensor mask = at::empty(shape, options);
  const uint64_t seed = cpu_seed();
  const int64_t n = mask.numel();
  AT_DISPATCH_FLOATING_TYPES(mask.scalar_type(), "dropout_keep_mask", [&] {
    const scalar_t keep = static_cast<scalar_t>(1 - p);
    const scalar_t scale = scalar_t(1) / keep;
    const scalar_t unit = scalar_t(1) / scalar_t(1 << 24);
    scalar_t* out = mask.data_ptr<scalar_t>();
    int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
    if (std::is_same_v<scalar_t, float>)  // (the dispatch's lambda is no template: a plain if)
      i = 2 * keep_pairs_avx512(seed, static_cast<float>(keep), static_cast<float>(scale),
                                reinterpret_cast<float*>(out), n / 2);
#endif
    for (; i < n; i += 2) {
      const uint64_t z = splitmix64(seed + static_cast<uint64_t>(i / 2 + 1) * kGolden);
      out[i] = static_cast<scalar_t>(z >> 40) * unit < keep ? scale : scalar_t(0);
      if (i + 1 < n)
        out[i + 1] =
            static_cast<scalar_t>((z >> 8) & 0xFFFFFF) * unit < keep ? scale : scalar_t(0);
    }
  });
  return mask;
}

}  // namespace seq2seq_ext
