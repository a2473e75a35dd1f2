// The small `_C` Python module: how the library was built, and the direct CPU paths of plain
// inference (DecoderStepper, gru_layer_cpu, gru_layer_projected_cpu) that skip the boxed
// dispatcher. Each op's schema and entry live in csrc/<op>.cpp; fake (meta) kernels and autograd
// formulas are registered from Python in seq2seq_ext/ops.py.
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/extension.h>

#include "decoder_stepper.h"
#include "cpu/argmax_screen.h"
#include "deferred_weight_grads.h"
#include "dropout_mask.h"
#include "gru_layer.h"
#include "lstm_decode_step.h"
#include "bf16_products.h"
#include "cpu/amx_gemm.h"
#include "cpu/mkl_packed.h"
#include "rnn_forward.h"
#include "rnn_stack.h"
#include "torch_dropout_mask.h"
#include "translation.h"

namespace {

// Whether each (params, name, tensor) of `bound` still has params[name] is tensor (params a
// dict), and with float32_cpu each tensor a float32 CPU tensor that is not an inference tensor.
bool still_bound(const pybind11::tuple& bound, bool float32_cpu) {
  for (const pybind11::handle item : bound) {
    PyObject* triple = item.ptr();
    if (!PyTuple_Check(triple) || PyTuple_GET_SIZE(triple) != 3) return false;
    PyObject* params = PyTuple_GET_ITEM(triple, 0);
    PyObject* tensor = PyTuple_GET_ITEM(triple, 2);
    if (!PyDict_Check(params)) return false;
    PyObject* now = PyDict_GetItemWithError(params, PyTuple_GET_ITEM(triple, 1));
    if (now != tensor) {
      PyErr_Clear();
      return false;
    }
    if (!float32_cpu) continue;
    if (!THPVariable_Check(tensor)) return false;
    const at::Tensor& t = THPVariable_Unpack(tensor);
    if (t.scalar_type() != at::kFloat || !t.is_cpu() || t.is_inference()) return false;
  }
  return true;
}

bool built_with_cuda() {
#ifdef SEQ2SEQ_EXT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "seq2seq_ext compiled library: registers torch.ops.seq2seq_ext.*";
  module.def("built_with_cuda", &built_with_cuda,
             "True when the CUDA kernels were compiled into this library.");
  module.def(
      "dropout_keep_mask",
      [](const std::vector<int64_t>& shape, double p, const at::Tensor& like) {
        return seq2seq_ext::dropout_keep_mask(shape, p, like.options());
      },
      pybind11::arg("shape"), pybind11::arg("p"), pybind11::arg("like"),
      "A dropout mask of shape: 1 / (1 - p) with probability 1 - p, else 0, for 0 < p < 1, in "
      "like's dtype and device, from the default generator (csrc/dropout_mask.h).");
  module.def(
      "torch_dropout_mask",
      [](const std::vector<int64_t>& shape, double p, const at::Tensor& like) {
        return seq2seq_ext::torch_dropout_mask(shape, p, like.options());
      },
      pybind11::arg("shape"), pybind11::arg("p"), pybind11::arg("like"),
      "like.new_empty(shape).bernoulli_(1 - p).div_(1 - p) for 0 < p < 1: the mask F.dropout and "
      "nn.GRU / nn.LSTM draw, the same values from the same generator state, float32 and float64 "
      "CPU masks several times faster (csrc/torch_dropout_mask.h).");
  module.def("torch_dropout_mask_exact", &seq2seq_ext::torch_dropout_mask_exact,
             "Whether torch_dropout_mask's CPU copy of bernoulli_'s draw matches this PyTorch "
             "(checked once); if not, it runs bernoulli_.");
  // A decoder's weights bound for repeated decode steps (see decoder_stepper.h). Its step() runs
  // the CPU kernel of seq2seq_ext::gru_decode_step without the boxed dispatcher call, whose
  // argument handling for a dozen tensors costs more than the step itself at the chapter's
  // sizes. seq2seq_ext uses it only for plain CPU tensors in inference with no tracing or
  // dispatch mode in force; everything else goes through torch.ops.seq2seq_ext.gru_decode_step.
  pybind11::class_<seq2seq_ext::DecoderStepper>(module, "DecoderStepper")
      .def(pybind11::init<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor>(),
           pybind11::arg("embedding"), pybind11::arg("weights"), pybind11::arg("dense_weight"),
           pybind11::arg("dense_bias"))
      .def("emb_proj", &seq2seq_ext::DecoderStepper::emb_proj)
      .def(
          "step",
          [](seq2seq_ext::DecoderStepper& s, const at::Tensor& token, const at::Tensor& state) {
            return s.step(token, state);
          },
          pybind11::arg("token"), pybind11::arg("state"))
      // greedy_decode's CPU kernel with the bound weights (ctx_proj (B, 3H) for a fixed context).
      .def("greedy", &seq2seq_ext::DecoderStepper::greedy, pybind11::arg("state"),
           pybind11::arg("ctx_proj"), pybind11::arg("bos"), pybind11::arg("eos"),
           pybind11::arg("num_steps"), pybind11::arg("bf16_weights") = false)
      // The per-token call of Seq2SeqDecoder (seq2seq_ext/models.py): step(token, state) when
      // token is a (B, 1) tensor, state a CPU tensor, neither a subclass, grad mode off, no
      // dispatch or torch function mode active and no CPU autocast (the usual call honours
      // it), and the state of the bound GRU's shape; else
      // None, and the caller takes the usual path.
      // These tests cost a few hundred nanoseconds here against microseconds in Python.
      .def(
          "try_step",
          [](seq2seq_ext::DecoderStepper& s, pybind11::handle token,
             pybind11::handle state) -> pybind11::object {
            if (!THPVariable_CheckExact(token.ptr()) || !THPVariable_CheckExact(state.ptr()))
              return pybind11::none();
            const at::Tensor& tok = THPVariable_Unpack(token.ptr());
            const at::Tensor& st = THPVariable_Unpack(state.ptr());
            if (!st.is_cpu() || tok.dim() != 2 || tok.size(1) != 1 ||
                at::GradMode::is_enabled() || c10::impl::TorchDispatchModeTLS::stack_len() != 0 ||
                at::impl::torch_function_mode_enabled() ||
                at::autocast::is_autocast_enabled(at::kCPU))
              return pybind11::none();
            // a state nn.GRU would refuse, or an embedding that no longer fits layer 0 (its
            // `.data` replaced): the usual call raises nn.GRU's error
            const auto& w = s.weights();
            if (st.dim() != 3 || st.size(0) != static_cast<int64_t>(w.size() / 4) ||
                st.size(2) != w[1].size(1) || !s.widths_fit())
              return pybind11::none();
            return pybind11::cast(s.step(tok, st));
          },
          pybind11::arg("token"), pybind11::arg("state"))
      // gru_decode_step's CPU kernel with a fixed context's projection ctx_proj (B, 3H).
      .def(
          "step_with_context",
          [](seq2seq_ext::DecoderStepper& s, const at::Tensor& token, const at::Tensor& state,
             const at::Tensor& ctx_proj) { return s.step(token, state, ctx_proj); },
          pybind11::arg("token"), pybind11::arg("state"), pybind11::arg("ctx_proj"))
      // lstm_decode_step's CPU kernel with the bound weights of an nn.LSTM decoder; ctx_proj
      // (B, 4H) for a fixed context, None for the context h[-1].
      .def(
          "lstm_step",
          [](seq2seq_ext::DecoderStepper& s, const at::Tensor& token, const at::Tensor& h,
             const at::Tensor& c, const std::optional<at::Tensor>& ctx_proj) {
            TORCH_CHECK(h.device().is_cpu(),
                        "h: DecoderStepper.lstm_step runs on the CPU, got a tensor on ",
                        h.device());
            return seq2seq_ext::lstm_decode_step(token, h, c, s.emb_proj(), ctx_proj,
                                                 s.weights(), s.dense_weight(), s.dense_bias());
          },
          pybind11::arg("token"), pybind11::arg("h"), pybind11::arg("c"),
          pybind11::arg("ctx_proj") = pybind11::none());
  // The bound tensors' test of the decoder's per-token shortcut and of predict_seq2seq's direct
  // path (seq2seq_ext/_fastcall.py: _still_bound, translation): whether each (params, name,
  // tensor) of `bound` still has params[name] is tensor. About 20 ns a tensor here, where
  // Python's lookups take 0.1 us a tensor (the decoder's 11 at every token, the model's 20 at
  // every sentence).
  module.def("still_bound", [](const pybind11::tuple& bound) {
    return still_bound(bound, /*float32_cpu=*/false);
  }, pybind11::arg("bound"));
  // The same, and each tensor a float32 CPU tensor with a version counter (not an inference
  // tensor): the direct path's weights.
  module.def("bound_float32_cpu", [](const pybind11::tuple& bound) {
    return still_bound(bound, /*float32_cpu=*/true);
  }, pybind11::arg("bound"));
  // predict_seq2seq's direct path (seq2seq_ext/_fastcall.py, translate_ids): one sentence's
  // encoding and greedy decoding in one call (translation.h). src: a list of Python ints; None
  // where it is not one, an id is not a row of the table, or the encoder's state has another
  // shape (the usual path then raises its error); else the output ids, a list.
  module.def(
      "translate_ids",
      [](pybind11::handle src, const at::Tensor& table, const std::vector<at::Tensor>& flat,
         seq2seq_ext::DecoderStepper& stepper, int64_t bos, int64_t eos, int64_t num_steps,
         bool bf16, const std::vector<int64_t>& state_shape) -> pybind11::object {
        if (!PyList_CheckExact(src.ptr()) || table.dim() != 2) return pybind11::none();
        std::vector<int64_t> ids(PyList_GET_SIZE(src.ptr()));
        for (size_t i = 0; i < ids.size(); ++i) {
          PyObject* item = PyList_GET_ITEM(src.ptr(), i);
          int overflow = 0;
          const long long id = PyLong_CheckExact(item) ? PyLong_AsLongLongAndOverflow(item, &overflow)
                                                       : -1;
          if (overflow || id < 0 || id >= table.size(0)) return pybind11::none();
          ids[i] = id;
        }
        auto out = seq2seq_ext::translate_ids(ids, table, flat, stepper, bos, eos, num_steps,
                                              bf16, state_shape);
        if (!out) return pybind11::none();
        return pybind11::cast(*out);
      },
      pybind11::arg("src"), pybind11::arg("table"), pybind11::arg("flat"),
      pybind11::arg("stepper"), pybind11::arg("bos"), pybind11::arg("eos"),
      pybind11::arg("num_steps"), pybind11::arg("bf16"), pybind11::arg("state_shape"));
  // The encoder's layers over layer 0's given input projection (seq2seq_ext.ops.
  // gru_over_projection; gru_layer.h).
  module.def(
      "gru_over_projection_cpu",
      [](const at::Tensor& gi0, const at::Tensor& h0, const std::vector<at::Tensor>& flat) {
        return seq2seq_ext::gru_over_projection_cpu(gi0, h0, flat);
      },
      pybind11::arg("gi0"), pybind11::arg("h0"), pybind11::arg("flat"));
  // The GRU encoder over its table (seq2seq_ext.models; gru_layer.h).
  module.def(
      "encode_over_table_cpu",
      [](const at::Tensor& X, const at::Tensor& table, const std::vector<at::Tensor>& flat,
         int64_t layers, int64_t hidden) {
        return seq2seq_ext::encode_over_table_cpu(X, table, flat, layers, hidden);
      },
      pybind11::arg("X"), pybind11::arg("table"), pybind11::arg("flat"), pybind11::arg("layers"),
      pybind11::arg("hidden"));
  // gru_layer's entry for CPU inference (no graph to record), under the same conditions.
  module.def("gru_layer_cpu",
             [](const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih,
                const at::Tensor& w_hh, const at::Tensor& b_ih, const at::Tensor& b_hh,
                const std::optional<at::Tensor>& extra) {
               return seq2seq_ext::gru_layer(input, h0, w_ih, w_hh, b_ih, b_hh, extra);
             },
             pybind11::arg("input"),
             pybind11::arg("h0"), pybind11::arg("w_ih"), pybind11::arg("w_hh"),
             pybind11::arg("b_ih"), pybind11::arg("b_hh"), pybind11::arg("extra") = pybind11::none());
  // The same over a given input projection (the encoder's table rows): see gru_layer.h.
  module.def("gru_layer_projected_cpu", &seq2seq_ext::gru_layer_projected_cpu,
             pybind11::arg("gi"), pybind11::arg("h0"), pybind11::arg("w_hh"),
             pybind11::arg("b_hh"));
  // x W^T + b with a bfloat16 W beside float32 rows (the bf16 encoder's input projections).
  module.def("linear_bf16_weights_cpu", &seq2seq_ext::linear_bf16_weights_cpu,
             pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("b"));
  // rnn_stack's create_graph backward (rnn_stack.h), a Python function of seq2seq_ext/ops.py:
  // fn(cell, grads, input, h0, c0, weights, mask, batch_sizes) -> gradients, None for an
  // undefined tensor either way. The function is kept for the life of the process (never
  // released: the hook may outlive the interpreter's teardown).
  module.def(
      "set_rnn_stack_graph_backward",
      [](pybind11::function fn) {
        auto* held = new pybind11::object(std::move(fn));
        auto wrap = [](const at::Tensor& t) -> pybind11::object {
          return t.defined() ? pybind11::cast(t) : pybind11::none();
        };
        seq2seq_ext::set_stack_graph_backward(
            [held, wrap](const std::string& cell, const std::vector<at::Tensor>& grads,
                         const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                         const std::vector<at::Tensor>& weights, const at::Tensor& mask,
                         const std::optional<std::vector<int64_t>>& batch_sizes) {
              pybind11::gil_scoped_acquire gil;
              pybind11::list g, w;
              for (const at::Tensor& t : grads) g.append(wrap(t));
              for (const at::Tensor& t : weights) w.append(wrap(t));
              pybind11::object bs = batch_sizes ? pybind11::cast(*batch_sizes) : pybind11::none();
              pybind11::object r =
                  (*held)(cell, g, wrap(input), wrap(h0), wrap(c0), w, wrap(mask), bs);
              std::vector<at::Tensor> out;
              for (pybind11::handle item : r)
                out.push_back(item.is_none() ? at::Tensor() : item.cast<at::Tensor>());
              return out;
            });
      },
      pybind11::arg("fn"));
  // The drop-in nn.GRU / nn.LSTM forward (seq2seq_ext/nn.py) in one call: see rnn_forward.h.
  module.def("rnn_forward", &seq2seq_ext::rnn_forward, pybind11::arg("cell"),
             pybind11::arg("input"), pybind11::arg("hx"), pybind11::arg("weights"),
             pybind11::arg("layers"), pybind11::arg("hidden"), pybind11::arg("batch_first"),
             pybind11::arg("dropout"), pybind11::arg("training"),
             pybind11::arg("torch_masks") = false);
  // How the CPU kernels run products with bfloat16 weight matrices (csrc/bf16_products.h);
  // seq2seq_ext.ops.set_bf16_gemm is the Python side.
  module.def("set_bf16_gemm", [](bool native) {
    seq2seq_ext::set_bf16_gemm(native ? seq2seq_ext::Bf16Gemm::kNative
                                      : seq2seq_ext::Bf16Gemm::kRounded);
  }, pybind11::arg("native"));
  module.def("bf16_gemm_native", [] {
    return seq2seq_ext::bf16_gemm() == seq2seq_ext::Bf16Gemm::kNative;
  });
  // When rnn_stack's one-step calls defer their matrices' gradients (deferred_weight_grads.h):
  // 0 never, 1 for large matrices, 2 always; seq2seq_ext.ops.set_deferred_grads is the Python side.
  module.def("set_deferred_grads", [](int mode) {
    TORCH_CHECK(mode >= 0 && mode <= 2, "mode: expected 0, 1 or 2, got ", mode);
    seq2seq_ext::set_deferred_grads(static_cast<seq2seq_ext::DeferGrads>(mode));
  }, pybind11::arg("mode"));
  module.def("deferred_grads", [] { return static_cast<int>(seq2seq_ext::deferred_grads()); });
  // The AMX-BF16 products of the recurrent layers' bf16 matrices (cpu/amx_gemm.h): whether they
  // run here, and one product on its own (a (M, K) bf16 times the (K, N) matrix w, or w^T when
  // `transposed`, plus bias), for the tests.
  module.def("amx_usable", &seq2seq_ext::cpu::amx_usable);
  module.def("set_amx_products", &seq2seq_ext::set_amx_products, pybind11::arg("on"));
  module.def("amx_products", &seq2seq_ext::amx_products);
  // The float32 products over matrices MKL packs once per layer call (cpu/mkl_packed.h): whether
  // they run here, and one product on its own (x (M, K) times w^T, packed for `rows` rows; w a
  // row-major (N, K) weight given with `transposed`, the only layout packed), for the tests.
  module.def("mkl_packed_usable", &seq2seq_ext::cpu::mkl_packed_usable);
  module.def("set_mkl_packed_products", &seq2seq_ext::cpu::set_mkl_packed_products,
             pybind11::arg("on"));
  module.def("mkl_packed_products", &seq2seq_ext::cpu::mkl_packed_products);
  module.def("mkl_packs_made", &seq2seq_ext::cpu::mkl_packs_made);
  module.def("mkl_packed_mm", [](const at::Tensor& x, const at::Tensor& w, bool transposed,
                                 int64_t rows) {
    TORCH_CHECK(seq2seq_ext::cpu::mkl_packed_usable(),
                "mkl_packed_mm: PyTorch in this process is not built with MKL");
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_cpu() && x.stride(1) == 1,
                "mkl_packed_mm: x: expected a 2-D float32 CPU tensor with unit column stride");
    const at::Tensor w_kn = transposed ? w.t() : w;
    TORCH_CHECK(seq2seq_ext::cpu::mkl_packable(w_kn) && w_kn.size(0) == x.size(1),
                "mkl_packed_mm: w: expected a row-major float32 (N, K) weight, used transposed, "
                "with K = ", x.size(1), ", got ", w.sizes(), " (transposed: ", transposed, ")");
    TORCH_CHECK(rows >= x.size(0), "mkl_packed_mm: rows: expected at least x's ", x.size(0),
                " rows, got ", rows);
    const auto packed = seq2seq_ext::cpu::mkl_pack(w_kn, rows);
    at::Tensor out = at::empty({x.size(0), w_kn.size(1)}, x.options());
    seq2seq_ext::cpu::mkl_packed_gemm(x.const_data_ptr<float>(), x.stride(0), x.size(0), *packed,
                                      nullptr, 0, out.mutable_data_ptr<float>(), out.stride(0));
    return out;
  }, pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("transposed"), pybind11::arg("rows"));
  module.def("argmax_screen_usable", &seq2seq_ext::cpu::argmax_screen_usable);
  module.def("set_argmax_screen", &seq2seq_ext::cpu::set_argmax_screen, pybind11::arg("on"));
  module.def("argmax_screen", &seq2seq_ext::cpu::argmax_screen_enabled);
  // cpu::screened_argmax over the rows of h (n, K) against w (V, K), float32 or bfloat16, and
  // bias (V,): (the argmax of each row, how many logits each computed, the argmax of the full
  // product), or None where no screen applies (make_argmax_screen). For the tests.
  module.def("_screened_argmax", [](const at::Tensor& w, const at::Tensor& bias,
                                    const at::Tensor& h) -> pybind11::object {
    TORCH_CHECK(w.dim() == 2 && w.is_cpu() && w.is_contiguous() &&
                    (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
                "_screened_argmax: w: expected a contiguous 2-D float32 or bfloat16 CPU tensor");
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == w.size(0) && bias.is_contiguous() &&
                    bias.scalar_type() == at::kFloat,
                "_screened_argmax: bias: expected ", w.size(0), " contiguous float32 values");
    TORCH_CHECK(h.dim() == 2 && h.size(1) == w.size(1) && h.is_contiguous() &&
                    h.scalar_type() == at::kFloat,
                "_screened_argmax: h: expected contiguous float32 rows of ", w.size(1), " values");
    const auto screen = seq2seq_ext::cpu::make_argmax_screen(w);
    if (!screen) return pybind11::none();
    const int64_t n = h.size(0), V = w.size(0), K = w.size(1);
    const auto long_opts = h.options().dtype(at::kLong);
    at::Tensor best = at::empty({n}, long_opts), computed = at::empty({n}, long_opts),
               full = at::empty({n}, long_opts);
    std::vector<float> logits(V);
    seq2seq_ext::cpu::ScreenScratch scratch;
    auto run = [&](const auto* W) {
      using WT = std::remove_cv_t<std::remove_pointer_t<decltype(W)>>;
      const float* b_ = bias.const_data_ptr<float>();
      for (int64_t r = 0; r < n; ++r) {
        const float* x = h.const_data_ptr<float>() + r * K;
        best.mutable_data_ptr<int64_t>()[r] = seq2seq_ext::cpu::screened_argmax(
            *screen, x, W, b_, scratch, logits.data(), computed.mutable_data_ptr<int64_t>() + r);
        // the full product's argmax (linear_nt and argmax_row), to compare with
        seq2seq_ext::cpu::linear_nt<float, WT>(x, K, 1, K, W, K, V, b_, logits.data(), false);
        full.mutable_data_ptr<int64_t>()[r] = seq2seq_ext::cpu::argmax_row(logits.data(), V);
      }
    };
    if (w.scalar_type() == at::kFloat)
      run(w.const_data_ptr<float>());
    else
      run(w.const_data_ptr<c10::BFloat16>());
    return pybind11::make_tuple(best, computed, full);
  }, pybind11::arg("w"), pybind11::arg("bias"), pybind11::arg("h"));
  module.def("amx_mm", [](const at::Tensor& a, const at::Tensor& w, bool transposed,
                          const std::optional<at::Tensor>& bias) {
    TORCH_CHECK(seq2seq_ext::cpu::amx_usable(), "amx_mm: this CPU or OS does not run AMX-BF16");
    TORCH_CHECK(a.dim() == 2 && w.dim() == 2 && a.scalar_type() == at::kBFloat16 &&
                w.scalar_type() == at::kBFloat16 && a.is_cpu() && w.is_cpu(),
                "amx_mm: expected 2-D bfloat16 CPU tensors a and w");
    const at::Tensor w_kn = transposed ? w.t() : w;
    TORCH_CHECK(a.size(1) == w_kn.size(0) && seq2seq_ext::cpu::amx_shape(w_kn.size(0), w_kn.size(1)),
                "amx_mm: expected a (M, K) and a (K, N) matrix with K and N multiples of 32, got ",
                a.sizes(), " and ", w_kn.sizes());
    const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    TORCH_CHECK(!b.defined() || b.numel() == w_kn.size(1), "amx_mm: bias: expected ",
                w_kn.size(1), " values, got ", b.numel());
    const at::Tensor ac = a.stride(1) == 1 ? a : a.contiguous();
    at::Tensor out = at::empty({a.size(0), w_kn.size(1)}, a.options().dtype(at::kFloat));
    const auto m = seq2seq_ext::cpu::amx_matrix(w_kn);
    seq2seq_ext::cpu::amx_gemm(ac.const_data_ptr<c10::BFloat16>(), ac.stride(0), ac.size(0), *m,
                               b.defined() ? b.const_data_ptr<float>() : nullptr, 0,
                               out.mutable_data_ptr<float>(), out.stride(0));
    return out;
  }, pybind11::arg("a"), pybind11::arg("w"), pybind11::arg("transposed"),
     pybind11::arg("bias") = std::nullopt);
#if defined(TORCH_VERSION_MAJOR) && defined(TORCH_VERSION_MINOR)
  module.attr("torch_version") =
      std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);
#else
  module.attr("torch_version") = "unknown";
#endif
}
