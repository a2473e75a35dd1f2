// The recurrent cells on the CPU: the lane policies under which the equations of rnn_cells.h run
// on AVX vectors and scalars, and the row update through which the decoders (decoder.h) and the
// GRU sequence layer (layer.h) use a cell (the model is PyTorch's RNN.cpp: a Cell, a layer over a
// cell, a stack of layers). A cell here has
//   kGates  gate blocks of H pre-activations per row, in its module's gate order;
//   kParts  state parts of H values per row: part 0 is the hidden state h; the LSTM's part 1 is
//           its cell state c;
//   update  the pointwise step over B rows.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <array>
#include <cmath>

#include "../rnn_cells.h"

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

// expm1(y) for float lanes at the cost of one exp: exp(y) - 1 where that subtraction loses
// little (|y| >= 1: at most ~1.6 ulp beyond exp's own error), the Taylor series through y^10
// below (truncation under 3e-8 relative). Sleef's expm1 keeps double-float precision throughout
// and cost as much as a small step's GEMMs in the LSTM's forward.
inline at::vec::Vectorized<float> vexpm1(const at::vec::Vectorized<float>& y) {
  using Vec = at::vec::Vectorized<float>;
  Vec p(1.0f / 3628800);  // 1/10!
  const float inv_fact[9] = {1.0f / 362880, 1.0f / 40320, 1.0f / 5040, 1.0f / 720, 1.0f / 120,
                             1.0f / 24,     1.0f / 6,     1.0f / 2,    1.0f};
  for (float c : inv_fact) p = at::vec::fmadd(p, y, Vec(c));
  const Vec series = p * y;
  const Vec near = y.abs() < Vec(1.0f);  // all-ones lanes where the series applies
  return Vec::blendv(y.exp() - Vec(1.0f), series, near);
}
inline at::vec::Vectorized<double> vexpm1(const at::vec::Vectorized<double>& y) {
  return y.expm1();
}

// tanh(x) = sign(x) * m / (m + 2) with m = expm1(2|x|): accurate near 0 (no cancellation),
// over |x| so that m >= 0 (for m < 0 the division magnifies m's relative error by 2 / (m + 2),
// up to 1.5x), and saturating exactly: beyond the clamp tanh rounds to +-1 in T.
template <typename T>
inline at::vec::Vectorized<T> vtanh(const at::vec::Vectorized<T>& x) {
  using Vec = at::vec::Vectorized<T>;
  constexpr T lim = std::is_same_v<T, float> ? T(10) : T(20);
  const Vec two(T(2));
  const Vec m = vexpm1(at::vec::minimum(x.abs(), Vec(lim)) * two);
  return (m / (m + two)) | (x & Vec(T(-0.0)));  // the sign bit of x
}

// Runs f(b) for every row b of [0, B), rows of H units, in parallel chunks of ~4096 units.
template <typename F>
inline void for_rows(int64_t B, int64_t H, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, H));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f(b);
  });
}

// The cells' lane policies on the CPU (rnn_cells.h): AVX lanes for the body of a row, scalars
// for its tail.
template <typename T>
struct VecLanes {
  using scalar = T;
  using V = at::vec::Vectorized<T>;
  static V load(const T* p) { return V::loadu(p); }
  static void store(const V& v, T* p) { v.store(p); }
  static V one() { return V(T(1)); }
  static V sigmoid(const V& x) { return vsigmoid(x); }
  static V tanh(const V& x) { return vtanh(x); }
  static V blend(const V& n, const V& z, const V& h) { return n + z * (h - n); }
};

template <typename T>
struct ScalarLanes {
  using scalar = T;
  using V = T;
  static T load(const T* p) { return *p; }
  static void store(T v, T* p) { *p = v; }
  static T one() { return T(1); }
  static T sigmoid(T x) { return cpu::sigmoid(x); }
  static T tanh(T x) { return std::tanh(x); }
  static T blend(T n, T z, T h) { return n + z * (h - n); }
};

// Applies f(lanes, j) over j in [0, H): vectors first, then scalars.
template <typename T, typename F>
inline void over_row(int64_t H, F&& f) {
  constexpr int64_t W = at::vec::Vectorized<T>::size();
  int64_t j = 0;
  for (; j + W <= H; j += W) f(VecLanes<T>{}, j);
  for (; j < H; ++j) f(ScalarLanes<T>{}, j);
}

// The decoders' and the GRU sequence layer's view of a cell: `update` runs the cell's equations
// (rnn_cells.h) over B rows, from the input-side and hidden-side pre-activations gi, gh ((B,
// kGates * H), rows of stride ldg, each already holding its bias) and the previous state parts
// (rows of stride ldp) to the next state parts (rows of stride ldn).

// nn.GRU, gate order (r, z, n). When `saved` is given it receives (B, 4H) = [r, z, n, gh_n],
// what the GRU layer's backward reads.
struct GruCell {
  using Equations = seq2seq_ext::GruCell;
  static constexpr int kGates = Equations::kGates;
  static constexpr int kParts = 1;
  static constexpr int kSaved = 4;  // r, z, n, gh_n

  template <typename T>
  static void update(const T* gi, const T* gh, int64_t ldg, Parts<const T, 1> prev, int64_t ldp,
                     Parts<T, 1> next, int64_t ldn, int64_t B, int64_t H, T* saved = nullptr) {
    for_rows(B, H, [&](int64_t b) {
      const T* a = gi + b * ldg;
      const T* c = gh + b * ldg;
      const T* hp = prev[0] + b * ldp;
      T* o = next[0] + b * ldn;
      T* s = saved ? saved + b * 4 * H : nullptr;
      over_row<T>(H, [&](auto lanes, int64_t j) {
        using L = decltype(lanes);
        const auto v = Equations::gates<L>(a + j, c + j, hp + j, nullptr, H);
        L::store(v.h, o + j);
        if (s) {
          L::store(v.r, s + j);
          L::store(v.z, s + H + j);
          L::store(v.n, s + 2 * H + j);
          L::store(v.ghn, s + 3 * H + j);
        }
      });
    });
  }
};

// nn.LSTM, gate order (i, f, g, o); state parts (h, c).
struct LstmCell {
  using Equations = seq2seq_ext::LstmCell;
  static constexpr int kGates = Equations::kGates;
  static constexpr int kParts = 2;

  template <typename T>
  static void update(const T* gi, const T* gh, int64_t ldg, Parts<const T, 2> prev, int64_t ldp,
                     Parts<T, 2> next, int64_t ldn, int64_t B, int64_t H) {
    for_rows(B, H, [&](int64_t b) {
      const T* a = gi + b * ldg;
      const T* r = gh + b * ldg;
      const T* cp = prev[1] + b * ldp;
      T* ho = next[0] + b * ldn;
      T* co = next[1] + b * ldn;
      over_row<T>(H, [&](auto lanes, int64_t j) {
        using L = decltype(lanes);
        const auto v = Equations::gates<L>(a + j, r + j, nullptr, cp + j, H);
        L::store(v.c, co + j);
        L::store(v.h, ho + j);
      });
    });
  }
};

}  // namespace cpu
}  // namespace seq2seq_ext
