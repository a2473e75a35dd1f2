// seq2seq_ext::lstm_decode_step: schema and the device-independent entry. Kernels:
// cpu/lstm_decode_step.cpp, cuda/lstm_decode_step.cu; the argument checks it shares with the
// other decode ops: decoder.h.
#include "decoder.h"
#include "entry.h"
#include "lstm_decode_step.h"

TORCH_LIBRARY_FRAGMENT(seq2seq_ext, m) {
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
}

namespace seq2seq_ext {

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_decode_step(
    const at::Tensor& token, const at::Tensor& h, const at::Tensor& c, const at::Tensor& emb_proj,
    const std::optional<at::Tensor>& ctx_proj, at::TensorList weights,
    const at::Tensor& dense_weight, const at::Tensor& dense_bias) {
  const DecoderDims d =
      check_decoder_args(h, "h", 4, emb_proj, ctx_proj, weights, dense_weight, dense_bias);
  // c: the LSTM's (L, B, H) cell state, of the shape, dtype and device of h
  check_dim(c, 3, "c");
  check_same_device(c, h, "c", "h");
  check_same_dtype(c, h, "c", "h");
  TORCH_CHECK(c.sizes() == h.sizes(), "c: expected shape ", shape_str(h),
              " (the shape of h), got ", shape_str(c));
  check_decode_token(token, h, d.batch, "h");
  at::Tensor logits = at::empty(decode_logits_shape(token, d.vocab), h.options());
  at::Tensor h_new = at::empty(h.sizes(), h.options());
  at::Tensor c_new = at::empty(c.sizes(), c.options());
  if (d.batch > 0)
    SEQ2SEQ_EXT_KERNEL(h, lstm_decode_step)(d, token, h, c, emb_proj, ctx_proj, weights,
                                            dense_weight, dense_bias, logits, h_new, c_new);
  return {logits, h_new, c_new};
}

SEQ2SEQ_EXT_ENTRIES(m) { m.impl("lstm_decode_step", &lstm_decode_step); }

SEQ2SEQ_EXT_INFERENCE_ONLY(lstm_decode_step)

}  // namespace seq2seq_ext
