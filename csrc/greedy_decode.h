// The kernels of seq2seq_ext::greedy_decode (contract and entry: csrc/greedy_decode.cpp). The
// entry has checked the arguments and allocated tokens (B, num_steps) filled with eos and
// lengths (B,) filled with num_steps, int64; B > 0 and num_steps > 0.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "decoder.h"

namespace seq2seq_ext {

// The arguments greedy_decode adds to the decoder's (also checked by DecoderStepper.greedy).
void check_greedy_args(const DecoderDims& d, int64_t bos, int64_t num_steps);

// The greedy loop's results before it runs: tokens (batch, num_steps) all eos and lengths all
// num_steps; an allocation that fails (a huge num_steps) is an error naming num_steps.
std::tuple<at::Tensor, at::Tensor> greedy_results(int64_t batch, int64_t num_steps, int64_t eos,
                                                  const at::TensorOptions& long_opts);

using GreedyDecodeKernel = void(const DecoderDims& d, const at::Tensor& state,
                                const at::Tensor& emb_proj,
                                const std::optional<at::Tensor>& ctx_proj,
                                at::TensorList weights, const at::Tensor& dense_weight,
                                const at::Tensor& dense_bias, int64_t bos, int64_t eos,
                                int64_t num_steps, at::Tensor& tokens, at::Tensor& lengths);
namespace cpu {
GreedyDecodeKernel greedy_decode;
}  // namespace cpu
namespace cuda {
GreedyDecodeKernel greedy_decode;
}  // namespace cuda
}  // namespace seq2seq_ext
