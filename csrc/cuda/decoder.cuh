// A decoder over a cell on CUDA (cells.cuh: GruCell, LstmCell), the device side of
// cpu/decoder.h: one step of every layer and the output projection (decode_step) and the greedy
// loop (greedy_loop), both templated on the cell.
//
// Per layer, the matrix products go through ATen (cuBLAS) on the current stream and one fused
// pointwise kernel applies the cell (cell_kernel). Layer 0's input projection is split as on
// the CPU: the embedding part (with b_ih0) is the row emb_proj[token], gathered inside the cell
// kernel; the context part is ctx_proj when the context is fixed, else one GEMM of the incoming
// top-layer hidden state with the context columns of W_ih0.
//
// Token ids are checked inside the cell kernel (a device-side assertion, see device_index.cuh):
// nothing synchronises with the host, so the decode ops can be captured in a CUDA graph. The
// greedy loop's own tokens come from the argmax and are always in range: the whole batch runs
// for num_steps steps, and an argmax kernel keeps per-row "finished" flags on the device. A
// finished row keeps being computed (its token stays a valid id) but its outputs are no longer
// recorded, which gives the CPU kernel's results: tokens after a sentence's end hold `eos`,
// lengths count the tokens before `eos` (num_steps when none came).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>

#include "../decoder.h"
#include "cells.cuh"
#include "device_index.cuh"

namespace seq2seq_ext {
namespace cuda {

constexpr int kCellThreads = 256;
constexpr int kArgmaxThreads = 256;
constexpr int64_t kDecoderMaxBlocks = 1 << 16;

// The previous state parts of one layer as the cell kernel reads them (any strides).
template <typename T, int P>
struct PrevParts {
  const T* p[P];
  int64_t ld[P], cs[P];
};

// The next state parts of one layer (rows of stride ld, unit column stride).
template <typename T, int P>
struct NextParts {
  T* p[P];
  int64_t ld;
};

// The cell for one layer: the input-side pre-activations are emb[tok[b]] + extra[b] when emb is
// given (layer 0), else extra[b]; tok[b] is checked against the tgt_vocab rows of emb (also when
// H is 0). extra and emb may have any strides; gh (B, kGates * H) has rows of stride gh_ld.
template <typename Cell, typename T>
__global__ void cell_kernel(int64_t B, int64_t H, const int64_t* __restrict__ tok,
                            int64_t tgt_vocab, const T* __restrict__ emb, int64_t emb_ld,
                            int64_t emb_cs, const T* __restrict__ extra, int64_t ex_ld,
                            int64_t ex_cs, const T* __restrict__ gh, int64_t gh_ld,
                            PrevParts<T, Cell::kParts> prev, NextParts<T, Cell::kParts> next) {
  constexpr int G = Cell::kGates;
  const int64_t Hc = H > 0 ? H : 1;  // one (idle) unit per row when H is 0: the token is checked
  const int64_t n = B * Hc;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / Hc, j = idx - b * Hc;
    const int64_t y = emb != nullptr ? checked_token(tok, b, tgt_vocab) : 0;
    if (j >= H) continue;
    const T* x = extra + b * ex_ld;
    T i[G], g[G];
#pragma unroll
    for (int k = 0; k < G; ++k) i[k] = x[(k * H + j) * ex_cs];
    if (emb != nullptr) {  // emb first, as the CPU kernel adds: emb + context
      const T* e = emb + y * emb_ld;
#pragma unroll
      for (int k = 0; k < G; ++k) i[k] = e[(k * H + j) * emb_cs] + i[k];
    }
    const T* c = gh + b * gh_ld;
#pragma unroll
    for (int k = 0; k < G; ++k) g[k] = c[k * H + j];
    T out[Cell::kParts];
    Cell::unit(i, g, [&](int p) { return prev.p[p][b * prev.ld[p] + j * prev.cs[p]]; }, out);
#pragma unroll
    for (int p = 0; p < Cell::kParts; ++p) next.p[p][b * next.ld + j] = out[p];
  }
}

inline int64_t decoder_blocks_for(int64_t n, int threads) {
  return std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, kDecoderMaxBlocks));
}

// The state parts of a decoder, (L, B, H) each (one layer's: (B, H) each).
template <typename Cell>
using StateTensors = std::array<at::Tensor, Cell::kParts>;

