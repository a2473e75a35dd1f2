// CPU kernels that are also called directly (not only through the dispatcher).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace seq2seq_ext {

// The CPU kernel of seq2seq_ext::gru_decode_step (see csrc/ops.cpp for the contract).
std::tuple<at::Tensor, at::Tensor> gru_decode_step_cpu(
    const at::Tensor& token, const at::Tensor& state, const at::Tensor& emb_proj,
    const std::optional<at::Tensor>& ctx_proj, at::TensorList weights,
    const at::Tensor& dense_weight, const at::Tensor& dense_bias);

}  // namespace seq2seq_ext
