// Helpers shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <list>
#include <memory>
#include <vector>

namespace seq2seq_ext {
namespace cpu {

// Asks the kernel to back a freshly allocated, not yet written buffer with transparent huge
// pages (its 2 MiB-aligned interior; buffers of 4 MiB and more). A large buffer written once per
// call otherwise pays a page fault per 4 KiB page on first touch: for the loss gradient more than
// computing it, and a quarter of a 12-step LSTM layer's forward at hidden 512 (its saved
// activations, 38 MB, are fresh memory at every call). Advice only: without THP nothing changes.
inline void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 2 * kHuge) return;
  const auto base = reinterpret_cast<uintptr_t>(data);
  const uintptr_t start = (base + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (base + bytes) & ~(kHuge - 1);
  if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

inline void advise_huge_pages(const at::Tensor& t) {
  advise_huge_pages(t.storage().mutable_data(), t.storage().nbytes());
}

// at::empty for a kernel's large output or buffer, written once: on huge pages on the CPU.
inline at::Tensor empty_written_once(at::IntArrayRef shape, const at::TensorOptions& opts) {
  at::Tensor t = at::empty(shape, opts);
  if (t.is_cpu()) advise_huge_pages(t);
  return t;
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

// Contiguous versions of a kernel's inputs: the tensor itself when it already is contiguous
// (nn.GRU's parameters are), else a copy made once per call and kept alive here (a list: the
// references it hands out stay valid as it grows).
struct Contig {
  std::list<at::Tensor> keep;
  const at::Tensor& operator()(const at::Tensor& t) {
    if (t.is_contiguous()) return t;
    keep.push_back(t.contiguous());
    return keep.back();
  }
};

// A kernel's scratch buffer whose every element is written before it is read: unlike
// std::vector's, resize() leaves new elements unset (no memset of megabytes that the next pass
// overwrites anyway) and keeps the storage when shrinking.
template <typename T>
class Scratch {
 public:
  void resize(size_t n) {
    if (n > capacity_) {
      data_.reset(new T[n]);
      capacity_ = n;
      advise_huge_pages(data_.get(), n * sizeof(T));
    }
  }
  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  T& operator[](size_t i) { return data_[i]; }

 private:
  std::unique_ptr<T[]> data_;
  size_t capacity_ = 0;
};

// out[n] += the sum over the M rows of A (M, N), row stride lda: a bias gradient, added one
// step's rows at a time while the backward has them in cache. Each column's rows are summed in
// order, then added to out (over a sequence: a sum per step, then a sum of the steps).
template <typename T>
void add_column_sums(const T* A, int64_t lda, int64_t M, int64_t N, T* out) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  auto sum_columns = [&](int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + 4 * W <= n1; n += 4 * W) {  // four columns of lanes: four chains of adds
      Vec s0(T(0)), s1(T(0)), s2(T(0)), s3(T(0));
      for (int64_t m = 0; m < M; ++m) {
        const T* a = A + m * lda + n;
        s0 += Vec::loadu(a);
        s1 += Vec::loadu(a + W);
        s2 += Vec::loadu(a + 2 * W);
        s3 += Vec::loadu(a + 3 * W);
      }
      (Vec::loadu(out + n) + s0).store(out + n);
      (Vec::loadu(out + n + W) + s1).store(out + n + W);
      (Vec::loadu(out + n + 2 * W) + s2).store(out + n + 2 * W);
      (Vec::loadu(out + n + 3 * W) + s3).store(out + n + 3 * W);
    }
    for (; n + W <= n1; n += W) {
      Vec s0(T(0));
      for (int64_t m = 0; m < M; ++m) s0 += Vec::loadu(A + m * lda + n);
      (Vec::loadu(out + n) + s0).store(out + n);
    }
    for (; n < n1; ++n) {
      T s = 0;
      for (int64_t m = 0; m < M; ++m) s += A[m * lda + n];
      out[n] += s;
    }
  };
  // one row, or one small step's rows (the recurrent backward's calls): no parallel region
  constexpr int64_t kSmall = 65536;
  if (M * N <= kSmall) return sum_columns(0, N);
  at::parallel_for(0, N, std::max<int64_t>(4 * W, kSmall / std::max<int64_t>(M, 1)),
                   sum_columns);
}

}  // namespace cpu
}  // namespace seq2seq_ext
