// greedy_decode on the CPU: the greedy loop of decoder.h over GruCell with the module's
// row-major weights.
#include <ATen/Dispatch.h>

#include "../greedy_decode.h"
#include "decoder.h"

namespace seq2seq_ext {
namespace cpu {

void greedy_decode(const DecoderDims& d, const at::Tensor& state, const at::Tensor& emb_proj,
                   const std::optional<at::Tensor>& ctx_proj, at::TensorList weights,
                   const at::Tensor& dense_weight, const at::Tensor& dense_bias, int64_t bos,
                   int64_t eos, int64_t num_steps, at::Tensor& tokens, at::Tensor& lengths) {
  const bool has_ctx = ctx_proj.has_value() && ctx_proj->defined();
  AT_DISPATCH_FLOATING_TYPES(state.scalar_type(), "greedy_decode_cpu", [&] {
    using T = scalar_t;
    Contig c;
    RowMajorWeights<T> w(d, GruCell::kGates, weights, dense_weight, dense_bias, c);
    greedy_rows<GruCell>(w, d, c(emb_proj).const_data_ptr<T>(), {c(state).const_data_ptr<T>()},
                         has_ctx ? c(*ctx_proj).const_data_ptr<T>() : nullptr, bos, eos,
                         num_steps, tokens.data_ptr<int64_t>(), lengths.data_ptr<int64_t>());
  });
}

}  // namespace cpu
}  // namespace seq2seq_ext
