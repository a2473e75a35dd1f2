// The kernels of seq2seq_ext::lstm_decode_step (contract and entry: csrc/lstm_decode_step.cpp).
// The entry has checked the arguments (token ids aside: the kernels check them) and allocated
// logits ((B, V) or (B, 1, V)), h_new and c_new (L, B, H) contiguous; B > 0.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "decoder.h"

namespace seq2seq_ext {
using LstmDecodeStepKernel = void(const DecoderDims& d, const at::Tensor& token,
                                  const at::Tensor& h, const at::Tensor& c,
                                  const at::Tensor& emb_proj,
                                  const std::optional<at::Tensor>& ctx_proj,
                                  at::TensorList weights, const at::Tensor& dense_weight,
                                  const at::Tensor& dense_bias, at::Tensor& logits,
                                  at::Tensor& h_new, at::Tensor& c_new);
namespace cpu {
LstmDecodeStepKernel lstm_decode_step;
}  // namespace cpu
namespace cuda {
LstmDecodeStepKernel lstm_decode_step;
}  // namespace cuda

// The entry of lstm_decode_step, which DecoderStepper.lstm_step also calls.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_decode_step(
    const at::Tensor& token, const at::Tensor& h, const at::Tensor& c, const at::Tensor& emb_proj,
    const std::optional<at::Tensor>& ctx_proj, at::TensorList weights,
    const at::Tensor& dense_weight, const at::Tensor& dense_bias);

}  // namespace seq2seq_ext
