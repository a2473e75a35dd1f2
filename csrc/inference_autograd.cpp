// Autograd-key kernels for the inference-only decode ops.
//
// gru_decode_step, lstm_decode_step and greedy_decode have no derivative (models take the
// differentiable path when gradients are needed). Without a kernel at the Autograd key, calls whose inputs are
// parameters (requires_grad=True) would go through PyTorch's generic "autograd not implemented"
// fallback, which costs more than a whole decode step at the chapter's sizes. These kernels
// step below autograd and redispatch; their outputs never require grad.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace seq2seq_ext {
namespace {

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using StepSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    at::TensorList, const at::Tensor&, const at::Tensor&);
using LstmStepSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, at::TensorList, const at::Tensor&, const at::Tensor&);
using GreedySig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, at::TensorList,
    const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t);

std::tuple<at::Tensor, at::Tensor> gru_decode_step_autograd(
    const at::Tensor& token, const at::Tensor& state, const at::Tensor& emb_proj,
    const std::optional<at::Tensor>& ctx_proj, at::TensorList weights,
    const at::Tensor& dense_weight, const at::Tensor& dense_bias) {
  static auto op = handle<StepSig>("seq2seq_ext::gru_decode_step");
  c10::impl::ExcludeDispatchKeyGuard no_autograd(c10::autograd_dispatch_keyset_with_ADInplaceOrView);
  return op.call(token, state, emb_proj, ctx_proj, weights, dense_weight, dense_bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_decode_step_autograd(
    const at::Tensor& token, const at::Tensor& h, const at::Tensor& c, const at::Tensor& emb_proj,
    const std::optional<at::Tensor>& ctx_proj, at::TensorList weights,
    const at::Tensor& dense_weight, const at::Tensor& dense_bias) {
  static auto op = handle<LstmStepSig>("seq2seq_ext::lstm_decode_step");
  c10::impl::ExcludeDispatchKeyGuard no_autograd(c10::autograd_dispatch_keyset_with_ADInplaceOrView);
  return op.call(token, h, c, emb_proj, ctx_proj, weights, dense_weight, dense_bias);
}

std::tuple<at::Tensor, at::Tensor> greedy_decode_autograd(
    const at::Tensor& state, const at::Tensor& emb_proj, const std::optional<at::Tensor>& ctx_proj,
    at::TensorList weights, const at::Tensor& dense_weight, const at::Tensor& dense_bias,
    int64_t bos, int64_t eos, int64_t num_steps) {
  static auto op = handle<GreedySig>("seq2seq_ext::greedy_decode");
  c10::impl::ExcludeDispatchKeyGuard no_autograd(c10::autograd_dispatch_keyset_with_ADInplaceOrView);
  return op.call(state, emb_proj, ctx_proj, weights, dense_weight, dense_bias, bos, eos,
                 num_steps);
}

}  // namespace

TORCH_LIBRARY_IMPL(seq2seq_ext, Autograd, m) {
  m.impl("gru_decode_step", &gru_decode_step_autograd);
  m.impl("greedy_decode", &greedy_decode_autograd);
  m.impl("lstm_decode_step", &lstm_decode_step_autograd);
}

}  // namespace seq2seq_ext
