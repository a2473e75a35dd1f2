// translate_ids (translation.h).
#include "translation.h"

#include "checks.h"
#include "gru_layer.h"

namespace seq2seq_ext {

std::optional<std::vector<int64_t>> translate_ids(const std::vector<int64_t>& src,
                                                  const at::Tensor& table, at::TensorList flat,
                                                  DecoderStepper& stepper, int64_t bos,
                                                  int64_t eos, int64_t num_steps, bool bf16,
                                                  at::IntArrayRef state_shape) {
  const at::NoGradGuard no_grad;
  check_dim(table, 2, "table");
  TORCH_CHECK(flat.size() >= 4 && flat[1].dim() == 2,
              "flat: expected nn.GRU's flat weights, 4 tensors a layer, got ", flat.size());
  const int64_t steps = static_cast<int64_t>(src.size());
  const int64_t layers = static_cast<int64_t>(flat.size()) / 4, hidden = flat[1].size(1);
  for (const int64_t id : src)
    TORCH_CHECK(id >= 0 && id < table.size(0), "src: token id ", id, " is not a row of the ",
                table.size(0), "-row table");
  // the usual path's encoder over the table, its states as wide as its weights (a state that
  // the decoder cannot take returns below)
  const at::Tensor X = at::tensor(at::ArrayRef<int64_t>(src), at::kLong).view({1, steps});
  const at::Tensor state = std::get<1>(encode_over_table_cpu(X, table, flat, layers, hidden));
  if (state.sizes() != state_shape) return std::nullopt;
  at::Tensor tokens, lengths;
  std::tie(tokens, lengths) = stepper.greedy(state, std::nullopt, bos, eos, num_steps, bf16);
  const int64_t n = lengths.const_data_ptr<int64_t>()[0];
  const int64_t* t = tokens.const_data_ptr<int64_t>();
  return std::vector<int64_t>(t, t + n);
}

}  // namespace seq2seq_ext
