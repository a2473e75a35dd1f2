// gru_decode_step on the CPU: the decoder step of decoder.h over GruCell with the module's
// row-major weights.
#include "../gru_decode_step.h"
#include "decoder.h"

namespace seq2seq_ext {
namespace cpu {

void gru_decode_step(const DecoderDims& d, const at::Tensor& token, const at::Tensor& state,
                     const at::Tensor& emb_proj, const std::optional<at::Tensor>& ctx_proj,
                     at::TensorList weights, const at::Tensor& dense_weight,
                     const at::Tensor& dense_bias, at::Tensor& logits, at::Tensor& new_state) {
  decode_step<GruCell>(d, token, {&state}, {&new_state}, emb_proj, ctx_proj, weights,
                       dense_weight, dense_bias, logits);
}

}  // namespace cpu
}  // namespace seq2seq_ext
