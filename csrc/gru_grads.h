// The whole-sequence part of gru_layer's backward, shared by the CPU and CUDA kernels: once the
// per-step passes have produced the gate-gradient buffers, the input, weight, bias and extra
// gradients are a few GEMMs and sums over all T * B rows (ATen calls, any device).
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <tuple>
#include <vector>

#include "bf16_products.h"
#include "gru_layer.h"

namespace seq2seq_ext {

// One element of a step's backward: g is the gradient of the step's output, h the previous
// state, (r, z, n, ghn) the saved activations. Writes the gradients of the input-side gate
// pre-activations (dgi: r, z, n), of the hidden-side ones (dgh: r, z, n; the reset gate
// multiplies W_hn h + b_hn) and the part of the previous state's gradient that bypasses W_hh.
template <typename T>
C10_HOST_DEVICE inline void gru_gate_grads(T g, T h, T r, T z, T n, T ghn, T* dgi, T* dgh,
                                           T* dh_direct, int64_t H) {
  const T dn = g * (T(1) - z) * (T(1) - n * n);  // through tanh
  const T dz = g * (h - n) * z * (T(1) - z);     // through sigmoid
  const T dr = dn * ghn * r * (T(1) - r);
  dgi[0] = dr;
  dgi[H] = dz;
  dgi[2 * H] = dn;
  dgh[0] = dr;
  dgh[H] = dz;
  dgh[2 * H] = dn * r;
  *dh_direct = g * z;
}

using GruLayerGrads =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// dgi, dgh: (T, B, 3H) gradients of the input-side and hidden-side gate pre-activations (or
// (N, 3H) over the rows of the packed layout, gru_layer.h); dh: (B, H) gradient of h0; input
// (T, B, I) or (N, I); h0 (B, H) and output (T, B, H) or (N, H) contiguous; sums: what the
// kernel summed already (the others are summed here). Returns (input, h0, w_ih, w_hh, b_ih, b_hh,
// extra) gradients; extra's is empty unless has_extra. A bfloat16 w_ih
// (and w_hh: the op under CPU autocast) makes every product bf16 (bf16_products.h) and the two
// matrices' gradients bfloat16.
inline GruLayerGrads gru_layer_sequence_grads(const GruLayerDims& d, const at::Tensor& dgi,
                                              const at::Tensor& dgh, const at::Tensor& dh,
                                              const at::Tensor& input, const at::Tensor& h0,
                                              const at::Tensor& output, const at::Tensor& w_ih,
                                              bool has_extra, const GruGateSums& sums) {
  const int64_t T = d.steps, B = d.batch, G = 3 * d.hidden, H = d.hidden, I = d.input;
  // the rows, (T, B) or packed (N,), counted from the shape (G may be 0)
  const int64_t N = dgi.dim() == 3 ? dgi.size(0) * dgi.size(1) : dgi.size(0);
  const at::Tensor dgi2 = dgi.view({N, G});
  const at::Tensor dgh2 = dgh.view({N, G});
  const bool low = w_ih.scalar_type() == at::kBFloat16;
  auto mm = [low](const at::Tensor& a, const at::Tensor& b) {
    return low ? bf16_mm(a, b) : at::mm(a, b);
  };
  // a^T x: a weight matrix's gradient over all rows (bf16 for a bf16 matrix)
  auto matrix_grad = [low](const at::Tensor& a, const at::Tensor& x) {
    return low ? bf16_matrix_grad(a, x) : at::mm(a.t(), x);
  };
  // under native bf16 GEMMs, dgi's bf16 copy is made once for its two products
  const at::Tensor dgi_x = low && native_product(N, G, I) ? dgi2.to(at::kBFloat16) : dgi2;
  at::Tensor grad_input = mm(dgi_x, w_ih).view(input.sizes());
  at::Tensor grad_w_ih = matrix_grad(dgi_x, input.reshape({N, I}));
  at::Tensor grad_b_ih = sums.b_ih.defined() ? sums.b_ih : dgi2.sum(0);
  // the state each row's step started from: h0, then the outputs of the step before
  at::Tensor h_prevs, grad_extra = at::empty({0}, h0.options());
  if (!d.packed()) {
    h_prevs = T > 0 ? at::cat({h0.unsqueeze(0), output.narrow(0, 0, T - 1)}, 0).view({T * B, H})
                    : at::empty({0, H}, h0.options());
    if (has_extra) grad_extra = sums.extra.defined() ? sums.extra : dgi.sum(0);
  } else {
    // row b of step t started from row b of step t - 1 (h0's row b at step 0); its batch row is
    // b, where extra's gradient sums it (the kernel's sums.extra, else the index_add_ below)
    const std::vector<int64_t> off = d.offsets();
    std::vector<int64_t> prev(N), batch_row(N);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t b = 0; b < d.batch_sizes[t]; ++b) {
        prev[off[t] + b] = t == 0 ? b : B + off[t - 1] + b;
        batch_row[off[t] + b] = b;
      }
    auto index = [&](const std::vector<int64_t>& v) {
      return at::tensor(v, at::TensorOptions().dtype(at::kLong)).to(h0.device());
    };
    h_prevs = at::cat({h0, output.view({N, H})}, 0).index_select(0, index(prev));
    if (has_extra)
      grad_extra = sums.extra.defined()
                       ? sums.extra
                       : at::zeros({B, G}, h0.options()).index_add_(0, index(batch_row), dgi2);
  }
  at::Tensor grad_w_hh = matrix_grad(dgh2, h_prevs);
  at::Tensor grad_b_hh = sums.b_hh.defined() ? sums.b_hh : dgh2.sum(0);
  return {grad_input, dh, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_extra};
}

}  // namespace seq2seq_ext
