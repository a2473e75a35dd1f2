// Shared argument checks for every seq2seq_ext op.
//
// One TORCH_CHECK per rule; each message names the argument, what was expected and what came.
// Every op validates all of its arguments before it allocates or writes anything, so a call
// that fails leaves its inputs untouched.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/TensorUtils.h>

#include <string>

namespace seq2seq_ext {

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + "]";
}

inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got an undefined tensor");
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  check_defined(t, name);
  TORCH_CHECK(t.dim() == dim, name, ": expected a ", dim, "-D tensor, got ", t.dim(),
              "-D with shape ", shape_str(t));
}

inline void check_min_dim(const at::Tensor& t, int64_t dim, const char* name) {
  check_defined(t, name);
  TORCH_CHECK(t.dim() >= dim, name, ": expected at least ", dim, " dimensions, got ", t.dim(),
              "-D with shape ", shape_str(t));
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t size, const char* name,
                       const char* what) {
  TORCH_CHECK(t.size(dim) == size, name, ": expected size ", size, " at dimension ", dim, " (",
              what, "), got ", t.size(dim), " (shape ", shape_str(t), ")");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected a tensor on ", ref.device(),
              " (the device of ", ref_name, "), got one on ", t.device());
}

inline void check_index_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, name,
              ": expected an int64 or int32 tensor of indices, got ", t.scalar_type());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name,
              ": expected a floating-point tensor, got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(),
              " (the dtype of ", ref_name, "), got ", t.scalar_type());
}

// valid_len may be any real dtype the reference accepts (it is compared with a float arange).
inline void check_valid_len(const at::Tensor& valid_len, int64_t batch, const at::Tensor& ref,
                            const char* ref_name) {
  check_dim(valid_len, 1, "valid_len");
  TORCH_CHECK(!at::isComplexType(valid_len.scalar_type()),
              "valid_len: expected a real (integer, bool or floating) tensor, got ",
              valid_len.scalar_type());
  TORCH_CHECK(valid_len.size(0) == batch, "valid_len: expected one length per sequence (",
              batch, ", the batch size of ", ref_name, "), got ", valid_len.size(0));
  check_same_device(valid_len, ref, "valid_len", ref_name);
}

}  // namespace seq2seq_ext

