// seq2seq_ext::greedy_decode: schema, the checks of its own arguments and the
// device-independent entry. Kernels: cpu/greedy_decode.cpp, cuda/greedy_decode.cu; the checks it
// shares with the other decode ops: decoder.h.
#include "decoder.h"
#include "entry.h"
#include "greedy_decode.h"

TORCH_LIBRARY_FRAGMENT(seq2seq_ext, m) {
  // Greedy decoding of a batch: starts every sentence from `bos`, feeds back the argmax, and
  // stops a sentence at `eos` or after num_steps tokens. Returns the tokens (B, num_steps)
  // int64 (positions after a sentence's end hold `eos`) and the lengths (B,) int64, the number
  // of tokens before `eos`.
  m.def(
      "greedy_decode(Tensor state, Tensor emb_proj, Tensor? ctx_proj, Tensor[] weights, "
      "Tensor dense_weight, Tensor dense_bias, int bos, int eos, int num_steps) "
      "-> (Tensor, Tensor)");
}

namespace seq2seq_ext {

void check_greedy_args(const DecoderDims& d, int64_t bos, int64_t num_steps) {
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

std::tuple<at::Tensor, at::Tensor> greedy_results(int64_t batch, int64_t num_steps, int64_t eos,
                                                  const at::TensorOptions& long_opts) {
  at::Tensor tokens;
  try {
    tokens = at::full({batch, num_steps}, eos, long_opts);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "num_steps: the result's tokens (", batch, " x ", num_steps,
                ") cannot be allocated: ", e.what_without_backtrace());
  }
  return {tokens, at::full({batch}, num_steps, long_opts)};
}

namespace {

std::tuple<at::Tensor, at::Tensor> greedy_decode(
    const at::Tensor& state, const at::Tensor& emb_proj, const std::optional<at::Tensor>& ctx_proj,
    at::TensorList weights, const at::Tensor& dense_weight, const at::Tensor& dense_bias,
    int64_t bos, int64_t eos, int64_t num_steps) {
  const DecoderDims d = check_decoder_args(state, "state", 3, emb_proj, ctx_proj, weights,
                                           dense_weight, dense_bias);
  check_greedy_args(d, bos, num_steps);
  at::Tensor tokens, lengths;
  std::tie(tokens, lengths) =
      greedy_results(d.batch, num_steps, eos, state.options().dtype(at::kLong));
  if (d.batch > 0 && num_steps > 0)
    SEQ2SEQ_EXT_KERNEL(state, greedy_decode)(d, state, emb_proj, ctx_proj, weights, dense_weight,
                                             dense_bias, bos, eos, num_steps, tokens, lengths);
  return {tokens, lengths};
}

}  // namespace

SEQ2SEQ_EXT_ENTRIES(m) { m.impl("greedy_decode", &greedy_decode); }

SEQ2SEQ_EXT_INFERENCE_ONLY(greedy_decode)

}  // namespace seq2seq_ext