template <typename Cell, typename T>
void launch_cell(int64_t B, int64_t H, const at::Tensor* tok, const at::Tensor* emb,
                 const at::Tensor& extra, const at::Tensor& gh, const StateTensors<Cell>& prev,
                 StateTensors<Cell>& next) {
  if (B == 0 || (H == 0 && emb == nullptr)) return;
  PrevParts<T, Cell::kParts> in;
  NextParts<T, Cell::kParts> out;
  for (int p = 0; p < Cell::kParts; ++p) {
    in.p[p] = prev[p].template const_data_ptr<T>();
    in.ld[p] = prev[p].stride(0);
    in.cs[p] = prev[p].stride(1);
    out.p[p] = next[p].template mutable_data_ptr<T>();
  }
  out.ld = next[0].stride(0);
  cell_kernel<Cell, T><<<static_cast<unsigned>(decoder_blocks_for(B * std::max<int64_t>(H, 1),
                                                                  kCellThreads)),
                         kCellThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      B, H, tok ? tok->const_data_ptr<int64_t>() : nullptr, emb ? emb->size(0) : 0,
      emb ? emb->const_data_ptr<T>() : nullptr, emb ? emb->stride(0) : 0,
      emb ? emb->stride(1) : 0, extra.const_data_ptr<T>(), extra.stride(0), extra.stride(1),
      gh.const_data_ptr<T>(), gh.stride(0), in, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Work buffers of one decoder step, (B, kGates * H) contiguous each.
struct StepBuffers {
  at::Tensor gi, gh;
};

template <typename Cell>
StepBuffers make_buffers(const DecoderDims& d, const at::Tensor& like) {
  return {at::empty({d.batch, Cell::kGates * d.hidden}, like.options()),
          at::empty({d.batch, Cell::kGates * d.hidden}, like.options())};
}

// One decoder step for every row: reads the state parts `in` (L, B, H) with any strides and the
// ids `tok` (B,) int64 contiguous; writes the parts `out` (L, B, H) contiguous and `logits`
// (B, V) contiguous.
template <typename Cell, typename T>
void decode_step(const DecoderDims& d, const at::Tensor& tok, const StateTensors<Cell>& in,
                 StateTensors<Cell>& out, at::Tensor& logits, const at::Tensor& emb_proj,
                 const std::optional<at::Tensor>& ctx_proj, at::TensorList weights,
                 const at::Tensor& dense_weight, const at::Tensor& dense_bias, StepBuffers& buf) {
  const int64_t L = d.layers, B = d.batch, H = d.hidden;
  for (int64_t l = 0; l < L; ++l) {
    StateTensors<Cell> prev, next;
    for (int p = 0; p < Cell::kParts; ++p) {
      prev[p] = in[p].select(0, l);
      next[p] = out[p].select(0, l);
    }
    at::addmm_out(buf.gh, weights[4 * l + 3], prev[0], weights[4 * l + 1].t());
    if (l == 0) {
      if (ctx_proj.has_value() && ctx_proj->defined()) {
        launch_cell<Cell, T>(B, H, &tok, &emb_proj, *ctx_proj, buf.gh, prev, next);
      } else {
        // The reference's rule: the context is the incoming top-layer hidden state.
        at::mm_out(buf.gi, in[0].select(0, L - 1), weights[0].narrow(1, d.in0 - H, H).t());
        launch_cell<Cell, T>(B, H, &tok, &emb_proj, buf.gi, buf.gh, prev, next);
      }
    } else {
      at::addmm_out(buf.gi, weights[4 * l + 2], out[0].select(0, l - 1), weights[4 * l].t());
      launch_cell<Cell, T>(B, H, nullptr, nullptr, buf.gi, buf.gh, prev, next);
    }
  }
  at::addmm_out(logits, dense_bias, out[0].select(0, L - 1), dense_weight.t());
}

// torch.argmax's order: a NaN beats any number (the first NaN wins among NaNs), a larger number
// beats a smaller one, and ties go to the smaller index. An index < 0 is an empty candidate.
template <typename T>
__device__ __forceinline__ bool argmax_takes(T x, int64_t ix, T y, int64_t iy) {
  if (ix < 0) return false;
  if (iy < 0) return true;
  const bool xn = x != x, yn = y != y;
  if (xn || yn) return xn && yn ? ix < iy : xn;
  if (x != y) return x > y;
  return ix < iy;
}

// One block per row (grid-stride over rows): y = argmax(logits[b]); for a row not yet finished,
// y == eos finishes it with length `step`, any other y is recorded and fed back.
template <typename T>
__global__ void __launch_bounds__(kArgmaxThreads)
    greedy_argmax_kernel(const T* __restrict__ logits, int64_t B, int64_t V, int64_t ld,
                         int64_t step, int64_t num_steps, int64_t eos, int64_t* __restrict__ tok,
                         uint8_t* __restrict__ finished, int64_t* __restrict__ tokens,
                         int64_t* __restrict__ lengths) {
  constexpr int W = kArgmaxThreads / 32;
  __shared__ T sh_v[W];
  __shared__ long long sh_i[W];
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {  // uniform over the block
    const T* row = logits + b * ld;
    T best = T(0);
    long long bi = -1;
    for (int64_t v = threadIdx.x; v < V; v += kArgmaxThreads) {  // increasing v: first wins ties
      const T x = row[v];
      if (argmax_takes<T>(x, v, best, bi)) {
        best = x;
        bi = v;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      const T ov = __shfl_xor_sync(0xffffffffu, best, off);
      const long long oi = __shfl_xor_sync(0xffffffffu, bi, off);
      if (argmax_takes<T>(ov, oi, best, bi)) {
        best = ov;
        bi = oi;
      }
    }
    const int warp = threadIdx.x / 32;
    if ((threadIdx.x & 31) == 0) {
      sh_v[warp] = best;
      sh_i[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int w = 1; w < W; ++w) {
        if (argmax_takes<T>(sh_v[w], sh_i[w], best, bi)) {
          best = sh_v[w];
          bi = sh_i[w];
        }
      }
      const int64_t y = bi < 0 ? 0 : bi;  // V == 0: the CPU kernel's argmax gives 0
      if (!finished[b]) {
        if (y == eos) {
          finished[b] = 1;
          lengths[b] = step;
        } else {
          tokens[b * num_steps + step] = y;
          tok[b] = y;
        }
      }
    }
    __syncthreads();  // sh_v / sh_i are rewritten for the next row
  }
}

// Greedy decoding of B > 0 rows for num_steps > 0 steps from the state parts `state`: tokens
// (B, num_steps) and lengths (B,) come filled with eos and num_steps (greedy_decode's contract).
template <typename Cell, typename T>
void greedy_loop(const DecoderDims& d, const StateTensors<Cell>& state, const at::Tensor& emb_proj,
                 const std::optional<at::Tensor>& ctx_proj, at::TensorList weights,
                 const at::Tensor& dense_weight, const at::Tensor& dense_bias, int64_t bos,
                 int64_t eos, int64_t num_steps, at::Tensor& tokens, at::Tensor& lengths) {
  const int64_t B = d.batch;
  const at::Tensor& like = state[0];
  at::Tensor tok = at::full({B}, bos, like.options().dtype(at::kLong));
  at::Tensor finished = at::zeros({B}, like.options().dtype(at::kByte));
  at::Tensor logits = at::empty({B, d.vocab}, like.options());
  // Two sets of state buffers, written alternately; the caller's state is only read.
  StateTensors<Cell> bufs[2];
  for (auto& set : bufs)
    for (auto& part : set) part = at::empty({d.layers, B, d.hidden}, like.options());
  StepBuffers buf = make_buffers<Cell>(d, like);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned argmax_grid = static_cast<unsigned>(std::min<int64_t>(B, kDecoderMaxBlocks));
  StateTensors<Cell> in = state;
  for (int64_t step = 0; step < num_steps; ++step) {
    StateTensors<Cell>& out = bufs[step & 1];
    decode_step<Cell, T>(d, tok, in, out, logits, emb_proj, ctx_proj, weights, dense_weight,
                         dense_bias, buf);
    greedy_argmax_kernel<T><<<argmax_grid, kArgmaxThreads, 0, stream>>>(
        logits.const_data_ptr<T>(), B, d.vocab, logits.stride(0), step, num_steps, eos,
        tok.mutable_data_ptr<int64_t>(), finished.mutable_data_ptr<uint8_t>(),
        tokens.mutable_data_ptr<int64_t>(), lengths.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    in = out;
  }
}

}  // namespace cuda
}  // namespace seq2seq_ext
