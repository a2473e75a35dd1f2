// rnn_stack: a multi-layer GRU or LSTM (nn.GRU's / nn.LSTM's equations, unidirectional, any
// number of layers, with or without biases, dropout between layers) over T time steps, forward
// and backward. T = 1 is the one-step call of a decoder inside a Python loop: one op forward and
// one op backward for all layers.
//
// Schema, argument checks and the device-independent entry that allocates the outputs and calls
// the device kernel (CPU: csrc/cpu/rnn_stack.h; CUDA: csrc/cuda/rnn_stack.cu). Python wrapper,
// fake and autograd: seq2seq_ext/ops.py (section rnn_stack); tests: tests/ops/test_rnn_stack.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "bf16_products.h"
#include "checks.h"
#include "cpu/rnn_stack.h"
#include "deferred_weight_grads.h"
#include "rnn_cells.h"
#include "rnn_stack.h"

namespace seq2seq_ext {

bool is_lstm(c10::string_view cell) {
  TORCH_CHECK(cell == "gru" || cell == "lstm", "cell: expected 'gru' or 'lstm', got '", cell,
              "'");
  return cell == "lstm";
}

// Declared in rnn_stack.h, shared with the CUDA entry.
std::vector<int64_t> stack_rows_shape(const StackDims& d, std::vector<int64_t> lead,
                                      int64_t width) {
  if (d.is_packed) {
    lead.push_back(d.offsets().back());
  } else {
    lead.push_back(d.steps);
    lead.push_back(d.batch);
  }
  lead.push_back(width);
  return lead;
}

StackDims check_rnn_stack_args(bool lstm, const at::Tensor& input, const at::Tensor& h0,
                               const std::optional<at::Tensor>& c0, at::TensorList weights,
                               const std::optional<at::Tensor>& mask,
                               at::OptionalIntArrayRef batch_sizes) {
  const bool packed = batch_sizes.has_value();
  check_dim(input, packed ? 2 : 3, "input");
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "input: expected float32 or float64, got ", input.scalar_type());
  check_dim(h0, 3, "h0");
  check_same_device(h0, input, "h0", "input");
  check_same_dtype(h0, input, "h0", "input");
  StackDims d = packed ? StackDims{h0.size(0), static_cast<int64_t>(batch_sizes->size()),
                                   h0.size(1), input.size(1), h0.size(2), true, *batch_sizes,
                                   true}
                       : StackDims{h0.size(0), input.size(0), input.size(1), input.size(2),
                                   h0.size(2), true};
  if (packed) check_batch_sizes(*batch_sizes, d.batch, input, "h0");
  const int64_t L = d.layers, H = d.hidden, G = (lstm ? 4 : 3) * H;
  TORCH_CHECK(L >= 1, "h0: expected at least one layer (size 0 of h0), got shape ",
              shape_str(h0));
  check_size(h0, 1, d.batch, "h0", "the batch of input");
  const int64_t n = static_cast<int64_t>(weights.size());
  TORCH_CHECK(n == 4 * L || n == 2 * L, "weights: expected 4 tensors per layer (w_ih, w_hh, b_ih, ",
              "b_hh) or 2 without biases for the ", L, " layers of h0, got ", n);
  d.bias = n == 4 * L;
  const int64_t per = d.bias ? 4 : 2;
  static const char* names[4] = {"weights (w_ih)", "weights (w_hh)", "weights (b_ih)",
                                 "weights (b_hh)"};
  // the weight matrices: input's dtype, or all bfloat16 beside a float32 CPU input (the products
  // then take bf16 operands: the op under CPU autocast, see csrc/cpu/rnn_stack.h)
  const auto matrix_dtype = weights.empty() ? input.scalar_type() : weights[0].scalar_type();
  if (matrix_dtype == at::kBFloat16) check_bf16_matrices(input, "weights (w_ih)");
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t k = 0; k < per; ++k) {
      const at::Tensor& w = weights[per * l + k];
      const char* name = names[k];
      check_dim(w, k < 2 ? 2 : 1, name);
      check_same_device(w, input, name, "input");
      if (k < 2 && matrix_dtype == at::kBFloat16) {
        TORCH_CHECK(w.scalar_type() == at::kBFloat16, name, ": expected bfloat16 like the other ",
                    "weight matrices, got ", w.scalar_type(), " at layer ", l);
      } else {
        check_same_dtype(w, input, name, "input");
      }
      TORCH_CHECK(w.size(0) == G, name, ": expected ", G, " rows (", lstm ? 4 : 3,
                  " gates of hidden ", H, ") at layer ", l, ", got shape ", shape_str(w));
      if (k < 2) {
        const int64_t cols = k == 1 || l > 0 ? H : d.input;
        TORCH_CHECK(w.size(1) == cols, name, ": expected ", cols, " columns at layer ", l,
                    " (", k == 1 ? "hidden" : (l > 0 ? "hidden" : "the feature size of input"),
                    "), got shape ", shape_str(w));
      }
    }
  }
  if (lstm) {
    TORCH_CHECK(c0.has_value() && c0->defined(), "c0: expected the initial cell state of an LSTM");
    check_same_device(*c0, input, "c0", "input");
    check_same_dtype(*c0, input, "c0", "input");
    TORCH_CHECK(c0->sizes() == h0.sizes(), "c0: expected the shape of h0 ", shape_str(h0),
                ", got ", shape_str(*c0));
  } else {
    TORCH_CHECK(!(c0.has_value() && c0->defined()), "c0: a GRU has no cell state; pass None");
  }
  if (mask.has_value() && mask->defined()) {
    check_same_device(*mask, input, "dropout_mask", "input");
    check_same_dtype(*mask, input, "dropout_mask", "input");
    const std::vector<int64_t> want = stack_rows_shape(d, {L - 1}, H);
    TORCH_CHECK(mask->sizes() == at::IntArrayRef(want), "dropout_mask: expected shape ",
                at::IntArrayRef(want),
                d.is_packed ? " (layers - 1, the packed rows, hidden)"
                            : " (layers - 1, steps, batch, hidden)",
                ", got ", shape_str(*mask));
  }
  return d;
}

