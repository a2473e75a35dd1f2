// A recurrent layer over a cell on the CPU (PyTorch RNN.cpp's FullLayer over a Cell): the
// input-side pre-activations of every step come precomputed (one GEMM over the whole sequence
// before the loop); per step one hidden-side product (W_hh h + b_hh, small products in vector
// loops, large ones in BLAS) and the cell's pointwise update, which also saves what the
// backward needs.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstddef>
#include <type_traits>
#include <vector>

#include "cells.h"
#include "linear.h"

namespace seq2seq_ext {
namespace cpu {

// gi (T, B, G) with G = Cell::kGates * H; w_hh (G, H) and b_hh (G,) contiguous; h0 the initial
// state parts (B, H) each. Writes the hidden state of every step to output (T, B, H) and each
// step's saved activations (B, Cell::kSaved * H) to saved; the other state parts (the LSTM's c)
// are carried in work rows. gh: a (B, G) work buffer. With `batch_sizes` (T entries, the packed
// layout of gru_layer.h) step t runs the first batch_sizes[t] rows only, and gi, output and saved
// hold the steps' rows one after the other. `hidden_product(h, rows, gh)`, when given, replaces
// the step's product gh = h W_hh^T + b_hh (the bf16 products of gru_layer under autocast).
template <typename Cell, typename T, typename HiddenProduct = std::nullptr_t>
void layer_forward(const T* gi, int64_t steps, int64_t B, int64_t H, const T* w_hh,
                   const T* b_hh, Parts<const T, Cell::kParts> h0, T* output, T* saved, T* gh,
                   const int64_t* batch_sizes = nullptr,
                   const HiddenProduct& hidden_product = nullptr) {
  constexpr int P = Cell::kParts;
  const int64_t G = Cell::kGates * H;
  std::vector<T> carry[2][P];  // parts 1.. of the state, written alternately
  for (auto& set : carry)
    for (int p = 1; p < P; ++p) set[p].resize(B * H);
  Parts<const T, P> prev = h0;
  int64_t row = 0;  // the first row of step t
  for (int64_t t = 0; t < steps; ++t) {
    const int64_t rows = batch_sizes ? batch_sizes[t] : B;
    if constexpr (std::is_same_v<HiddenProduct, std::nullptr_t>)
      linear_nt<T>(prev[0], H, rows, H, w_hh, H, G, b_hh, gh, false);
    else
      hidden_product(prev[0], rows, gh);
    Parts<T, P> next;
    next[0] = output + row * H;
    for (int p = 1; p < P; ++p) next[p] = carry[t & 1][p].data();
    Cell::template update<T>(gi + row * G, gh, G, prev, H, next, H, rows, H,
                             saved + row * Cell::kSaved * H);
    for (int p = 0; p < P; ++p) prev[p] = next[p];
    row += rows;
  }
}

}  // namespace cpu
}  // namespace seq2seq_ext
