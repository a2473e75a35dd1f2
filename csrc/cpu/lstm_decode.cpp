// Inference-time decoding of an LSTM Seq2SeqDecoder on the CPU: one step for all layers and the
// output projection (lstm_decode_step).
//
// The same algebra as the GRU step: layer 0's input projection W_ih0 [emb; ctx] + b_ih0 is split
// by the concatenation. The embedding part (with b_ih0) is a row of emb_proj, precomputed once
// per set of weights; the context part is ctx_proj when the context is fixed, else h[-1] times
// the context columns of W_ih0 (the current top hidden state, the chapter's rule). Per layer one
// product for the recurrent part, one for the input part (layers > 0), then one fused pass over
// nn.LSTM's gates (i, f, g, o).
#include <torch/library.h>

#include <deque>
#include <vector>

#include "../checks.h"
#include "common.h"
#include "gru_math.h"
#include "kernels.h"

namespace seq2seq_ext {
namespace {

// Contiguous copies are made once per call, only of inputs that are not contiguous (a deque:
// the references it hands out stay valid as it grows).
struct ContigCopies {
  std::deque<at::Tensor> keep;
  const at::Tensor& operator()(const at::Tensor& t) {
    if (t.is_contiguous()) return t;
    keep.push_back(t.contiguous());
    return keep.back();
  }
};

// One LSTM decoder step for n rows. h, c, h_new, c_new are (L, n, H) contiguous; ctx (n, 4H) or
// null; logits (n, V).
template <typename T>
void lstm_step_rows(const DecoderDims& d, const std::vector<const T*>& w, const T* emb_proj,
                    const T* dense_w, const T* dense_b, const int64_t* tok, int64_t n,
                    const T* h, const T* c, const T* ctx, T* h_new, T* c_new, T* logits) {
  const int64_t L = d.layers, H = d.hidden, G = 4 * H;
  std::vector<T> gi(n * G), gh(n * G);
  for (int64_t b = 0; b < n; ++b) {
    const T* e = emb_proj + tok[b] * G;
    T* g = gi.data() + b * G;
    if (ctx) {
      const T* x = ctx + b * G;
      for (int64_t j = 0; j < G; ++j) g[j] = e[j] + x[j];
    } else {
      std::copy(e, e + G, g);
    }
  }
  if (!ctx)  // the chapter's rule: the context is the incoming top-layer hidden state
    cpu::linear_nt<T>(h + (L - 1) * n * H, H, n, H, w[0] + (d.in0 - H), d.in0, G, nullptr,
                      gi.data(), /*accumulate=*/true);
  for (int64_t l = 0; l < L; ++l) {
    if (l > 0)
      cpu::linear_nt<T>(h_new + (l - 1) * n * H, H, n, H, w[4 * l], H, G, w[4 * l + 2],
                        gi.data(), false);
    cpu::linear_nt<T>(h + l * n * H, H, n, H, w[4 * l + 1], H, G, w[4 * l + 3], gh.data(),
                      false);
    cpu::lstm_cell<T>(gi.data(), gh.data(), c + l * n * H, H, h_new + l * n * H,
                      c_new + l * n * H, H, n, H);
  }
  cpu::linear_nt<T>(h_new + (L - 1) * n * H, H, n, H, dense_w, H, d.vocab, dense_b, logits,
                    false);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_decode_step_cpu(
    const at::Tensor& token, const at::Tensor& h, const at::Tensor& c, const at::Tensor& emb_proj,
    const std::optional<at::Tensor>& ctx_proj, at::TensorList weights,
    const at::Tensor& dense_weight, const at::Tensor& dense_bias) {
  const DecoderDims d =
      check_lstm_decoder_args(h, c, emb_proj, ctx_proj, weights, dense_weight, dense_bias);
  check_decode_token(token, h, d.batch, "h");
  const auto tok = cpu::tokens_to_vector(token, d.tgt_vocab);
  at::Tensor logits = at::empty(decode_logits_shape(token, d.vocab), h.options());
  at::Tensor h_new = at::empty(h.sizes(), h.options());
  at::Tensor c_new = at::empty(c.sizes(), c.options());
  const bool has_ctx = ctx_proj.has_value() && ctx_proj->defined();
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "lstm_decode_step_cpu", [&] {
    using T = scalar_t;
    ContigCopies cc;
    std::vector<const T*> w;
    w.reserve(weights.size());
    for (const auto& t : weights) w.push_back(cc(t).template const_data_ptr<T>());
    const T* ctx = has_ctx ? cc(*ctx_proj).template const_data_ptr<T>() : nullptr;
    lstm_step_rows<T>(d, w, cc(emb_proj).template const_data_ptr<T>(),
                      cc(dense_weight).template const_data_ptr<T>(),
                      cc(dense_bias).template const_data_ptr<T>(), tok.data(), d.batch,
                      cc(h).template const_data_ptr<T>(), cc(c).template const_data_ptr<T>(), ctx,
                      h_new.data_ptr<T>(), c_new.data_ptr<T>(), logits.data_ptr<T>());
  });
  return {logits, h_new, c_new};
}

TORCH_LIBRARY_IMPL(seq2seq_ext, CPU, m) { m.impl("lstm_decode_step", &lstm_decode_step_cpu); }

}  // namespace seq2seq_ext