namespace {

StackGraphBackward& graph_backward_hook() {
  static StackGraphBackward fn;
  return fn;
}

}  // namespace

void set_stack_graph_backward(StackGraphBackward fn) { graph_backward_hook() = std::move(fn); }

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_stack_cpu(
    c10::string_view cell, const at::Tensor& input, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, at::TensorList weights,
    const std::optional<at::Tensor>& dropout_mask, at::OptionalIntArrayRef batch_sizes) {
  const bool lstm = is_lstm(cell);
  const StackDims d =
      check_rnn_stack_args(lstm, input, h0, c0, weights, dropout_mask, batch_sizes);
  const int64_t L = d.layers, T = d.steps, B = d.batch, H = d.hidden;
  const int64_t S = (lstm ? LstmCell::kSaved : GruCell::kSaved) * H;
  auto opts = input.options();
  // 38 MB for two LSTM layers at hidden 512 over 12 steps of 128 rows
  at::Tensor saved = cpu::empty_written_once(stack_rows_shape(d, {L}, S), opts);
  const StackOperands o = contiguous_operands(input, h0, c0, weights, dropout_mask);
  if (T == 0 || (d.is_packed && d.offsets().back() == 0)) {
    return {at::empty(stack_rows_shape(d, {}, H), opts), h0.clone(at::MemoryFormat::Contiguous),
            lstm ? o.c0.clone() : at::empty({0}, opts), saved};
  }
  at::Tensor output = at::empty(stack_rows_shape(d, {}, H), opts);
  at::Tensor h_n = at::empty({L, B, H}, opts);
  at::Tensor c_n = lstm ? at::empty({L, B, H}, opts) : at::Tensor();
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rnn_stack_cpu", [&] {
      if (lstm)
        cpu::stack_forward<LstmCell, scalar_t>(d, o.input, o.h0, o.c0, o.weights, o.mask,
                                               saved);
      else
        cpu::stack_forward<GruCell, scalar_t>(d, o.input, o.h0, o.c0, o.weights, o.mask,
                                              saved);
      cpu::stack_outputs<scalar_t>(d, S, saved, o.h0, o.c0, output, h_n, c_n);
    });
  }
  if (!lstm) c_n = at::empty({0}, opts);
  return {output, h_n, c_n, saved};
}

