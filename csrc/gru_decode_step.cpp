// seq2seq_ext::gru_decode_step: schema and the device-independent entry. Kernels:
// cpu/gru_decode_step.cpp, cuda/gru_decode_step.cu; the argument checks it shares with the
// other decode ops: decoder.h.
#include "decoder.h"
#include "entry.h"
#include "gru_decode_step.h"

TORCH_LIBRARY_FRAGMENT(seq2seq_ext, m) {
  // One step of Seq2SeqDecoder for all GRU layers and the output projection.
  //   token (B,) or (B, 1) ids; state (L, B, H); emb_proj (V_tgt, 3H) = embedding @ W_ih0[:, :E]^T + b_ih0;
  //   ctx_proj (B, 3H) = context @ W_ih0[:, E:]^T when the context is fixed, or None to take the
  //   context from state[-1] as the reference decoder does; weights = nn.GRU's flat weights
  //   [w_ih_l, w_hh_l, b_ih_l, b_hh_l] per layer; dense (V, H), (V,).
  // Returns the logits ((B, V), or (B, 1, V) for a (B, 1) token) and the new state (L, B, H).
  m.def(
      "gru_decode_step(Tensor token, Tensor state, Tensor emb_proj, Tensor? ctx_proj, "
      "Tensor[] weights, Tensor dense_weight, Tensor dense_bias) -> (Tensor, Tensor)");
}

namespace seq2seq_ext {
namespace {

std::tuple<at::Tensor, at::Tensor> gru_decode_step(
    const at::Tensor& token, const at::Tensor& state, const at::Tensor& emb_proj,
    const std::optional<at::Tensor>& ctx_proj, at::TensorList weights,
    const at::Tensor& dense_weight, const at::Tensor& dense_bias) {
  const DecoderDims d = check_decoder_args(state, "state", 3, emb_proj, ctx_proj, weights,
                                           dense_weight, dense_bias);
  check_decode_token(token, state, d.batch);
  at::Tensor logits = at::empty(decode_logits_shape(token, d.vocab), state.options());
  at::Tensor new_state = at::empty_like(state, at::MemoryFormat::Contiguous);
  if (d.batch > 0)
    SEQ2SEQ_EXT_KERNEL(state, gru_decode_step)(d, token, state, emb_proj, ctx_proj, weights,
                                               dense_weight, dense_bias, logits, new_state);
  return {logits, new_state};
}

}  // namespace

SEQ2SEQ_EXT_ENTRIES(m) { m.impl("gru_decode_step", &gru_decode_step); }

SEQ2SEQ_EXT_INFERENCE_ONLY(gru_decode_step)

}  // namespace seq2seq_ext
