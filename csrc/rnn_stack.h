// rnn_stack's device-independent pieces, shared by its CPU entry (csrc/rnn_stack.cpp, kernels in
// csrc/cpu/rnn_stack.h) and its CUDA entry (csrc/cuda/rnn_stack.cu): the sizes of one call and
// the argument checks that every device runs before it allocates anything, and the helpers both
// entries read their operands through.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace seq2seq_ext {

// The pieces of one stack call: L layers of hidden size H over T steps of B rows.
struct StackDims {
  int64_t layers, steps, batch, input, hidden;
  bool bias;
  // The packed layout (PackedSequence's), when is_packed: step t runs the first batch_sizes[t]
  // rows of the batch (non-increasing), and the per-row tensors (input, output, dropout_mask,
  // saved) hold the steps' rows one after the other. batch_sizes points into the op's argument.
  c10::IntArrayRef batch_sizes = {};
  bool is_packed = false;
  // the first row of each step among the rows of all steps, and their number (T + 1 entries)
  std::vector<int64_t> offsets() const {
    std::vector<int64_t> o(steps + 1, 0);
    for (int64_t t = 0; t < steps; ++t) o[t + 1] = o[t] + (is_packed ? batch_sizes[t] : batch);
    return o;
  }
};

// weights[k] of layer `layer`: [w_ih, w_hh(, b_ih, b_hh)] per layer (k = 0 to 3).
inline const at::Tensor& stack_weight(at::TensorList w, const StackDims& d, int64_t layer,
                                      int k) {
  return w[(d.bias ? 4 : 2) * layer + k];
}

// The entries' operands, contiguous (a tensor that already is, as nn.GRU's parameters are, is
// itself); c0 and mask undefined when absent.
struct StackOperands {
  at::Tensor input, h0, c0, mask;
  std::vector<at::Tensor> weights;
};

inline StackOperands contiguous_operands(const at::Tensor& input, const at::Tensor& h0,
                                         const std::optional<at::Tensor>& c0,
                                         at::TensorList weights,
                                         const std::optional<at::Tensor>& mask) {
  auto optional = [](const std::optional<at::Tensor>& t) {
    return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
  };
  StackOperands o{input.contiguous(), h0.contiguous(), optional(c0), optional(mask), {}};
  o.weights.reserve(weights.size());
  for (const auto& w : weights) o.weights.push_back(w.contiguous());
  return o;
}

// true for "lstm", false for "gru"; any other name fails with a message naming `cell`.
bool is_lstm(c10::string_view cell);

// Checks every argument of rnn_stack (and the shared ones of its backward) before anything is
// allocated. weights: nn.GRU's / nn.LSTM's flat weights, [w_ih, w_hh, b_ih, b_hh] per layer, or
// [w_ih, w_hh] per layer without biases. Defined in csrc/rnn_stack.cpp.
StackDims check_rnn_stack_args(bool lstm, const at::Tensor& input, const at::Tensor& h0,
                               const std::optional<at::Tensor>& c0, at::TensorList weights,
                               const std::optional<at::Tensor>& mask,
                               at::OptionalIntArrayRef batch_sizes = std::nullopt);

// rnn_stack's signature, for typed calls through the dispatcher.
using StackSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    c10::string_view, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    at::TensorList, const std::optional<at::Tensor>&, at::OptionalIntArrayRef);

// The shape of a per-row tensor: {lead..., T, B, width}, or {lead..., N, width} packed.
std::vector<int64_t> stack_rows_shape(const StackDims& d, std::vector<int64_t> lead,
                                      int64_t width);

// rnn_stack's backward under create_graph=True (a double backward ahead): the first-order
// gradients as a graph that autograd can differentiate again. The kernels' backward is not
// differentiable, so the package's Python side supplies this (seq2seq_ext/ops.py): it
// recomputes the layers from the saved inputs in differentiable ATen ops and differentiates
// them with create_graph. Arguments: cell, the incoming gradients (grad_output, grad_hn, grad_cn;
// undefined where none came), input, h0, c0 (undefined for the GRU), the weights, the dropout
// mask (undefined when none) and batch_sizes; returns the gradients of input, h0, c0 and each
// weight, undefined where there is none.
using StackGraphBackward = std::function<std::vector<at::Tensor>(
    const std::string& cell, const std::vector<at::Tensor>& grads, const at::Tensor& input,
    const at::Tensor& h0, const at::Tensor& c0, const std::vector<at::Tensor>& weights,
    const at::Tensor& mask, const std::optional<std::vector<int64_t>>& batch_sizes)>;
void set_stack_graph_backward(StackGraphBackward fn);

}  // namespace seq2seq_ext
