// DecoderStepper (csrc/decoder_stepper.h): a decoder's weights bound for repeated CPU decode
// steps, the table and packed weights it derives from them, and its step and greedy loop (the
// decoder of decoder.h over GruCell with the packed weights, or the CPU kernels of
// gru_decode_step and greedy_decode with the module's weights).
#include <ATen/EmptyTensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <initializer_list>
#include <vector>

#include "../decoder_stepper.h"
#include "../greedy_decode.h"
#include "../gru_decode_step.h"

namespace seq2seq_ext {
namespace {

// Stores the version counter, data pointer, dtype and shape of each tensor (and the extra
// values) in key (the caller holds the storages, so that a pointer cannot be reused), and says whether they all equal what key held (false for an empty key, and always
// false when one of them is an inference tensor).
bool same_key(std::vector<int64_t>& key, std::initializer_list<const at::Tensor*> head,
              const std::vector<at::Tensor>& tail, std::initializer_list<int64_t> extra = {}) {
  size_t i = 0;
  bool same = true;
  auto put = [&](int64_t v) {
    if (i == key.size()) {
      key.push_back(v);
      same = false;
    } else if (key[i] != v) {
      key[i] = v;
      same = false;
    }
    ++i;
  };
  bool inference = false;
  auto add = [&](const at::Tensor& t) {
    // an inference tensor has no version counter: its in-place changes cannot be seen
    inference = inference || t.is_inference();
    put(t.is_inference() ? -1
                         : static_cast<int64_t>(
                               t.unsafeGetTensorImpl()->version_counter().current_version()));
    put(reinterpret_cast<int64_t>(t.const_data_ptr()));
    put(static_cast<int64_t>(t.scalar_type()));
    put(t.dim());
    for (const int64_t s : t.sizes()) put(s);
    // `w.data = w.data.t()` keeps a square matrix's storage, sizes and version
    for (const int64_t s : t.strides()) put(s);
  };
  for (const at::Tensor* t : head) add(*t);
  for (const at::Tensor& t : tail) add(t);
  for (const int64_t v : extra) put(v);
  if (i != key.size()) {
    key.resize(i);
    same = false;
  }
  return same && !inference;
}

// The packed weights are used for at most this many rows and this many bytes: beyond, a row at
// a time re-reads weights that no longer stay in cache, and BLAS does better.
constexpr int64_t kPackedMaxRows = 32;
constexpr int64_t kPackedMaxBytes = 4 << 20;

// bf16 weights read as they are for at most this many rows (greedy's bf16_weights); float32
// copies of their values, multiplied by BLAS, above. Per sentence at embed and hidden 256 (one
// thread, Intel Xeon), bf16 as they are against the copies: 12 rows 1.04 against 1.14 ms,
// 16 rows 0.83 against 0.88, 32 rows 0.76 against 0.62, 256 rows 0.58-0.77 against 0.48.
constexpr int64_t kBf16MaxRows = 16;

}  // namespace

DecoderStepper::DecoderStepper(at::Tensor embedding, std::vector<at::Tensor> weights,
                               at::Tensor dense_weight, at::Tensor dense_bias)
    : embedding_(std::move(embedding)),
      dense_weight_(std::move(dense_weight)),
      dense_bias_(std::move(dense_bias)),
      weights_(std::move(weights)) {
  check_dim(embedding_, 2, "embedding");
  TORCH_CHECK(weights_.size() >= 4 && weights_.size() % 4 == 0,
              "weights: expected nn.GRU's flat weights (4 per layer), got ", weights_.size());
  check_widths();
}

// Layer 0 reads [embedding, context]: W_ih0's columns are the embedding's width plus the hidden
// size (W_hh0's columns).
bool DecoderStepper::widths_fit() const {
  return weights_[0].dim() == 2 && weights_[1].dim() == 2 && embedding_.dim() == 2 &&
         weights_[0].size(1) == embedding_.size(1) + weights_[1].size(1);
}

void DecoderStepper::check_widths() const {
  check_dim(weights_[0], 2, "weights (w_ih)");
  check_dim(weights_[1], 2, "weights (w_hh)");
  TORCH_CHECK(widths_fit(),
              "embedding: expected ", weights_[0].size(1) - weights_[1].size(1),
              " columns (layer 0's input size ", weights_[0].size(1), " less the hidden size ",
              weights_[1].size(1), " of the context), got ", embedding_.size(1));
}

bool DecoderStepper::refresh() {
  if (same_key(key_, {&embedding_, &dense_weight_, &dense_bias_}, weights_)) return true;
  try {
    check_widths();  // `.data =` may have given a tensor another shape
  } catch (...) {
    key_.clear();  // checked again at the next call, never taken as valid
    throw;
  }
  key_storages_.clear();
  for (const at::Tensor* t : {&embedding_, &dense_weight_, &dense_bias_})
    key_storages_.push_back(t->has_storage() ? t->storage() : c10::Storage());
  for (const auto& w : weights_)
    key_storages_.push_back(w.has_storage() ? w.storage() : c10::Storage());
  emb_proj_ = at::Tensor();
  packed_ = at::Tensor();
  low_.clear();
  low_float32_.clear();
  emb_proj_low_ = at::Tensor();
  screens_[0] = screens_[1] = nullptr;
  screens_tried_[0] = screens_tried_[1] = false;
  validated_ = false;
  // weights made in inference mode: everything derived is rebuilt on every call, so the
  // packed copy would cost more than it saves
  bool inference = embedding_.is_inference() || dense_weight_.is_inference() ||
                   dense_bias_.is_inference();
  for (const auto& w : weights_) inference = inference || w.is_inference();
  packed_built_ = inference;
  inference_ = inference;
  return false;
}

const cpu::ArgmaxScreen* DecoderStepper::screen(bool bf16) {
  // weights made in inference mode: rebuilt on every call, a screen would cost what it saves
  if (!cpu::argmax_screen_enabled() || inference_) return nullptr;
  if (!screens_tried_[bf16]) {
    screens_tried_[bf16] = true;
    if (bf16 || dense_weight_.scalar_type() == at::kFloat)
      screens_[bf16] = cpu::make_argmax_screen(bf16 ? low().back() : dense_weight_.contiguous());
  }
  return screens_[bf16].get();
}

const at::Tensor& DecoderStepper::rounded_emb_proj() {
  refresh();
  if (!emb_proj_low_.defined()) {
    at::NoGradGuard no_grad;
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    auto rounded = [](const at::Tensor& t) { return t.to(at::kBFloat16).to(t.scalar_type()); };
    emb_proj_low_ = at::addmm(weights_[2], rounded(embedding_),
                              rounded(weights_[0].narrow(1, 0, embedding_.size(1))).t());
  }
  return emb_proj_low_;
}

const at::Tensor& DecoderStepper::emb_proj() {
  refresh();
  if (!emb_proj_.defined()) {
    at::NoGradGuard no_grad;
    // in the weights' dtype whatever autocast is in force: the table is cached for every call
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    emb_proj_ = at::addmm(weights_[2], embedding_,
                          weights_[0].narrow(1, 0, embedding_.size(1)).t());
  }
  return emb_proj_;
}

const std::vector<at::Tensor>& DecoderStepper::low() {
  if (!low_.empty()) return low_;
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> low;
  for (size_t l = 0; l * 4 < weights_.size(); ++l) {
    low.push_back(weights_[4 * l].to(at::kBFloat16).contiguous());
    low.push_back(weights_[4 * l + 1].to(at::kBFloat16).contiguous());
  }
  low.push_back(dense_weight_.to(at::kBFloat16).contiguous());
  low_ = std::move(low);
  return low_;
}

const std::vector<at::Tensor>& DecoderStepper::low_float32() {
  if (low_float32_.empty()) {
    at::NoGradGuard no_grad;
    for (const at::Tensor& t : low()) low_float32_.push_back(t.to(at::kFloat));
  }
  return low_float32_;
}

const at::Tensor& DecoderStepper::packed() {
  if (packed_built_) return packed_;
  packed_built_ = true;
  const int64_t L = v_layers_, H = v_hidden_, in0 = v_in0_;
  const cpu::PackedLayout lay =
      cpu::packed_layout(cpu::GruCell::kGates, L, H, v_vocab_, dense_weight_.element_size());
  if (lay.total * dense_weight_.element_size() > kPackedMaxBytes) return packed_;
  at::NoGradGuard no_grad;
  at::Tensor flat = at::zeros({lay.total}, dense_weight_.options());
  // w_t: a (K, N) view of a weight's transpose, stored at off as (K, Np)
  auto put = [&](int64_t off, const at::Tensor& w_t, int64_t Np) {
    flat.narrow(0, off, w_t.size(0) * Np).view({w_t.size(0), Np}).narrow(1, 0, w_t.size(1))
        .copy_(w_t);
  };
  auto put_bias = [&](int64_t off, const at::Tensor& b) { flat.narrow(0, off, b.size(0)).copy_(b); };
  put(lay.ctx, weights_[0].narrow(1, in0 - H, H).t(), lay.Gp);
  for (int64_t l = 0; l < L; ++l) {
    if (l > 0) {
      put(lay.ih[l], weights_[4 * l].t(), lay.Gp);
      put_bias(lay.b_ih[l], weights_[4 * l + 2]);
    }
    put(lay.hh[l], weights_[4 * l + 1].t(), lay.Gp);
    put_bias(lay.b_hh[l], weights_[4 * l + 3]);
  }
  put(lay.dense, dense_weight_.t(), lay.Vp);
  put_bias(lay.dense_b, dense_bias_);
  packed_ = flat;
  layout_ = lay;
  return packed_;
}

DecoderDims DecoderStepper::checked_dims(const at::Tensor& state, const at::Tensor& table,
                                         const std::optional<at::Tensor>& ctx_proj) {
  TORCH_CHECK(state.device().is_cpu(), "state: DecoderStepper runs on the CPU, got a tensor on ",
              state.device());
  const bool has_ctx = ctx_proj.has_value() && ctx_proj->defined();
  if (validated_ && !has_ctx && state.dim() == 3 && state.size(0) == v_layers_ &&
      state.size(2) == v_hidden_ && state.scalar_type() == v_dtype_)
    return DecoderDims{v_layers_, state.size(1), v_hidden_, v_tgt_vocab_, v_vocab_, v_in0_};
  const DecoderDims d = check_decoder_args(state, "state", cpu::GruCell::kGates, table, ctx_proj,
                                           weights_, dense_weight_, dense_bias_);
  validated_ = true;
  v_layers_ = d.layers;
  v_hidden_ = d.hidden;
  v_in0_ = d.in0;
  v_vocab_ = d.vocab;
  v_tgt_vocab_ = d.tgt_vocab;
  v_dtype_ = state.scalar_type();
  return d;
}

std::tuple<at::Tensor, at::Tensor> DecoderStepper::step(const at::Tensor& token,
                                                        const at::Tensor& state,
                                                        const std::optional<at::Tensor>& ctx_proj) {
  const at::Tensor& table = emb_proj();
  const DecoderDims d = checked_dims(state, table, ctx_proj);
  check_decode_token(token, state, d.batch);
  at::Tensor logits = at::detail::empty_cpu(decode_logits_shape(token, d.vocab), v_dtype_);
  at::Tensor new_state = at::detail::empty_cpu(state.sizes(), v_dtype_);
  if (d.batch == 0) return {logits, new_state};
  const at::Tensor& P = d.batch <= kPackedMaxRows ? packed() : at::Tensor();
  if (!P.defined()) {
    cpu::gru_decode_step(d, token, state, table, ctx_proj, weights_, dense_weight_, dense_bias_,
                         logits, new_state);
    return {logits, new_state};
  }
  const auto tok = cpu::tokens_to_vector(token, d.tgt_vocab);
  const bool has_ctx = ctx_proj.has_value() && ctx_proj->defined();
  AT_DISPATCH_FLOATING_TYPES(v_dtype_, "DecoderStepper.step", [&] {
    using T = scalar_t;
    cpu::Contig c;
    cpu::PackedWeights<T> w(layout_, P.const_data_ptr<T>(), d);
    cpu::GateBuffers<T> buf;
    cpu::step_rows<cpu::GruCell>(w, d, c(table).const_data_ptr<T>(), tok.data(), d.batch,
                                 has_ctx ? c(*ctx_proj).const_data_ptr<T>() : nullptr,
                                 {c(state).const_data_ptr<T>()}, {new_state.data_ptr<T>()},
                                 logits.data_ptr<T>(), buf);
  });
  return {logits, new_state};
}

std::tuple<at::Tensor, at::Tensor> DecoderStepper::greedy(const at::Tensor& state,
                                                          const std::optional<at::Tensor>& ctx_proj,
                                                          int64_t bos, int64_t eos,
                                                          int64_t num_steps, bool bf16_weights) {
  const at::Tensor& table = emb_proj();
  const DecoderDims d = checked_dims(state, table, ctx_proj);
  check_greedy_args(d, bos, num_steps);
  at::Tensor tokens, lengths;
  std::tie(tokens, lengths) =
      greedy_results(d.batch, num_steps, eos, state.options().dtype(at::kLong));
  if (d.batch == 0 || num_steps == 0) return {tokens, lengths};
  const bool has_ctx = ctx_proj.has_value() && ctx_proj->defined();
  cpu::Contig c;
  // greedy_rows over float32 row-major weights w (the module's, or bfloat16 copies) and the
  // embedding table tab, with the screen of the argmax sc (or none)
  auto row_major = [&](auto& w, const at::Tensor& tab, const cpu::ArgmaxScreen* sc) {
    w.screen = sc;
    cpu::greedy_rows<cpu::GruCell>(w, d, c(tab).const_data_ptr<float>(),
                                   {c(state).const_data_ptr<float>()},
                                   has_ctx ? c(*ctx_proj).const_data_ptr<float>() : nullptr, bos,
                                   eos, num_steps, tokens.data_ptr<int64_t>(),
                                   lengths.data_ptr<int64_t>());
    return std::make_tuple(tokens, lengths);
  };
  if (bf16_weights) {
    TORCH_CHECK(v_dtype_ == at::kFloat && dense_weight_.scalar_type() == at::kFloat,
                "bf16_weights: decoding with bfloat16 weights needs float32 weights and state, "
                "got ", dense_weight_.scalar_type(), " weights and a ", v_dtype_, " state");
    if (d.batch > kBf16MaxRows) {
      // the screen of the bf16 matrix screens its float32 copy too (the same values); it serves
      // once the rows still decoding are few enough that BLAS does not take the product
      cpu::RowMajorWeights<float> w(d, cpu::GruCell::kGates, weights_, dense_weight_,
                                    dense_bias_, c, low_float32());
      return row_major(w, rounded_emb_proj(), screen(true));
    }
    cpu::RowMajorWeights<float, c10::BFloat16> w(d, cpu::GruCell::kGates, weights_, dense_weight_,
                                                 dense_bias_, c, low());
    return row_major(w, rounded_emb_proj(), screen(true));
  }
  const at::Tensor& P = d.batch <= kPackedMaxRows ? packed() : at::Tensor();
  const cpu::ArgmaxScreen* sc = !P.defined() && v_dtype_ == at::kFloat ? screen(false) : nullptr;
  if (sc != nullptr) {  // greedy_decode's kernel, with the screen
    cpu::RowMajorWeights<float> w(d, cpu::GruCell::kGates, weights_, dense_weight_, dense_bias_,
                                  c);
    return row_major(w, table, sc);
  }
  if (!P.defined()) {
    cpu::greedy_decode(d, state, table, ctx_proj, weights_, dense_weight_, dense_bias_, bos, eos,
                       num_steps, tokens, lengths);
    return {tokens, lengths};
  }
  AT_DISPATCH_FLOATING_TYPES(v_dtype_, "DecoderStepper.greedy", [&] {
    using T = scalar_t;
    cpu::PackedWeights<T> w(layout_, P.const_data_ptr<T>(), d);
    cpu::greedy_rows<cpu::GruCell>(w, d, c(table).const_data_ptr<T>(),
                                   {c(state).const_data_ptr<T>()},
                                   has_ctx ? c(*ctx_proj).const_data_ptr<T>() : nullptr, bos,
                                   eos, num_steps, tokens.data_ptr<int64_t>(),
                                   lengths.data_ptr<int64_t>());
  });
  return {tokens, lengths};
}

}  // namespace seq2seq_ext
