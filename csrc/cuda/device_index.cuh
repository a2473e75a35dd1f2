// Reading lengths and indices inside CUDA kernels, and checking them there.
//
// The ops read `valid_len` and the label/token ids in the kernels that use them, so that a call
// neither launches helper kernels nor synchronises with the host (the ops can be captured in a
// CUDA graph). An id outside its range stops the kernel with a device-side assertion, as ATen's
// own index kernels (nll_loss, embedding) do: the kernel prints the CPU kernel's message (naming
// the argument, the range and the position) and the next synchronising CUDA call raises
// "device-side assert triggered". The CPU kernels raise their TORCH_CHECK errors instead.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <cstdio>

#include "../lengths.h"

namespace seq2seq_ext {

// Prints the formatted message once per failing thread, then asserts (the kernel traps).
#define SEQ2SEQ_DEVICE_CHECK(cond, ...)  \
  do {                                   \
    if (C10_UNLIKELY(!(cond))) {         \
      printf(__VA_ARGS__);               \
      CUDA_KERNEL_ASSERT(cond);          \
    }                                    \
  } while (0)

// The element types a kernel reads `valid_len` in; other dtypes are converted to float64 once on
// the host (the CPU kernel's rule computes in float64 too).
enum class LenKind : int { kLong = 0, kInt = 1, kFloat = 2, kDouble = 3 };

// A strided (B,) length vector as a kernel reads it.
struct DeviceLengths {
  const void* data;
  int64_t stride;
  LenKind kind;
};

// valid_len ready for a kernel: `keep` holds the tensor whose memory `lengths` points to (a
// float64 copy for the dtypes kernels do not read directly).
struct HostLengths {
  at::Tensor keep;
  DeviceLengths lengths;
};

inline HostLengths device_lengths(const at::Tensor& valid_len) {
  at::Tensor v = valid_len;
  LenKind kind;
  switch (v.scalar_type()) {
    case at::kLong: kind = LenKind::kLong; break;
    case at::kInt: kind = LenKind::kInt; break;
    case at::kFloat: kind = LenKind::kFloat; break;
    case at::kDouble: kind = LenKind::kDouble; break;
    default:
      v = v.to(at::kDouble);
      kind = LenKind::kDouble;
  }
  return {v, {v.const_data_ptr(), v.numel() > 0 ? v.stride(0) : 1, kind}};
}

// The first masked step of sequence b (the rule of lengths.h), read in place.
__device__ __forceinline__ int64_t first_masked_step(const DeviceLengths& len, int64_t b,
                                                     int64_t steps) {
  const int64_t i = b * len.stride;
  double v;
  switch (len.kind) {
    case LenKind::kLong: v = static_cast<double>(static_cast<const int64_t*>(len.data)[i]); break;
    case LenKind::kInt: v = static_cast<double>(static_cast<const int32_t*>(len.data)[i]); break;
    case LenKind::kFloat: v = static_cast<double>(static_cast<const float*>(len.data)[i]); break;
    default: v = static_cast<const double*>(len.data)[i]; break;
  }
  return first_masked_step_of(v, steps);
}

// A strided 2-D int64 or int32 index tensor (labels) as a kernel reads it.
struct DeviceIndex2d {
  const void* data;
  int64_t s0, s1;
  bool is_long;
};

inline DeviceIndex2d device_index_2d(const at::Tensor& idx) {
  return {idx.const_data_ptr(), idx.stride(0), idx.stride(1), idx.scalar_type() == at::kLong};
}

__device__ __forceinline__ int64_t load_index(const DeviceIndex2d& idx, int64_t i, int64_t j) {
  const int64_t off = i * idx.s0 + j * idx.s1;
  return idx.is_long ? static_cast<const int64_t*>(idx.data)[off]
                     : static_cast<int64_t>(static_cast<const int32_t*>(idx.data)[off]);
}

// label[b, t] in [0, vocab), with the CPU kernel's message.
__device__ __forceinline__ int64_t checked_label(const DeviceIndex2d& label, int64_t b, int64_t t,
                                                 int64_t vocab) {
  const int64_t y = load_index(label, b, t);
  SEQ2SEQ_DEVICE_CHECK(y >= 0 && y < vocab,
                       "label: expected class indices in [0, %lld), got %lld at position "
                       "[%lld, %lld]\n",
                       static_cast<long long>(vocab), static_cast<long long>(y),
                       static_cast<long long>(b), static_cast<long long>(t));
  return y;
}

// token[b] in [0, tgt_vocab), with the CPU kernel's message.
__device__ __forceinline__ int64_t checked_token(const int64_t* tok, int64_t b,
                                                 int64_t tgt_vocab) {
  const int64_t y = tok[b];
  SEQ2SEQ_DEVICE_CHECK(y >= 0 && y < tgt_vocab,
                       "token: expected ids in [0, %lld) (the rows of emb_proj), got %lld at "
                       "position %lld\n",
                       static_cast<long long>(tgt_vocab), static_cast<long long>(y),
                       static_cast<long long>(b));
  return y;
}

}  // namespace seq2seq_ext
