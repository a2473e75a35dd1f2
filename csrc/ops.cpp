// Every seq2seq_ext op schema, in one place, and the small `_C` Python module that reports
// how the library was built. Kernels live in cpu/*.cpp and cuda/*.cu and register themselves
// with TORCH_LIBRARY_IMPL for their dispatch key; fake (meta) kernels and autograd formulas
// are registered from Python in seq2seq_ext/ops.py.
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/kernels.h"
#include "rnn_forward.h"

TORCH_LIBRARY(seq2seq_ext, m) {
  // Masked softmax cross-entropy, as d2l's MaskedSoftmaxCELoss: pred (B, T, V) with any strides,
  // label (B, T) int64/int32, valid_len (B,). Returns the per-sequence loss (B,) (the mean over
  // all T steps, masked steps contributing 0) and the per-position log-sum-exp (B, T) in the
  // accumulation dtype, which the backward reuses.
  m.def("masked_softmax_ce(Tensor pred, Tensor label, Tensor valid_len) -> (Tensor, Tensor)");
  // Gradient of the loss above with respect to pred, in one pass over the logits.
  m.def(
      "masked_softmax_ce_backward(Tensor grad_loss, Tensor pred, Tensor label, "
      "Tensor valid_len, Tensor lse) -> Tensor");
  // Sequence mask: X[b, t, ...] = value for t >= valid_len[b]. Out of place and in place (the
  // in-place op returns nothing, so that torch.compile can functionalize it; the Python wrapper
  // returns X as the reference does).
  m.def("sequence_mask(Tensor X, Tensor valid_len, Scalar value=0) -> Tensor");
  m.def("sequence_mask_(Tensor(a!) X, Tensor valid_len, Scalar value=0) -> ()");
  // One step of Seq2SeqDecoder for all GRU layers and the output projection.
  //   token (B,) or (B, 1) ids; state (L, B, H); emb_proj (V_tgt, 3H) = embedding @ W_ih0[:, :E]^T + b_ih0;
  //   ctx_proj (B, 3H) = context @ W_ih0[:, E:]^T when the context is fixed, or None to take the
  //   context from state[-1] as the reference decoder does; weights = nn.GRU's flat weights
  //   [w_ih_l, w_hh_l, b_ih_l, b_hh_l] per layer; dense (V, H), (V,).
  // Returns the logits ((B, V), or (B, 1, V) for a (B, 1) token) and the new state (L, B, H).
  m.def(
      "gru_decode_step(Tensor token, Tensor state, Tensor emb_proj, Tensor? ctx_proj, "
      "Tensor[] weights, Tensor dense_weight, Tensor dense_bias) -> (Tensor, Tensor)");
  // One step of an LSTM Seq2SeqDecoder for all layers and the output projection (nn.LSTM's
  // equations, gate order i, f, g, o).
  //   token (B,) or (B, 1) ids; h, c (L, B, H) the hidden and cell states; emb_proj
  //   (V_tgt, 4H) = embedding @ W_ih0[:, :E]^T + b_ih0; ctx_proj (B, 4H) = context @
  //   W_ih0[:, E:]^T when the context is fixed, or None to take the context from h[-1] (the
  //   current top hidden state); weights = nn.LSTM's flat weights [w_ih_l, w_hh_l, b_ih_l,
  //   b_hh_l] per layer; dense (V, H), (V,).
  // Returns the logits ((B, V), or (B, 1, V) for a (B, 1) token) and the new h and c (L, B, H).
  m.def(
      "lstm_decode_step(Tensor token, Tensor h, Tensor c, Tensor emb_proj, Tensor? ctx_proj, "
      "Tensor[] weights, Tensor dense_weight, Tensor dense_bias) -> (Tensor, Tensor, Tensor)");
  // Greedy decoding of a batch: starts every sentence from `bos`, feeds back the argmax, and
  // stops a sentence at `eos` or after num_steps tokens. Returns the tokens (B, num_steps)
  // int64 (positions after a sentence's end hold `eos`) and the lengths (B,) int64, the number
  // of tokens before `eos`.
  m.def(
      "greedy_decode(Tensor state, Tensor emb_proj, Tensor? ctx_proj, Tensor[] weights, "
      "Tensor dense_weight, Tensor dense_bias, int bos, int eos, int num_steps) "
      "-> (Tensor, Tensor)");
  // One GRU layer over a whole sequence, nn.GRU's equations and gate order (r, z, n; b_hn inside
  // the reset product). input (T, B, I), h0 (B, H), w_ih (3H, I), w_hh (3H, H), b_ih, b_hh (3H);
  // extra (B, 3H), when given, is added to the input projection at every step (the decoder's
  // constant context: its share of W_ih x is computed once per sequence). Returns the output
  // (T, B, H), the final state (B, H) and the activations the backward needs (T, B, 4H:
  // r, z, n and W_hn h + b_hn).
  m.def(
      "gru_layer(Tensor input, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor b_ih, Tensor b_hh, "
      "Tensor? extra) -> (Tensor, Tensor, Tensor)");
  // Gradients of gru_layer: (input, h0, w_ih, w_hh, b_ih, b_hh, extra); grad_extra is empty
  // unless has_extra.
  m.def(
      "gru_layer_backward(Tensor grad_output, Tensor? grad_hn, Tensor input, Tensor h0, "
      "Tensor w_ih, Tensor w_hh, Tensor output, Tensor saved, bool has_extra) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace {

bool built_with_cuda() {
#ifdef SEQ2SEQ_EXT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "seq2seq_ext compiled library: registers torch.ops.seq2seq_ext.*";
  module.def("built_with_cuda", &built_with_cuda,
             "True when the CUDA kernels were compiled into this library.");
  // A decoder's weights bound for repeated decode steps (see cpu/kernels.h). Its step() runs
  // the CPU kernel of seq2seq_ext::gru_decode_step without the boxed dispatcher call, whose
  // argument handling for a dozen tensors costs more than the step itself at the chapter's
  // sizes. seq2seq_ext uses it only for plain CPU tensors in inference with no tracing or
  // dispatch mode in force; everything else goes through torch.ops.seq2seq_ext.gru_decode_step.
  pybind11::class_<seq2seq_ext::DecoderStepper>(module, "DecoderStepper")
      .def(pybind11::init<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor>(),
           pybind11::arg("embedding"), pybind11::arg("weights"), pybind11::arg("dense_weight"),
           pybind11::arg("dense_bias"))
      .def("emb_proj", &seq2seq_ext::DecoderStepper::emb_proj)
      .def(
          "step",
          [](seq2seq_ext::DecoderStepper& s, const at::Tensor& token, const at::Tensor& state) {
            return s.step(token, state);
          },
          pybind11::arg("token"), pybind11::arg("state"))
      // greedy_decode's CPU kernel with the bound weights (ctx_proj (B, 3H) for a fixed context).
      .def("greedy", &seq2seq_ext::DecoderStepper::greedy, pybind11::arg("state"),
           pybind11::arg("ctx_proj"), pybind11::arg("bos"), pybind11::arg("eos"),
           pybind11::arg("num_steps"))
      // The per-token call of Seq2SeqDecoder (seq2seq_ext/models.py): step(token, state) when
      // token is a (B, 1) tensor, state a CPU tensor, neither a subclass, grad mode off and no
      // dispatch or torch function mode active; else None, and the caller takes the usual path.
      // These tests cost a few hundred nanoseconds here against microseconds in Python.
      .def(
          "try_step",
          [](seq2seq_ext::DecoderStepper& s, pybind11::handle token,
             pybind11::handle state) -> pybind11::object {
            if (!THPVariable_CheckExact(token.ptr()) || !THPVariable_CheckExact(state.ptr()))
              return pybind11::none();
            const at::Tensor& tok = THPVariable_Unpack(token.ptr());
            const at::Tensor& st = THPVariable_Unpack(state.ptr());
            if (!st.is_cpu() || tok.dim() != 2 || tok.size(1) != 1 ||
                at::GradMode::is_enabled() || c10::impl::TorchDispatchModeTLS::stack_len() != 0 ||
                at::impl::torch_function_mode_enabled())
              return pybind11::none();
            return pybind11::cast(s.step(tok, st));
          },
          pybind11::arg("token"), pybind11::arg("state"))
      // gru_decode_step's CPU kernel with a fixed context's projection ctx_proj (B, 3H).
      .def(
          "step_with_context",
          [](seq2seq_ext::DecoderStepper& s, const at::Tensor& token, const at::Tensor& state,
             const at::Tensor& ctx_proj) { return s.step(token, state, ctx_proj); },
          pybind11::arg("token"), pybind11::arg("state"), pybind11::arg("ctx_proj"))
      // lstm_decode_step's CPU kernel with the bound weights of an nn.LSTM decoder; ctx_proj
      // (B, 4H) for a fixed context, None for the context h[-1].
      .def(
          "lstm_step",
          [](seq2seq_ext::DecoderStepper& s, const at::Tensor& token, const at::Tensor& h,
             const at::Tensor& c, const std::optional<at::Tensor>& ctx_proj) {
            TORCH_CHECK(h.device().is_cpu(),
                        "h: DecoderStepper.lstm_step runs on the CPU, got a tensor on ",
                        h.device());
            return seq2seq_ext::lstm_decode_step_cpu(token, h, c, s.emb_proj(), ctx_proj,
                                                     s.weights(), s.dense_weight(),
                                                     s.dense_bias());
          },
          pybind11::arg("token"), pybind11::arg("h"), pybind11::arg("c"),
          pybind11::arg("ctx_proj") = pybind11::none());
  // gru_layer's CPU kernel for inference (no graph to record), under the same conditions.
  module.def("gru_layer_cpu", &seq2seq_ext::gru_layer_cpu, pybind11::arg("input"),
             pybind11::arg("h0"), pybind11::arg("w_ih"), pybind11::arg("w_hh"),
             pybind11::arg("b_ih"), pybind11::arg("b_hh"), pybind11::arg("extra") = pybind11::none());
  // The drop-in nn.GRU / nn.LSTM forward (seq2seq_ext/nn.py) in one call: see rnn_forward.h.
  module.def("rnn_forward", &seq2seq_ext::rnn_forward, pybind11::arg("cell"),
             pybind11::arg("input"), pybind11::arg("hx"), pybind11::arg("weights"),
             pybind11::arg("layers"), pybind11::arg("hidden"), pybind11::arg("batch_first"),
             pybind11::arg("dropout"), pybind11::arg("training"),
             pybind11::arg("torch_masks") = false);
#if defined(TORCH_VERSION_MAJOR) && defined(TORCH_VERSION_MINOR)
  module.attr("torch_version") =
      std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);
#else
  module.attr("torch_version") = "unknown";
#endif
}