// rnn_stack_backward's CPU kernel; defer and rows as cpu::stack_backward's (the autograd's
// deferred weight gradients, csrc/deferred_weight_grads.h; null for the op).
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> stack_backward_cpu(
    c10::string_view cell, const std::optional<at::Tensor>& grad_output,
    const std::optional<at::Tensor>& grad_hn, const std::optional<at::Tensor>& grad_cn,
    const at::Tensor& input, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    at::TensorList weights, const std::optional<at::Tensor>& dropout_mask,
    const at::Tensor& saved, at::OptionalIntArrayRef batch_sizes,
    const std::vector<bool>* defer, std::vector<at::Tensor>* rows) {
  const bool lstm = is_lstm(cell);
  const StackDims d =
      check_rnn_stack_args(lstm, input, h0, c0, weights, dropout_mask, batch_sizes);
  const int64_t L = d.layers, B = d.batch, H = d.hidden;
  const int64_t S = (lstm ? LstmCell::kSaved : GruCell::kSaved) * H;
  const std::vector<int64_t> saved_shape = stack_rows_shape(d, {L}, S);
  check_same_device(saved, input, "saved", "input");
  check_same_dtype(saved, input, "saved", "input");
  TORCH_CHECK(saved.sizes() == at::IntArrayRef(saved_shape), "saved: expected shape ",
              at::IntArrayRef(saved_shape), " (rnn_stack's fourth output), got ",
              shape_str(saved));
  const std::vector<int64_t> out_shape = stack_rows_shape(d, {}, H), state_shape{L, B, H};
  const at::Tensor go = incoming_grad(grad_output, input, out_shape, "grad_output");
  const at::Tensor ghn = incoming_grad(grad_hn, input, state_shape, "grad_hn");
  const at::Tensor gcn = cell_state_grad(lstm, grad_cn, input, state_shape);
  const StackOperands o = contiguous_operands(input, h0, c0, weights, dropout_mask);
  const at::Tensor sv = saved.contiguous();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> out;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rnn_stack_backward_cpu", [&] {
    if (lstm)
      out = cpu::stack_backward<LstmCell, scalar_t>(d, go, ghn, gcn, o.input, o.h0, o.c0,
                                                    o.weights, o.mask, sv, defer, rows);
    else
      out = cpu::stack_backward<GruCell, scalar_t>(d, go, ghn, gcn, o.input, o.h0, o.c0,
                                                   o.weights, o.mask, sv, defer, rows);
  });
  if (!lstm) std::get<2>(out) = at::empty({0}, input.options());
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> rnn_stack_backward_cpu(
    c10::string_view cell, const std::optional<at::Tensor>& grad_output,
    const std::optional<at::Tensor>& grad_hn, const std::optional<at::Tensor>& grad_cn,
    const at::Tensor& input, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    at::TensorList weights, const std::optional<at::Tensor>& dropout_mask,
    const at::Tensor& saved, at::OptionalIntArrayRef batch_sizes) {
  return stack_backward_cpu(cell, grad_output, grad_hn, grad_cn, input, h0, c0, weights,
                            dropout_mask, saved, batch_sizes, nullptr, nullptr);
}

// The number of weights per layer in a weights list for h0's layers: 4 ([w_ih, w_hh, b_ih,
// b_hh]), 2 (no biases), or 0 for a list of neither length (left to the kernel's checks); the
// first two of each layer's are its matrices.
int64_t weights_per_layer(const at::Tensor& h0, size_t n) {
  // sym_size: size() of a fake tensor (torch.compile's tracing) would read, and so fix, every
  // dimension of h0, the batch included; this reads the layer count alone
  const int64_t layers = h0.dim() == 3 ? h0.sym_size(0).guard_int(__FILE__, __LINE__) : 0;
  const auto count = static_cast<int64_t>(n);
  return layers > 0 && count == 4 * layers ? 4 : (layers > 0 && count == 2 * layers ? 2 : 0);
}

// Autograd, in C++ rather than through torch.library.register_autograd: a decoder called once
// per token in a Python loop pays this per call, forward and backward, and a Python autograd
// function costs several times the op itself at the seeds' sizes (batch 32, hidden 32).
using StackBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>>(
    c10::string_view, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, at::TensorList, const std::optional<at::Tensor>&,
    const at::Tensor&, at::OptionalIntArrayRef);

const c10::TypedOperatorHandle<StackSig>& stack_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("seq2seq_ext::rnn_stack", "").typed<StackSig>();
  return op;
}

const c10::TypedOperatorHandle<StackBackwardSig>& stack_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("seq2seq_ext::rnn_stack_backward", "")
                             .typed<StackBackwardSig>();
  return op;
}

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

