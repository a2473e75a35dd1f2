// rnn_stack on CUDA, forward and backward: the CPU template's algorithm (csrc/cpu/rnn_stack.h)
// with the matrix products through ATen (cuBLAS) on the current stream and the cell's pointwise
// equations (csrc/rnn_cells.h, GruCell / LstmCell) as one kernel per step.
//
// Forward, per layer: the input projection of all T steps is one GEMM, (T*B, K) x (K, G) + b_ih,
// on the layer's input: the input for layer 0, else the previous layer's outputs read in place
// from `saved` (rows of stride S), times its dropout mask when given. Then per step one GEMM
// into a preallocated (B, G) buffer (W_hh h + b_hh, h read in place from `saved` too) and one
// kernel that applies the cell and writes the step's row of `saved` (L, T, B, S).
// Backward, per layer from the top and per step from the last: one kernel adds the layer's
// output gradient of step t to the running state gradient, runs the cell's backward and writes
// the step's gate gradients (into (T*B, G) buffers) and dh_direct; one GEMM then carries the
// gradient to the previous state, dh = dh_direct + dgh_t W_hh. The weight, bias and input
// gradients are whole-sequence products and sums, written exactly as the CPU version's.
//
// Kernels are 2-D grid-stride loops: grid.y walks the batch rows, grid.x the H hidden units of a
// row. Offsets are int64. Nothing synchronises with the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../rnn_cells.h"
#include "../rnn_stack.h"
#include "cells.cuh"
#include "row_launch.cuh"

namespace seq2seq_ext {
namespace {

using cuda::DeviceLanes;
using cuda::kRowThreads;
using cuda::launch_for;
using cuda::RowLaunch;

// One step of one layer for B rows. gi: the step's input-side pre-activations (B, G)
// contiguous; gh: the hidden-side ones (B, G) contiguous; h, c: the previous hidden and cell
// states, rows of stride ldh (c null for the GRU); s: the step's rows of `saved` (B, S)
// contiguous. h and c may point into the previous step's rows of the buffer s points into.
template <class Cell, typename T>
__global__ void __launch_bounds__(kRowThreads)
    stack_forward_kernel(int64_t B, int64_t H, const T* gi, const T* gh, const T* h, const T* c,
                         int64_t ldh, T* s) {
  const int64_t G = Cell::kGates * H, S = Cell::kSaved * H;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t jstep = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const T* gib = gi + b * G;
    const T* ghb = gh + b * G;
    const T* hb = h + b * ldh;
    const T* cb = c != nullptr ? c + b * ldh : nullptr;
    T* sb = s + b * S;
    for (int64_t j = j0; j < H; j += jstep) {
      Cell::template forward<DeviceLanes<T>>(gib + j, ghb + j, hb + j,
                                             cb != nullptr ? cb + j : nullptr, sb + j, H);
    }
  }
}

// The backward of one step of one layer for B rows. dh: the running gradient of the step's new
// hidden state from later steps (B, H); dy: the gradient of the layer's output at this step
// (B, H), or null for none; dc: the running gradient of the new cell state (B, H), in/out,
// replaced by the previous cell state's (null for the GRU); h, c: the previous states, rows of
// stride ldh (c null for the GRU); s: the step's rows of `saved` (B, S). Writes dgi, dgh (B, G)
// (the same buffer for the LSTM, whose cell writes dgi only) and dh_direct (B, H). All but h, c
// contiguous.
template <class Cell, typename T>
__global__ void __launch_bounds__(kRowThreads)
    stack_backward_kernel(int64_t B, int64_t H, const T* dh, const T* dy, T* dc, const T* h,
                          const T* c, int64_t ldh, const T* s, T* dgi, T* dgh, T* dh_direct) {
  const int64_t G = Cell::kGates * H, S = Cell::kSaved * H;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t jstep = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const T* hb = h + b * ldh;
    const T* cb = c != nullptr ? c + b * ldh : nullptr;
    const T* sb = s + b * S;
    T* dgib = dgi + b * G;
    T* dghb = dgh + b * G;
    for (int64_t j = j0; j < H; j += jstep) {
      const int64_t k = b * H + j;
      // the CPU version's dh += dy[t] before the cell's backward
      T g = dy != nullptr ? dh[k] + dy[k] : dh[k];
      Cell::template backward<DeviceLanes<T>>(&g, dc != nullptr ? dc + k : nullptr, hb + j,
                                              cb != nullptr ? cb + j : nullptr, sb + j, dgib + j,
                                              dghb + j, dh_direct + k, H);
    }
  }
}