namespace seq2seq_ext {

// Sizes of a decoder described by the decode ops' arguments.
struct DecoderDims {
  int64_t layers, batch, hidden, tgt_vocab, vocab, in0;
};

// Checks the arguments of a decode step for any gated cell (device independent): `gates` is 3
// for nn.GRU (r, z, n) and 4 for nn.LSTM (i, f, g, o); `state_name` is how the (L, B, H) state
// argument is called in the op's schema. weights = the flat weights [w_ih, w_hh, b_ih, b_hh] of
// each layer; emb_proj (tgt_vocab, gates*H); ctx_proj (B, gates*H) when given; dense (V, H), (V,).
inline DecoderDims check_cell_decoder_args(const at::Tensor& state, const char* state_name,
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

// Checks the arguments shared by gru_decode_step and greedy_decode (device independent).
inline DecoderDims check_decoder_args(const at::Tensor& state, const at::Tensor& emb_proj,
                                      const std::optional<at::Tensor>& ctx_proj,
                                      at::TensorList weights, const at::Tensor& dense_weight,
                                      const at::Tensor& dense_bias) {
  return check_cell_decoder_args(state, "state", 3, emb_proj, ctx_proj, weights, dense_weight,
                                 dense_bias);
}

// Checks the arguments of lstm_decode_step except the token (device independent): h and c are
// the LSTM's (L, B, H) hidden and cell states, of the same shape, dtype and device.
inline DecoderDims check_lstm_decoder_args(const at::Tensor& h, const at::Tensor& c,
                                           const at::Tensor& emb_proj,
                                           const std::optional<at::Tensor>& ctx_proj,
                                           at::TensorList weights, const at::Tensor& dense_weight,
                                           const at::Tensor& dense_bias) {
  const DecoderDims d =
      check_cell_decoder_args(h, "h", 4, emb_proj, ctx_proj, weights, dense_weight, dense_bias);
  check_dim(c, 3, "c");
  check_same_device(c, h, "c", "h");
  check_same_dtype(c, h, "c", "h");
  TORCH_CHECK(c.sizes() == h.sizes(), "c: expected shape ", shape_str(h),
              " (the shape of h), got ", shape_str(c));
  return d;
}

}  // namespace seq2seq_ext

#include <ATen/OpMathType.h>

#include <vector>

namespace seq2seq_ext {

// Device-agnostic helpers, written with ATen ops so that they run where their tensors live.

// Arguments of masked_softmax_ce (and the shared part of its backward).
inline void check_masked_ce_args(const at::Tensor& pred, const at::Tensor& label,
                                 const at::Tensor& valid_len) {
  check_dim(pred, 3, "pred");
  check_floating(pred, "pred");
  check_dim(label, 2, "label");
  check_index_dtype(label, "label");
  check_same_device(label, pred, "label", "pred");
  TORCH_CHECK(label.size(0) == pred.size(0) && label.size(1) == pred.size(1),
              "label: expected shape [", pred.size(0), ", ", pred.size(1),
              "] (the batch and steps of pred), got ", shape_str(label));
  check_valid_len(valid_len, pred.size(0), pred, "pred");
}

// The arguments masked_softmax_ce_backward adds to the forward's.
inline void check_masked_ce_backward_args(const at::Tensor& grad_loss, const at::Tensor& pred,
                                          const at::Tensor& lse) {
  const int64_t B = pred.size(0), T = pred.size(1);
  check_dim(grad_loss, 1, "grad_loss");
  check_size(grad_loss, 0, B, "grad_loss", "the batch size of pred");
  check_same_device(grad_loss, pred, "grad_loss", "pred");
  check_dim(lse, 2, "lse");
  TORCH_CHECK(lse.size(0) == B && lse.size(1) == T, "lse: expected shape [", B, ", ", T,
              "], got ", shape_str(lse));
  TORCH_CHECK(lse.scalar_type() == at::toOpMathType(pred.scalar_type()),
              "lse: expected dtype ", at::toOpMathType(pred.scalar_type()), ", got ",
              lse.scalar_type());
  check_same_device(lse, pred, "lse", "pred");
}

// Arguments of sequence_mask and sequence_mask_.
inline void check_sequence_mask_args(const at::Tensor& X, const at::Tensor& valid_len) {
  check_min_dim(X, 2, "X");
  check_valid_len(valid_len, X.size(0), X, "X");
}

// For each sequence, the first masked step as an int64 tensor of shape (B,) on valid_len's
// device: ceil(valid_len) clamped to [0, steps]; NaN and non-positive lengths give 0. The same
// rule as cpu::first_masked_step, computed in float64 as that function does (the CUDA kernels
// compute it in place: device_index.cuh; this tensor form serves layouts they do not handle).
inline at::Tensor first_masked_step_tensor(const at::Tensor& valid_len, int64_t steps) {
  const at::Tensor v = valid_len.to(at::kDouble);
  const at::Tensor c = at::ceil(v).clamp_max_(static_cast<double>(steps));
  return at::where(v.gt(0), c, at::zeros_like(c)).to(at::kLong).contiguous();
}

// token of gru_decode_step: (B,) or (B, 1) ids on the device of state.
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

// logits of gru_decode_step: (B, V) for a (B,) token, (B, 1, V) for a (B, 1) token (the shape
// of Seq2SeqDecoder's output for one step).
inline std::vector<int64_t> decode_logits_shape(const at::Tensor& token, int64_t vocab) {
  std::vector<int64_t> shape(token.sizes().begin(), token.sizes().end());
  shape.push_back(vocab);
  return shape;
}

// X of the in-place sequence mask must not have elements sharing memory (an expanded tensor).
inline void check_mask_writable(const at::Tensor& X) {
  TORCH_CHECK(at::has_internal_overlap(X) != at::MemOverlap::Yes,
              "X: the in-place sequence mask cannot write into a tensor whose elements share "
              "memory (for instance an expanded tensor); clone it first or use the out-of-place op");
}

// The fill value converted as the reference's `X[~mask] = value` does: floating dtypes round
// (and saturate to +-inf), other dtypes must represent it exactly in range.
template <typename scalar_t>
inline scalar_t mask_value(const at::Scalar& value, at::ScalarType dtype) {
  if constexpr (std::is_floating_point_v<scalar_t> || std::is_same_v<scalar_t, at::Half> ||
                std::is_same_v<scalar_t, at::BFloat16>) {
    if (!value.isComplex()) {
      if constexpr (std::is_same_v<scalar_t, double>) return value.toDouble();
      return static_cast<scalar_t>(static_cast<float>(value.toDouble()));
    }
  }
  try {
    return value.to<scalar_t>();
  } catch (const c10::Error&) {
    TORCH_CHECK(false, "value: ", value, " cannot be converted to the dtype of X (", dtype,
                ") without overflow");
  }
}

// The reference converts the value even when nothing is masked (an empty X included): a value
// X's dtype cannot hold is an error whatever the lengths.
inline void check_mask_value(const at::Tensor& X, const at::Scalar& value) {
  AT_DISPATCH_ALL_TYPES_AND_COMPLEX_AND3(at::kBool, at::kHalf, at::kBFloat16, X.scalar_type(),
                                         "sequence_mask_value", [&] {
    (void)mask_value<scalar_t>(value, X.scalar_type());
  });
}

struct GruLayerDims {
  int64_t steps, batch, input, hidden;
};

// Checks the arguments of gru_layer (device independent).
inline GruLayerDims check_gru_layer_args(const at::Tensor& input, const at::Tensor& h0,
                                         const at::Tensor& w_ih, const at::Tensor& w_hh,
                                         const at::Tensor& b_ih, const at::Tensor& b_hh,
                                         const std::optional<at::Tensor>& extra) {
  check_dim(input, 3, "input");
  check_floating(input, "input");
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "input: expected float32 or float64, got ", input.scalar_type());
  check_dim(w_hh, 2, "w_hh");
  GruLayerDims d{input.size(0), input.size(1), input.size(2), w_hh.size(1)};
  const int64_t H = d.hidden, G = 3 * H;
  check_same_device(w_hh, input, "w_hh", "input");
  check_same_dtype(w_hh, input, "w_hh", "input");
  check_size(w_hh, 0, G, "w_hh", "3 * hidden, hidden being w_hh's second size");
  check_dim(w_ih, 2, "w_ih");
  check_same_device(w_ih, input, "w_ih", "input");
  check_same_dtype(w_ih, input, "w_ih", "input");
  check_size(w_ih, 0, G, "w_ih", "3 * hidden");
  check_size(w_ih, 1, d.input, "w_ih", "the feature size of input");
  const at::Tensor* biases[2] = {&b_ih, &b_hh};
  const char* bnames[2] = {"b_ih", "b_hh"};
  for (int k = 0; k < 2; ++k) {
    check_dim(*biases[k], 1, bnames[k]);
    check_same_device(*biases[k], input, bnames[k], "input");
    check_same_dtype(*biases[k], input, bnames[k], "input");
    check_size(*biases[k], 0, G, bnames[k], "3 * hidden");
  }
  check_dim(h0, 2, "h0");
  check_same_device(h0, input, "h0", "input");
  check_same_dtype(h0, input, "h0", "input");
  TORCH_CHECK(h0.size(0) == d.batch && h0.size(1) == H, "h0: expected shape [", d.batch, ", ", H,
              "] (batch of input, hidden of w_hh), got ", shape_str(h0));
  if (extra.has_value() && extra->defined()) {
    check_dim(*extra, 2, "extra");
    check_same_device(*extra, input, "extra", "input");
    check_same_dtype(*extra, input, "extra", "input");
    TORCH_CHECK(extra->size(0) == d.batch && extra->size(1) == G, "extra: expected shape [",
                d.batch, ", ", G, "] (batch, 3 * hidden), got ", shape_str(*extra));
  }
  return d;
}

}  // namespace seq2seq_ext

