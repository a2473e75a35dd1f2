// seq2seq_ext::masked_softmax_ce and masked_softmax_ce_backward: schema, argument checks and
// the device-independent entries. Kernels: cpu/masked_softmax_ce.cpp, cuda/masked_softmax_ce.cu.
#include <ATen/OpMathType.h>

#include <limits>

#include "checks.h"
#include "entry.h"
#include "masked_softmax_ce.h"

TORCH_LIBRARY_FRAGMENT(seq2seq_ext, m) {
  // Masked softmax cross-entropy, as d2l's MaskedSoftmaxCELoss: pred (B, T, V) with any strides,
  // label (B, T) int64/int32, valid_len (B,). Returns the per-sequence loss (B,) (the mean over
  // all T steps, masked steps contributing 0) and the per-position log-sum-exp in two parts,
  // lse (B, T, 2) in the accumulation dtype: [..., 0] the row's maximum m and [..., 1]
  // log(sum(exp(x - m))) (0 and 0 at masked positions), which the backward reuses. Kept apart,
  // they give the softmax as exp((x - m) - log_sum), the reference's formula, which stays exact
  // for logits so large that m + log_sum would round to m.
  m.def("masked_softmax_ce(Tensor pred, Tensor label, Tensor valid_len) -> (Tensor, Tensor)");
  // Gradient of the loss above with respect to pred, in one pass over the logits.
  m.def(
      "masked_softmax_ce_backward(Tensor grad_loss, Tensor pred, Tensor label, "
      "Tensor valid_len, Tensor lse) -> Tensor");
}

namespace seq2seq_ext {
namespace {

// Arguments of masked_softmax_ce (and the shared part of its backward). Label values are
// checked by the kernels (on the CPU before anything is written; on CUDA in the kernel).
void check_masked_ce_args(const at::Tensor& pred, const at::Tensor& label,
                          const at::Tensor& valid_len) {
  check_dim(pred, 3, "pred");
  check_floating(pred, "pred");
  check_dim(label, 2, "label");
  check_index_dtype(label, "label");
  check_same_device(label, pred, "label", "pred");
  TORCH_CHECK(label.size(0) == pred.size(0) && label.size(1) == pred.size(1),
              "label: expected shape [", pred.size(0), ", ", pred.size(1),
              "] (the batch and steps of pred), got ", shape_str(label));
  check_valid_len(valid_len, pred.size(0), pred, "pred");
}

// The arguments masked_softmax_ce_backward adds to the forward's.
void check_masked_ce_backward_args(const at::Tensor& grad_loss, const at::Tensor& pred,
                                   const at::Tensor& lse) {
  const int64_t B = pred.size(0), T = pred.size(1);
  check_dim(grad_loss, 1, "grad_loss");
  check_size(grad_loss, 0, B, "grad_loss", "the batch size of pred");
  check_same_device(grad_loss, pred, "grad_loss", "pred");
  check_floating(grad_loss, "grad_loss");
  check_dim(lse, 3, "lse");
  TORCH_CHECK(lse.size(0) == B && lse.size(1) == T && lse.size(2) == 2,
              "lse: expected shape [", B, ", ", T, ", 2], got ", shape_str(lse));
  TORCH_CHECK(lse.scalar_type() == at::toOpMathType(pred.scalar_type()),
              "lse: expected dtype ", at::toOpMathType(pred.scalar_type()), ", got ",
              lse.scalar_type());
  check_same_device(lse, pred, "lse", "pred");
}

std::tuple<at::Tensor, at::Tensor> masked_softmax_ce(const at::Tensor& pred,
                                                     const at::Tensor& label,
                                                     const at::Tensor& valid_len) {
  check_masked_ce_args(pred, label, valid_len);
  const int64_t B = pred.size(0), T = pred.size(1);
  at::Tensor loss = at::empty({B}, pred.options());
  at::Tensor lse =
      at::empty({B, T, 2}, pred.options().dtype(at::toOpMathType(pred.scalar_type())));
  if (B == 0) return {loss, lse};
  if (T == 0) return {loss.fill_(std::numeric_limits<double>::quiet_NaN()), lse};  // mean of nothing
  SEQ2SEQ_EXT_KERNEL(pred, masked_softmax_ce)(pred, label, valid_len, loss, lse);
  return {loss, lse};
}

at::Tensor masked_softmax_ce_backward(const at::Tensor& grad_loss, const at::Tensor& pred,
                                      const at::Tensor& label, const at::Tensor& valid_len,
                                      const at::Tensor& lse) {
  check_masked_ce_args(pred, label, valid_len);
  check_masked_ce_backward_args(grad_loss, pred, lse);
  at::Tensor grad = at::empty_like(pred);
  if (pred.size(0) * pred.size(1) == 0) return grad;
  SEQ2SEQ_EXT_KERNEL(pred, masked_softmax_ce_backward)(grad_loss, pred, label, valid_len, lse,
                                                       grad);
  return grad;
}

}  // namespace

SEQ2SEQ_EXT_ENTRIES(m) {
  m.impl("masked_softmax_ce", &masked_softmax_ce);
  m.impl("masked_softmax_ce_backward", &masked_softmax_ce_backward);
}

SEQ2SEQ_EXT_NO_DERIVATIVE("masked_softmax_ce_backward")

}  // namespace seq2seq_ext
