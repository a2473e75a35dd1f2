// The drop-in layers' forward in one call (see rnn_forward.cpp); bound in the _C module.
#pragma once

#include <ATen/ATen.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

namespace seq2seq_ext {

// nn.GRU / nn.LSTM's forward on rnn_stack: (output, h_n, c_n or None) in the module's layout,
// or None when the fused op does not apply (dtype, device, autocast, shapes nn.RNNBase would
// reject), in which case the caller runs torch.nn's own forward. torch_masks: draw the dropout
// masks as nn.GRU / nn.LSTM do (the same masks for the same seed, slower), else from uniform
// samples (the same distribution).
pybind11::object rnn_forward(const std::string& cell, const at::Tensor& input,
                             pybind11::handle hx, const std::vector<at::Tensor>& weights,
                             int64_t layers, int64_t hidden, bool batch_first, double dropout,
                             bool training, bool torch_masks);

}  // namespace seq2seq_ext
