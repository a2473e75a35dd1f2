// The kernel of seq2seq_ext::sequence_mask and sequence_mask_ (contract and entry:
// csrc/sequence_mask.cpp), and the fill value's conversion that the kernels share.
#pragma once

#include <cmath>
#include <limits>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <type_traits>

namespace seq2seq_ext {

// The fill value converted as the reference's `X[~mask] = value` does: floating dtypes round
// (and saturate to +-inf), other dtypes must represent it exactly in range.
template <typename scalar_t>
inline scalar_t mask_value(const at::Scalar& value, at::ScalarType dtype) {
  if constexpr (std::is_floating_point_v<scalar_t> || std::is_same_v<scalar_t, at::Half> ||
                std::is_same_v<scalar_t, at::BFloat16>) {
    if (!value.isComplex()) {
      const double v = value.toDouble();
      if constexpr (std::is_same_v<scalar_t, double>) return v;
      // float32 refuses a finite value beyond its range, as the reference's index_put_ does;
      // half and bfloat16 saturate to +-inf there, as the reference's do (through float)
      if constexpr (std::is_same_v<scalar_t, float>)
        TORCH_CHECK(!std::isfinite(v) || std::abs(v) <= std::numeric_limits<float>::max(),
                    "value: ", value, " cannot be converted to the dtype of X (", dtype,
                    ") without overflow");
      return static_cast<scalar_t>(static_cast<float>(v));
    }
  }
  try {
    return value.to<scalar_t>();
  } catch (const c10::Error&) {
    TORCH_CHECK(false, "value: ", value, " cannot be converted to the dtype of X (", dtype,
                ") without overflow");
  }
}

// mask_value as a Scalar for ATen's fills (the rare layouts), which would otherwise refuse a
// value that X's floating dtype rounds to +-inf where the reference saturates.
inline at::Scalar mask_scalar(const at::Tensor& X, const at::Scalar& value) {
  at::Scalar out;
  AT_DISPATCH_ALL_TYPES_AND_COMPLEX_AND3(at::kBool, at::kHalf, at::kBFloat16, X.scalar_type(),
                                         "sequence_mask_value", [&] {
    out = at::Scalar(mask_value<scalar_t>(value, X.scalar_type()));
  });
  return out;
}

// Number of elements of one X[b, t] slice, when that slice is one contiguous run; -1 otherwise.
inline int64_t contiguous_inner(const at::Tensor& X) {
  int64_t expected = 1;
  for (int64_t d = X.dim() - 1; d >= 2; --d) {
    if (X.size(d) != 1 && X.stride(d) != expected) return -1;
    expected *= X.size(d);
  }
  return expected;
}

// X[b, t, ...] = value in place for t at or after valid_len[b]; the entry has checked the
// arguments (the value included) and X is not empty.
using SequenceMaskKernel = void(at::Tensor& X, const at::Tensor& valid_len,
                                const at::Scalar& value);
namespace cpu {
SequenceMaskKernel sequence_mask_;
}  // namespace cpu
namespace cuda {
SequenceMaskKernel sequence_mask_;
}  // namespace cuda

}  // namespace seq2seq_ext
