// lstm_decode_step on the CPU: the decoder step of decoder.h over LstmCell with the module's
// row-major weights.
#include "../lstm_decode_step.h"
#include "decoder.h"

namespace seq2seq_ext {
namespace cpu {

void lstm_decode_step(const DecoderDims& d, const at::Tensor& token, const at::Tensor& h,
                      const at::Tensor& c, const at::Tensor& emb_proj,
                      const std::optional<at::Tensor>& ctx_proj, at::TensorList weights,
                      const at::Tensor& dense_weight, const at::Tensor& dense_bias,
                      at::Tensor& logits, at::Tensor& h_new, at::Tensor& c_new) {
  decode_step<LstmCell>(d, token, {&h, &c}, {&h_new, &c_new}, emb_proj, ctx_proj, weights,
                        dense_weight, dense_bias, logits);
}

}  // namespace cpu
}  // namespace seq2seq_ext
