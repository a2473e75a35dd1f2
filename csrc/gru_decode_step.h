// The kernels of seq2seq_ext::gru_decode_step (contract and entry: csrc/gru_decode_step.cpp).
// The entry has checked the arguments (token ids aside: the kernels check them) and allocated
// logits ((B, V) or (B, 1, V)) and new_state (L, B, H) contiguous; B > 0.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "decoder.h"

namespace seq2seq_ext {
using GruDecodeStepKernel = void(const DecoderDims& d, const at::Tensor& token,
                                 const at::Tensor& state, const at::Tensor& emb_proj,
                                 const std::optional<at::Tensor>& ctx_proj,
                                 at::TensorList weights, const at::Tensor& dense_weight,
                                 const at::Tensor& dense_bias, at::Tensor& logits,
                                 at::Tensor& new_state);
namespace cpu {
GruDecodeStepKernel gru_decode_step;
}  // namespace cpu
namespace cuda {
GruDecodeStepKernel gru_decode_step;
}  // namespace cuda
}  // namespace seq2seq_ext
