// One GRU layer over a sequence on CUDA, forward and backward: the CPU kernel's algorithm
// (csrc/cpu/gru_layer.cpp), with the matrix products through ATen (cuBLAS) on the current
// stream and the pointwise passes as fused kernels.
//
// Forward: the input projection of all T steps is one GEMM (plus the per-sequence `extra`
// term); then per step one GEMM into a preallocated (B, 3H) buffer (W_hh h + b_hh) and one
// fused kernel that applies the gates, writes the step's output row and saves r, z, n and
// W_hn h + b_hn, (T, B, 4H) in that order.
// Backward, from the last step to the first: one fused kernel adds grad_output[t] to the
// running state gradient and writes the gradients of the input-side and hidden-side gate
// pre-activations of step t (into (T, B, 3H) buffers) and dh * z; one GEMM then carries the
// gradient to the previous state: dh = dh * z + dgh_t W_hh. The weight, bias, input and extra
// gradients are whole-sequence GEMMs and sums at the end.
//
// The kernels are the GRU's own rather than cell_kernel over cells.cuh's GruCell: the forward
// saves the gates (r, z, n, W_hn h + b_hn) for the backward, and the backward is the GRU cell's
// derivative. The forward computes through the cells' equations (rnn_cells.h), the backward
// through gru_gate_grads.
//
// Both kernels are 2-D grid-stride loops (row_launch.cuh): grid.y walks the batch rows, grid.x
// (blocks of up to kRowThreads threads) the H hidden units of a row, so neighbouring threads touch
// neighbouring elements of every gate and no thread divides. Offsets are int64. Nothing
// synchronises with the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "../gru_grads.h"
#include "../gru_layer.h"
#include "cells.cuh"
#include "device_math.cuh"
#include "row_launch.cuh"

namespace seq2seq_ext {
namespace cuda {
namespace {

// Gates of one step for B rows: gi (B, 3H) input-side pre-activations (biases and extra
// included), gh (B, 3H) hidden-side (b_hh included), h (B, H) previous state, all contiguous;
// writes out (B, H) and saved (B, 4H) = [r, z, n, gh_n].
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    gru_forward_kernel(int64_t B, int64_t H, const T* __restrict__ gi, const T* __restrict__ gh,
                       const T* __restrict__ h, T* __restrict__ out, T* __restrict__ saved) {
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t jstep = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const T* a = gi + b * 3 * H;
    const T* c = gh + b * 3 * H;
    const T* hp = h + b * H;
    T* o = out + b * H;
    T* s = saved + b * 4 * H;
    for (int64_t j = j0; j < H; j += jstep) {
      const auto u = seq2seq_ext::GruCell::gates<cuda::DeviceLanes<T>>(a + j, c + j, hp + j,
                                                                        nullptr, H);
      o[j] = u.h;
      s[j] = u.r;
      s[H + j] = u.z;
      s[2 * H + j] = u.n;
      s[3 * H + j] = u.ghn;
    }
  }
}

// Backward of one step for B rows: g = dh + go is the gradient of the step's output (the
// running gradient from later steps plus grad_output[t]); h the previous state, saved the
// step's [r, z, n, gh_n]. Writes dgi (B, 3H), dgh (B, 3H) and dh_direct = g * z (B, H), the
// part of the previous state's gradient that does not go through W_hh. All contiguous.
template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    gru_backward_kernel(int64_t B, int64_t H, const T* __restrict__ go, const T* __restrict__ dh,
                        const T* __restrict__ h, const T* __restrict__ saved,
                        T* __restrict__ dgi, T* __restrict__ dgh, T* __restrict__ dh_direct) {
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t jstep = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const T* gop = go + b * H;
    const T* dhp = dh + b * H;
    const T* hp = h + b * H;
    const T* s = saved + b * 4 * H;
    T* di = dgi + b * 3 * H;
    T* dd = dgh + b * 3 * H;
    T* dp = dh_direct + b * H;
    for (int64_t j = j0; j < H; j += jstep) {
      const T g = dhp[j] + gop[j];  // the CPU kernel's dh.add_(grad_output[t])
      gru_gate_grads<T>(g, hp[j], s[j], s[H + j], s[2 * H + j], s[3 * H + j], di + j, dd + j,
                        dp + j, H);
    }
  }
}

}  // namespace

