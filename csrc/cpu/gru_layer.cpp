// One GRU layer over a sequence on the CPU, forward and backward.
//
// Forward: the input projection of all T steps is one GEMM (plus the per-sequence `extra`
// term, the decoder's constant context); then per step one GEMM (W_hh h + b_hh) and one fused
// pointwise pass over the gates. The pass saves r, z, n and W_hn h + b_hn, which is all the
// backward needs besides the outputs.
// Backward, from the last step to the first: one fused pointwise pass gives the gradients of
// the input-side and hidden-side gate pre-activations, then one GEMM carries the gradient to
// the previous state. The weight gradients are four GEMMs over the whole sequence at the end.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "../checks.h"
#include "../gru_grads.h"
#include "gru_math.h"
#include "kernels.h"

namespace seq2seq_ext {
namespace {

using at::vec::Vectorized;

// Backward pointwise for B rows: dh (B, H) gradient of the step's output (accumulated), h
// previous state, saved [r, z, n, gh_n]; writes dgi (B, 3H), dgh (B, 3H) and dh_direct (B, H),
// the part of the previous state's gradient that does not go through W_hh.
template <typename T>
void gru_backward_pointwise(const T* dh, const T* h, const T* saved, T* dgi, T* dgh, T* dh_direct,
                            int64_t B, int64_t H) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, H));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    const Vec one(T(1));
    for (int64_t b = b0; b < b1; ++b) {
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
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gru_layer_backward_cpu(const at::Tensor& grad_output, const std::optional<at::Tensor>& grad_hn,
                       const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih,
                       const at::Tensor& w_hh, const at::Tensor& output, const at::Tensor& saved,
                       bool has_extra) {
  const GruLayerDims d = check_gru_layer_args(input, h0, w_ih, w_hh, w_hh.new_empty({w_hh.size(0)}),
                                              w_hh.new_empty({w_hh.size(0)}), std::nullopt);
  const int64_t T = d.steps, B = d.batch, H = d.hidden, G = 3 * H;
  // output and saved are read through raw pointers below: their shapes, dtypes and devices are
  // checked first (an output narrower than (T, B, H) would be read past its end)
  check_gru_layer_backward_tensors(grad_output, grad_hn, input, output, saved, d);
  auto opts = input.options();
  at::Tensor dgi = at::empty({T, B, G}, opts);
  at::Tensor dgh = at::empty({T, B, G}, opts);
  // a fresh (B, H) buffer in input's dtype: grad_hn of another dtype is converted
  at::Tensor dh = (grad_hn.has_value() && grad_hn->defined())
                      ? at::empty({B, H}, opts).copy_(*grad_hn)
                      : at::zeros({B, H}, opts);
  at::Tensor dh_direct = at::empty({B, H}, opts);
  const at::Tensor go = grad_output.contiguous();
  const at::Tensor out_c = output.contiguous();
  const at::Tensor saved_c = saved.contiguous();
  const at::Tensor h0_c = h0.contiguous();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "gru_layer_backward_cpu", [&] {
    for (int64_t t = T - 1; t >= 0; --t) {
      dh.add_(go.select(0, t));
      const at::Tensor h_prev = t > 0 ? out_c.select(0, t - 1) : h0_c;
      at::Tensor dgh_t = dgh.select(0, t);
      gru_backward_pointwise<scalar_t>(dh.const_data_ptr<scalar_t>(),
                                       h_prev.const_data_ptr<scalar_t>(),
                                       saved_c.select(0, t).const_data_ptr<scalar_t>(),
                                       dgi.select(0, t).data_ptr<scalar_t>(),
                                       dgh_t.data_ptr<scalar_t>(), dh_direct.data_ptr<scalar_t>(),
                                       B, H);
      // dh_prev = dh * z + dgh W_hh
      at::addmm_out(dh, dh_direct, dgh_t, w_hh);
    }
  });
  return gru_layer_sequence_grads(dgi, dgh, dh, input, h0_c, out_c, w_ih, has_extra);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_layer_cpu(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const at::Tensor& b_ih, const at::Tensor& b_hh, const std::optional<at::Tensor>& extra) {
  const GruLayerDims d = check_gru_layer_args(input, h0, w_ih, w_hh, b_ih, b_hh, extra);
  const int64_t T = d.steps, B = d.batch, H = d.hidden, G = 3 * H;
  auto opts = input.options();
  at::Tensor output = at::empty({T, B, H}, opts);
  at::Tensor saved = at::empty({T, B, 4 * H}, opts);
  if (T == 0 || B == 0) return {output, h0.clone(at::MemoryFormat::Contiguous), saved};
  // the input projection of every step in one GEMM: (T*B, I) x (I, 3H) + b_ih
  at::Tensor gi = at::empty({T, B, G}, opts);
  {
    const at::Tensor x = input.reshape({T * B, d.input}).contiguous();
    const at::Tensor w = w_ih.stride(1) == 1 ? w_ih : w_ih.contiguous();
    const at::Tensor bias = b_ih.contiguous();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "gru_layer_cpu_input", [&] {
      cpu::linear_nt<scalar_t>(x.const_data_ptr<scalar_t>(), d.input, T * B, d.input,
                               w.const_data_ptr<scalar_t>(), w.stride(0), G,
                               bias.const_data_ptr<scalar_t>(), gi.data_ptr<scalar_t>(), false);
    });
  }
  if (extra.has_value() && extra->defined()) gi.add_(extra->unsqueeze(0));
  at::Tensor gh = at::empty({B, G}, opts);
  const at::Tensor h0_c = h0.contiguous();
  const at::Tensor w_hh_c = w_hh.contiguous();
  const at::Tensor b_hh_c = b_hh.contiguous();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "gru_layer_cpu", [&] {
    using T_ = scalar_t;
    const T_* gi_p = gi.const_data_ptr<T_>();
    T_* gh_p = gh.data_ptr<T_>();
    T_* out_p = output.data_ptr<T_>();
    T_* saved_p = saved.data_ptr<T_>();
    const T_* h_prev = h0_c.const_data_ptr<T_>();
    for (int64_t t = 0; t < T; ++t) {
      // gh = h_prev W_hh^T + b_hh: small products in vector loops, large ones in BLAS
      cpu::linear_nt<T_>(h_prev, H, B, H, w_hh_c.const_data_ptr<T_>(), H, G,
                         b_hh_c.const_data_ptr<T_>(), gh_p, false);
      T_* out_t = out_p + t * B * H;
      cpu::gru_cell<T_>(gi_p + t * B * G, gh_p, h_prev, H, out_t, H, B, H,
                        saved_p + t * B * 4 * H);
      h_prev = out_t;
    }
  });
  return {output, output.select(0, T - 1).clone(), saved};
}

TORCH_LIBRARY_IMPL(seq2seq_ext, CPU, m) {
  m.impl("gru_layer", &gru_layer_cpu);
  m.impl("gru_layer_backward", &gru_layer_backward_cpu);
}

}  // namespace seq2seq_ext
