// CPU kernels that are also called directly (not only through the dispatcher).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace seq2seq_ext {

// The CPU kernel of seq2seq_ext::gru_decode_step (see csrc/ops.cpp for the contract).
std::tuple<at::Tensor, at::Tensor> gru_decode_step_cpu(
    const at::Tensor& token, const at::Tensor& state, const at::Tensor& emb_proj,
    const std::optional<at::Tensor>& ctx_proj, at::TensorList weights,
    const at::Tensor& dense_weight, const at::Tensor& dense_bias);

// The CPU kernel of seq2seq_ext::lstm_decode_step (see csrc/ops.cpp for the contract).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_decode_step_cpu(
    const at::Tensor& token, const at::Tensor& h, const at::Tensor& c, const at::Tensor& emb_proj,
    const std::optional<at::Tensor>& ctx_proj, at::TensorList weights,
    const at::Tensor& dense_weight, const at::Tensor& dense_bias);

// The CPU kernel of seq2seq_ext::gru_layer (see csrc/ops.cpp for the contract).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_layer_cpu(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const at::Tensor& b_ih, const at::Tensor& b_hh, const std::optional<at::Tensor>& extra);

// A decoder's weights bound once for repeated decode steps. It keeps references to the
// parameters themselves (so in-place updates and `.data` swaps are seen) and rebuilds the
// embedding projection table emb_proj = embedding @ W_ih0[:, :E]^T + b_ih0 when the version
// counter or storage of one of its three inputs changes. step() runs the CPU kernel directly.
// Nothing in it is specific to the GRU but step(): the table and the bound weights serve an
// nn.LSTM decoder as well (its flat weights have the same four tensors per layer).
class DecoderStepper {
 public:
  DecoderStepper(at::Tensor embedding, std::vector<at::Tensor> weights, at::Tensor dense_weight,
                 at::Tensor dense_bias);
  // The table for the current weights (any device).
  const at::Tensor& emb_proj();
  // One decode step with the reference's context rule, on CPU tensors.
  std::tuple<at::Tensor, at::Tensor> step(const at::Tensor& token, const at::Tensor& state);
  // The bound weights, as the decode ops take them.
  const std::vector<at::Tensor>& weights() const { return weights_; }
  const at::Tensor& dense_weight() const { return dense_weight_; }
  const at::Tensor& dense_bias() const { return dense_bias_; }

 private:
  at::Tensor embedding_, dense_weight_, dense_bias_, emb_proj_;
  std::vector<at::Tensor> weights_;
  int64_t key_[6] = {-1, -1, -1, -1, -1, -1};
};

}  // namespace seq2seq_ext
