// The recurrent cells of the CPU kernels, one interface for nn.GRU and nn.LSTM (the model is
// PyTorch's RNN.cpp: a Cell, a layer over a cell, a stack of layers). A cell has
//   kGates  gate blocks of H pre-activations per row, in its module's gate order;
//   kParts  state parts of H values per row: part 0 is the hidden state h (the layer's output,
//           the next layer's input, the input of the output projection); the LSTM's part 1 is
//           its cell state c;
//   update  the pointwise step: from the input-side and hidden-side pre-activations gi, gh
//           ((B, kGates * H), rows of stride ldg, each already holding its bias) and the
//           previous state parts (rows of stride ldp) to the next state parts (rows of stride
//           ldn); a GRU cell can also save what its backward needs.
// The decoders (decoder.h) and the sequence layer (gru_layer.cpp) are written over this interface.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <array>
#include <cmath>

namespace seq2seq_ext {
namespace cpu {

// The state parts of a cell, one pointer per part.
template <typename T, int P>
using Parts = std::array<T*, P>;

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

template <typename T>
inline at::vec::Vectorized<T> vsigmoid(const at::vec::Vectorized<T>& x) {
  const at::vec::Vectorized<T> one(T(1));
  return one / (one + x.neg().exp());
}

// tanh(x) = expm1(2x) / (expm1(2x) + 2): one expm1 instead of Sleef's costlier tanh, accurate
// near 0 (no cancellation) and saturating exactly: beyond the clamp tanh rounds to +-1 in T.
template <typename T>
inline at::vec::Vectorized<T> vtanh(const at::vec::Vectorized<T>& x) {
  using Vec = at::vec::Vectorized<T>;
  constexpr T lim = std::is_same_v<T, float> ? T(10) : T(20);
  const Vec two(T(2));
  const Vec m = (at::vec::clamp(x, Vec(-lim), Vec(lim)) * two).expm1();
  return m / (m + two);
}

// Runs f(b) for every row b of [0, B), rows of H units, in parallel chunks of ~4096 units.
template <typename F>
inline void for_rows(int64_t B, int64_t H, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, H));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f(b);
  });
}

// nn.GRU's cell, gate order (r, z, n), b_hn inside the reset product (it is part of gh):
//   r = s(gi_r + gh_r), z = s(gi_z + gh_z), n = tanh(gi_n + r * gh_n), h' = (1 - z) n + z h.
// When `saved` is given it receives (B, 4H) = [r, z, n, gh_n] for the backward.
struct GruCell {
  static constexpr int kGates = 3;
  static constexpr int kParts = 1;
  static constexpr int kSaved = 4;  // r, z, n, gh_n

  template <typename T>
  static void update(const T* gi, const T* gh, int64_t ldg, Parts<const T, 1> prev, int64_t ldp,
                     Parts<T, 1> next, int64_t ldn, int64_t B, int64_t H, T* saved = nullptr) {
    using Vec = at::vec::Vectorized<T>;
    constexpr int64_t W = Vec::size();
    for_rows(B, H, [&](int64_t b) {
      const T* a = gi + b * ldg;
      const T* c = gh + b * ldg;
      const T* hp = prev[0] + b * ldp;
      T* o = next[0] + b * ldn;
      T* s = saved ? saved + b * 4 * H : nullptr;
      int64_t j = 0;
      for (; j + W <= H; j += W) {
        const Vec r = vsigmoid(Vec::loadu(a + j) + Vec::loadu(c + j));
        const Vec z = vsigmoid(Vec::loadu(a + H + j) + Vec::loadu(c + H + j));
        const Vec ghn = Vec::loadu(c + 2 * H + j);
        const Vec n = vtanh(Vec::loadu(a + 2 * H + j) + r * ghn);
        (n + z * (Vec::loadu(hp + j) - n)).store(o + j);
        if (s) {
          r.store(s + j);
          z.store(s + H + j);
          n.store(s + 2 * H + j);
          ghn.store(s + 3 * H + j);
        }
      }
      for (; j < H; ++j) {
        const T r = sigmoid(a[j] + c[j]);
        const T z = sigmoid(a[H + j] + c[H + j]);
        const T ghn = c[2 * H + j];
        const T n = std::tanh(a[2 * H + j] + r * ghn);
        o[j] = n + z * (hp[j] - n);
        if (s) {
          s[j] = r;
          s[H + j] = z;
          s[2 * H + j] = n;
          s[3 * H + j] = ghn;
        }
      }
    });
  }
};

// nn.LSTM's cell, gate order (i, f, g, o); state parts (h, c):
//   i = s(gi_i + gh_i), f = s(gi_f + gh_f), g = tanh(gi_g + gh_g), o = s(gi_o + gh_o),
//   c' = f c + i g, h' = o tanh(c').
// The previous h enters through gh only: the pass reads the previous c. (A sequence layer over
// this cell, layer.h, would add what its backward needs: kSaved and a `saved` output.)
struct LstmCell {
  static constexpr int kGates = 4;
  static constexpr int kParts = 2;

  template <typename T>
  static void update(const T* gi, const T* gh, int64_t ldg, Parts<const T, 2> prev, int64_t ldp,
                     Parts<T, 2> next, int64_t ldn, int64_t B, int64_t H) {
    using Vec = at::vec::Vectorized<T>;
    constexpr int64_t W = Vec::size();
    for_rows(B, H, [&](int64_t b) {
      const T* a = gi + b * ldg;
      const T* r = gh + b * ldg;
      const T* cp = prev[1] + b * ldp;
      T* ho = next[0] + b * ldn;
      T* co = next[1] + b * ldn;
      int64_t j = 0;
      for (; j + W <= H; j += W) {
        const Vec i = vsigmoid(Vec::loadu(a + j) + Vec::loadu(r + j));
        const Vec f = vsigmoid(Vec::loadu(a + H + j) + Vec::loadu(r + H + j));
        const Vec g = vtanh(Vec::loadu(a + 2 * H + j) + Vec::loadu(r + 2 * H + j));
        const Vec o = vsigmoid(Vec::loadu(a + 3 * H + j) + Vec::loadu(r + 3 * H + j));
        const Vec cn = f * Vec::loadu(cp + j) + i * g;
        cn.store(co + j);
        (o * vtanh(cn)).store(ho + j);
      }
      for (; j < H; ++j) {
        const T i = sigmoid(a[j] + r[j]);
        const T f = sigmoid(a[H + j] + r[H + j]);
        const T g = std::tanh(a[2 * H + j] + r[2 * H + j]);
        const T o = sigmoid(a[3 * H + j] + r[3 * H + j]);
        const T cn = f * cp[j] + i * g;
        co[j] = cn;
        ho[j] = o * std::tanh(cn);
      }
    });
  }
};

}  // namespace cpu
}  // namespace seq2seq_ext
