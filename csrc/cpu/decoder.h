// A decoder over a cell on the CPU (the model is PyTorch's RNN.cpp: a cell, a layer over it, a
// stack of layers): one step of every layer and the output projection for n rows (step_rows),
// and the greedy loop (greedy_rows), both templated on the cell (cells.h: GruCell, LstmCell) and
// on how the weights are stored:
//   RowMajorWeights  the module's own weights, as the ops take them (products: linear_nt);
//   PackedWeights    DecoderStepper's copy, each weight transposed and padded to whole vectors
//                    (products: linear_t_rows, four rows a block, no horizontal sums).
// Layer 0's input projection W_ih0 [emb; ctx] + b_ih0 is split by the algebra of the
// concatenation: the embedding part (with b_ih0) is a row of emb_proj, precomputed once per set
// of weights; the context part is ctx_proj when the context is fixed, else the incoming
// top-layer hidden state times the context columns of W_ih0 (the reference's rule). Per layer one
// product for the hidden side, one for the input side (layers > 0), then the cell's pointwise
// update.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "../decoder.h"
#include "argmax_screen.h"
#include "cells.h"
#include "common.h"
#include "linear.h"

namespace seq2seq_ext {
namespace cpu {

// The module's weights: [w_ih, w_hh, b_ih, b_hh] per layer (contiguous), the output layer.
// With WT = bfloat16 (T = float) the weight matrices are read from `low`, bfloat16 copies
// [w_ih, w_hh per layer..., dense weight]; biases, state and sums stay float.
template <typename T, typename WT = T>
struct RowMajorWeights {
  int64_t H, G, in0, V;
  std::vector<const WT*> w_ih, w_hh;
  std::vector<const T*> b_ih, b_hh;
  const WT* dense_w;
  const T* dense_b;

  RowMajorWeights(const DecoderDims& d, int64_t gates, at::TensorList weights,
                  const at::Tensor& dense_weight, const at::Tensor& dense_bias, Contig& c,
                  at::TensorList low = {})
      : H(d.hidden), G(gates * d.hidden), in0(d.in0), V(d.vocab) {
    const bool own = low.empty();
    auto mat = [&](const at::Tensor& t) { return c(t).template const_data_ptr<WT>(); };
    auto vec = [&](const at::Tensor& t) { return c(t).template const_data_ptr<T>(); };
    for (size_t l = 0; l * 4 < weights.size(); ++l) {
      w_ih.push_back(mat(own ? weights[4 * l] : low[2 * l]));
      w_hh.push_back(mat(own ? weights[4 * l + 1] : low[2 * l + 1]));
      b_ih.push_back(vec(weights[4 * l + 2]));
      b_hh.push_back(vec(weights[4 * l + 3]));
    }
    dense_w = mat(own ? dense_weight : low.back());
    dense_b = vec(dense_bias);
  }
  // the row stride of the gate buffers
  int64_t gate_ld() const { return G; }
  // Whether greedy_rows may compute a step's context and hidden-side products for n rows at the
  // end of the step before (Ahead): only where each is a row-at-a-time product (not BLAS), whose
  // bits do not depend on when it runs or beside how many rows.
  bool lookahead(int64_t n) const { return !linear_nt_blas<T, WT>(n, G, H); }
  // gi (n, G) += h (n, H) times the context columns of W_ih0
  void context(const T* h, int64_t n, T* gi) const {
    linear_nt<T, WT>(h, H, n, H, w_ih[0] + (in0 - H), in0, G, nullptr, gi, /*accumulate=*/true);
  }
  // gi = x W_ih^T + b_ih for layer l > 0
  void input(int64_t l, const T* x, int64_t n, T* gi) const {
    linear_nt<T, WT>(x, H, n, H, w_ih[l], H, G, b_ih[l], gi, false);
  }
  // gh = h W_hh^T + b_hh for layer l
  void hidden(int64_t l, const T* h, int64_t n, T* gh) const {
    linear_nt<T, WT>(h, H, n, H, w_hh[l], H, G, b_hh[l], gh, false);
  }
  // logits (n, V) = h W^T + b
  void dense(const T* h, int64_t n, T* logits) {
    linear_nt<T, WT>(h, H, n, H, dense_w, H, V, dense_b, logits, false);
  }
  // best[b] = argmax_row of row b's logits, for n rows of h; logits (n, V) as scratch. With a
  // screen of dense_w (argmax_screen.h) a row computes only the logits that can be the largest,
  // by dense's own operations: the same index.
  void dense_argmax(const T* h, int64_t n, T* logits, int64_t* best) {
    if constexpr (std::is_same_v<T, float>) {
      if (screen != nullptr && !linear_nt_blas<T, WT>(n, V, H)) {
        for (int64_t b = 0; b < n; ++b)
          best[b] =
              screened_argmax(*screen, h + b * H, dense_w, dense_b, scratch_, logits + b * V);
        return;
      }
    }
    dense(h, n, logits);
    for (int64_t b = 0; b < n; ++b) best[b] = argmax_row<T>(logits + b * V, V);
  }

