// The kernels of seq2seq_ext::masked_softmax_ce and masked_softmax_ce_backward (contract and
// entry: csrc/masked_softmax_ce.cpp). The entry has checked the arguments and allocated the
// outputs; B * T > 0.
#pragma once

#include <ATen/ATen.h>

namespace seq2seq_ext {
// loss (B,) and lse (B, T, 2) (each row's maximum and log-sum of exp(x - maximum)) in the
// accumulation dtype
using MaskedSoftmaxCeKernel = void(const at::Tensor& pred, const at::Tensor& label,
                                   const at::Tensor& valid_len, at::Tensor& loss,
                                   at::Tensor& lse);
// grad with pred's shape and layout
using MaskedSoftmaxCeBackwardKernel = void(const at::Tensor& grad_loss, const at::Tensor& pred,
                                           const at::Tensor& label,
                                           const at::Tensor& valid_len, const at::Tensor& lse,
                                           at::Tensor& grad);
namespace cpu {
MaskedSoftmaxCeKernel masked_softmax_ce;
MaskedSoftmaxCeBackwardKernel masked_softmax_ce_backward;
}  // namespace cpu
namespace cuda {
MaskedSoftmaxCeKernel masked_softmax_ce;
MaskedSoftmaxCeBackwardKernel masked_softmax_ce_backward;
}  // namespace cuda
}  // namespace seq2seq_ext