// out = x w^T (+ b): the projections of the forward.
void linear_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  if (b.defined()) {
    at::addmm_out(out, b, x, w.t());
  } else {
    at::mm_out(out, x, w.t());
  }
}

// Forward of all layers. x, h0, c0 (c0 undefined for the GRU), mask (undefined or
// (L-1, T, B, H)) and the weights contiguous; T, B > 0. Writes saved (L, T, B, S).
template <class Cell, typename T>
void stack_forward_cuda(const StackDims& d, const at::Tensor& x, const at::Tensor& h0,
                        const at::Tensor& c0, const std::vector<at::Tensor>& w,
                        const at::Tensor& mask, at::Tensor& saved) {
  constexpr bool kLstm = Cell::kHasCellState;
  const int64_t L = d.layers, Ts = d.steps, B = d.batch, H = d.hidden;
  const int64_t G = Cell::kGates * H, S = Cell::kSaved * H;
  auto opts = x.options();
  at::Tensor gi = at::empty({Ts * B, G}, opts);
  at::Tensor gh = at::empty({B, G}, opts);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const RowLaunch launch = launch_for(B, H);
  T* sv = saved.mutable_data_ptr<T>();
  const T* gi_p = gi.const_data_ptr<T>();
  const T* gh_p = gh.const_data_ptr<T>();
  for (int64_t l = 0; l < L; ++l) {
    // this layer's input (T*B, K)
    at::Tensor in;
    if (l == 0) {
      in = x.view({Ts * B, d.input});
    } else {
      // the previous layer's outputs: rows of stride S in saved[l - 1]
      in = saved.select(0, l - 1).narrow(2, 0, H).view({Ts * B, H});
      if (mask.defined()) in = in * mask.select(0, l - 1).view({Ts * B, H});
    }
    const at::Tensor& w_ih = stack_weight(w, d, l, 0);
    const at::Tensor& w_hh = stack_weight(w, d, l, 1);
    const at::Tensor b_ih = d.bias ? stack_weight(w, d, l, 2) : at::Tensor();
    const at::Tensor b_hh = d.bias ? stack_weight(w, d, l, 3) : at::Tensor();
    linear_out(gi, in, w_ih, b_ih);
    T* layer_saved = sv + l * Ts * B * S;
    const T* h = h0.const_data_ptr<T>() + l * B * H;
    const T* c = kLstm ? c0.const_data_ptr<T>() + l * B * H : nullptr;
    int64_t ldh = H;
    for (int64_t t = 0; t < Ts; ++t) {
      const at::Tensor h_prev = t == 0 ? h0.select(0, l)
                                       : saved.select(0, l).select(0, t - 1).narrow(1, 0, H);
      linear_out(gh, h_prev, w_hh, b_hh);
      T* s = layer_saved + t * B * S;
      if (H > 0) {
        stack_forward_kernel<Cell, T><<<launch.grid, launch.block, 0, stream>>>(
            B, H, gi_p + t * B * G, gh_p, h, c, ldh, s);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      h = s;
      c = kLstm ? s + H : nullptr;
      ldh = S;
    }
  }
}

// Backward of all layers: the CPU version's stack_backward. grad_output (T, B, H) and grad_hn,
// grad_cn (L, B, H) contiguous or undefined; the rest contiguous. Returns (grad_input, grad_h0,
// grad_c0 (undefined for the GRU), the weights' gradients in their order).
template <class Cell, typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> stack_backward_cuda(
    const StackDims& d, const at::Tensor& grad_output, const at::Tensor& grad_hn,
    const at::Tensor& grad_cn, const at::Tensor& input, const at::Tensor& h0,
    const at::Tensor& c0, const std::vector<at::Tensor>& weights, const at::Tensor& mask,
    const at::Tensor& saved) {
  constexpr bool kLstm = Cell::kHasCellState;
  const int64_t L = d.layers, Ts = d.steps, B = d.batch, H = d.hidden;
  const int64_t G = Cell::kGates * H, S = Cell::kSaved * H;
  auto opts = input.options();
  at::Tensor grad_h0 = at::empty({L, B, H}, opts);
  at::Tensor grad_c0 = kLstm ? at::empty({L, B, H}, opts) : at::Tensor();
  std::vector<at::Tensor> grad_w(weights.size());
  // dy: the gradient reaching this layer's output, (T, B, H) contiguous, undefined for none
  at::Tensor dy = grad_output;
  at::Tensor dgi = at::empty({Ts * B, G}, opts);
  at::Tensor dgh = kLstm ? dgi : at::empty({Ts * B, G}, opts);
  at::Tensor dh = at::empty({B, H}, opts);
  at::Tensor dc = kLstm ? at::empty({B, H}, opts) : at::Tensor();
  at::Tensor dh_direct = at::empty({B, H}, opts);
  at::Tensor grad_input;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const T* sv = saved.const_data_ptr<T>();
  for (int64_t l = L - 1; l >= 0; --l) {
    const at::Tensor& w_ih = stack_weight(weights, d, l, 0);
    const at::Tensor& w_hh = stack_weight(weights, d, l, 1);
    if (grad_hn.defined()) {
      dh.copy_(grad_hn.select(0, l));
    } else {
      dh.zero_();
    }
    if (kLstm) {
      if (grad_cn.defined()) {
        dc.copy_(grad_cn.select(0, l));
      } else {
        dc.zero_();
      }
    }
    if (B > 0 && H > 0) {
      const RowLaunch launch = launch_for(B, H);
      const T* layer_saved = sv + l * Ts * B * S;
      const T* dy_p = dy.defined() ? dy.const_data_ptr<T>() : nullptr;
      const T* dh_p = dh.const_data_ptr<T>();
      T* dc_p = kLstm ? dc.mutable_data_ptr<T>() : nullptr;
      T* dgi_p = dgi.mutable_data_ptr<T>();
      T* dgh_p = dgh.mutable_data_ptr<T>();
      T* dd_p = dh_direct.mutable_data_ptr<T>();
      const T* h0l = h0.const_data_ptr<T>() + l * B * H;
      const T* c0l = kLstm ? c0.const_data_ptr<T>() + l * B * H : nullptr;
      for (int64_t t = Ts - 1; t >= 0; --t) {
        const T* s = layer_saved + t * B * S;
        const T* hp = t > 0 ? layer_saved + (t - 1) * B * S : h0l;
        const T* cp = kLstm ? (t > 0 ? layer_saved + (t - 1) * B * S + H : c0l) : nullptr;
        const int64_t ldh = t > 0 ? S : H;
        stack_backward_kernel<Cell, T><<<launch.grid, launch.block, 0, stream>>>(
            B, H, dh_p, dy_p != nullptr ? dy_p + t * B * H : nullptr, dc_p, hp, cp, ldh, s,
            dgi_p + t * B * G, dgh_p + t * B * G, dd_p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        // dh_prev = dh_direct + dgh W_hh
        at::addmm_out(dh, dh_direct, dgh.narrow(0, t * B, B), w_hh);
      }
    }  // else no rows or no units: dh, dc, dgi and dgh are empty
    grad_h0.select(0, l).copy_(dh);
    if (kLstm) grad_c0.select(0, l).copy_(dc);
    // whole-sequence products: the weight and bias gradients, the input's gradient
    const at::Tensor saved_l = saved.select(0, l);  // (T, B, S*H)
    at::Tensor x;  // this layer's input (T*B, K)
    if (l == 0) {
      x = input.reshape({Ts * B, d.input});
    } else {
      x = saved.select(0, l - 1).narrow(2, 0, H).reshape({Ts * B, H});
      if (mask.defined()) x = x * mask.select(0, l - 1).reshape({Ts * B, H});
    }
    at::Tensor h_prevs =
        Ts > 0 ? at::cat({h0.select(0, l).unsqueeze(0),
                          saved_l.narrow(0, 0, Ts - 1).narrow(2, 0, H)},
                         0)
                     .reshape({Ts * B, H})
               : at::empty({0, H}, opts);
    const int64_t base = (d.bias ? 4 : 2) * l;
    grad_w[base] = at::mm(dgi.t(), x);
    grad_w[base + 1] = at::mm(dgh.t(), h_prevs);
    if (d.bias) {
      grad_w[base + 2] = dgi.sum(0);
      grad_w[base + 3] = dgh.sum(0);
    }
    at::Tensor dx = at::mm(dgi, w_ih);  // (T*B, K)
    if (l == 0) {
      grad_input = dx.view({Ts, B, d.input});
    } else {
      if (mask.defined()) dx.mul_(mask.select(0, l - 1).reshape({Ts * B, H}));
      dy = dx.view({Ts, B, H});
    }
  }
  return {grad_input, grad_h0, grad_c0, grad_w};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_stack_cuda(
    c10::string_view cell, const at::Tensor& input, const at::Tensor& h0,
    const std::optional<at::Tensor>& c0, at::TensorList weights,
    const std::optional<at::Tensor>& dropout_mask, at::OptionalIntArrayRef batch_sizes) {
  const bool lstm = is_lstm(cell);
  // the packed layout is the CPU's: the check raises naming batch_sizes
  const StackDims d =
      check_rnn_stack_args(lstm, input, h0, c0, weights, dropout_mask, batch_sizes);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t L = d.layers, T = d.steps, B = d.batch, H = d.hidden;
  const int64_t S = (lstm ? LstmCell::kSaved : GruCell::kSaved) * H;
  auto opts = input.options();
  at::Tensor saved = at::empty({L, T, B, S}, opts);
  const StackOperands o = contiguous_operands(input, h0, c0, weights, dropout_mask);
  if (T > 0 && B > 0) {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rnn_stack_cuda", [&] {
      if (lstm)
        stack_forward_cuda<LstmCell, scalar_t>(d, o.input, o.h0, o.c0, o.weights, o.mask, saved);
      else
        stack_forward_cuda<GruCell, scalar_t>(d, o.input, o.h0, o.c0, o.weights, o.mask, saved);
    });
  }
  if (T == 0) {
    return {at::empty({0, B, H}, opts), h0.clone(at::MemoryFormat::Contiguous),
            lstm ? o.c0.clone() : at::empty({0}, opts), saved};
  }
  at::Tensor output = saved.select(0, L - 1).narrow(2, 0, H).contiguous();
  at::Tensor last = saved.select(1, T - 1);  // (L, B, S)
  at::Tensor h_n = last.narrow(2, 0, H).contiguous();
  at::Tensor c_n = lstm ? last.narrow(2, H, H).contiguous() : at::empty({0}, opts);
  return {output, h_n, c_n, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> rnn_stack_backward_cuda(
    c10::string_view cell, const std::optional<at::Tensor>& grad_output,
    const std::optional<at::Tensor>& grad_hn, const std::optional<at::Tensor>& grad_cn,
    const at::Tensor& input, const at::Tensor& h0, const std::optional<at::Tensor>& c0,
    at::TensorList weights, const std::optional<at::Tensor>& dropout_mask,
    const at::Tensor& saved, at::OptionalIntArrayRef batch_sizes) {
  const bool lstm = is_lstm(cell);
  const StackDims d =
      check_rnn_stack_args(lstm, input, h0, c0, weights, dropout_mask, batch_sizes);
  const int64_t L = d.layers, T = d.steps, B = d.batch, H = d.hidden;
  const int64_t S = (lstm ? LstmCell::kSaved : GruCell::kSaved) * H;
  const std::vector<int64_t> saved_shape{L, T, B, S};
  check_same_device(saved, input, "saved", "input");
  check_same_dtype(saved, input, "saved", "input");
  TORCH_CHECK(saved.sizes() == at::IntArrayRef(saved_shape), "saved: expected shape [", L, ", ",
              T, ", ", B, ", ", S, "] (rnn_stack's fourth output), got ", shape_str(saved));
  const std::vector<int64_t> out_shape{T, B, H}, state_shape{L, B, H};
  const at::Tensor go = incoming_grad(grad_output, input, out_shape, "grad_output");
  const at::Tensor ghn = incoming_grad(grad_hn, input, state_shape, "grad_hn");
  const at::Tensor gcn = cell_state_grad(lstm, grad_cn, input, state_shape);
  const c10::cuda::CUDAGuard guard(input.device());
  const StackOperands o = contiguous_operands(input, h0, c0, weights, dropout_mask);
  const at::Tensor sv = saved.contiguous();
  std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> out;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "rnn_stack_backward_cuda", [&] {
    if (lstm)
      out = stack_backward_cuda<LstmCell, scalar_t>(d, go, ghn, gcn, o.input, o.h0, o.c0,
                                                    o.weights, o.mask, sv);
    else
      out = stack_backward_cuda<GruCell, scalar_t>(d, go, ghn, gcn, o.input, o.h0, o.c0,
                                                   o.weights, o.mask, sv);
  });
  if (!lstm) std::get<2>(out) = at::empty({0}, input.options());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(seq2seq_ext, CUDA, m) {
  m.impl("rnn_stack", &rnn_stack_cuda);
  m.impl("rnn_stack_backward", &rnn_stack_backward_cuda);
}

}  // namespace seq2seq_ext
