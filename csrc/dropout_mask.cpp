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

namespace seq2seq_ext {
namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

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
    for (int64_t i = 0; i < n; i += 2) {
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
