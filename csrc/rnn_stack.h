// rnn_stack's device-independent pieces, shared by its CPU entry (csrc/rnn_stack.cpp, kernels in
// csrc/cpu/rnn_stack.h) and its CUDA entry (csrc/cuda/rnn_stack.cu): the sizes of one call and
// the argument checks that every device runs before it allocates anything.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>

namespace seq2seq_ext {

// The pieces of one stack call: L layers of hidden size H over T steps of B rows.
struct StackDims {
  int64_t layers, steps, batch, input, hidden;
  bool bias;
};

// true for "lstm", false for "gru"; any other name fails with a message naming `cell`.
bool is_lstm(c10::string_view cell);

// Checks every argument of rnn_stack (and the shared ones of its backward) before anything is
// allocated. weights: nn.GRU's / nn.LSTM's flat weights, [w_ih, w_hh, b_ih, b_hh] per layer, or
// [w_ih, w_hh] per layer without biases. Defined in csrc/rnn_stack.cpp.
StackDims check_rnn_stack_args(bool lstm, const at::Tensor& input, const at::Tensor& h0,
                               const std::optional<at::Tensor>& c0, at::TensorList weights,
                               const std::optional<at::Tensor>& mask);

}  // namespace seq2seq_ext