namespace seq2seq_ext {

// The tensors gru_layer_backward takes besides the forward's arguments (device independent):
// grad_output and output (T, B, H), saved (T, B, 4H) and grad_hn (B, H) when given, all on the
// device of input; output and saved in input's dtype (grad_output and grad_hn may be of another
// dtype: they are converted, as the CPU kernel's in-place add converts grad_output). The two
// shape rules the CPU kernel checks come first, with its messages; the rest guards a device
// kernel against reading through pointers of the wrong size, device or type.
inline void check_gru_layer_backward_tensors(const at::Tensor& grad_output,
                                             const std::optional<at::Tensor>& grad_hn,
                                             const at::Tensor& input, const at::Tensor& output,
                                             const at::Tensor& saved, const GruLayerDims& d) {
  const int64_t T = d.steps, B = d.batch, H = d.hidden;
  check_defined(grad_output, "grad_output");
  check_defined(output, "output");
  check_defined(saved, "saved");
  TORCH_CHECK(grad_output.sizes() == output.sizes(), "grad_output: expected shape ",
              shape_str(output), ", got ", shape_str(grad_output));
  TORCH_CHECK(saved.dim() == 3 && saved.size(0) == T && saved.size(1) == B &&
                  saved.size(2) == 4 * H,
              "saved: expected shape [", T, ", ", B, ", ", 4 * H, "], got ", shape_str(saved));
  TORCH_CHECK(output.dim() == 3 && output.size(0) == T && output.size(1) == B &&
                  output.size(2) == H,
              "output: expected shape [", T, ", ", B, ", ", H,
              "] (steps and batch of input, hidden of w_hh), got ", shape_str(output));
  check_same_device(output, input, "output", "input");
  check_same_dtype(output, input, "output", "input");
  check_same_device(saved, input, "saved", "input");
  check_same_dtype(saved, input, "saved", "input");
  check_same_device(grad_output, input, "grad_output", "input");
  if (grad_hn.has_value() && grad_hn->defined()) {
    TORCH_CHECK(grad_hn->dim() == 2 && grad_hn->size(0) == B && grad_hn->size(1) == H,
                "grad_hn: expected shape [", B, ", ", H, "] (the final state's), got ",
                shape_str(*grad_hn));
    check_same_device(*grad_hn, input, "grad_hn", "input");
  }
}

// The arguments greedy_decode adds to the decoder's (device independent).
inline void check_greedy_args(const DecoderDims& d, int64_t bos, int64_t num_steps) {
  TORCH_CHECK(num_steps >= 0, "num_steps: expected a non-negative number of steps, got ",
              num_steps);
  TORCH_CHECK(bos >= 0 && bos < d.tgt_vocab, "bos: expected an id in [0, ", d.tgt_vocab,
              ") (the rows of emb_proj), got ", bos);
  TORCH_CHECK(d.vocab <= d.tgt_vocab, "dense_weight: expected at most ", d.tgt_vocab,
              " outputs (predictions are fed back through emb_proj), got ", d.vocab);
  // an argmax over no logits has no answer (the reference's argmax raises)
  TORCH_CHECK(d.vocab >= 1 || d.batch == 0 || num_steps == 0,
              "dense_weight: expected at least one output to pick tokens from, got 0");
}

}  // namespace seq2seq_ext