struct RnnStackFunction : public torch::autograd::Function<RnnStackFunction> {
  // Variables, in order: input, h0, c0 (when given), the weights, dropout_mask (when given).
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                std::string cell, const at::Tensor& input,
                                                const at::Tensor& h0,
                                                const std::optional<at::Tensor>& c0,
                                                at::TensorList weights,
                                                const std::optional<at::Tensor>& mask,
                                                at::OptionalIntArrayRef batch_sizes) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [output, h_n, c_n, saved] =
        stack_op().call(cell, input, h0, c0, weights, mask, batch_sizes);
    // saved is kept through a detached alias (the same data and version counter), not as an
    // output of this node: torch.utils.checkpoint's non-reentrant recomputation stops by raising
    // from the pack hook while the context is saving, which leaves the context holding what it
    // was given; an output there refers back to this node (its grad_fn), a cycle that nothing
    // frees, so every checkpointed call's recomputed graph leaked
    std::vector<at::Tensor> keep{input, h0, c0.value_or(at::Tensor()), mask.value_or(at::Tensor()),
                                 saved.detach()};
    keep.insert(keep.end(), weights.begin(), weights.end());
    // and the weights' values at this call for the kernels' backward: aliases of their storage
    // (with their version counters), so that new storage given to a weight later (`p.data = ...`,
    // a module's .double()) does not reach this call's backward; the weights themselves serve
    // the create_graph backward, whose graph must lead to them. (A tensor subclass, as
    // torch.compile traces with, is kept as it is.)
    for (const at::Tensor& w : weights)
      keep.push_back(at::isTensorSubclassLike(w) ? w : w.tensor_data());
    ctx->save_for_backward(keep);
    ctx->saved_data["cell"] = cell;
    ctx->saved_data["has_c0"] = c0.has_value() && c0->defined();
    ctx->saved_data["packed"] = batch_sizes.has_value();
    if (batch_sizes.has_value()) ctx->saved_data["batch_sizes"] = batch_sizes->vec();
    // saved (and a GRU's empty c_n) are not marked non-differentiable: compiled autograd
    // (torch._dynamo.compiled_autograd) takes no C++ autograd node that marks outputs so. No
    // gradient ever flows into them (ops.rnn_stack drops saved; the GRU's c_n is empty), and
    // an output without a gradient (saved, always; often the encoder's output or the decoder's
    // c_n) reaches backward undefined, which the kernel reads as zero, instead of as a zero
    // tensor autograd would allocate and fill (saved is the op's largest tensor)
    ctx->set_materialize_grads(false);
    return {output, h_n, c_n, saved};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto keep = ctx->get_saved_variables();
    const std::string cell = ctx->saved_data["cell"].toStringRef();
    const bool has_c0 = ctx->saved_data["has_c0"].toBool();
    const bool lstm = cell == "lstm";
    std::optional<std::vector<int64_t>> batch_sizes;
    if (ctx->saved_data["packed"].toBool())
      batch_sizes = ctx->saved_data["batch_sizes"].toIntVector();
    const size_t n_weights = (keep.size() - 5) / 2;
    const std::vector<at::Tensor> weights(keep.begin() + 5, keep.begin() + 5 + n_weights);
    const std::vector<at::Tensor> values(keep.begin() + 5 + n_weights, keep.end());
    // one gradient per argument of forward: cell, input, h0, c0, each weight, dropout_mask,
    // batch_sizes
    auto gradients = [&](const at::Tensor& g_input, const at::Tensor& g_h0,
                         const at::Tensor& g_c0, const std::vector<at::Tensor>& g_w) {
      torch::autograd::variable_list out{at::Tensor(), g_input, g_h0};
      out.push_back(has_c0 && lstm ? g_c0 : at::Tensor());
      out.insert(out.end(), g_w.begin(), g_w.end());
      out.push_back(at::Tensor());
      out.push_back(at::Tensor());
      return out;
    };
    // create_graph (gradients that carry a graph), or vmap's batched gradients of
    // autograd.grad(..., is_grads_batched=True) and jacobian(vectorize=True), which the kernels
    // cannot read (functorch has no fallback for an op returning Tensor[], and the deferred
    // rows are read from data pointers): the composite backward in PyTorch ops. Other
    // wrappers (FakeTensor and FunctionalTensor under torch.compile, dispatch modes) go to
    // the backward op, which has a fake kernel.
    static const c10::DispatchKeySet batched({c10::DispatchKey::FuncTorchBatched,
                                              c10::DispatchKey::BatchedNestedTensor,
                                              c10::DispatchKey::Batched});
    bool composite = at::GradMode::is_enabled();
    for (const auto& g : grads)
      composite = composite ||
                  (g.defined() && g.unsafeGetTensorImpl()->key_set().has_any(batched));
    if (composite) {
      const StackGraphBackward& graph_backward = graph_backward_hook();
      TORCH_CHECK(graph_backward,
                  "rnn_stack: a backward with create_graph=True (for a double backward) needs "
                  "the seq2seq_ext Python package, which was not imported");
      const std::vector<at::Tensor> g = graph_backward(
          cell, {grads[0], grads[1], lstm ? grads[2] : at::Tensor()}, keep[0], keep[1],
          has_c0 ? keep[2] : at::Tensor(), weights, keep[3], batch_sizes);
      TORCH_CHECK(g.size() == 3 + weights.size(), "rnn_stack: the create_graph backward gave ",
                  g.size(), " gradients for ", 3 + weights.size(), " inputs");
      return gradients(g[0], g[1], g[2], std::vector<at::Tensor>(g.begin() + 3, g.end()));
    }
    // nothing records the kernels' backward: skip autograd's not-implemented fallback (boxed, a
    // large share of a small call)
    at::AutoDispatchBelowADInplaceOrView below;
    // the matrices whose gradients a WeightGradSum sums over the calls (deferred_weight_grads.h)
    std::vector<bool> defer(weights.size(), false);
    bool deferring = false;
    const size_t first_weight_edge = has_c0 ? 3 : 2;  // after input, h0 (and c0)
    for (size_t k = 0; k < weights.size(); ++k) {
      defer[k] = weight_grad_sum(weights[k]) != nullptr &&
                 ctx->needs_input_grad(first_weight_edge + k);
      deferring = deferring || defer[k];
    }
    const auto sizes =
        batch_sizes ? at::OptionalIntArrayRef(*batch_sizes) : at::OptionalIntArrayRef();
    std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> result;
    if (deferring) {  // deferring calls are CPU ones (defers_grad): the kernel itself
      RECORD_FUNCTION("seq2seq_ext::rnn_stack_backward", std::vector<c10::IValue>());
      std::vector<at::Tensor> rows;
      result = stack_backward_cpu(cell, opt(grads[0]), opt(grads[1]),
                                  lstm ? opt(grads[2]) : std::nullopt, keep[0], keep[1],
                                  opt(keep[2]), values, opt(keep[3]), keep[4], sizes, &defer,
                                  &rows);
      for (size_t k = 0; k < weights.size(); ++k) {
        if (!defer[k]) continue;
        bool shared = false;  // W_ih and W_hh of a layer handed the same gate gradients
        for (size_t j = 0; j < weights.size(); ++j)
          shared = shared || (j != k && defer[j] && rows[3 * j].is_same(rows[3 * k]));
        weight_grad_sum(weights[k])->add_rows(rows[3 * k], rows[3 * k + 1], shared,
                                              rows[3 * k + 2]);
      }
    } else {
      result = stack_backward_op().call(cell, opt(grads[0]), opt(grads[1]),
                                        lstm ? opt(grads[2]) : std::nullopt, keep[0], keep[1],
                                        opt(keep[2]), values, opt(keep[3]), keep[4], sizes);
    }
    auto& [grad_input, grad_h0, grad_c0, grad_w] = result;
    return gradients(grad_input, grad_h0, grad_c0, grad_w);
  }
};

