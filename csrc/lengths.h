// The sequence-length rule of the masked ops, defined once: position t of sequence b is kept
// when t < valid_len[b] (the reference compares a float arange with valid_len), so the first
// masked step is ceil(valid_len[b]) clamped to [0, steps], NaN and non-positive lengths masking
// every step. The forms below (one length on the host or the device, a host vector, a tensor on
// any device) all apply first_masked_step_of.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace seq2seq_ext {

// The rule for one length, computed in float64 (host and device code).
C10_HOST_DEVICE inline int64_t first_masked_step_of(double v, int64_t steps) {
  if (!(v > 0)) return 0;  // also NaN
  const double c = ::ceil(v);
  return c >= static_cast<double>(steps) ? steps : static_cast<int64_t>(c);
}

// Every sequence's first masked step, read from a CPU valid_len of any real dtype.
inline std::vector<int64_t> first_masked_steps(const at::Tensor& valid_len, int64_t steps) {
  auto vl = valid_len.contiguous();
  switch (vl.scalar_type()) {  // the unsigned dtypes beyond uint8 have few kernels: read as float64
    case at::kUInt16:
    case at::kUInt32:
    case at::kUInt64: vl = vl.to(at::kDouble); break;
    default: break;
  }
  std::vector<int64_t> out(vl.numel());
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, vl.scalar_type(),
                             "first_masked_step", [&] {
    const scalar_t* p = vl.const_data_ptr<scalar_t>();
    for (size_t i = 0; i < out.size(); ++i)
      out[i] = first_masked_step_of(static_cast<double>(p[i]), steps);
  });
  return out;
}

// The same rule as an int64 tensor (B,) on valid_len's device, written with ATen ops (no host
// synchronisation; for layouts the CUDA kernels, which apply the rule in place, do not handle).
inline at::Tensor first_masked_steps_tensor(const at::Tensor& valid_len, int64_t steps) {
  const at::Tensor v = valid_len.to(at::kDouble);
  const at::Tensor c = at::ceil(v).clamp_max_(static_cast<double>(steps));
  return at::where(v.gt(0), c, at::zeros_like(c)).to(at::kLong).contiguous();
}

}  // namespace seq2seq_ext
