// Generic argument checks for every seq2seq_ext op (the checks of one op's own arguments live
// beside that op's entry, csrc/<op>.cpp).
//
// One TORCH_CHECK per rule; each message names the argument, what was expected and what came.
// Every op validates all of its arguments before it writes anything, so a call that fails
// leaves its inputs untouched.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace seq2seq_ext {

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + "]";
}

inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got an undefined tensor");
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  check_defined(t, name);
  TORCH_CHECK(t.dim() == dim, name, ": expected a ", dim, "-D tensor, got ", t.dim(),
              "-D with shape ", shape_str(t));
}

inline void check_min_dim(const at::Tensor& t, int64_t dim, const char* name) {
  check_defined(t, name);
  TORCH_CHECK(t.dim() >= dim, name, ": expected at least ", dim, " dimensions, got ", t.dim(),
              "-D with shape ", shape_str(t));
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t size, const char* name,
                       const char* what) {
  TORCH_CHECK(t.size(dim) == size, name, ": expected size ", size, " at dimension ", dim, " (",
              what, "), got ", t.size(dim), " (shape ", shape_str(t), ")");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected a tensor on ", ref.device(),
              " (the device of ", ref_name, "), got one on ", t.device());
}

inline void check_index_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, name,
              ": expected an int64 or int32 tensor of indices, got ", t.scalar_type());
}

// float64, float32, float16 or bfloat16 (the kernels' types; not the float8 ones)
inline void check_floating(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kDouble || s == at::kFloat || s == at::kHalf || s == at::kBFloat16, name,
              ": expected a floating-point tensor (float64, float32, float16 or bfloat16), got ",
              s);
}

// An optional incoming gradient of a backward op: undefined, or a real floating tensor of
// `shape` on input's device, returned contiguous in input's dtype.
inline at::Tensor incoming_grad(const std::optional<at::Tensor>& g, const at::Tensor& input,
                                at::IntArrayRef shape, const char* name) {
  if (!g.has_value() || !g->defined()) return at::Tensor();
  check_same_device(*g, input, name, "input");
  check_floating(*g, name);
  TORCH_CHECK(g->sizes() == shape, name, ": expected shape ", shape, ", got ", shape_str(*g));
  return g->to(input.scalar_type()).contiguous();
}

// The incoming gradient of the cell state: an LSTM's, checked as incoming_grad; a GRU has none.
inline at::Tensor cell_state_grad(bool lstm, const std::optional<at::Tensor>& g,
                                  const at::Tensor& input, at::IntArrayRef shape) {
  if (lstm) return incoming_grad(g, input, shape, "grad_cn");
  TORCH_CHECK(!g.has_value() || !g->defined(),
              "grad_cn: a GRU has no cell state: expected None, got a tensor of shape ",
              shape_str(*g));
  return at::Tensor();
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(),
              " (the dtype of ", ref_name, "), got ", t.scalar_type());
}

// valid_len may be any real dtype the reference accepts (it is compared with a float arange).
inline void check_valid_len(const at::Tensor& valid_len, int64_t batch, const at::Tensor& ref,
                            const char* ref_name) {
  check_dim(valid_len, 1, "valid_len");
  TORCH_CHECK(!at::isComplexType(valid_len.scalar_type()),
              "valid_len: expected a real (integer, bool or floating) tensor, got ",
              valid_len.scalar_type());
  TORCH_CHECK(valid_len.size(0) == batch, "valid_len: expected one length per sequence (",
              batch, ", the batch size of ", ref_name, "), got ", valid_len.size(0));
  check_same_device(valid_len, ref, "valid_len", ref_name);
}

// The batch_sizes of PackedSequence's layout, for an op whose packed input holds the rows of
// every step one after the other: CPU only, non-increasing sizes in [0, batch], and input's
// first size their sum.
inline void check_batch_sizes(at::IntArrayRef batch_sizes, int64_t batch, const at::Tensor& input,
                              const char* batch_of) {
  TORCH_CHECK(input.device().is_cpu(), "batch_sizes: the packed layout runs on the CPU; got "
              "input on ", input.device());
  int64_t rows = 0, prev = batch;
  for (const int64_t n : batch_sizes) {
    TORCH_CHECK(n >= 0 && n <= prev, "batch_sizes: expected non-increasing sizes between 0 ",
                "and the batch of ", batch_of, " (", batch, "), got ", batch_sizes);
    rows += prev = n;
  }
  TORCH_CHECK(input.size(0) == rows, "input: expected ", rows, " rows (the sum of ",
              "batch_sizes) in the packed layout, got shape ", shape_str(input));
}

}  // namespace seq2seq_ext
