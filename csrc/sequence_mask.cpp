// seq2seq_ext::sequence_mask and sequence_mask_: schema, argument checks and the
// device-independent entries. Kernels: cpu/sequence_mask.cpp, cuda/sequence_mask.cu.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/variable.h>

#include "checks.h"
#include "entry.h"
#include "sequence_mask.h"

TORCH_LIBRARY_FRAGMENT(seq2seq_ext, m) {
  // Sequence mask: X[b, t, ...] = value for t >= valid_len[b]. Out of place and in place (the
  // in-place op returns nothing, so that torch.compile can functionalize it; the Python wrapper
  // returns X as the reference does).
  m.def("sequence_mask(Tensor X, Tensor valid_len, Scalar value=0) -> Tensor");
  m.def("sequence_mask_(Tensor(a!) X, Tensor valid_len, Scalar value=0) -> ()");
}

namespace seq2seq_ext {
namespace {

// Arguments of sequence_mask and sequence_mask_.
// The dtypes the kernels are built for (all types, complex, bool, half, bfloat16): not uint16,
// uint32, uint64, the float8 types or complex32.
bool mask_dtype_supported(at::ScalarType s) {
  switch (s) {
    case at::kBool: case at::kByte: case at::kChar: case at::kShort: case at::kInt:
    case at::kLong: case at::kHalf: case at::kBFloat16: case at::kFloat: case at::kDouble:
    case at::kComplexFloat: case at::kComplexDouble:
      return true;
    default:
      return false;
  }
}

void check_sequence_mask_args(const at::Tensor& X, const at::Tensor& valid_len) {
  TORCH_CHECK(mask_dtype_supported(X.scalar_type()),
              "X: expected a bool, integer (uint8 to int64), floating or complex64/128 tensor, "
              "got ", X.scalar_type());
  check_min_dim(X, 2, "X");
  check_valid_len(valid_len, X.size(0), X, "X");
}

// X of the in-place sequence mask must not have elements sharing memory (an expanded tensor).
void check_mask_writable(const at::Tensor& X) {
  TORCH_CHECK(at::has_internal_overlap(X) != at::MemOverlap::Yes,
              "X: the in-place sequence mask cannot write into a tensor whose elements share "
              "memory (for instance an expanded tensor); clone it first or use the out-of-place op");
}

// The reference converts the value even when nothing is masked (an empty X included): a value
// X's dtype cannot hold is an error whatever the lengths.
void check_mask_value(const at::Tensor& X, const at::Scalar& value) {
  AT_DISPATCH_ALL_TYPES_AND_COMPLEX_AND3(at::kBool, at::kHalf, at::kBFloat16, X.scalar_type(),
                                         "sequence_mask_value", [&] {
    (void)mask_value<scalar_t>(value, X.scalar_type());
  });
}

void sequence_mask_(at::Tensor& X, const at::Tensor& valid_len, const at::Scalar& value) {
  // An inference tensor carries no dispatch key above its backend's, so this is the one place
  // that sees it: PyTorch's rule for every in-place op.
  TORCH_CHECK(!X.is_inference() || c10::InferenceMode::is_enabled(),
              "X: cannot write in place into an inference tensor outside torch.inference_mode() "
              "(make a normal tensor with X.clone() first)");
  check_sequence_mask_args(X, valid_len);
  check_mask_writable(X);
  check_mask_value(X, value);
  if (X.numel() == 0) return;
  // lengths read from X's own memory: copied first on CUDA, whose kernel may read a length
  // after another thread wrote X (the CPU kernel reads every length before it writes)
  const at::Tensor lengths =
      X.is_cuda() && valid_len.is_cuda() && X.storage().is_alias_of(valid_len.storage())
          ? valid_len.clone()
          : valid_len;
  SEQ2SEQ_EXT_KERNEL(X, sequence_mask_)(X, lengths, value);
}

at::Tensor sequence_mask(const at::Tensor& X, const at::Tensor& valid_len,
                         const at::Scalar& value) {
  check_sequence_mask_args(X, valid_len);
  check_mask_value(X, value);
  at::Tensor out = X.clone(at::MemoryFormat::Preserve);
  if (out.numel() != 0) SEQ2SEQ_EXT_KERNEL(out, sequence_mask_)(out, valid_len, value);
  return out;
}

}  // namespace

SEQ2SEQ_EXT_ENTRIES(m) {
  m.impl("sequence_mask", &sequence_mask);
  m.impl("sequence_mask_", &sequence_mask_);
}

// The in-place op's write must reach autograd. The ADInplaceOrView kernel bumps X's version
// counter (a graph that saved X then refuses to backward through its old values, as after any
// in-place op; in inference mode too, where a normal tensor still passes this key); the
// Autograd kernel refuses an X that requires grad, the op having no derivative (sequence_mask
// is differentiable).
namespace {

using MaskInPlaceSig = void(at::Tensor&, const at::Tensor&, const at::Scalar&);

const c10::TypedOperatorHandle<MaskInPlaceSig>& mask_inplace_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("seq2seq_ext::sequence_mask_", "")
                             .typed<MaskInPlaceSig>();
  return op;
}

void sequence_mask_autograd(at::Tensor& X, const at::Tensor& valid_len, const at::Scalar& value) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && X.requires_grad()),
              "X: the in-place sequence_mask_ has no derivative and X requires grad; use the "
              "out-of-place sequence_mask, or call it under torch.no_grad()");
  at::AutoDispatchBelowAutograd below;
  mask_inplace_op().call(X, valid_len, value);
}

void sequence_mask_inplace_or_view(at::Tensor& X, const at::Tensor& valid_len,
                                   const at::Scalar& value) {
  {
    at::AutoDispatchBelowADInplaceOrView below;
    mask_inplace_op().call(X, valid_len, value);
  }
  torch::autograd::impl::bump_version(X);
}

}  // namespace

TORCH_LIBRARY_IMPL(seq2seq_ext, Autograd, m) {
  m.impl("sequence_mask_", &sequence_mask_autograd);
}

TORCH_LIBRARY_IMPL(seq2seq_ext, ADInplaceOrView, m) {
  m.impl("sequence_mask_", &sequence_mask_inplace_or_view);
}

}  // namespace seq2seq_ext
