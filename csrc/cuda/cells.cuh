// The recurrent cells of the CUDA kernels, the device side of cpu/cells.h's interface: a cell
// has kGates gate blocks of H pre-activations per row (its module's gate order) and kParts state
// parts (part 0 the hidden state h; the LSTM's part 1 its cell state c), and `unit` computes one
// hidden unit of the next state from the unit's input-side pre-activations i (biases and the
// embedding row included), hidden-side ones g (W_hh h + b_hh) and a loader prev(p) of the
// previous state's part p (only the parts the cell reads are loaded).
#pragma once

#include "device_math.cuh"

namespace seq2seq_ext {
namespace cuda {

// nn.GRU: gate order (r, z, n), b_hn inside the reset product (gru_unit, which the sequence
// layer's kernel shares).
struct GruCell {
  static constexpr int kGates = 3;
  static constexpr int kParts = 1;
  template <typename T, typename Prev>
  __device__ __forceinline__ static void unit(const T (&i)[3], const T (&g)[3], Prev prev,
                                              T (&next)[1]) {
    next[0] = gru_unit(i[0], i[1], i[2], g[0], g[1], g[2], prev(0)).h_new;
  }
};

// nn.LSTM: gate order (i, f, g, o), state parts (h, c):
//   i = s(i_i + g_i), f = s(i_f + g_f), g = tanh(i_g + g_g), o = s(i_o + g_o),
//   c' = f c + i g, h' = o tanh(c').
struct LstmCell {
  static constexpr int kGates = 4;
  static constexpr int kParts = 2;
  template <typename T, typename Prev>
  __device__ __forceinline__ static void unit(const T (&a)[4], const T (&r)[4], Prev prev,
                                              T (&next)[2]) {
    const T i = dev_sigmoid(a[0] + r[0]);
    const T f = dev_sigmoid(a[1] + r[1]);
    const T g = dev_tanh(a[2] + r[2]);
    const T o = dev_sigmoid(a[3] + r[3]);
    const T cn = f * prev(1) + i * g;
    next[1] = cn;
    next[0] = o * dev_tanh(cn);
  }
};

}  // namespace cuda
}  // namespace seq2seq_ext
