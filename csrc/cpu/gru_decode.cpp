// Inference-time decoding of Seq2SeqDecoder on the CPU: one step for all layers and the output
// projection (gru_decode_step), and the whole greedy loop for a batch (greedy_decode).
//
// Layer 0's input projection W_ih0 [emb; ctx] + b_ih0 is split by the algebra of the
// concatenation: the embedding part (with b_ih0) is a row of emb_proj, precomputed once per set
// of weights; the context part is ctx_proj when the context is fixed, else state[-1] times the
// context columns of W_ih0.
#include <ATen/EmptyTensor.h>
#include <torch/library.h>

#include <initializer_list>
#include <vector>

#include "../checks.h"
#include "common.h"
#include "gru_math.h"
#include "kernels.h"

namespace seq2seq_ext {
namespace {

template <typename T>
struct DecoderView {
  DecoderDims d;
  std::vector<const T*> w;  // 4 * layers contiguous weight pointers
  const T* emb_proj;
  const T* dense_w;
  const T* dense_b;
};

// Contiguous copies are made once per call; nn.GRU's parameters already are contiguous.
struct Contig {
  std::vector<at::Tensor> keep;  // only the copies of non-contiguous inputs
  const at::Tensor& operator()(const at::Tensor& t) {
    if (t.is_contiguous()) return t;
    keep.push_back(t.contiguous());
    return keep.back();
  }
};

template <typename T>
DecoderView<T> make_view(const DecoderDims& d, at::TensorList weights, const at::Tensor& emb_proj,
                         const at::Tensor& dense_w, const at::Tensor& dense_b, Contig& c) {
  DecoderView<T> v{d, {}, nullptr, nullptr, nullptr};
  for (const auto& w : weights) v.w.push_back(c(w).template const_data_ptr<T>());
  v.emb_proj = c(emb_proj).template const_data_ptr<T>();
  v.dense_w = c(dense_w).template const_data_ptr<T>();
  v.dense_b = c(dense_b).template const_data_ptr<T>();
  return v;
}

// One decoder step for n rows. state/new_state are (L, n, H), ctx (n, 3H) or null, logits (n, V).
template <typename T>
void step_rows(const DecoderView<T>& m, const int64_t* tok, int64_t n, const T* state,
               const T* ctx, T* new_state, T* logits, std::vector<T>& gi, std::vector<T>& gh) {
  const int64_t L = m.d.layers, H = m.d.hidden, G = 3 * H;
  gi.resize(n * G);
  gh.resize(n * G);
  for (int64_t b = 0; b < n; ++b) {
    const T* e = m.emb_proj + tok[b] * G;
    T* g = gi.data() + b * G;
    if (ctx) {
      const T* c = ctx + b * G;
      for (int64_t j = 0; j < G; ++j) g[j] = e[j] + c[j];
    } else {
      std::copy(e, e + G, g);
    }
  }
  if (!ctx)  // the reference's rule: the context is the incoming top-layer state
    cpu::linear_nt<T>(state + (L - 1) * n * H, H, n, H, m.w[0] + (m.d.in0 - H), m.d.in0, G,
                      nullptr, gi.data(), /*accumulate=*/true);
  for (int64_t l = 0; l < L; ++l) {
    const T* h = state + l * n * H;
    T* out = new_state + l * n * H;
    if (l > 0)
      cpu::linear_nt<T>(new_state + (l - 1) * n * H, H, n, H, m.w[4 * l], H, G, m.w[4 * l + 2],
                        gi.data(), false);
    cpu::linear_nt<T>(h, H, n, H, m.w[4 * l + 1], H, G, m.w[4 * l + 3], gh.data(), false);
    cpu::gru_cell<T>(gi.data(), gh.data(), h, H, out, H, n, H);
  }
  cpu::linear_nt<T>(new_state + (L - 1) * n * H, H, n, H, m.dense_w, H, m.d.vocab, m.dense_b,
                    logits, false);
}

// torch.argmax's rule: the first maximum, NaN counting as the maximum.
template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  int64_t best = 0;
  for (int64_t v = 1; v < n; ++v) {
    const bool best_nan = x[best] != x[best];
    if (best_nan) break;
    if (x[v] != x[v] || x[v] > x[best]) best = v;
  }
  return best;
}

std::tuple<at::Tensor, at::Tensor> greedy_decode_cpu(
    const at::Tensor& state, const at::Tensor& emb_proj, const std::optional<at::Tensor>& ctx_proj,
    at::TensorList weights, const at::Tensor& dense_weight, const at::Tensor& dense_bias,
    int64_t bos, int64_t eos, int64_t num_steps) {
  const DecoderDims d =
      check_decoder_args(state, emb_proj, ctx_proj, weights, dense_weight, dense_bias);
  check_greedy_args(d, bos, num_steps);
  const int64_t B = d.batch, L = d.layers, H = d.hidden, G = 3 * H, V = d.vocab;
  at::Tensor tokens = at::full({B, num_steps}, eos, state.options().dtype(at::kLong));
  at::Tensor lengths = at::full({B}, num_steps, state.options().dtype(at::kLong));
  if (B == 0 || num_steps == 0) return {tokens, lengths};
  const bool has_ctx = ctx_proj.has_value() && ctx_proj->defined();
  int64_t* tok_out = tokens.data_ptr<int64_t>();
  int64_t* len_out = lengths.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(state.scalar_type(), "greedy_decode_cpu", [&] {
    using T = scalar_t;
    Contig c;
    auto m = make_view<T>(d, weights, emb_proj, dense_weight, dense_bias, c);
    // Working copies for the rows still decoding, compacted as sentences finish.
    const T* s0 = c(state).const_data_ptr<T>();
    std::vector<T> cur(s0, s0 + L * B * H), next(L * B * H), logits(B * V), gi, gh;
    std::vector<T> ctx;
    if (has_ctx) {
      const T* p = c(*ctx_proj).const_data_ptr<T>();
      ctx.assign(p, p + B * G);
    }
    std::vector<int64_t> row(B), tok(B, bos);
    for (int64_t b = 0; b < B; ++b) row[b] = b;
    int64_t n = B;
    for (int64_t step = 0; step < num_steps && n > 0; ++step) {
      step_rows<T>(m, tok.data(), n, cur.data(), has_ctx ? ctx.data() : nullptr, next.data(),
                   logits.data(), gi, gh);
      int64_t kept = 0;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t y = argmax_row<T>(logits.data() + i * V, V);
        const int64_t b = row[i];
        if (y == eos) {
          len_out[b] = step;
          continue;
        }
        tok_out[b * num_steps + step] = y;
        // compact row i into slot `kept` (kept <= i, so the copy never overwrites a live row)
        row[kept] = b;
        tok[kept] = y;
        for (int64_t l = 0; l < L; ++l)
          std::copy(next.data() + (l * n + i) * H, next.data() + (l * n + i + 1) * H,
                    next.data() + (l * n + kept) * H);
        if (has_ctx && kept != i)
          std::copy(ctx.data() + i * G, ctx.data() + (i + 1) * G, ctx.data() + kept * G);
        ++kept;
      }
      // next holds layer-major rows for n sentences; repack them for `kept`
      for (int64_t l = 0; l < L; ++l)
        std::copy(next.data() + l * n * H, next.data() + (l * n + kept) * H,
                  cur.data() + l * kept * H);
      n = kept;
    }
  });
  return {tokens, lengths};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gru_decode_step_cpu(
    const at::Tensor& token, const at::Tensor& state, const at::Tensor& emb_proj,
    const std::optional<at::Tensor>& ctx_proj, at::TensorList weights,
    const at::Tensor& dense_weight, const at::Tensor& dense_bias) {
  const DecoderDims d =
      check_decoder_args(state, emb_proj, ctx_proj, weights, dense_weight, dense_bias);
  check_decode_token(token, state, d.batch);
  const auto tok = cpu::tokens_to_vector(token, d.tgt_vocab);
  at::Tensor logits = at::empty(decode_logits_shape(token, d.vocab), state.options());
  at::Tensor new_state = at::empty_like(state, at::MemoryFormat::Contiguous);
  const bool has_ctx = ctx_proj.has_value() && ctx_proj->defined();
  AT_DISPATCH_FLOATING_TYPES(state.scalar_type(), "gru_decode_step_cpu", [&] {
    Contig c;
    auto m = make_view<scalar_t>(d, weights, emb_proj, dense_weight, dense_bias, c);
    const scalar_t* ctx = has_ctx ? c(*ctx_proj).const_data_ptr<scalar_t>() : nullptr;
    std::vector<scalar_t> gi, gh;
    step_rows<scalar_t>(m, tok.data(), d.batch, c(state).const_data_ptr<scalar_t>(), ctx,
                        new_state.data_ptr<scalar_t>(), logits.data_ptr<scalar_t>(), gi, gh);
  });
  return {logits, new_state};
}

namespace {

// Stores the version counter, storage, dtype and shape of each tensor (and the extra values)
// in key, and says whether they all equal what key held (false for an empty key, and always
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

PackedLayout packed_layout(int64_t L, int64_t H, int64_t V, int64_t elem_size) {
  const int64_t P = 64 / elem_size;
  auto pad = [&](int64_t n) { return (n + P - 1) / P * P; };
  PackedLayout p;
  p.Gp = pad(3 * H);
  p.Vp = pad(V);
  int64_t off = 0;
  auto take = [&](int64_t n) {
    const int64_t at = off;
    off += n;
    return at;
  };
  p.ctx = take(H * p.Gp);
  for (int64_t l = 0; l < L; ++l) {
    p.ih.push_back(l > 0 ? take(H * p.Gp) : 0);
    p.b_ih.push_back(l > 0 ? take(p.Gp) : 0);
    p.hh.push_back(take(H * p.Gp));
    p.b_hh.push_back(take(p.Gp));
  }
  p.dense = take(H * p.Vp);
  p.dense_b = take(p.Vp);
  p.total = off;
  return p;
}

// One decode step of row b of B with the packed weights P (see step_rows for the algebra).
// scratch holds 2 * Gp + Vp elements.
template <typename T>
void packed_row_step(const PackedLayout& lay, const T* P, const DecoderDims& d, int64_t tok,
                     const T* emb_proj, const T* state, int64_t b, const T* ctx, T* new_state,
                     T* logits, T* scratch) {
  const int64_t L = d.layers, B = d.batch, H = d.hidden, G = 3 * H;
  T* gi = scratch;
  T* gh = gi + lay.Gp;
  T* lg = gh + lay.Gp;
  auto row = [&](auto* base, int64_t l) { return base + (l * B + b) * H; };
  const T* e = emb_proj + tok * G;
  if (ctx) {
    for (int64_t j = 0; j < G; ++j) gi[j] = e[j] + ctx[j];
  } else {
    std::copy(e, e + G, gi);
    cpu::linear_t_row<T>(row(state, L - 1), H, P + lay.ctx, lay.Gp, nullptr, gi, true);
  }
  for (int64_t l = 0; l < L; ++l) {
    if (l > 0)
      cpu::linear_t_row<T>(row(new_state, l - 1), H, P + lay.ih[l], lay.Gp, P + lay.b_ih[l], gi,
                           false);
    cpu::linear_t_row<T>(row(state, l), H, P + lay.hh[l], lay.Gp, P + lay.b_hh[l], gh, false);
    cpu::gru_cell<T>(gi, gh, row(state, l), H, row(new_state, l), H, 1, H);
  }
  cpu::linear_t_row<T>(row(new_state, L - 1), H, P + lay.dense, lay.Vp, P + lay.dense_b, lg,
                       false);
  std::copy(lg, lg + d.vocab, logits);
}

// The state, fixed context projection (or none) and embedding table of a packed step, read
// contiguously, and a zeroed scratch row for packed_row_step.
template <typename T>
struct RowInputs {
  Contig c;
  const T* state;
  const T* ctx;
  const T* table;
  std::vector<T> scratch;
  RowInputs(const at::Tensor& s, const std::optional<at::Tensor>& ctx_proj,
            const at::Tensor& emb_proj, const PackedLayout& lay)
      : state(c(s).template const_data_ptr<T>()),
        ctx(ctx_proj.has_value() && ctx_proj->defined()
                ? c(*ctx_proj).template const_data_ptr<T>()
                : nullptr),
        table(c(emb_proj).template const_data_ptr<T>()),
        scratch(2 * lay.Gp + lay.Vp) {}
  const T* ctx_row(int64_t b, int64_t H) const { return ctx ? ctx + b * 3 * H : nullptr; }
};

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
  check_dim(weights_[0], 2, "weights (w_ih)");
  TORCH_CHECK(weights_[0].size(1) > embedding_.size(1), "weights (w_ih of layer 0): expected ",
              "more input columns than the embedding size ", embedding_.size(1), ", got ",
              weights_[0].size(1));
}

bool DecoderStepper::refresh() {
  if (same_key(key_, {&embedding_, &dense_weight_, &dense_bias_}, weights_)) return true;
  emb_proj_ = at::Tensor();
  packed_ = at::Tensor();
  validated_ = false;
  // weights made in inference mode: everything derived is rebuilt on every call, so the
  // packed copy would cost more than it saves
  bool inference = embedding_.is_inference() || dense_weight_.is_inference() ||
                   dense_bias_.is_inference();
  for (const auto& w : weights_) inference = inference || w.is_inference();
  packed_built_ = inference;
  return false;
}

const at::Tensor& DecoderStepper::emb_proj() {
  refresh();
  if (!emb_proj_.defined()) {
    at::NoGradGuard no_grad;
    emb_proj_ = at::addmm(weights_[2], embedding_,
                          weights_[0].narrow(1, 0, embedding_.size(1)).t());
  }
  return emb_proj_;
}

const at::Tensor& DecoderStepper::packed() {
  if (packed_built_) return packed_;
  packed_built_ = true;
  const int64_t L = v_layers_, H = v_hidden_, in0 = v_in0_;
  const PackedLayout lay = packed_layout(L, H, v_vocab_, dense_weight_.element_size());
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
  const DecoderDims d =
      check_decoder_args(state, table, ctx_proj, weights_, dense_weight_, dense_bias_);
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
  const at::Tensor& P = d.batch <= kPackedMaxRows ? packed() : at::Tensor();
  if (!P.defined())
    return gru_decode_step_cpu(token, state, table, ctx_proj, weights_, dense_weight_,
                               dense_bias_);
  const auto tok = cpu::tokens_to_vector(token, d.tgt_vocab);
  at::Tensor logits = at::detail::empty_cpu(decode_logits_shape(token, d.vocab), v_dtype_);
  at::Tensor new_state = at::detail::empty_cpu(state.sizes(), v_dtype_);
  AT_DISPATCH_FLOATING_TYPES(v_dtype_, "DecoderStepper.step", [&] {
    using T = scalar_t;
    RowInputs<T> in(state, ctx_proj, table, layout_);
    T* out = new_state.data_ptr<T>();
    T* lg = logits.data_ptr<T>();
    for (int64_t b = 0; b < d.batch; ++b)
      packed_row_step<T>(layout_, P.const_data_ptr<T>(), d, tok[b], in.table, in.state, b,
                         in.ctx_row(b, d.hidden), out, lg + b * d.vocab, in.scratch.data());
  });
  return {logits, new_state};
}

std::tuple<at::Tensor, at::Tensor> DecoderStepper::greedy(const at::Tensor& state,
                                                          const std::optional<at::Tensor>& ctx_proj,
                                                          int64_t bos, int64_t eos,
                                                          int64_t num_steps) {
  const at::Tensor& table = emb_proj();
  const DecoderDims d = checked_dims(state, table, ctx_proj);
  check_greedy_args(d, bos, num_steps);
  const at::Tensor& P = d.batch <= kPackedMaxRows ? packed() : at::Tensor();
  if (!P.defined())
    return greedy_decode_cpu(state, table, ctx_proj, weights_, dense_weight_, dense_bias_, bos,
                             eos, num_steps);
  const int64_t B = d.batch, L = d.layers, H = d.hidden, V = d.vocab;
  at::Tensor tokens = at::full({B, num_steps}, eos, state.options().dtype(at::kLong));
  at::Tensor lengths = at::full({B}, num_steps, state.options().dtype(at::kLong));
  if (B == 0 || num_steps == 0) return {tokens, lengths};
  int64_t* tok_out = tokens.data_ptr<int64_t>();
  int64_t* len_out = lengths.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(v_dtype_, "DecoderStepper.greedy", [&] {
    using T = scalar_t;
    RowInputs<T> in(state, ctx_proj, table, layout_);
    // rows are independent: each sentence is decoded to its end on its own (L, 1, H) state
    DecoderDims one = d;
    one.batch = 1;
    std::vector<T> cur(L * H), next(L * H), logits(V);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t l = 0; l < L; ++l)
        std::copy(in.state + (l * B + b) * H, in.state + (l * B + b + 1) * H,
                  cur.data() + l * H);
      int64_t tok = bos;
      for (int64_t step = 0; step < num_steps; ++step) {
        packed_row_step<T>(layout_, P.const_data_ptr<T>(), one, tok, in.table, cur.data(), 0,
                           in.ctx_row(b, H), next.data(), logits.data(), in.scratch.data());
        tok = argmax_row<T>(logits.data(), V);
        if (tok == eos) {
          len_out[b] = step;
          break;
        }
        tok_out[b * num_steps + step] = tok;
        std::swap(cur, next);
      }
    }
  });
  return {tokens, lengths};
}

TORCH_LIBRARY_IMPL(seq2seq_ext, CPU, m) {
  m.impl("gru_decode_step", &gru_decode_step_cpu);
  m.impl("greedy_decode", &greedy_decode_cpu);
}

}  // namespace seq2seq_ext
