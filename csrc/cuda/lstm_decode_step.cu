// lstm_decode_step on CUDA: the decoder step of decoder.cuh over LstmCell.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include "../lstm_decode_step.h"
#include "decoder.cuh"

namespace seq2seq_ext {
namespace cuda {

void lstm_decode_step(const DecoderDims& d, const at::Tensor& token, const at::Tensor& h,
                      const at::Tensor& c, const at::Tensor& emb_proj,
                      const std::optional<at::Tensor>& ctx_proj, at::TensorList weights,
                      const at::Tensor& dense_weight, const at::Tensor& dense_bias,
                      at::Tensor& logits, at::Tensor& h_new, at::Tensor& c_new) {
  const c10::cuda::CUDAGuard guard(h.device());
  const at::Tensor tok = token.reshape({-1}).to(at::kLong).contiguous();
  at::Tensor logits2d = logits.view({d.batch, d.vocab});
  StepBuffers buf = make_buffers<LstmCell>(d, h);
  StateTensors<LstmCell> out{h_new, c_new};
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "lstm_decode_step_cuda", [&] {
    decode_step<LstmCell, scalar_t>(d, tok, {h, c}, out, logits2d, emb_proj, ctx_proj, weights,
                                    dense_weight, dense_bias, buf);
  });
}

}  // namespace cuda
}  // namespace seq2seq_ext
