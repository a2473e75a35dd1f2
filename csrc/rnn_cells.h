// The recurrent cells: nn.GRU's and nn.LSTM's pointwise equations, forward and backward, written
// once for every device and lane type. Every kernel with a cell in it computes through these:
// rnn_stack (CPU and CUDA, forward and backward), the decoders' steps and greedy loops
// (cpu/cells.h's row update, cuda/cells.cuh's unit) and the GRU sequence layer's forward.
//
// A cell sees one element j of a row of B rows at a time through a lane policy `L` (a scalar on
// a GPU thread or in a CPU loop's tail, an at::vec::Vectorized<T> in a CPU loop's body; the
// policies are in cpu/cells.h and cuda/cells.cuh):
//   L::V            the lane type;       L::load(p), L::store(v, p);
//   L::sigmoid(v),  L::tanh(v),          L::one();
//   L::blend(n, z, h)  n + z * (h - n), rounded after each operation (the GRU's new state).
// Pointers point at element j of the row; offsets in multiples of H select a gate.
//
// `gates` returns the activations of one element (the new state first); `forward` stores them
// as a row of `saved`; `backward` is the derivative, from a row of `saved`.
//
// A row of `saved` (width kSaved * H) keeps what the backward needs: the new hidden state first
// (the layer's output), then for the LSTM the new cell state, then the gate activations.
//   GRU  (r, z, n):    [h', r, z, n, W_hn h + b_hn]       kSaved = 5
//   LSTM (i, f, g, o): [h', c', i, f, g, o]               kSaved = 6
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace seq2seq_ext {

struct GruCell {
  static constexpr int kGates = 3;
  static constexpr int kSaved = 5;
  static constexpr bool kHasCellState = false;
  static constexpr const char* kName = "gru";

  template <class V>
  struct Act {
    V h, r, z, n, ghn;  // h: the new state; ghn: W_hn h + b_hn
  };

  // gi, gh: the input-side and hidden-side gate pre-activations (each with its bias); h: the
  // previous state; c: unused.
  template <class L>
  C10_HOST_DEVICE static Act<typename L::V> gates(const typename L::scalar* gi,
                                                  const typename L::scalar* gh,
                                                  const typename L::scalar* h,
                                                  const typename L::scalar*, int64_t H) {
    Act<typename L::V> a;
    a.r = L::sigmoid(L::load(gi) + L::load(gh));
    a.z = L::sigmoid(L::load(gi + H) + L::load(gh + H));
    a.ghn = L::load(gh + 2 * H);
    a.n = L::tanh(L::load(gi + 2 * H) + a.r * a.ghn);
    a.h = L::blend(a.n, a.z, L::load(h));
    return a;
  }

  // gates(), stored as the row of `saved`.
  template <class L>
  C10_HOST_DEVICE static void forward(const typename L::scalar* gi, const typename L::scalar* gh,
                                      const typename L::scalar* h, const typename L::scalar* c,
                                      typename L::scalar* s, int64_t H) {
    const auto a = gates<L>(gi, gh, h, c, H);
    L::store(a.h, s);
    L::store(a.r, s + H);
    L::store(a.z, s + 2 * H);
    L::store(a.n, s + 3 * H);
    L::store(a.ghn, s + 4 * H);
  }

  // dh: the gradient reaching h' (in); h: the previous state; s: the row of `saved`.
  // Writes dgi and dgh (the gradients of the two pre-activations; they differ in the n gate,
  // whose hidden side sits inside the reset product) and dh_prev, the part of the previous
  // state's gradient that does not go through W_hh. c, dc, c_prev: unused.
  template <class L>
  C10_HOST_DEVICE static void backward(const typename L::scalar* dh, typename L::scalar*,
                                       const typename L::scalar* h, const typename L::scalar*,
                                       const typename L::scalar* s, typename L::scalar* dgi,
                                       typename L::scalar* dgh, typename L::scalar* dh_prev,
                                       int64_t H) {
    using V = typename L::V;
    const V one = L::one();
    const V g = L::load(dh);
    const V r = L::load(s + H), z = L::load(s + 2 * H), n = L::load(s + 3 * H);
    const V ghn = L::load(s + 4 * H);
    const V dn = g * (one - z) * (one - n * n);
    const V dz = g * (L::load(h) - n) * z * (one - z);
    const V dr = dn * ghn * r * (one - r);
    L::store(dr, dgi);
    L::store(dz, dgi + H);
    L::store(dn, dgi + 2 * H);
    L::store(dr, dgh);
    L::store(dz, dgh + H);
    L::store(dn * r, dgh + 2 * H);
    L::store(g * z, dh_prev);
  }
};

struct LstmCell {
  static constexpr int kGates = 4;
  static constexpr int kSaved = 6;
  static constexpr bool kHasCellState = true;
  static constexpr const char* kName = "lstm";

  template <class V>
  struct Act {
    V h, c, i, f, g, o;  // h, c: the new states
  };

  // gi, gh: the input-side and hidden-side gate pre-activations (each with its bias); c: the
  // previous cell state (the previous h enters through gh only).
  template <class L>
  C10_HOST_DEVICE static Act<typename L::V> gates(const typename L::scalar* gi,
                                                  const typename L::scalar* gh,
                                                  const typename L::scalar*,
                                                  const typename L::scalar* c, int64_t H) {
    Act<typename L::V> a;
    a.i = L::sigmoid(L::load(gi) + L::load(gh));
    a.f = L::sigmoid(L::load(gi + H) + L::load(gh + H));
    a.g = L::tanh(L::load(gi + 2 * H) + L::load(gh + 2 * H));
    a.o = L::sigmoid(L::load(gi + 3 * H) + L::load(gh + 3 * H));
    a.c = a.f * L::load(c) + a.i * a.g;
    a.h = a.o * L::tanh(a.c);
    return a;
  }

  template <class L>
  C10_HOST_DEVICE static void forward(const typename L::scalar* gi, const typename L::scalar* gh,
                                      const typename L::scalar* h, const typename L::scalar* c,
                                      typename L::scalar* s, int64_t H) {
    const auto a = gates<L>(gi, gh, h, c, H);
    L::store(a.h, s);
    L::store(a.c, s + H);
    L::store(a.i, s + 2 * H);
    L::store(a.f, s + 3 * H);
    L::store(a.g, s + 4 * H);
    L::store(a.o, s + 5 * H);
  }

  // dh: the gradient reaching h'; dc: in, the gradient reaching c' from the next step; out, the
  // gradient of the previous cell state c_prev. Writes the gate pre-activations' gradient into
  // dgi (the same for both sides: dgh is unused) and zero into dh_prev (the previous hidden
  // state is reached only through W_hh).
  template <class L>
  C10_HOST_DEVICE static void backward(const typename L::scalar* dh, typename L::scalar* dc,
                                       const typename L::scalar*, const typename L::scalar* c_prev,
                                       const typename L::scalar* s, typename L::scalar* dgi,
                                       typename L::scalar*, typename L::scalar* dh_prev,
                                       int64_t H) {
    using V = typename L::V;
    const V one = L::one();
    const V g_h = L::load(dh);
    const V cn = L::load(s + H), i = L::load(s + 2 * H), f = L::load(s + 3 * H);
    const V g = L::load(s + 4 * H), o = L::load(s + 5 * H);
    const V tc = L::tanh(cn);
    const V d_c = L::load(dc) + g_h * o * (one - tc * tc);
    L::store(d_c * g * i * (one - i), dgi);
    L::store(d_c * L::load(c_prev) * f * (one - f), dgi + H);
    L::store(d_c * i * (one - g * g), dgi + 2 * H);
    L::store(g_h * tc * o * (one - o), dgi + 3 * H);
    L::store(d_c * f, dc);
    L::store(one - one, dh_prev);
  }
};

}  // namespace seq2seq_ext
