// seq2seq_ext::gru_layer and gru_layer_backward: schema, argument checks and the
// device-independent entries. Kernels: cpu/gru_layer.cpp, cuda/gru_layer.cu; the
// whole-sequence part of the backward: gru_grads.h.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "bf16_products.h"
#include "checks.h"
#include "cpu/common.h"
#include "cpu/linear.h"
#include "entry.h"
#include "gru_grads.h"
#include "gru_layer.h"

TORCH_LIBRARY_FRAGMENT(seq2seq_ext, m) {
  // One GRU layer over a whole sequence, nn.GRU's equations and gate order (r, z, n; b_hn inside
  // the reset product). input (T, B, I), h0 (B, H), w_ih (3H, I), w_hh (3H, H), b_ih, b_hh (3H);
  // extra (B, 3H), when given, is added to the input projection at every step (the decoder's
  // constant context: its share of W_ih x is computed once per sequence). Returns the output
  // (T, B, H), the final state (B, H) and the activations the backward needs (T, B, 4H:
  // r, z, n and W_hn h + b_hn).
  // batch_sizes (CPU), when given: input is the packed layout (N, I) of gru_layer.h (the rows
  // of step t are the first batch_sizes[t] of the batch); output and saved are packed alike
  // and each row's final state is its state after its last step (h0's row for a row in no step).
  m.def(
      "gru_layer(Tensor input, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor b_ih, Tensor b_hh, "
      "Tensor? extra, int[]? batch_sizes=None) -> (Tensor, Tensor, Tensor)");
  // Gradients of gru_layer: (input, h0, w_ih, w_hh, b_ih, b_hh, extra); grad_extra is empty
  // unless has_extra.
  m.def(
      "gru_layer_backward(Tensor grad_output, Tensor? grad_hn, Tensor input, Tensor h0, "
      "Tensor w_ih, Tensor w_hh, Tensor output, Tensor saved, bool has_extra, "
      "int[]? batch_sizes=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

namespace seq2seq_ext {
namespace {

// The shape of a per-row tensor of `width` features: (T, B, width), or (N, width) packed.
std::vector<int64_t> rows_shape(const GruLayerDims& d, int64_t width) {
  if (d.packed()) return {d.offsets().back(), width};
  return {d.steps, d.batch, width};
}

// Checks the arguments of gru_layer (device independent).
GruLayerDims check_gru_layer_args(const at::Tensor& input, const at::Tensor& h0,
                                         const at::Tensor& w_ih, const at::Tensor& w_hh,
                                         const at::Tensor& b_ih, const at::Tensor& b_hh,
                                         const std::optional<at::Tensor>& extra,
                                         at::OptionalIntArrayRef batch_sizes) {
  const bool packed = batch_sizes.has_value();
  check_dim(input, packed ? 2 : 3, "input");
  check_floating(input, "input");
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "input: expected float32 or float64, got ", input.scalar_type());
  check_dim(w_hh, 2, "w_hh");
  check_dim(h0, 2, "h0");
  // the weight matrices: input's dtype, or both bfloat16 beside a float32 CPU input (bf16
  // products: the op under CPU autocast, bf16_products.h)
  const bool low = w_ih.scalar_type() == at::kBFloat16 || w_hh.scalar_type() == at::kBFloat16;
  if (low) check_bf16_matrices(input, w_ih.scalar_type() == at::kBFloat16 ? "w_ih" : "w_hh");
  auto check_matrix_dtype = [&](const at::Tensor& w, const char* name) {
    if (low) {
      TORCH_CHECK(w.scalar_type() == at::kBFloat16, name, ": expected bfloat16 like the other ",
                  "weight matrix, got ", w.scalar_type());
    } else {
      check_same_dtype(w, input, name, "input");
    }
  };
  GruLayerDims d = packed ? GruLayerDims{static_cast<int64_t>(batch_sizes->size()), h0.size(0),
                                         input.size(1), w_hh.size(1), *batch_sizes, true}
                          : GruLayerDims{input.size(0), input.size(1), input.size(2),
                                         w_hh.size(1)};
  if (packed) check_batch_sizes(*batch_sizes, d.batch, input, "h0");
  const int64_t H = d.hidden, G = 3 * H;
  check_same_device(w_hh, input, "w_hh", "input");
  check_matrix_dtype(w_hh, "w_hh");
  check_size(w_hh, 0, G, "w_hh", "3 * hidden, hidden being w_hh's second size");
  check_dim(w_ih, 2, "w_ih");
  check_same_device(w_ih, input, "w_ih", "input");
  check_matrix_dtype(w_ih, "w_ih");
  check_size(w_ih, 0, G, "w_ih", "3 * hidden");
  check_size(w_ih, 1, d.input, "w_ih", "the feature size of input");
  const at::Tensor* biases[2] = {&b_ih, &b_hh};
  const char* bnames[2] = {"b_ih", "b_hh"};
  for (int k = 0; k < 2; ++k) {
    check_dim(*biases[k], 1, bnames[k]);
    check_same_device(*biases[k], input, bnames[k], "input");
    check_same_dtype(*biases[k], input, bnames[k], "input");
    check_size(*biases[k], 0, G, bnames[k], "3 * hidden");
  }
  check_same_device(h0, input, "h0", "input");
  check_same_dtype(h0, input, "h0", "input");
  TORCH_CHECK(h0.size(0) == d.batch && h0.size(1) == H, "h0: expected shape [", d.batch, ", ", H,
              "] (batch of input, hidden of w_hh), got ", shape_str(h0));
  if (extra.has_value() && extra->defined()) {
    check_dim(*extra, 2, "extra");
    check_same_device(*extra, input, "extra", "input");
    check_same_dtype(*extra, input, "extra", "input");
    TORCH_CHECK(extra->size(0) == d.batch && extra->size(1) == G, "extra: expected shape [",
                d.batch, ", ", G, "] (batch, 3 * hidden), got ", shape_str(*extra));
  }
  return d;
}

// The tensors gru_layer_backward takes besides the forward's arguments (device independent):
// grad_output and output (T, B, H), saved (T, B, 4H) and grad_hn (B, H) when given, all on the
// device of input; output and saved in input's dtype (grad_output and grad_hn may be of another
// dtype: they are converted, as the CPU kernel's in-place add converts grad_output). The two
// shape rules the CPU kernel checks come first, with its messages; the rest guards a device
// kernel against reading through pointers of the wrong size, device or type.
void check_gru_layer_backward_tensors(const at::Tensor& grad_output,
                                             const std::optional<at::Tensor>& grad_hn,
                                             const at::Tensor& input, const at::Tensor& output,
                                             const at::Tensor& saved, const GruLayerDims& d) {
  const int64_t B = d.batch, H = d.hidden;
  check_defined(grad_output, "grad_output");
  check_defined(output, "output");
  check_defined(saved, "saved");
  TORCH_CHECK(grad_output.sizes() == output.sizes(), "grad_output: expected shape ",
              shape_str(output), ", got ", shape_str(grad_output));
  const std::vector<int64_t> want_saved = rows_shape(d, 4 * H), want_out = rows_shape(d, H);
  TORCH_CHECK(saved.sizes() == at::IntArrayRef(want_saved), "saved: expected shape ",
              at::IntArrayRef(want_saved), ", got ", shape_str(saved));
  TORCH_CHECK(output.sizes() == at::IntArrayRef(want_out), "output: expected shape ",
              at::IntArrayRef(want_out), d.packed() ? " (the packed rows of input, " : " (steps and batch of input, ",
              "hidden of w_hh), got ", shape_str(output));
  check_same_device(output, input, "output", "input");
  check_same_dtype(output, input, "output", "input");
  check_same_device(saved, input, "saved", "input");
  check_same_dtype(saved, input, "saved", "input");
  check_same_device(grad_output, input, "grad_output", "input");
  check_floating(grad_output, "grad_output");
  if (grad_hn.has_value() && grad_hn->defined()) {
    check_floating(*grad_hn, "grad_hn");
    TORCH_CHECK(grad_hn->dim() == 2 && grad_hn->size(0) == B && grad_hn->size(1) == H,
                "grad_hn: expected shape [", B, ", ", H, "] (the final state's), got ",
                shape_str(*grad_hn));
    check_same_device(*grad_hn, input, "grad_hn", "input");
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_layer(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const at::Tensor& b_ih, const at::Tensor& b_hh, const std::optional<at::Tensor>& extra,
    at::OptionalIntArrayRef batch_sizes) {
  const GruLayerDims d =
      check_gru_layer_args(input, h0, w_ih, w_hh, b_ih, b_hh, extra, batch_sizes);
  const int64_t T = d.steps, B = d.batch, H = d.hidden;
  auto opts = input.options();
  at::Tensor output = cpu::empty_written_once(rows_shape(d, H), opts);
  at::Tensor saved = cpu::empty_written_once(rows_shape(d, 4 * H), opts);
  if (T == 0 || B == 0 || output.numel() == 0)
    return {output, h0.clone(at::MemoryFormat::Contiguous), saved};
  SEQ2SEQ_EXT_KERNEL(input, gru_layer)(d, input, h0, w_ih, w_hh, b_ih, b_hh, extra, output,
                                       saved);
  if (!d.packed())
    return {output, output.select(0, T - 1).clone(at::MemoryFormat::Contiguous), saved};
  // each row's state after its last step: the rows of step t are a prefix of the batch
  at::Tensor h_n = h0.clone(at::MemoryFormat::Contiguous);
  const std::vector<int64_t> off = d.offsets();
  for (int64_t t = 0; t < T; ++t)
    if (d.batch_sizes[t] > 0)
      h_n.narrow(0, 0, d.batch_sizes[t]).copy_(output.narrow(0, off[t], d.batch_sizes[t]));
  return {output, h_n, saved};
}

std::tuple<at::Tensor, at::Tensor> gru_layer_projected_cpu(const at::Tensor& gi,
                                                           const at::Tensor& h0,
                                                           const at::Tensor& w_hh,
                                                           const at::Tensor& b_hh) {
  check_dim(gi, 3, "gi");
  TORCH_CHECK(gi.scalar_type() == at::kFloat || gi.scalar_type() == at::kDouble,
              "gi: expected float32 or float64, got ", gi.scalar_type());
  TORCH_CHECK(gi.is_cpu(), "gi: expected a CPU tensor, got one on ", gi.device());
  check_dim(w_hh, 2, "w_hh");
  check_dim(h0, 2, "h0");
  check_dim(b_hh, 1, "b_hh");
  const GruLayerDims d{gi.size(0), gi.size(1), 0, w_hh.size(1)};
  const int64_t H = d.hidden, G = 3 * H;
  const bool bf16_weights = w_hh.scalar_type() == at::kBFloat16;
  TORCH_CHECK(!bf16_weights || gi.scalar_type() == at::kFloat,
              "w_hh: bfloat16 weights go with a float32 gi, got ", gi.scalar_type());
  const at::Tensor* others[3] = {&h0, &w_hh, &b_hh};
  const char* names[3] = {"h0", "w_hh", "b_hh"};
  for (int k = 0; k < 3; ++k) {
    check_same_device(*others[k], gi, names[k], "gi");
    if (!(bf16_weights && k == 1)) check_same_dtype(*others[k], gi, names[k], "gi");
  }
  check_size(w_hh, 0, G, "w_hh", "3 * hidden, hidden being w_hh's second size");
  check_size(gi, 2, G, "gi", "3 * hidden (w_hh's first size)");
  check_size(b_hh, 0, G, "b_hh", "3 * hidden");
  TORCH_CHECK(h0.size(0) == d.batch && h0.size(1) == H, "h0: expected shape [", d.batch, ", ", H,
              "] (batch of gi, hidden of w_hh), got ", shape_str(h0));
  auto opts = gi.options();
  at::Tensor output = cpu::empty_written_once(rows_shape(d, H), opts);
  if (d.steps == 0 || d.batch == 0 || H == 0)
    return {output, h0.clone(at::MemoryFormat::Contiguous)};
  at::Tensor saved = cpu::empty_written_once(rows_shape(d, 4 * H), opts);
  const at::Tensor rows = gi.reshape({d.steps * d.batch, G}).contiguous();
  cpu::gru_layer_steps(d, rows, h0, w_hh, b_hh, output, saved, /*round_state=*/false);
  return {output, output.select(0, d.steps - 1).clone(at::MemoryFormat::Contiguous)};
}

at::Tensor linear_bf16_weights_cpu(const at::Tensor& x, const at::Tensor& w,
                                   const at::Tensor& b) {
  check_dim(x, 2, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_cpu(), "x: expected a float32 CPU tensor, ",
              "got ", x.scalar_type(), " on ", x.device());
  check_dim(w, 2, "w");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.is_cpu(),
              "w: expected a bfloat16 CPU tensor, got ", w.scalar_type(), " on ", w.device());
  check_dim(b, 1, "b");
  TORCH_CHECK(b.scalar_type() == at::kFloat && b.is_cpu(), "b: expected a float32 CPU tensor, ",
              "got ", b.scalar_type(), " on ", b.device());
  check_size(w, 1, x.size(1), "w", "x's columns");
  check_size(b, 0, w.size(0), "b", "w's rows");
  const at::Tensor x_c = x.contiguous(), w_c = w.contiguous(), b_c = b.contiguous();
  at::Tensor y = cpu::empty_written_once({x.size(0), w.size(0)}, x.options());
  cpu::linear_nt<float, c10::BFloat16>(x_c.const_data_ptr<float>(), x.size(1), x.size(0),
                                       x.size(1), w_c.const_data_ptr<c10::BFloat16>(),
                                       x.size(1), w.size(0), b_c.const_data_ptr<float>(),
                                       y.data_ptr<float>(), false);
  return y;
}

std::tuple<at::Tensor, at::Tensor> gru_over_projection_cpu(const at::Tensor& gi0,
                                                           const at::Tensor& h0,
                                                           at::TensorList flat) {
  const int64_t layers = static_cast<int64_t>(flat.size()) / 4;
  TORCH_CHECK(layers > 0 && static_cast<int64_t>(flat.size()) == 4 * layers,
              "flat_weights: expected nn.GRU's flat weights, 4 tensors a layer, got ",
              flat.size());
  TORCH_CHECK(h0.dim() == 3 && h0.size(0) == layers, "h0: expected the state of a ", layers,
              "-layer GRU, (", layers, ", batch, hidden), got shape ", shape_str(h0));
  at::Tensor x, h_n;
  std::tie(x, h_n) = gru_layer_projected_cpu(gi0, h0.select(0, 0), flat[1], flat[3]);
  std::vector<at::Tensor> states{h_n};
  for (int64_t l = 1; l < layers; ++l) {
    const at::Tensor &w_ih = flat[4 * l], &w_hh = flat[4 * l + 1];
    const at::Tensor &b_ih = flat[4 * l + 2], &b_hh = flat[4 * l + 3];
    if (w_ih.scalar_type() == at::kBFloat16) {
      // (no -1 in the view: zero steps)
      const at::Tensor gi = linear_bf16_weights_cpu(x.reshape({-1, x.size(-1)}), w_ih, b_ih)
                                .view({x.size(0), x.size(1), w_ih.size(0)});
      std::tie(x, h_n) = gru_layer_projected_cpu(gi, h0.select(0, l), w_hh, b_hh);
    } else {
      auto out = gru_layer(x, h0.select(0, l), w_ih, w_hh, b_ih, b_hh, std::nullopt);
      x = std::get<0>(out);
      h_n = std::get<1>(out);
    }
    states.push_back(h_n);
  }
  return {x, at::stack(states)};
}

std::tuple<at::Tensor, at::Tensor> encode_over_table_cpu(const at::Tensor& X,
                                                         const at::Tensor& table,
                                                         at::TensorList flat, int64_t layers,
                                                         int64_t hidden) {
  check_dim(X, 2, "X");
  const at::Tensor gi0 = at::embedding(table, X.t());
  const at::Tensor h0 = at::zeros({layers, X.size(0), hidden}, table.options());
  return gru_over_projection_cpu(gi0, h0, flat);
}

namespace {

GruLayerGrads gru_layer_backward(const at::Tensor& grad_output,
                                 const std::optional<at::Tensor>& grad_hn,
                                 const at::Tensor& input, const at::Tensor& h0,
                                 const at::Tensor& w_ih, const at::Tensor& w_hh,
                                 const at::Tensor& output, const at::Tensor& saved,
                                 bool has_extra, at::OptionalIntArrayRef batch_sizes) {
  check_dim(w_hh, 2, "w_hh");  // its rows give the bias shapes the checks below compare
  const GruLayerDims d =
      check_gru_layer_args(input, h0, w_ih, w_hh, input.new_empty({w_hh.size(0)}),
                           input.new_empty({w_hh.size(0)}), std::nullopt, batch_sizes);
  // output and saved are read through raw pointers by the kernels: their shapes, dtypes and
  // devices are checked first (an output narrower than (T, B, H) would be read past its end)
  check_gru_layer_backward_tensors(grad_output, grad_hn, input, output, saved, d);
  const int64_t B = d.batch, H = d.hidden, G = 3 * H;
  auto opts = input.options();
  at::Tensor dgi = cpu::empty_written_once(rows_shape(d, G), opts);
  at::Tensor dgh = cpu::empty_written_once(rows_shape(d, G), opts);
  // a fresh (B, H) buffer in input's dtype: grad_hn of another dtype is converted
  at::Tensor dh = (grad_hn.has_value() && grad_hn->defined())
                      ? at::empty({B, H}, opts).copy_(*grad_hn)
                      : at::zeros({B, H}, opts);
  const at::Tensor out_c = output.contiguous();
  const at::Tensor h0_c = h0.contiguous();
  GruGateSums sums;
  if (H > 0)  // (no hidden unit: the gate gradients are empty, every other gradient zero)
    SEQ2SEQ_EXT_KERNEL(input, gru_layer_backward)(d, grad_output, h0_c, w_hh, out_c, saved, dgi,
                                                  dgh, dh, has_extra, sums);
  return gru_layer_sequence_grads(d, dgi, dgh, dh, input, h0_c, out_c, w_ih, has_extra, sums);
}

// Under CPU autocast: with bfloat16 as autocast's dtype, w_ih and w_hh go to the kernel in
// bfloat16 through autocast's cast cache (bf16 products, bf16_products.h) and the other floating
// arguments in float32; with another dtype, all of them in float32. float64 calls run as they
// are. (On CUDA the op's autocast rule is float32 throughout: seq2seq_ext/ops.py.)
std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_layer_autocast_cpu(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const at::Tensor& b_ih, const at::Tensor& b_hh, const std::optional<at::Tensor>& extra,
    at::OptionalIntArrayRef batch_sizes) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCPU);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("seq2seq_ext::gru_layer", "")
                             .typed<decltype(gru_layer)>();
  if (input.scalar_type() == at::kDouble)
    return op.call(input, h0, w_ih, w_hh, b_ih, b_hh, extra, batch_sizes);
  return op.call(autocast_cpu_float(input), autocast_cpu_float(h0), autocast_cpu_matrix(w_ih),
                 autocast_cpu_matrix(w_hh), autocast_cpu_float(b_ih), autocast_cpu_float(b_hh),
                 autocast_cpu_float(extra), batch_sizes);
}

}  // namespace

SEQ2SEQ_EXT_ENTRIES(m) {
  m.impl("gru_layer", &gru_layer);
  m.impl("gru_layer_backward", &gru_layer_backward);
}

SEQ2SEQ_EXT_NO_DERIVATIVE("gru_layer_backward")

TORCH_LIBRARY_IMPL(seq2seq_ext, AutocastCPU, m) { m.impl("gru_layer", &gru_layer_autocast_cpu); }

}  // namespace seq2seq_ext