  // An int8 screen of dense_w, or null (float T only).
  const ArgmaxScreen* screen = nullptr;

 private:
  ScreenScratch scratch_;
};

// Where PackedWeights lie (element offsets into one flat tensor): each product's weight
// transposed to (K, Np), its output size N padded with zeros to Np (a multiple of 64 bytes),
// then its bias padded likewise. ctx: the context columns of W_ih0 (no bias: it is in
// emb_proj); ih and b_ih are unused for layer 0.
struct PackedLayout {
  int64_t Gp = 0, Vp = 0, ctx = 0, dense = 0, dense_b = 0, total = 0;
  std::vector<int64_t> ih, b_ih, hh, b_hh;
};

inline PackedLayout packed_layout(int64_t gates, int64_t L, int64_t H, int64_t V,
                                  int64_t elem_size) {
  const int64_t P = 64 / elem_size;
  auto pad = [&](int64_t n) { return (n + P - 1) / P * P; };
  PackedLayout p;
  p.Gp = pad(gates * H);
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

// The packed weights: the same products, a row at a time; gate rows are padded to Gp.
template <typename T>
struct PackedWeights {
  const PackedLayout& lay;
  const T* P;
  int64_t H, V;
  std::vector<T> row;  // padded rows of logits

  PackedWeights(const PackedLayout& layout, const T* packed, const DecoderDims& d)
      : lay(layout), P(packed), H(d.hidden), V(d.vocab), row(layout.Vp) {}
  int64_t gate_ld() const { return lay.Gp; }
  // never: linear_t_rows starts a sum that accumulates from its initial value, so the context
  // product computed apart would round otherwise
  bool lookahead(int64_t) const { return false; }
  void context(const T* h, int64_t n, T* gi) const {
    linear_t_rows<T>(h, H, n, H, P + lay.ctx, lay.Gp, nullptr, gi, lay.Gp, true);
  }
  void input(int64_t l, const T* x, int64_t n, T* gi) const {
    linear_t_rows<T>(x, H, n, H, P + lay.ih[l], lay.Gp, P + lay.b_ih[l], gi, lay.Gp, false);
  }
  void hidden(int64_t l, const T* h, int64_t n, T* gh) const {
    linear_t_rows<T>(h, H, n, H, P + lay.hh[l], lay.Gp, P + lay.b_hh[l], gh, lay.Gp, false);
  }
  void dense(const T* h, int64_t n, T* logits) {
    row.resize(n * lay.Vp);
    linear_t_rows<T>(h, H, n, H, P + lay.dense, lay.Vp, P + lay.dense_b, row.data(), lay.Vp,
                     false);
    for (int64_t b = 0; b < n; ++b)
      std::copy(row.data() + b * lay.Vp, row.data() + b * lay.Vp + V, logits + b * V);
  }
  void dense_argmax(const T* h, int64_t n, T* logits, int64_t* best) {
    dense(h, n, logits);
    for (int64_t b = 0; b < n; ++b) best[b] = argmax_row<T>(logits + b * V, V);
  }
};

// Gate buffers of step_rows, kept across the steps of a loop.
template <typename T>
struct GateBuffers {
  std::vector<T> gi, gh;
};

// A step's products that read only the states of the step before, computed by greedy_rows at
// the end of that step (ready): ctx (n, ld) the context product (without the embedding part;
// unused with a fixed context) and gh (L, n, ld) each layer's hidden side, b_hh included. Their
// values are those step_rows would compute (the same row-at-a-time products: Weights::lookahead).
template <typename T>
struct Ahead {
  std::vector<T> ctx, gh;
  bool ready = false;
};

// One decoder step for n rows. Each state part of `state` and `next` is (L, n, H) contiguous;
// tok (n,) ids of emb_proj's rows; ctx (n, kGates * H) or null; logits (n, V), or null for
// none (the caller then projects the top layer's new state itself).
// With `ahead` ready, the context and hidden-side products are read from it instead.
template <typename Cell, typename Weights, typename T>
void step_rows(Weights& w, const DecoderDims& d, const T* emb_proj, const int64_t* tok,
               int64_t n, const T* ctx, Parts<const T, Cell::kParts> state,
               Parts<T, Cell::kParts> next, T* logits, GateBuffers<T>& buf,
               const Ahead<T>* ahead = nullptr) {
  const int64_t L = d.layers, H = d.hidden, G = Cell::kGates * H, ld = w.gate_ld();
  const bool ready = ahead != nullptr && ahead->ready;
  buf.gi.resize(n * ld);
  buf.gh.resize(n * ld);
  T* gi = buf.gi.data();
  for (int64_t b = 0; b < n; ++b) {
    const T* e = emb_proj + tok[b] * G;
    T* g = gi + b * ld;
    // the context product accumulates into the embedding part (linear_nt: e + sum), the sum
    // computed ahead is added to it alike
    const T* c = ctx ? ctx + b * G : ready ? ahead->ctx.data() + b * ld : nullptr;
    if (c) {
      for (int64_t j = 0; j < G; ++j) g[j] = e[j] + c[j];
    } else {
      std::copy(e, e + G, g);
    }
  }
  if (!ctx && !ready) w.context(state[0] + (L - 1) * n * H, n, gi);
  for (int64_t l = 0; l < L; ++l) {
    const T* gh = ready ? ahead->gh.data() + l * n * ld : buf.gh.data();
    Parts<const T, Cell::kParts> prev;
    Parts<T, Cell::kParts> out;
    for (int p = 0; p < Cell::kParts; ++p) {
      prev[p] = state[p] + l * n * H;
      out[p] = next[p] + l * n * H;
    }
    if (l > 0) w.input(l, next[0] + (l - 1) * n * H, n, gi);
    if (!ready) w.hidden(l, prev[0], n, buf.gh.data());
    Cell::template update<T>(gi, gh, ld, prev, H, out, H, n, H);
  }
  if (logits) w.dense(next[0] + (L - 1) * n * H, n, logits);
}

// The CPU kernel of a decode-step op over Cell, with the module's row-major weights: reads the
// state parts `state` ((L, B, H) each, any layout), writes `next` ((L, B, H) contiguous each)
// and logits (B, V) (or (B, 1, V)). Token ids are checked here, before anything is written.
template <typename Cell>
void decode_step(const DecoderDims& d, const at::Tensor& token,
                 Parts<const at::Tensor, Cell::kParts> state, Parts<at::Tensor, Cell::kParts> next,
                 const at::Tensor& emb_proj, const std::optional<at::Tensor>& ctx_proj,
                 at::TensorList weights, const at::Tensor& dense_weight,
                 const at::Tensor& dense_bias, at::Tensor& logits) {
  const auto tok = tokens_to_vector(token, d.tgt_vocab);
  const bool has_ctx = ctx_proj.has_value() && ctx_proj->defined();
  AT_DISPATCH_FLOATING_TYPES(state[0]->scalar_type(), "decode_step_cpu", [&] {
    using T = scalar_t;
    Contig c;
    RowMajorWeights<T> w(d, Cell::kGates, weights, dense_weight, dense_bias, c);
    Parts<const T, Cell::kParts> in;
    Parts<T, Cell::kParts> out;
    for (int p = 0; p < Cell::kParts; ++p) {
      in[p] = c(*state[p]).template const_data_ptr<T>();
      out[p] = next[p]->template data_ptr<T>();
    }
    GateBuffers<T> buf;
    step_rows<Cell>(w, d, c(emb_proj).template const_data_ptr<T>(), tok.data(), d.batch,
                    has_ctx ? c(*ctx_proj).template const_data_ptr<T>() : nullptr, in, out,
                    logits.data_ptr<T>(), buf);
  });
}

// Greedy decoding of B > 0 rows for num_steps > 0 steps from the state parts `state` ((L, B, H)
// each, contiguous) and the fixed context projection ctx (B, kGates * H) or null: every row
// starts from bos and feeds back its argmax; a row stops at eos. tok_out (B, num_steps) and
// len_out (B,) come filled with eos and num_steps; a row's tokens and length are written here.
// The rows still decoding are kept compacted at the front of the working state.
//
// Where the weights allow it (Weights::lookahead), the next step's context and hidden-side
// products, which read only this step's new states, are computed at the end of this step beside
// the output layer's (Ahead), and every other step in the reverse order: the matrices read last
// in one step are read first in the next, while they are still in cache. At batch 1 a step reads
// more bytes of weights than L2 holds, every one of them again at the next step; in a fixed
// order each is gone from L2 before it is read again. The same products, so the same bits.
template <typename Cell, typename Weights, typename T>
void greedy_rows(Weights& w, const DecoderDims& d, const T* emb_proj,
                 Parts<const T, Cell::kParts> state, const T* ctx_proj, int64_t bos,
                 int64_t eos, int64_t num_steps, int64_t* tok_out, int64_t* len_out) {
  constexpr int P = Cell::kParts;
  const int64_t B = d.batch, L = d.layers, H = d.hidden, G = Cell::kGates * H, V = d.vocab;
  std::vector<T> cur[P], next[P];
  for (int p = 0; p < P; ++p) {
    cur[p].assign(state[p], state[p] + L * B * H);
    next[p].resize(L * B * H);
  }
  std::vector<T> logits(B * V), ctx;
  if (ctx_proj) ctx.assign(ctx_proj, ctx_proj + B * G);
  std::vector<int64_t> row(B), tok(B, bos), best(B);
  for (int64_t b = 0; b < B; ++b) row[b] = b;
  GateBuffers<T> buf;
  Ahead<T> ahead;
  const int64_t ld = w.gate_ld();
  int64_t n = B;
  for (int64_t step = 0; step < num_steps && n > 0; ++step) {
    Parts<const T, P> in;
    Parts<T, P> out;
    for (int p = 0; p < P; ++p) {
      in[p] = cur[p].data();
      out[p] = next[p].data();
    }
    step_rows<Cell>(w, DecoderDims{L, n, H, d.tgt_vocab, V, d.in0}, emb_proj, tok.data(), n,
                    ctx_proj ? ctx.data() : nullptr, in, out, static_cast<T*>(nullptr), buf,
                    &ahead);
    const T* top = out[0] + (L - 1) * n * H;
    // the next step's products over this step's new states (none after the last step), in
    // the order of this step's parity: the output layer first and the layers upwards, or the
    // layers downwards and the output layer last
    const bool look = step + 1 < num_steps && w.lookahead(n);
    const bool reversed = step % 2 == 1;
    bool computed = false;
    auto products_ahead = [&] {
      computed = true;
      ahead.ctx.resize(n * ld);
      ahead.gh.resize(L * n * ld);
      auto context = [&] {
        if (ctx_proj) return;
        std::fill(ahead.ctx.begin(), ahead.ctx.end(), T(0));
        w.context(top, n, ahead.ctx.data());
      };
      if (!reversed) context();
      for (int64_t i = 0; i < L; ++i) {
        const int64_t l = reversed ? L - 1 - i : i;
        w.hidden(l, out[0] + l * n * H, n, ahead.gh.data() + l * n * ld);
      }
      if (reversed) context();
    };
    ahead.ready = false;
    if (look && reversed) products_ahead();
    w.dense_argmax(top, n, logits.data(), best.data());
    if (look && !reversed && std::any_of(best.begin(), best.begin() + n,
                                         [&](int64_t y) { return y != eos; }))
      products_ahead();
    ahead.ready = computed;
    int64_t kept = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t y = best[i];
      const int64_t b = row[i];
      if (y == eos) {
        len_out[b] = step;
        continue;
      }
      tok_out[b * num_steps + step] = y;
      // compact row i into slot `kept` (kept <= i, so the copy never overwrites a live row)
      row[kept] = b;
      tok[kept] = y;
      for (int p = 0; p < P; ++p)
        for (int64_t l = 0; l < L; ++l)
          std::copy(out[p] + (l * n + i) * H, out[p] + (l * n + i + 1) * H,
                    out[p] + (l * n + kept) * H);
      if (ctx_proj && kept != i)
        std::copy(ctx.data() + i * G, ctx.data() + (i + 1) * G, ctx.data() + kept * G);
      if (ahead.ready && kept != i) {
        T* a = ahead.ctx.data();
        std::copy(a + i * ld, a + (i + 1) * ld, a + kept * ld);
        for (int64_t l = 0; l < L; ++l) {
          T* g = ahead.gh.data() + l * n * ld;
          std::copy(g + i * ld, g + (i + 1) * ld, g + kept * ld);
        }
      }
      ++kept;
    }
    // next holds layer-major rows for n sentences; repack them for `kept`
    for (int p = 0; p < P; ++p)
      for (int64_t l = 0; l < L; ++l)
        std::copy(out[p] + l * n * H, out[p] + (l * n + kept) * H, cur[p].data() + l * kept * H);
    // ahead.gh likewise, from (L, n, ld) to (L, kept, ld) in place (layer l's rows move down)
    if (ahead.ready && kept != n)
      for (int64_t l = 1; l < L; ++l)
        std::copy(ahead.gh.data() + l * n * ld, ahead.gh.data() + (l * n + kept) * ld,
                  ahead.gh.data() + l * kept * ld);
    n = kept;
  }
}

}  // namespace cpu
}  // namespace seq2seq_ext
