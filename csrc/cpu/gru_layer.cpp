// One GRU layer over a sequence on the CPU, forward and backward.
//
// Forward: the input projection of all T steps is one GEMM (plus the per-sequence `extra`
// term, the decoder's constant context); then the layer of layer.h over GruCell: per step one
// GEMM (W_hh h + b_hh) and one fused pointwise pass over the gates, which saves r, z, n and
// W_hn h + b_hn, all the backward needs besides the outputs.
// Backward, from the last step to the first: one fused pointwise pass gives the gradients of
// the input-side and hidden-side gate pre-activations, then one GEMM carries the gradient to
// the previous state, and the step's rows are added to the bias gradients' sums while they are
// in cache. The weight gradients are four GEMMs over the whole sequence at the end
// (gru_grads.h). The backward is written for the GRU: its pointwise pass is the GRU cell's
// derivative and its state has one part; an LSTM layer's would also carry the gradient of c.
// With w_ih and w_hh in bfloat16 (the op under CPU autocast) every product takes bf16 operands
// and sums in float32 (csrc/bf16_products.h); the pointwise passes are unchanged.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include "../bf16_products.h"
#include "../gru_grads.h"
#include "../gru_layer.h"
#include "bf16.h"
#include "cells.h"
#include "common.h"
#include "layer.h"
#include "linear.h"
#include "mkl_packed.h"

namespace seq2seq_ext {
namespace cpu {
namespace {

using at::vec::Vectorized;

// The (K, N) matrix of a layer's per-step products, laid out by MKL once for all `steps` of them
// (mkl_packed.h), when they are float32 products of at most `rows` rows that go to BLAS
// (linear_nt_blas) and the layout pays; null otherwise (the steps run as before).
std::unique_ptr<MklPackedMatrix> steps_packed(const at::Tensor& w_kn, int64_t rows,
                                              int64_t steps) {
  if (!linear_nt_blas<float, float>(rows, w_kn.size(1), w_kn.size(0))) return nullptr;
  return mkl_pack_if_it_pays(w_kn, rows, steps);
}

// Backward pointwise for B rows: dh (B, H) gradient of the step's output (accumulated), h
// previous state, saved [r, z, n, gh_n]; writes dgi (B, 3H), dgh (B, 3H) and dh_direct (B, H),
// the part of the previous state's gradient that does not go through W_hh.
template <typename T>
void gru_backward_pointwise(const T* dh, const T* h, const T* saved, T* dgi, T* dgh, T* dh_direct,
                            int64_t B, int64_t H) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec one(T(1));
  for_rows(B, H, [&](int64_t b) {
    const T* g = dh + b * H;
    const T* hp = h + b * H;
    const T* s = saved + b * 4 * H;
    T* di = dgi + b * 3 * H;
    T* dd = dgh + b * 3 * H;
    T* dp = dh_direct + b * H;
    int64_t j = 0;
    for (; j + W <= H; j += W) {
      const Vec r = Vec::loadu(s + j), z = Vec::loadu(s + H + j);
      const Vec n = Vec::loadu(s + 2 * H + j), ghn = Vec::loadu(s + 3 * H + j);
      const Vec gj = Vec::loadu(g + j);
      const Vec dn = gj * (one - z) * (one - n * n);
      const Vec dz = gj * (Vec::loadu(hp + j) - n) * z * (one - z);
      const Vec dr = dn * ghn * r * (one - r);
      dr.store(di + j);
      dz.store(di + H + j);
      dn.store(di + 2 * H + j);
      dr.store(dd + j);
      dz.store(dd + H + j);
      (dn * r).store(dd + 2 * H + j);
      (gj * z).store(dp + j);
    }
    for (; j < H; ++j) {
      gru_gate_grads<T>(g[j], hp[j], s[j], s[H + j], s[2 * H + j], s[3 * H + j], di + j,
                        dd + j, dp + j, H);
    }
  });
}

}  // namespace

void gru_layer_backward(const GruLayerDims& d, const at::Tensor& grad_output,
                        const at::Tensor& h0, const at::Tensor& w_hh, const at::Tensor& output,
                        const at::Tensor& saved, at::Tensor& dgi, at::Tensor& dgh,
                        at::Tensor& dh, bool has_extra, GruGateSums& sums) {
  const int64_t T = d.steps, B = d.batch, H = d.hidden, G = 3 * H;
  at::Tensor dh_direct = at::empty({B, H}, dh.options());
  // the sums over the rows, each step's added as soon as the pointwise pass has made its rows
  // (in cache): the biases' gradients, and extra's, whose row b is every step's row b
  sums.b_ih = at::zeros({G}, dh.options());
  sums.b_hh = at::zeros({G}, dh.options());
  if (has_extra) sums.extra = at::zeros({B, G}, dh.options());
  const at::Tensor go = grad_output.to(dh.scalar_type()).contiguous();
  const at::Tensor saved_c = saved.contiguous();
  // the first row of each step in the (T * B) or packed rows; the rows of step t are the first
  // batch_sizes[t] of the batch (all B when dense), and the others keep their gradient as it is
  const std::vector<int64_t> off = d.offsets();
  // bf16 products: a step's product is a bf16 GEMM (native_product) or the float32 kernel on
  // W_hh's float32 values, made once, not per step
  const bool low = w_hh.scalar_type() == at::kBFloat16;
  at::Tensor w_hh_values;
  AT_DISPATCH_FLOATING_TYPES(dh.scalar_type(), "gru_layer_backward_cpu", [&] {
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t rows = off[t + 1] - off[t];
      if (rows == 0) continue;
      at::Tensor dh_t = dh.narrow(0, 0, rows);
      dh_t.add_(go.reshape({-1, H}).narrow(0, off[t], rows));
      const scalar_t* h_prev = t > 0 ? output.const_data_ptr<scalar_t>() + off[t - 1] * H
                                     : h0.const_data_ptr<scalar_t>();
      at::Tensor dgh_t = dgh.reshape({-1, G}).narrow(0, off[t], rows);
      gru_backward_pointwise<scalar_t>(dh.const_data_ptr<scalar_t>(), h_prev,
                                       saved_c.const_data_ptr<scalar_t>() + off[t] * 4 * H,
                                       dgi.data_ptr<scalar_t>() + off[t] * G,
                                       dgh_t.data_ptr<scalar_t>(), dh_direct.data_ptr<scalar_t>(),
                                       rows, H);
      const scalar_t* dgi_rows = dgi.const_data_ptr<scalar_t>() + off[t] * G;
      add_column_sums<scalar_t>(dgi_rows, G, rows, G, sums.b_ih.data_ptr<scalar_t>());
      // b_hh's r and z columns are b_ih's (the same gate gradients): its n columns only
      add_column_sums<scalar_t>(dgh_t.const_data_ptr<scalar_t>() + 2 * H, G, rows, H,
                                sums.b_hh.data_ptr<scalar_t>() + 2 * H);
      if (has_extra) {  // rows of (B, 3H), contiguous: one flat sum
        scalar_t* e = sums.extra.data_ptr<scalar_t>();
        for (int64_t k = 0; k < rows * G; ++k) e[k] += dgi_rows[k];
      }
      // dh_prev = dh * z + dgh W_hh
      if (low && native_product(rows, G, H)) {
        bf16_addmm_out(dh_t, dh_direct.narrow(0, 0, rows), dgh_t, w_hh);
      } else if (low) {
        if (!w_hh_values.defined()) w_hh_values = w_hh.to(at::kFloat);
        at::addmm_out(dh_t, dh_direct.narrow(0, 0, rows), bf16_values(dgh_t), w_hh_values);
      } else
        at::addmm_out(dh_t, dh_direct.narrow(0, 0, rows), dgh_t, w_hh);
    }
    scalar_t* b_hh = sums.b_hh.data_ptr<scalar_t>();
    std::copy(sums.b_ih.const_data_ptr<scalar_t>(), sums.b_ih.const_data_ptr<scalar_t>() + 2 * H,
              b_hh);
  });
}

