// Inference-time decoding of Seq2SeqDecoder on CUDA: one step for all layers and the output
// projection (gru_decode_step), and the whole greedy loop for a batch (greedy_decode).
//
// Per layer, the matrix products go through ATen (cuBLAS) on the current stream and one fused
// pointwise kernel applies the GRU cell. Layer 0's input projection is split as on the CPU:
// the embedding part (with b_ih0) is the row emb_proj[token], gathered inside the cell kernel;
// the context part is ctx_proj when the context is fixed, else one GEMM of the incoming
// top-layer state with the context columns of W_ih0.
//
// Token ids are checked inside the cell kernel (a device-side assertion, see device_index.cuh):
// neither op synchronises with the host, so both can be captured in a CUDA graph.
// greedy_decode's own tokens come from the argmax and are always in range. It never
// synchronises with the host either: the whole batch runs for num_steps steps,
// and an argmax kernel keeps per-row "finished" flags on the device. A finished row keeps
// being computed (its token stays a valid id) but its outputs are no longer recorded, which
// gives the CPU kernel's results: tokens after a sentence's end hold `eos`, lengths count the
// tokens before `eos` (num_steps when none came).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "../checks.h"
#include "device_index.cuh"
#include "device_math.cuh"

namespace seq2seq_ext {
namespace {

constexpr int kCellThreads = 256;
constexpr int kArgmaxThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;

// nn.GRU's cell for one layer (gru_unit, shared with the layer kernel of training).
// gi = emb[tok[b]] + extra[b] when emb is given (layer 0), else extra[b]; tok[b] is checked
// against the tgt_vocab rows of emb (also when H is 0). extra and emb may have any strides;
// gh (B, 3H) has contiguous rows of stride gh_ld; out (B, H) row stride out_ld.
template <typename T>
__global__ void gru_cell_kernel(int64_t B, int64_t H, const int64_t* __restrict__ tok,
                                int64_t tgt_vocab, const T* __restrict__ emb, int64_t emb_ld,
                                int64_t emb_cs,
                                const T* __restrict__ extra, int64_t ex_ld, int64_t ex_cs,
                                const T* __restrict__ gh, int64_t gh_ld,
                                const T* __restrict__ h, int64_t h_ld, int64_t h_cs,
                                T* __restrict__ out, int64_t out_ld) {
  const int64_t Hc = H > 0 ? H : 1;  // one (idle) unit per row when H is 0: the token is checked
  const int64_t n = B * Hc;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / Hc, j = idx - b * Hc;
    const int64_t y = emb != nullptr ? checked_token(tok, b, tgt_vocab) : 0;
    if (j >= H) continue;
    const T* x = extra + b * ex_ld;
    T ir = x[j * ex_cs], iz = x[(H + j) * ex_cs], in = x[(2 * H + j) * ex_cs];
    if (emb != nullptr) {  // emb first, as the CPU kernel adds: emb + context
      const T* e = emb + y * emb_ld;
      ir = e[j * emb_cs] + ir;
      iz = e[(H + j) * emb_cs] + iz;
      in = e[(2 * H + j) * emb_cs] + in;
    }
    const T* c = gh + b * gh_ld;
    out[b * out_ld + j] =
        gru_unit(ir, iz, in, c[j], c[H + j], c[2 * H + j], h[b * h_ld + j * h_cs]).h_new;
  }
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

int64_t blocks_for(int64_t n, int threads) {
  return std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, kMaxBlocks));
}

