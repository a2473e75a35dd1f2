// The forward of the drop-in nn.GRU / nn.LSTM layers (seq2seq_ext/nn.py) in one C++ call: the
// layout work around rnn_stack (batch_first, unbatched input, a missing initial state, the
// dropout masks) and the op itself through the dispatcher's typed (unboxed) call.
//
// What it buys: a decoder called once per token spends most of its time in per-call overhead
// at the seeds' sizes; done in Python with a boxed torch.ops call, this layout work and the call
// cost several times the fused op's own compute (see benchmarks/RESULTS.md, "drop-in layers").
// The dispatcher call keeps autograd, dispatch modes and fake tensors working; the Python caller
// takes this path only when no torch function mode is active and nothing is being compiled.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include "dropout_mask.h"
#include "rnn_forward.h"
#include "rnn_stack.h"
#include "torch_dropout_mask.h"

namespace seq2seq_ext {
namespace {

const c10::TypedOperatorHandle<StackSig>& stack_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("seq2seq_ext::rnn_stack", "")
                             .typed<StackSig>();
  return op;
}

// Whether rnn_stack has a kernel for the device (CUDA only in a CUDA build).
bool has_kernel(const at::Device& device) {
  static const bool cpu = stack_op().hasKernelForDispatchKey(c10::DispatchKey::CPU);
  static const bool cuda = stack_op().hasKernelForDispatchKey(c10::DispatchKey::CUDA);
  return device.is_cpu() ? cpu : (device.is_cuda() && cuda);
}

// Whether the fused op takes the input under the autocast in force: CPU autocast to bfloat16
// over a float32 input (the op's autocast rule, csrc/rnn_stack.cpp, runs it with bf16 products)
// or a float64 input (which autocast leaves alone). Other settings leave the layer to torch.nn.
bool autocast_ok(const at::Tensor& input) {
  if (!at::autocast::is_autocast_enabled(input.device().type())) return true;
  if (input.scalar_type() == at::kDouble) return true;
  return input.is_cpu() && input.scalar_type() == at::kFloat &&
         at::autocast::get_autocast_dtype(at::kCPU) == at::kBFloat16;
}

bool same_kind(const at::Tensor& t, const at::Tensor& like) {
  return t.scalar_type() == like.scalar_type() && t.device() == like.device();
}

// A given state the fused op takes beside `input`: of its kind, or, under CPU autocast to
// bfloat16 over a float32 input, a bfloat16 one (PyTorch's own oneDNN LSTM returns its states
// so: an encoder that ran it hands them to the decoder), which the op's autocast rule casts to
// float32 like any other floating argument.
bool state_ok(const at::Tensor& s, const at::Tensor& input) {
  if (same_kind(s, input)) return true;
  return s.scalar_type() == at::kBFloat16 && s.device() == input.device() &&
         at::autocast::is_autocast_enabled(at::kCPU) && input.is_cpu() &&
         input.scalar_type() == at::kFloat &&
         at::autocast::get_autocast_dtype(at::kCPU) == at::kBFloat16;
}

}  // namespace

pybind11::object rnn_forward(const std::string& cell, const at::Tensor& input,
                             pybind11::handle hx, const std::vector<at::Tensor>& weights,
                             int64_t layers, int64_t hidden, bool batch_first, double dropout,
                             bool training, bool torch_masks) {
  const bool lstm = cell == "lstm";
  const auto dtype = input.scalar_type();
  if ((dtype != at::kFloat && dtype != at::kDouble) || (input.dim() != 2 && input.dim() != 3) ||
      weights.empty() || !has_kernel(input.device()) || !autocast_ok(input))
    return pybind11::none();
  if (!(dropout >= 0 && dropout <= 1)) return pybind11::none();  // torch.nn raises (NaN too)
  for (const auto& w : weights)
    if (!w.defined() || !same_kind(w, input)) return pybind11::none();
  if (input.size(-1) != weights[0].size(1)) return pybind11::none();
  const bool batched = input.dim() == 3;
  const at::Tensor x = batched ? (batch_first ? input.transpose(0, 1) : input) : input.unsqueeze(1);
  // no time step: torch.nn raises ("Expected sequence length to be larger than 0")
  if (x.size(0) == 0) return pybind11::none();
  const int64_t batch = x.size(1);
  at::Tensor h0, c0;
  if (hx.is_none()) {
    h0 = at::zeros({layers, batch, hidden}, x.options());
    if (lstm) c0 = h0;
  } else {
    // the state nn.GRU / nn.LSTM accept: anything else goes back to torch.nn, which raises
    const std::vector<int64_t> want =
        batched ? std::vector<int64_t>{layers, batch, hidden} : std::vector<int64_t>{layers, hidden};
    auto take = [&](pybind11::handle obj, at::Tensor& out) {
      if (!THPVariable_Check(obj.ptr())) return false;
      out = THPVariable_Unpack(obj.ptr());
      return out.sizes() == at::IntArrayRef(want) && state_ok(out, input);
    };
    if (lstm) {
      if (!pybind11::isinstance<pybind11::tuple>(hx)) return pybind11::none();
      auto pair = pybind11::reinterpret_borrow<pybind11::tuple>(hx);
      if (pair.size() != 2 || !take(pair[0], h0) || !take(pair[1], c0)) return pybind11::none();
    } else if (!take(hx, h0)) {
      return pybind11::none();
    }
    if (!batched) {
      h0 = h0.unsqueeze(1);
      if (lstm) c0 = c0.unsqueeze(1);
    }
  }
  std::optional<at::Tensor> mask;
  if (dropout > 0 && training && layers > 1) {
    const std::vector<int64_t> shape{layers - 1, x.size(0), batch, hidden};
    if (dropout >= 1) {
      mask = at::zeros(shape, x.options());
    } else if (torch_masks) {
      // nn.GRU / nn.LSTM's own draws (one bernoulli_ per layer output, layer by layer: the
      // generator's outputs in the order one draw over the stacked shape takes them)
      mask = torch_dropout_mask(shape, dropout, x.options());
    } else {
      // keep with probability 1 - p (bernoulli_ costs more than the whole step at the seeds'
      // sizes: its CPU kernel sets up a random stream per call)
      mask = dropout_keep_mask(shape, dropout, x.options());
    }
  }
  auto [output, h_n, c_n, saved] =
      stack_op().call(cell, x, h0, lstm ? std::optional<at::Tensor>(c0) : std::nullopt, weights,
                      mask, std::nullopt);
  (void)saved;
  if (!batched) {
    output = output.squeeze(1);
    h_n = h_n.squeeze(1);
    if (lstm) c_n = c_n.squeeze(1);
  } else if (batch_first) {
    output = output.transpose(0, 1);
  }
  if (lstm) return pybind11::make_tuple(output, h_n, c_n);
  return pybind11::make_tuple(output, h_n, pybind11::none());
}

}  // namespace seq2seq_ext