// True when weights[k] is also another of the weights (tied matrices): one sum of deferred rows
// holds one role's rows (a layer's W_ih or W_hh), so a tied matrix is not deferred.
bool passed_twice(at::TensorList weights, size_t k) {
  for (size_t j = 0; j < weights.size(); ++j)
    if (j != k && weights[j].is_same(weights[k])) return true;
  return false;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_stack_autograd(
    c10::string_view cell, const at::Tensor& input, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, at::TensorList weights,
    const std::optional<at::Tensor>& dropout_mask, at::OptionalIntArrayRef batch_sizes) {
  bool needs_grad = false;
  if (at::GradMode::is_enabled()) {
    needs_grad = input.requires_grad() || h0.requires_grad() ||
                 (c0.has_value() && c0->defined() && c0->requires_grad());
    for (const auto& w : weights) needs_grad = needs_grad || w.requires_grad();
  }
  if (!needs_grad) {  // nothing to record: straight to the kernel
    at::AutoDispatchBelowADInplaceOrView below;
    return stack_op().call(cell, input, h0, c0, weights, dropout_mask, batch_sizes);
  }
  // a one-step call's large matrices through their deferring aliases (deferred_weight_grads.h)
  std::vector<at::Tensor> w(weights.begin(), weights.end());
  const int64_t per = weights_per_layer(h0, w.size());
  for (size_t k = 0; per > 0 && k < w.size(); ++k)
    if (static_cast<int64_t>(k) % per < 2 && defers_grad(input, batch_sizes.has_value(), w[k]) &&
        !passed_twice(weights, k))
      w[k] = deferring_alias(w[k], static_cast<int>(k % per) + (cell == "gru" ? 2 : 0));
  auto out = RnnStackFunction::apply(std::string(cell), input, h0, c0, at::TensorList(w),
                                     dropout_mask, batch_sizes);
  return {out[0], out[1], out[2], out[3]};
}

// Under CPU autocast: with bfloat16 as autocast's dtype, the weight matrices go to the kernel in
// bfloat16 through autocast's own cast cache (a leaf parameter is cast once per autocast region,
// however many steps call the op) and everything else in float32; with another dtype, every
// floating argument in float32. float64 calls run as they are.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_stack_autocast_cpu(
    c10::string_view cell, const at::Tensor& input, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, at::TensorList weights,
    const std::optional<at::Tensor>& dropout_mask, at::OptionalIntArrayRef batch_sizes) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCPU);
  if (input.scalar_type() == at::kDouble)
    return stack_op().call(cell, input, h0, c0, weights, dropout_mask, batch_sizes);
  const int64_t n = static_cast<int64_t>(weights.size());
  const int64_t per = weights_per_layer(h0, weights.size());
  std::vector<at::Tensor> w;
  w.reserve(n);
  for (int64_t k = 0; k < n; ++k) {
    const bool matrix = per > 0 && k % per < 2;
    w.push_back(matrix ? autocast_cpu_matrix(weights[k]) : autocast_cpu_float(weights[k]));
  }
  return stack_op().call(cell, autocast_cpu_float(input), autocast_cpu_float(h0),
                         autocast_cpu_float(c0), w, autocast_cpu_float(dropout_mask),
                         batch_sizes);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(seq2seq_ext, m) {
  // cell: "gru" or "lstm". input (T, B, I); h0 (L, B, H); c0 (L, B, H) for the LSTM, None for
  // the GRU; weights: the module's flat weights, [w_ih, w_hh, b_ih, b_hh] per layer or
  // [w_ih, w_hh] without biases; dropout_mask (L-1, T, B, H), when given, multiplies each
  // layer's output but the last before it feeds the next layer (nn.GRU's inter-layer dropout,
  // the mask already scaled by 1 / (1 - p)).
  // Returns the top layer's output (T, B, H), h_n (L, B, H), c_n (L, B, H) (empty for the GRU)
  // and what the backward needs, saved (L, T, B, S*H) (see csrc/rnn_cells.h).
  // batch_sizes (CPU), when given: PackedSequence's layout (rnn_stack.h). input is (N, I) and
  // output (N, H), dropout_mask (L-1, N, H) and saved (L, N, S*H) are packed alike; h_n and c_n
  // hold each row's state after its last step (h0's / c0's row for a row in no step).
  m.def(
      "rnn_stack(str cell, Tensor input, Tensor h0, Tensor? c0, Tensor[] weights, "
      "Tensor? dropout_mask, int[]? batch_sizes=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients of rnn_stack: (input, h0, c0 (empty for the GRU), weights in their order).
  m.def(
      "rnn_stack_backward(str cell, Tensor? grad_output, Tensor? grad_hn, Tensor? grad_cn, "
      "Tensor input, Tensor h0, Tensor? c0, Tensor[] weights, Tensor? dropout_mask, "
      "Tensor saved, int[]? batch_sizes=None) -> (Tensor, Tensor, Tensor, Tensor[])");
}

TORCH_LIBRARY_IMPL(seq2seq_ext, CPU, m) {
  m.impl("rnn_stack", &rnn_stack_cpu);
  m.impl("rnn_stack_backward", &rnn_stack_backward_cpu);
}

TORCH_LIBRARY_IMPL(seq2seq_ext, Autograd, m) {
  m.impl("rnn_stack", &rnn_stack_autograd);
  // differentiating the backward op raises autograd's not-implemented error (entry.h's
  // SEQ2SEQ_EXT_NO_DERIVATIVE; create_graph on rnn_stack's backward gives second derivatives)
  m.impl("rnn_stack_backward", torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(seq2seq_ext, AutocastCPU, m) { m.impl("rnn_stack", &rnn_stack_autocast_cpu); }

}  // namespace seq2seq_ext