void gru_layer(const GruLayerDims& d, const at::Tensor& input, const at::Tensor& h0,
               const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& b_ih,
               const at::Tensor& b_hh, const std::optional<at::Tensor>& extra,
               at::Tensor& output, at::Tensor& saved) {
  const int64_t T = d.steps, B = d.batch, H = d.hidden, G = 3 * H;
  const int64_t N = d.offsets().back();  // rows over all steps
  auto opts = input.options();
  // the input projection of every step in one GEMM: (N, I) x (I, 3H) + b_ih
  at::Tensor gi = empty_written_once({N, G}, opts);
  const bool low = w_ih.scalar_type() == at::kBFloat16;
  if (low) {
    bf16_addmm_out(gi, b_ih, input.reshape({N, d.input}), w_ih.t());
  } else {
    const at::Tensor x = input.reshape({N, d.input}).contiguous();
    const at::Tensor w = w_ih.stride(1) == 1 ? w_ih : w_ih.contiguous();
    const at::Tensor bias = b_ih.contiguous();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "gru_layer_cpu_input", [&] {
      linear_nt<scalar_t>(x.const_data_ptr<scalar_t>(), d.input, N, d.input,
                          w.const_data_ptr<scalar_t>(), w.stride(0), G,
                          bias.const_data_ptr<scalar_t>(), gi.data_ptr<scalar_t>(), false);
    });
  }
  if (extra.has_value() && extra->defined()) {
    if (!d.packed()) {
      gi.view({T, B, G}).add_(extra->unsqueeze(0));
    } else {
      int64_t row = 0;
      for (const int64_t rows : d.batch_sizes) {
        gi.narrow(0, row, rows).add_(extra->narrow(0, 0, rows));
        row += rows;
      }
    }
  }
  gru_layer_steps(d, gi, h0, w_hh, b_hh, output, saved);
}

