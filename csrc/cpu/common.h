// Helpers shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <vector>

namespace seq2seq_ext {
namespace cpu {

// For each sequence, the first masked step: position t is kept when t < valid_len[b] (the
// reference compares a float arange with valid_len), so this is ceil(valid_len) clamped to
// [0, steps]; NaN and negative lengths mask every step.
inline std::vector<int64_t> first_masked_step(const at::Tensor& valid_len, int64_t steps) {
  auto vl = valid_len.contiguous();
  std::vector<int64_t> out(vl.numel());
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, vl.scalar_type(),
                             "first_masked_step", [&] {
    const scalar_t* p = vl.const_data_ptr<scalar_t>();
    for (size_t i = 0; i < out.size(); ++i) {
      double v = static_cast<double>(p[i]);
      if (!(v > 0)) {  // also NaN
        out[i] = 0;
      } else {
        double c = std::ceil(v);
        out[i] = c >= static_cast<double>(steps) ? steps : static_cast<int64_t>(c);
      }
    }
  });
  return out;
}

// Asks the kernel to back a freshly allocated, not yet written buffer with transparent huge
// pages (its 2 MiB-aligned interior; buffers of 4 MiB and more). A large output written once per
// call otherwise pays a page fault per 4 KiB page on first touch, which for the loss gradient
// costs more than computing it. Advice only: without THP support nothing changes.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = t.storage().nbytes();
  if (bytes < 2 * kHuge) return;
  const auto base = reinterpret_cast<uintptr_t>(t.storage().data());
  const uintptr_t start = (base + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (base + bytes) & ~(kHuge - 1);
  if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// The token ids of a decode step (int64 or int32, any stride along the batch) as int64, each
// checked to be in [0, tgt_vocab) before anything is allocated.
inline std::vector<int64_t> tokens_to_vector(const at::Tensor& token, int64_t tgt_vocab) {
  std::vector<int64_t> out(token.size(0));
  const int64_t stride = token.stride(0);
  if (token.scalar_type() == at::kLong) {
    const int64_t* p = token.const_data_ptr<int64_t>();
    for (size_t b = 0; b < out.size(); ++b) out[b] = p[b * stride];
  } else {
    const int32_t* p = token.const_data_ptr<int32_t>();
    for (size_t b = 0; b < out.size(); ++b) out[b] = p[b * stride];
  }
  for (size_t b = 0; b < out.size(); ++b)
    TORCH_CHECK(out[b] >= 0 && out[b] < tgt_vocab, "token: expected ids in [0, ", tgt_vocab,
                ") (the rows of emb_proj), got ", out[b], " at position ", b);
  return out;
}

}  // namespace cpu
}  // namespace seq2seq_ext