template <typename T>
void launch_cell(int64_t B, int64_t H, const at::Tensor* tok, const at::Tensor* emb,
                 const at::Tensor& extra, const at::Tensor& gh, const at::Tensor& h,
                 at::Tensor& out) {
  if (B == 0 || (H == 0 && emb == nullptr)) return;
  gru_cell_kernel<T><<<static_cast<unsigned>(blocks_for(B * std::max<int64_t>(H, 1),
                                                        kCellThreads)),
                       kCellThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      B, H, tok ? tok->const_data_ptr<int64_t>() : nullptr, emb ? emb->size(0) : 0,
      emb ? emb->const_data_ptr<T>() : nullptr, emb ? emb->stride(0) : 0,
      emb ? emb->stride(1) : 0, extra.const_data_ptr<T>(), extra.stride(0), extra.stride(1),
      gh.const_data_ptr<T>(), gh.stride(0), h.const_data_ptr<T>(), h.stride(0), h.stride(1),
      out.mutable_data_ptr<T>(), out.stride(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Work buffers of one decoder step, (B, 3H) contiguous each.
struct StepBuffers {
  at::Tensor gi, gh;
};

// One decoder step for every row: reads the state `in` (L, B, H) with any strides and the ids
// `tok` (B,) int64 contiguous; writes `out` (L, B, H) contiguous and `logits` (B, V) contiguous.
template <typename T>
void decode_step(const DecoderDims& d, const at::Tensor& tok, const at::Tensor& in,
                 at::Tensor& out, at::Tensor& logits, const at::Tensor& emb_proj,
                 const std::optional<at::Tensor>& ctx_proj, at::TensorList weights,
                 const at::Tensor& dense_weight, const at::Tensor& dense_bias, StepBuffers& buf) {
  const int64_t L = d.layers, B = d.batch, H = d.hidden;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor h = in.select(0, l);
    at::Tensor o = out.select(0, l);
    at::addmm_out(buf.gh, weights[4 * l + 3], h, weights[4 * l + 1].t());
    if (l == 0) {
      if (ctx_proj.has_value() && ctx_proj->defined()) {
        launch_cell<T>(B, H, &tok, &emb_proj, *ctx_proj, buf.gh, h, o);
      } else {
        // The reference's rule: the context is the incoming top-layer state.
        at::mm_out(buf.gi, in.select(0, L - 1), weights[0].narrow(1, d.in0 - H, H).t());
        launch_cell<T>(B, H, &tok, &emb_proj, buf.gi, buf.gh, h, o);
      }
    } else {
      at::addmm_out(buf.gi, weights[4 * l + 2], out.select(0, l - 1), weights[4 * l].t());
      launch_cell<T>(B, H, nullptr, nullptr, buf.gi, buf.gh, h, o);
    }
  }
  at::addmm_out(logits, dense_bias, out.select(0, L - 1), dense_weight.t());
}

StepBuffers make_buffers(const DecoderDims& d, const at::Tensor& state) {
  return {at::empty({d.batch, 3 * d.hidden}, state.options()),
          at::empty({d.batch, 3 * d.hidden}, state.options())};
}

std::tuple<at::Tensor, at::Tensor> gru_decode_step_cuda(
    const at::Tensor& token, const at::Tensor& state, const at::Tensor& emb_proj,
    const std::optional<at::Tensor>& ctx_proj, at::TensorList weights,
    const at::Tensor& dense_weight, const at::Tensor& dense_bias) {
  const DecoderDims d =
      check_decoder_args(state, emb_proj, ctx_proj, weights, dense_weight, dense_bias);
  check_decode_token(token, state, d.batch);
  const c10::cuda::CUDAGuard guard(state.device());
  // (B, V) logits for a (B,) token, (B, 1, V) for a (B, 1) token, as on the CPU
  at::Tensor logits = at::empty(decode_logits_shape(token, d.vocab), state.options());
  at::Tensor new_state = at::empty_like(state, at::MemoryFormat::Contiguous);
  if (d.batch == 0) return {logits, new_state};
  const at::Tensor tok = token.reshape({-1}).to(at::kLong).contiguous();
  at::Tensor logits2d = logits.view({d.batch, d.vocab});
  StepBuffers buf = make_buffers(d, state);
  AT_DISPATCH_FLOATING_TYPES(state.scalar_type(), "gru_decode_step_cuda", [&] {
    decode_step<scalar_t>(d, tok, state, new_state, logits2d, emb_proj, ctx_proj, weights,
                          dense_weight, dense_bias, buf);
  });
  return {logits, new_state};
}

std::tuple<at::Tensor, at::Tensor> greedy_decode_cuda(
    const at::Tensor& state, const at::Tensor& emb_proj, const std::optional<at::Tensor>& ctx_proj,
    at::TensorList weights, const at::Tensor& dense_weight, const at::Tensor& dense_bias,
    int64_t bos, int64_t eos, int64_t num_steps) {
  const DecoderDims d =
      check_decoder_args(state, emb_proj, ctx_proj, weights, dense_weight, dense_bias);
  check_greedy_args(d, bos, num_steps);
  const c10::cuda::CUDAGuard guard(state.device());
  const int64_t B = d.batch;
  const auto long_opts = state.options().dtype(at::kLong);
  at::Tensor tokens = at::full({B, num_steps}, eos, long_opts);
  at::Tensor lengths = at::full({B}, num_steps, long_opts);
  if (B == 0 || num_steps == 0) return {tokens, lengths};
  at::Tensor tok = at::full({B}, bos, long_opts);
  at::Tensor finished = at::zeros({B}, state.options().dtype(at::kByte));
  at::Tensor logits = at::empty({B, d.vocab}, state.options());
  // Two state buffers, written alternately; the caller's state is only read.
  at::Tensor bufs[2] = {at::empty({d.layers, B, d.hidden}, state.options()),
                        at::empty({d.layers, B, d.hidden}, state.options())};
  StepBuffers buf = make_buffers(d, state);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned argmax_grid = static_cast<unsigned>(std::min<int64_t>(B, kMaxBlocks));
  AT_DISPATCH_FLOATING_TYPES(state.scalar_type(), "greedy_decode_cuda", [&] {
    at::Tensor in = state;
    for (int64_t step = 0; step < num_steps; ++step) {
      at::Tensor& out = bufs[step & 1];
      decode_step<scalar_t>(d, tok, in, out, logits, emb_proj, ctx_proj, weights, dense_weight,
                            dense_bias, buf);
      greedy_argmax_kernel<scalar_t><<<argmax_grid, kArgmaxThreads, 0, stream>>>(
          logits.const_data_ptr<scalar_t>(), B, d.vocab, logits.stride(0), step, num_steps, eos,
          tok.mutable_data_ptr<int64_t>(), finished.mutable_data_ptr<uint8_t>(),
          tokens.mutable_data_ptr<int64_t>(), lengths.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      in = out;
    }
  });
  return {tokens, lengths};
}

}  // namespace

TORCH_LIBRARY_IMPL(seq2seq_ext, CUDA, m) {
  m.impl("gru_decode_step", &gru_decode_step_cuda);
  m.impl("greedy_decode", &greedy_decode_cuda);
}

}  // namespace seq2seq_ext
