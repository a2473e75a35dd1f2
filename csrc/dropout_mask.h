// The drop-in layers' inter-layer dropout masks (see dropout_mask.cpp).
#pragma once

#include <ATen/ATen.h>

namespace seq2seq_ext {

// A dropout mask of `shape`: each element 1 / (1 - p) with probability 1 - p, else 0, for
// 0 < p < 1, in options' dtype (floating) and device. Drawn from the default generator of that
// device: the same seed gives the same mask.
at::Tensor dropout_keep_mask(at::IntArrayRef shape, double p, const at::TensorOptions& options);

}  // namespace seq2seq_ext
