// The recurrent cells on CUDA: the lane policy under which the equations of rnn_cells.h run on a
// GPU thread (one scalar in the tensor's dtype), and the unit through which the decode kernels
// (decoder.cuh) use a cell. A cell here has kGates gate blocks of H pre-activations per row (its
// module's gate order) and kParts state parts (part 0 the hidden state h; the LSTM's part 1 its
// cell state c); `unit` computes one hidden unit of the next state from the unit's input-side
// pre-activations i (biases and the embedding row included), hidden-side ones g (W_hh h + b_hh)
// and a loader prev(p) of the previous state's part p (only the parts the cell reads are loaded).
#pragma once

#include <c10/macros/Macros.h>

#include "../rnn_cells.h"
#include "device_math.cuh"

namespace seq2seq_ext {
namespace cuda {

template <typename T>
struct DeviceLanes {
  using scalar = T;
  using V = T;
  static C10_DEVICE T load(const T* p) { return *p; }
  static C10_DEVICE void store(T v, T* p) { *p = v; }
  static C10_DEVICE T one() { return T(1); }
  static C10_DEVICE T sigmoid(T x) { return dev_sigmoid(x); }
  static C10_DEVICE T tanh(T x) { return dev_tanh(x); }
  // rounded per operation as on the CPU (device_math.cuh)
  static C10_DEVICE T blend(T n, T z, T h) { return gru_new_state(n, z, h); }
};

// nn.GRU: gate order (r, z, n), b_hn inside the reset product. The unit's three gates sit in
// i[0..2] and g[0..2], so the equations see them with a gate stride of 1.
struct GruCell {
  static constexpr int kGates = 3;
  static constexpr int kParts = 1;
  template <typename T, typename Prev>
  __device__ __forceinline__ static void unit(const T (&i)[3], const T (&g)[3], Prev prev,
                                              T (&next)[1]) {
    const T h = prev(0);
    next[0] = seq2seq_ext::GruCell::gates<DeviceLanes<T>>(i, g, &h, nullptr, 1).h;
  }
};

// nn.LSTM: gate order (i, f, g, o), state parts (h, c).
struct LstmCell {
  static constexpr int kGates = 4;
  static constexpr int kParts = 2;
  template <typename T, typename Prev>
  __device__ __forceinline__ static void unit(const T (&a)[4], const T (&r)[4], Prev prev,
                                              T (&next)[2]) {
    const T c = prev(1);
    const auto v = seq2seq_ext::LstmCell::gates<DeviceLanes<T>>(a, r, nullptr, &c, 1);
    next[1] = v.c;
    next[0] = v.h;
  }
};

}  // namespace cuda
}  // namespace seq2seq_ext