void gru_layer_steps(const GruLayerDims& d, const at::Tensor& gi, const at::Tensor& h0,
                     const at::Tensor& w_hh, const at::Tensor& b_hh, at::Tensor& output,
                     at::Tensor& saved, bool round_state) {
  const int64_t T = d.steps, B = d.batch, H = d.hidden, G = 3 * H;
  auto opts = gi.options();
  const bool low = w_hh.scalar_type() == at::kBFloat16;
  at::Tensor gh = at::empty({B, G}, opts);
  const at::Tensor h0_c = h0.contiguous();
  const at::Tensor w_hh_c = w_hh.contiguous();
  const at::Tensor b_hh_c = b_hh.contiguous();
  const int64_t* sizes = d.packed() ? d.batch_sizes.data() : nullptr;
  // a float32 layer whose steps' product `product(h, rows, gh)` replaces layer_forward's own
  auto forward_with = [&](const auto& product) {
    layer_forward<GruCell, float>(gi.const_data_ptr<float>(), T, B, H, nullptr,
                                  b_hh_c.const_data_ptr<float>(), {h0_c.const_data_ptr<float>()},
                                  output.data_ptr<float>(), saved.data_ptr<float>(),
                                  gh.data_ptr<float>(), sizes, product);
  };
  if (low && !round_state) {
    // gh = h W_hh^T + b_hh, the float32 state times the bf16 weights read as they are
    const c10::BFloat16* w = w_hh_c.const_data_ptr<c10::BFloat16>();
    const float* bias = b_hh_c.const_data_ptr<float>();
    forward_with([&](const float* h, int64_t rows, float* out) {
      linear_nt<float, c10::BFloat16>(h, H, rows, H, w, H, G, bias, out, false);
    });
    return;
  }
  if (low) {
    // gh = round(h) W_hh^T + b_hh: the float32 kernel on a float32 copy of the bf16 W_hh (at
    // BLAS sizes over that copy laid out once by MKL, as for a float32 layer below), or, under
    // Bf16Gemm::kNative and at BLAS sizes, a bf16 GEMM. The copy is made on first use: a layer
    // whose every step is a bf16 GEMM never needs it.
    at::Tensor w32;
    std::unique_ptr<MklPackedMatrix> packed;
    std::vector<float> h_low;
    const float* bias = b_hh_c.const_data_ptr<float>();
    auto product = [&](const float* h, int64_t rows, float* out) {
      if (native_product(rows, H, G)) {
        const at::Tensor hv = at::from_blob(const_cast<float*>(h), {rows, H}, opts);
        at::Tensor gh_rows = at::from_blob(out, {rows, G}, opts);
        bf16_addmm_out(gh_rows, b_hh_c, hv, w_hh_c.t());
        return;
      }
      if (!w32.defined()) {
        w32 = w_hh_c.to(at::kFloat);
        packed = steps_packed(w32.t(), B, T);
      }
      const float* h_rounded = rounded_to_bf16(h, H, rows, H, h_low);
      if (packed)
        mkl_packed_gemm(h_rounded, H, rows, *packed, bias, 0, out, G);
      else
        linear_nt<float>(h_rounded, H, rows, H, w32.const_data_ptr<float>(), H, G, bias, out,
                         false);
    };
    forward_with(product);
    return;
  }
  // float32 steps at BLAS sizes: W_hh^T laid out by MKL once for all of them (mkl_packed.h)
  if (const auto packed = steps_packed(w_hh_c.t(), B, T)) {
    const float* bias = b_hh_c.const_data_ptr<float>();
    forward_with([&](const float* h, int64_t rows, float* out) {
      mkl_packed_gemm(h, H, rows, *packed, bias, 0, out, G);
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(gi.scalar_type(), "gru_layer_cpu", [&] {
    layer_forward<GruCell>(gi.const_data_ptr<scalar_t>(), T, B, H,
                           w_hh_c.const_data_ptr<scalar_t>(), b_hh_c.const_data_ptr<scalar_t>(),
                           {h0_c.const_data_ptr<scalar_t>()}, output.data_ptr<scalar_t>(),
                           saved.data_ptr<scalar_t>(), gh.data_ptr<scalar_t>(), sizes);
  });
}

}  // namespace cpu
}  // namespace seq2seq_ext
