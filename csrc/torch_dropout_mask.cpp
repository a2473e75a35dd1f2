// PyTorch's own dropout masks on the CPU, bit for bit and several times faster.
//
// What it buys: F.dropout and nn.GRU / nn.LSTM's inter-layer dropout draw their masks with
// bernoulli_(1 - p). Its CPU kernel (ATen/native/cpu/DistributionTemplates.h) goes element by
// element in memory order: two outputs of the generator's Mersenne Twister (at::mt19937), the
// first as the high half, make a 64-bit word w, and the element is 1 when the 53-bit uniform
// (w & (2^53 - 1)) * 2^-53 is below q = 1 - p. That costs about 7 ns an element on one core: the
// chapter's models at embed 256 / hidden 512 / batch 128 draw two (12, 128, 512) masks a training
// step, 11 ms of it. Here the twister's outputs are made a block of 624 at a time (its recurrence
// and tempering in loops the compiler vectorises) and the same decisions are taken on integers:
// (w & (2^53 - 1)) * 2^-53 < q exactly when (w & (2^53 - 1)) < ceil(q * 2^53), both sides exact.
// The engine is read from the default generator and written back under the generator's lock, so
// the next draw continues where bernoulli_ would have left it. Whether this reproduces the
// PyTorch at hand is checked once, against bernoulli_ on a private generator; if it ever does
// not, the masks come from bernoulli_ itself.
#include "torch_dropout_mask.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>

namespace seq2seq_ext {
namespace {

// the twister's state words and its recurrence's offset, as in ATen/core/MT19937RNGEngine.h
constexpr int64_t kN = 624, kM = 397;
constexpr uint32_t kMatrixA = 0x9908b0dfu, kUpper = 0x80000000u, kLower = 0x7fffffffu;

inline uint32_t twist(uint32_t u, uint32_t v) {
  return (((u & kUpper) | (v & kLower)) >> 1) ^ ((0u - (v & 1u)) & kMatrixA);
}

inline uint32_t temper(uint32_t y) {
  y ^= y >> 11;
  y ^= (y << 7) & 0x9d2c5680u;
  y ^= (y << 15) & 0xefc60000u;
  return y ^ (y >> 18);
}

// The next block of state words in place (the engine's next_state): the first kN - kM read words
// not yet replaced, the rest words replaced earlier in this block.
void next_block(uint32_t* s) {
  int64_t i = 0;
  for (; i < kN - kM; ++i) s[i] = s[i + kM] ^ twist(s[i], s[i + 1]);
  for (; i < kN - 1; ++i) s[i] = s[i + kM - kN] ^ twist(s[i], s[i + 1]);
  s[kN - 1] = s[kM - 1] ^ twist(s[kN - 1], s[0]);
}

// The engine's outputs in the order its operator() gives them, several at a time.
class Outputs {
 public:
  explicit Outputs(const at::mt19937_data_pod& data) : d_(data) {}

  // Writes the next min(n, what is left of the current block) outputs; returns how many. The
  // engine's call with left_ == 1 makes a new block and returns its first word: left_ counts the
  // words still to read plus one.
  int64_t take(uint32_t* out, int64_t n) {
    if (d_.left_ <= 1) {
      next_block(d_.state_.data());
      d_.left_ = static_cast<int>(kN + 1);
      d_.next_ = 0;
    }
    const int64_t k = std::min<int64_t>(n, d_.left_ - 1);
    const uint32_t* s = d_.state_.data() + d_.next_;
    for (int64_t j = 0; j < k; ++j) out[j] = temper(s[j]);
    d_.next_ += static_cast<uint32_t>(k);
    d_.left_ -= static_cast<int>(k);
    return k;
  }

  const at::mt19937_data_pod& data() const { return d_; }

