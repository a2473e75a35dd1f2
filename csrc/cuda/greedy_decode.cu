// greedy_decode on CUDA: the greedy loop of decoder.cuh over GruCell.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include "../greedy_decode.h"
#include "decoder.cuh"

namespace seq2seq_ext {
namespace cuda {

void greedy_decode(const DecoderDims& d, const at::Tensor& state, const at::Tensor& emb_proj,
                   const std::optional<at::Tensor>& ctx_proj, at::TensorList weights,
                   const at::Tensor& dense_weight, const at::Tensor& dense_bias, int64_t bos,
                   int64_t eos, int64_t num_steps, at::Tensor& tokens, at::Tensor& lengths) {
  const c10::cuda::CUDAGuard guard(state.device());
  AT_DISPATCH_FLOATING_TYPES(state.scalar_type(), "greedy_decode_cuda", [&] {
    greedy_loop<GruCell, scalar_t>(d, {state}, emb_proj, ctx_proj, weights, dense_weight,
                                   dense_bias, bos, eos, num_steps, tokens, lengths);
  });
}

}  // namespace cuda
}  // namespace seq2seq_ext
