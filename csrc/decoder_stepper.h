// DecoderStepper: a decoder's weights bound for repeated CPU decode steps (the _C module's
// DecoderStepper, csrc/python_module.cpp; implementation: cpu/decoder_stepper.cpp).
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/decoder.h"
#include "decoder.h"

namespace seq2seq_ext {

// A decoder's weights bound once for repeated decode steps. It keeps references to the
// parameters themselves (so in-place updates and `.data` swaps are seen) and rebuilds what it
// derives from them when the version counter, storage or shape of one of them changes:
//  - the embedding projection table emb_proj = embedding @ W_ih0[:, :E]^T + b_ih0;
//  - for a few rows at small sizes, the weights packed transposed (cpu::PackedWeights), so
//    that a row's products need no horizontal sums: at the chapter's sizes the sums of
//    row-major dot products cost more than the multiply-adds.
// step() and greedy() run the decoder of cpu/decoder.h over GruCell directly, with the packed
// weights when there are some, else with the module's (the CPU kernels of gru_decode_step and
// greedy_decode); greedy() also with bfloat16 copies of the weight matrices, when asked, and
// finds a large output layer's argmax with its int8 screen (cpu/argmax_screen.h) wherever the
// layer's product is not BLAS's (one to three rows in float32, any number in bfloat16). The
// table and the bound weights serve an nn.LSTM decoder as well (its flat weights have the same
// four tensors per layer).
class DecoderStepper {
 public:
  DecoderStepper(at::Tensor embedding, std::vector<at::Tensor> weights, at::Tensor dense_weight,
                 at::Tensor dense_bias);
  // The table for the current weights (any device).
  const at::Tensor& emb_proj();
  // One decode step on CPU tensors: the contract of gru_decode_step's CPU kernel with the bound
  // weights (ctx_proj (B, 3H) for a fixed context, none for the reference's rule).
  std::tuple<at::Tensor, at::Tensor> step(const at::Tensor& token, const at::Tensor& state,
                                          const std::optional<at::Tensor>& ctx_proj = {});
  // Greedy decoding of a batch on CPU tensors: the contract of greedy_decode's CPU kernel with
  // the bound weights. bf16_weights: decode with the weight matrices rounded to bfloat16 (the
  // embedding, every W_ih and W_hh, the output layer's weight; biases, states and sums stay
  // float32), reading half the bytes per token; the copies are made once per set of weights.
  // Needs float32 weights and state. Above kBf16MaxRows rows the rounded values are multiplied
  // as float32 copies, whose products BLAS takes: a row at a time, every row would read every
  // matrix again.
  std::tuple<at::Tensor, at::Tensor> greedy(const at::Tensor& state,
                                            const std::optional<at::Tensor>& ctx_proj,
                                            int64_t bos, int64_t eos, int64_t num_steps,
                                            bool bf16_weights = false);
  // The bound weights, as the decode ops take them.
  const std::vector<at::Tensor>& weights() const { return weights_; }
  // Layer 0 reads [embedding, context]: W_ih0's columns are the embedding's width plus the
  // hidden size (also after `.data =` gave one of them another shape).
  bool widths_fit() const;
  const at::Tensor& dense_weight() const { return dense_weight_; }
  const at::Tensor& dense_bias() const { return dense_bias_; }

 private:
  // Compares the bound tensors with what the derived data were built from; on any change,
  // drops them (the table, the packed weights, the validated dims). True when unchanged.
  bool refresh();
  void check_widths() const;  // widths_fit, else an error naming the embedding
  // check_decoder_args for a state on the CPU with the bound weights, skipped (but for the
  // state's own dims) when the weights were already checked against a state like this one.
  DecoderDims checked_dims(const at::Tensor& state, const at::Tensor& table,
                           const std::optional<at::Tensor>& ctx_proj);
  // The packed weights for the validated dims, built when missing; undefined when too large.
  const at::Tensor& packed();
  // emb_proj() from the embedding and W_ih0 rounded to bfloat16 (greedy's bf16_weights).
  const at::Tensor& rounded_emb_proj();
  // The bfloat16 weight matrices [w_ih, w_hh per layer..., dense weight], built when missing.
  const std::vector<at::Tensor>& low();
  // float32 copies of low()'s matrices (the rounded values), built when missing: greedy's
  // bf16_weights for more than kBf16MaxRows rows.
  const std::vector<at::Tensor>& low_float32();
  // The int8 screen of the output layer's float32 (bf16 false) or bfloat16 matrix for greedy's
  // argmax (cpu/argmax_screen.h), built when missing; null where it does not apply.
  const cpu::ArgmaxScreen* screen(bool bf16);

  at::Tensor embedding_, dense_weight_, dense_bias_, emb_proj_, packed_;
  std::vector<at::Tensor> weights_;
  std::vector<int64_t> key_;
  // The storages the key's data pointers point into, held so that no other storage can take
  // their addresses: `p.data = x` keeps p's version counter, and new storage landing where the
  // old one was would otherwise look unchanged.
  std::vector<c10::Storage> key_storages_;
  bool packed_built_ = false;
  bool inference_ = false;  // some bound tensor is an inference tensor
  std::shared_ptr<const cpu::ArgmaxScreen> screens_[2];
  bool screens_tried_[2] = {false, false};
  std::vector<at::Tensor> low_, low_float32_;
  at::Tensor emb_proj_low_;  // the table from the rounded embedding and W_ih0
  // The dims (batch aside) of the last state checked against the current weights, and its
  // dtype: a state that agrees needs no new check of the weights.
  bool validated_ = false;
  int64_t v_layers_ = 0, v_hidden_ = 0, v_in0_ = 0, v_vocab_ = 0, v_tgt_vocab_ = 0;
  at::ScalarType v_dtype_ = at::kFloat;
  cpu::PackedLayout layout_;
};

}  // namespace seq2seq_ext