 private:
  at::mt19937_data_pod d_;
};

// out[i] = kept ? value : 0 for n elements, two outputs an element, as bernoulli_(q) decides:
// kept when the first output's low 21 bits, then the second's 32, read as an integer, are below
// `threshold` = ceil(q * 2^53).
template <typename T>
void fill(Outputs& src, uint64_t threshold, T value, T* out, int64_t n) {
  uint32_t buf[kN + 1];
  int64_t have = 0;  // outputs in buf not yet used: 0, or 1 carried over to the next block
  for (int64_t i = 0; i < n;) {
    have += src.take(buf + have, std::min<int64_t>(2 * (n - i) - have, kN));
    const int64_t pairs = have / 2;
    T* o = out + i;
    for (int64_t j = 0; j < pairs; ++j) {
      const uint64_t w = (static_cast<uint64_t>(buf[2 * j] & 0x1FFFFFu) << 32) | buf[2 * j + 1];
      o[j] = w < threshold ? value : T(0);
    }
    i += pairs;
    if (have & 1) buf[0] = buf[have - 1];
    have &= 1;
  }
}

// Draws `mask` (contiguous float32 or float64) from gen's engine where bernoulli_(q) gives 1:
// 1 / q in the mask's dtype, as div_(q) computes it, when `scaled`, else 1. The caller holds
// gen's lock.
void draw(at::CPUGeneratorImpl* gen, double q, bool scaled, at::Tensor& mask) {
  at::mt19937 engine = gen->engine();
  Outputs src(engine.data());
  const uint64_t threshold = static_cast<uint64_t>(std::ceil(std::ldexp(q, 53)));
  AT_DISPATCH_FLOATING_TYPES(mask.scalar_type(), "torch_dropout_mask", [&] {
    const scalar_t kept = scaled ? scalar_t(1) / static_cast<scalar_t>(q) : scalar_t(1);
    fill<scalar_t>(src, threshold, kept, mask.data_ptr<scalar_t>(), mask.numel());
  });
  engine.set_data(src.data());
  gen->set_engine(engine);
}

// The copy against bernoulli_ itself, on two private generators seeded alike: draws that start
// within a block and cross several, each dtype, a few q; then both generators' next outputs.
bool matches_bernoulli() {
  for (const double q : {0.5, 0.9, 0.1, 0.7}) {
    for (const auto dtype : {at::kFloat, at::kDouble}) {
      at::Generator a = at::make_generator<at::CPUGeneratorImpl>(20261207);
      at::Generator b = at::make_generator<at::CPUGeneratorImpl>(20261207);
      auto* ga = at::check_generator<at::CPUGeneratorImpl>(a);
      auto* gb = at::check_generator<at::CPUGeneratorImpl>(b);
      for (int k = 0; k < 3; ++k) {  // an odd number of outputs into the first block
        ga->random();
        gb->random();
      }
      const at::Tensor expect = at::empty({1901}, dtype).bernoulli_(q, a);
      at::Tensor got = at::empty({1901}, dtype);
      draw(gb, q, false, got);
      if (!at::equal(expect, got) || ga->random() != gb->random()) return false;
    }
  }
  return true;
}

}  // namespace

bool torch_dropout_mask_exact() {
  static const bool exact = matches_bernoulli();
  return exact;
}

at::Tensor torch_dropout_mask(at::IntArrayRef shape, double p, const at::TensorOptions& options) {
  TORCH_CHECK(p > 0 && p < 1, "torch_dropout_mask: p must be in (0, 1), got ", p);
  const double q = 1 - p;
  const auto dtype = options.dtype().toScalarType();
  // under a Python dispatch mode the draw stays visible to it as bernoulli_ (and the
  // self-check, which draws on private generators, does not run inside the mode)
  if (!options.device().is_cpu() || (dtype != at::kFloat && dtype != at::kDouble) ||
      options.layout() != at::kStrided || c10::impl::TorchDispatchModeTLS::stack_len() > 0 ||
      !torch_dropout_mask_exact())
    return at::empty(shape, options).bernoulli_(q).div_(q);
  at::Tensor mask = at::empty(shape, options);
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  draw(at::check_generator<at::CPUGeneratorImpl>(gen), q, true, mask);
  return mask;
}

}  // namespace seq2seq_ext
