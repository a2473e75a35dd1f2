// gru_decode_step on CUDA: the decoder step of decoder.cuh over GruCell.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include "../gru_decode_step.h"
#include "decoder.cuh"

namespace seq2seq_ext {
namespace cuda {

void gru_decode_step(const DecoderDims& d, const at::Tensor& token, const at::Tensor& state,
                     const at::Tensor& emb_proj, const std::optional<at::Tensor>& ctx_proj,
                     at::TensorList weights, const at::Tensor& dense_weight,
                     const at::Tensor& dense_bias, at::Tensor& logits, at::Tensor& new_state) {
  const c10::cuda::CUDAGuard guard(state.device());
  const at::Tensor tok = token.reshape({-1}).to(at::kLong).contiguous();
  at::Tensor logits2d = logits.view({d.batch, d.vocab});
  StepBuffers buf = make_buffers<GruCell>(d, state);
  StateTensors<GruCell> out{new_state};
  AT_DISPATCH_FLOATING_TYPES(state.scalar_type(), "gru_decode_step_cuda", [&] {
    decode_step<GruCell, scalar_t>(d, tok, {state}, out, logits2d, emb_proj, ctx_proj, weights,
                                   dense_weight, dense_bias, buf);
  });
}

}  // namespace cuda
}  // namespace seq2seq_ext
