// The dropout masks PyTorch's own dropout draws, bit for bit (see torch_dropout_mask.cpp).
#pragma once

#include <ATen/ATen.h>

namespace seq2seq_ext {

// at::empty(shape, options).bernoulli_(1 - p).div_(1 - p), for 0 < p < 1: the mask that
// F.dropout and nn.GRU / nn.LSTM's inter-layer dropout draw, the same values from the same
// generator state, and the default generator left where bernoulli_ leaves it. Float32 and float64
// CPU masks come from a vectorised copy of the generator's draws; anything else, and any call
// under a Python dispatch mode, runs that very expression.
at::Tensor torch_dropout_mask(at::IntArrayRef shape, double p, const at::TensorOptions& options);

// Whether the CPU copy reproduces this PyTorch's bernoulli_ (checked once, on a private
// generator, against bernoulli_ itself); when it does not, torch_dropout_mask runs bernoulli_.
bool torch_dropout_mask_exact();

}  // namespace seq2seq_ext