void gru_layer(const GruLayerDims& d, const at::Tensor& input, const at::Tensor& h0,
               const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& b_ih,
               const at::Tensor& b_hh, const std::optional<at::Tensor>& extra,
               at::Tensor& output, at::Tensor& saved) {
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t T = d.steps, B = d.batch, H = d.hidden, G = 3 * H;
  auto opts = input.options();
  // the input projection of every step in one GEMM: (T*B, I) x (I, 3H) + b_ih
  at::Tensor gi = at::addmm(b_ih, input.reshape({T * B, d.input}), w_ih.t())
                      .contiguous()
                      .view({T, B, G});
  if (extra.has_value() && extra->defined()) gi.add_(extra->unsqueeze(0));
  at::Tensor gh = at::empty({B, G}, opts);
  const at::Tensor h0_c = h0.contiguous();
  const at::Tensor w_hh_t = w_hh.t();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const RowLaunch launch = launch_for(B, H);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "gru_layer_cuda", [&] {
    const scalar_t* gi_p = gi.const_data_ptr<scalar_t>();
    const scalar_t* gh_p = gh.const_data_ptr<scalar_t>();
    const scalar_t* h0_p = h0_c.const_data_ptr<scalar_t>();
    scalar_t* out_p = output.mutable_data_ptr<scalar_t>();
    scalar_t* saved_p = saved.mutable_data_ptr<scalar_t>();
    for (int64_t t = 0; t < T; ++t) {
      const at::Tensor h_prev = t == 0 ? h0_c : output.select(0, t - 1);
      at::addmm_out(gh, b_hh, h_prev, w_hh_t);
      if (H == 0) continue;
      gru_forward_kernel<scalar_t><<<launch.grid, launch.block, 0, stream>>>(
          B, H, gi_p + t * B * G, gh_p, t == 0 ? h0_p : out_p + (t - 1) * B * H,
          out_p + t * B * H, saved_p + t * B * 4 * H);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

void gru_layer_backward(const GruLayerDims& d, const at::Tensor& grad_output,
                        const at::Tensor& h0, const at::Tensor& w_hh, const at::Tensor& output,
                        const at::Tensor& saved, at::Tensor& dgi, at::Tensor& dgh,
                        at::Tensor& dh, bool /*has_extra*/, GruGateSums& /*sums: made after*/) {
  const c10::cuda::CUDAGuard guard(dh.device());
  const int64_t T = d.steps, B = d.batch, H = d.hidden, G = 3 * H;
  at::Tensor dh_direct = at::empty({B, H}, dh.options());
  const at::Tensor go = grad_output.to(dh.scalar_type()).contiguous();
  const at::Tensor saved_c = saved.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (B > 0) {
    const RowLaunch launch = launch_for(B, H);
    AT_DISPATCH_FLOATING_TYPES(dh.scalar_type(), "gru_layer_backward_cuda", [&] {
      const scalar_t* go_p = go.const_data_ptr<scalar_t>();
      const scalar_t* out_p = output.const_data_ptr<scalar_t>();
      const scalar_t* saved_p = saved_c.const_data_ptr<scalar_t>();
      const scalar_t* h0_p = h0.const_data_ptr<scalar_t>();
      const scalar_t* dh_p = dh.const_data_ptr<scalar_t>();
      scalar_t* dgi_p = dgi.mutable_data_ptr<scalar_t>();
      scalar_t* dgh_p = dgh.mutable_data_ptr<scalar_t>();
      scalar_t* dd_p = dh_direct.mutable_data_ptr<scalar_t>();
      for (int64_t t = T - 1; t >= 0; --t) {
        if (H > 0) {
          gru_backward_kernel<scalar_t><<<launch.grid, launch.block, 0, stream>>>(
              B, H, go_p + t * B * H, dh_p, t > 0 ? out_p + (t - 1) * B * H : h0_p,
              saved_p + t * B * 4 * H, dgi_p + t * B * G, dgh_p + t * B * G, dd_p);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        // dh_prev = dh * z + dgh W_hh
        at::addmm_out(dh, dh_direct, dgh.select(0, t), w_hh);
      }
    });
  }
}

}  // namespace cuda
}  // namespace seq2seq_ext
