// One sentence's greedy translation on the CPU in one call: predict_seq2seq's direct path for
// the chapter's GRU model (seq2seq_ext/decoding.py, _translate_directly; the _C module's
// translate_ids). The same kernels on the same tensors as its usual path, without the Python
// between them: the encoder over its table (gru_over_projection_cpu, as
// seq2seq_ext.ops.gru_over_projection) and the bound decoder's greedy loop
// (DecoderStepper::greedy).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "decoder_stepper.h"

namespace seq2seq_ext {

// src: the sentence's token ids, already truncated or padded to its steps, each a row of table
// (vocab, 3H: layer 0's input projection of every token, float32); flat: the encoder's flat GRU
// weights (gru_over_projection_cpu). The encoder runs from zero states; its final state, of
// shape state_shape, starts the greedy loop of `stepper` from bos for num_steps steps at most,
// with the weights rounded to bfloat16 when bf16. Returns the output ids before eos, or nullopt
// when the encoder's state does not have state_shape (the usual path then raises its error).
std::optional<std::vector<int64_t>> translate_ids(const std::vector<int64_t>& src,
                                                  const at::Tensor& table, at::TensorList flat,
                                                  DecoderStepper& stepper, int64_t bos,
                                                  int64_t eos, int64_t num_steps, bool bf16,
                                                  at::IntArrayRef state_shape);

}  // namespace seq2seq_ext
