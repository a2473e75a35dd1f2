// What the decode ops (gru_decode_step, lstm_decode_step, greedy_decode) and the bound
// DecoderStepper share, device independent: the decoder's sizes, the checks of a decoder's
// arguments for any cell, the token and logits of one step, and the Autograd-key kernel of an
// inference-only op.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

#include "checks.h"

namespace seq2seq_ext {

// Sizes of a decoder described by the decode ops' arguments.
struct DecoderDims {
  int64_t layers, batch, hidden, tgt_vocab, vocab, in0;
};

// Checks the arguments of a decode step for any gated cell (device independent): `gates` is 3
// for nn.GRU (r, z, n) and 4 for nn.LSTM (i, f, g, o); `state_name` is how the (L, B, H) state
// argument is called in the op's schema. weights = the flat weights [w_ih, w_hh, b_ih, b_hh] of
// each layer; emb_proj (tgt_vocab, gates*H); ctx_proj (B, gates*H) when given; dense (V, H), (V,).
inline DecoderDims check_decoder_args(const at::Tensor& state, const char* state_name,
                                           int64_t gates, const at::Tensor& emb_proj,
                                           const std::optional<at::Tensor>& ctx_proj,
                                           at::TensorList weights, const at::Tensor& dense_weight,
                                           const at::Tensor& dense_bias) {
  check_dim(state, 3, state_name);
  check_floating(state, state_name);
  TORCH_CHECK(state.scalar_type() == at::kFloat || state.scalar_type() == at::kDouble,
              state_name, ": expected float32 or float64, got ", state.scalar_type());
  DecoderDims d{state.size(0), state.size(1), state.size(2), 0, 0, 0};
  const int64_t H = d.hidden, G = gates * H;
  const char* gates_what = gates == 4 ? "4 * hidden" : "3 * hidden";
  TORCH_CHECK(d.layers >= 1, state_name, ": expected at least one layer, got shape ",
              shape_str(state));
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 4 * d.layers, "weights: expected ",
              4 * d.layers, " tensors (w_ih, w_hh, b_ih, b_hh for each of the ", d.layers,
              " layers of ", state_name, "), got ", weights.size());
  const char* names[4] = {"weights (w_ih)", "weights (w_hh)", "weights (b_ih)", "weights (b_hh)"};
  for (int64_t l = 0; l < d.layers; ++l) {
    for (int k = 0; k < 4; ++k) {
      const at::Tensor& w = weights[4 * l + k];
      check_defined(w, names[k]);
      check_same_device(w, state, names[k], state_name);
      check_same_dtype(w, state, names[k], state_name);
      if (k >= 2) {
        check_dim(w, 1, names[k]);
        check_size(w, 0, G, names[k], gates_what);
      } else {
        check_dim(w, 2, names[k]);
        check_size(w, 0, G, names[k], gates_what);
        if (k == 1 || l > 0) check_size(w, 1, H, names[k], "hidden");
      }
    }
  }
  d.in0 = weights[0].size(1);
  TORCH_CHECK(d.in0 >= H, "weights (w_ih of layer 0): expected at least ", H,
              " input columns (the last hidden-size columns multiply the context), got ", d.in0);
  check_dim(emb_proj, 2, "emb_proj");
  check_same_device(emb_proj, state, "emb_proj", state_name);
  check_same_dtype(emb_proj, state, "emb_proj", state_name);
  check_size(emb_proj, 1, G, "emb_proj", gates_what);
  d.tgt_vocab = emb_proj.size(0);
  if (ctx_proj.has_value() && ctx_proj->defined()) {
    const std::string batch_of = std::string("the batch size of ") + state_name;
    check_dim(*ctx_proj, 2, "ctx_proj");
    check_same_device(*ctx_proj, state, "ctx_proj", state_name);
    check_same_dtype(*ctx_proj, state, "ctx_proj", state_name);
    check_size(*ctx_proj, 0, d.batch, "ctx_proj", batch_of.c_str());
    check_size(*ctx_proj, 1, G, "ctx_proj", gates_what);
  }
  check_dim(dense_weight, 2, "dense_weight");
  check_same_device(dense_weight, state, "dense_weight", state_name);
  check_same_dtype(dense_weight, state, "dense_weight", state_name);
  check_size(dense_weight, 1, H, "dense_weight", "hidden");
  d.vocab = dense_weight.size(0);
  check_dim(dense_bias, 1, "dense_bias");
  check_same_device(dense_bias, state, "dense_bias", state_name);
  check_same_dtype(dense_bias, state, "dense_bias", state_name);
  check_size(dense_bias, 0, d.vocab, "dense_bias", "the output size of dense_weight");
  return d;
}

// token of a decode step: (B,) or (B, 1) ids on the device of the state.
inline void check_decode_token(const at::Tensor& token, const at::Tensor& state, int64_t batch,
                               const char* state_name = "state") {
  check_defined(token, "token");
  TORCH_CHECK(token.dim() == 1 || (token.dim() == 2 && token.size(1) == 1),
              "token: expected shape [", batch, "] or [", batch, ", 1], got ", shape_str(token));
  check_index_dtype(token, "token");
  check_same_device(token, state, "token", state_name);
  const std::string batch_of = std::string("the batch size of ") + state_name;
  check_size(token, 0, batch, "token", batch_of.c_str());
}

// logits of a decode step: (B, V) for a (B,) token, (B, 1, V) for a (B, 1) token (the shape
// of Seq2SeqDecoder's output for one step).
inline std::vector<int64_t> decode_logits_shape(const at::Tensor& token, int64_t vocab) {
  std::vector<int64_t> shape(token.sizes().begin(), token.sizes().end());
  shape.push_back(vocab);
  return shape;
}

// The Autograd-key kernel of an inference-only op (the decode ops have no derivative; models
// take the differentiable path when gradients are needed). Without a kernel at the Autograd key,
// calls whose inputs are parameters (requires_grad=True) would go through PyTorch's generic
// "autograd not implemented" fallback, which costs more than a whole decode step at the
// chapter's sizes. This kernel steps below autograd and redispatches to the op `Name`, whose
// schema has the signature Sig; its outputs never require grad.
template <typename Sig>
struct InferenceOnly;

template <typename R, typename... Args>
struct InferenceOnly<R(Args...)> {
  template <const char* Name>
  static R autograd(Args... args) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow(Name, "").template typed<R(Args...)>();
    c10::impl::ExcludeDispatchKeyGuard no_autograd(
        c10::autograd_dispatch_keyset_with_ADInplaceOrView);
    return op.call(std::forward<Args>(args)...);
  }
};

}  // namespace seq2seq_ext

// Registers InferenceOnly's Autograd-key kernel for the op whose entry is the function `op`
// (in namespace seq2seq_ext).
#define SEQ2SEQ_EXT_INFERENCE_ONLY(op)                                                 \
  constexpr char kInferenceOnlyName_##op[] = "seq2seq_ext::" #op;                      \
  TORCH_LIBRARY_IMPL(seq2seq_ext, Autograd, m) {                                       \
    m.impl(#op, &::seq2seq_ext::InferenceOnly<decltype(op)>::autograd<kInferenceOnlyName_##op>); \
  }
