// Inference-time decoding of an LSTM Seq2SeqDecoder on CUDA: one step for all layers and the
// output projection (lstm_decode_step).
//
// Per layer, the matrix products go through ATen (cuBLAS) on the current stream and one fused
// pointwise kernel applies nn.LSTM's cell (gate order i, f, g, o). Layer 0's input projection
// is split as on the CPU: the embedding part (with b_ih0) is the row emb_proj[token], gathered
// inside the cell kernel; the context part is ctx_proj when the context is fixed, else one GEMM
// of the incoming top-layer hidden state h[-1] with the context columns of W_ih0. Token ids are
// checked inside the cell kernel: the op never synchronises with the host.
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

constexpr int kLstmCellThreads = 256;
constexpr int64_t kLstmMaxBlocks = 1 << 16;

// nn.LSTM's cell for one layer:
//   i = s(gi_i + gh_i), f = s(gi_f + gh_f), g = tanh(gi_g + gh_g), o = s(gi_o + gh_o),
//   c' = f c + i g, h' = o tanh(c').
// gi = emb[tok[b]] + extra[b] when emb is given (layer 0), else extra[b]; tok[b] is checked
// against the tgt_vocab rows of emb (also when H is 0: see device_index.cuh). extra and emb may
// have any strides; gh (B, 4H) has rows of stride gh_ld (unit column stride); c (B, H) any strides;
// h_out and c_out (B, H) have row strides out_ld (unit column stride).
template <typename T>
__global__ void lstm_cell_kernel(int64_t B, int64_t H, const int64_t* __restrict__ tok,
                                 int64_t tgt_vocab, const T* __restrict__ emb, int64_t emb_ld, int64_t emb_cs,
                                 const T* __restrict__ extra, int64_t ex_ld, int64_t ex_cs,
                                 const T* __restrict__ gh, int64_t gh_ld,
                                 const T* __restrict__ c, int64_t c_ld, int64_t c_cs,
                                 T* __restrict__ h_out, T* __restrict__ c_out, int64_t out_ld) {
  const int64_t Hc = H > 0 ? H : 1;  // one (idle) unit per row when H is 0: the token is checked
  const int64_t n = B * Hc;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = idx / Hc, j = idx - b * Hc;
    const int64_t y = emb != nullptr ? checked_token(tok, b, tgt_vocab) : 0;
    if (j >= H) continue;
    const T* x = extra + b * ex_ld;
    T ai = x[j * ex_cs], af = x[(H + j) * ex_cs], ag = x[(2 * H + j) * ex_cs],
      ao = x[(3 * H + j) * ex_cs];
    if (emb != nullptr) {  // emb first, as the CPU kernel adds: emb + context
      const T* e = emb + y * emb_ld;
      ai = e[j * emb_cs] + ai;
      af = e[(H + j) * emb_cs] + af;
      ag = e[(2 * H + j) * emb_cs] + ag;
      ao = e[(3 * H + j) * emb_cs] + ao;
    }
    const T* r = gh + b * gh_ld;
    const T i = dev_sigmoid(ai + r[j]);
    const T f = dev_sigmoid(af + r[H + j]);
    const T g = dev_tanh(ag + r[2 * H + j]);
    const T o = dev_sigmoid(ao + r[3 * H + j]);
    const T cn = f * c[b * c_ld + j * c_cs] + i * g;
    c_out[b * out_ld + j] = cn;
    h_out[b * out_ld + j] = o * dev_tanh(cn);
  }
}

int64_t lstm_blocks_for(int64_t n) {
  return std::max<int64_t>(
      1, std::min<int64_t>((n + kLstmCellThreads - 1) / kLstmCellThreads, kLstmMaxBlocks));
}

template <typename T>
void launch_lstm_cell(int64_t B, int64_t H, const at::Tensor* tok, const at::Tensor* emb,
                      const at::Tensor& extra, const at::Tensor& gh, const at::Tensor& c,
                      at::Tensor& h_out, at::Tensor& c_out) {
  if (B == 0 || (H == 0 && emb == nullptr)) return;
  lstm_cell_kernel<T><<<static_cast<unsigned>(lstm_blocks_for(B * std::max<int64_t>(H, 1))),
                        kLstmCellThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      B, H, tok ? tok->const_data_ptr<int64_t>() : nullptr, emb ? emb->size(0) : 0,
      emb ? emb->const_data_ptr<T>() : nullptr, emb ? emb->stride(0) : 0,
      emb ? emb->stride(1) : 0, extra.const_data_ptr<T>(), extra.stride(0), extra.stride(1),
      gh.const_data_ptr<T>(), gh.stride(0), c.const_data_ptr<T>(), c.stride(0), c.stride(1),
      h_out.mutable_data_ptr<T>(), c_out.mutable_data_ptr<T>(), h_out.stride(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_decode_step_cuda(
    const at::Tensor& token, const at::Tensor& h, const at::Tensor& c, const at::Tensor& emb_proj,
    const std::optional<at::Tensor>& ctx_proj, at::TensorList weights,
    const at::Tensor& dense_weight, const at::Tensor& dense_bias) {
  const DecoderDims d =
      check_lstm_decoder_args(h, c, emb_proj, ctx_proj, weights, dense_weight, dense_bias);
  check_decode_token(token, h, d.batch, "h");
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t L = d.layers, B = d.batch, H = d.hidden, G = 4 * H;
  at::Tensor logits = at::empty(decode_logits_shape(token, d.vocab), h.options());
  at::Tensor logits2d = logits.view({B, d.vocab});
  at::Tensor h_new = at::empty({L, B, H}, h.options());
  at::Tensor c_new = at::empty({L, B, H}, h.options());
  if (B > 0) {
    const at::Tensor tok = token.reshape({-1}).to(at::kLong).contiguous();
    at::Tensor gi = at::empty({B, G}, h.options());
    at::Tensor gh = at::empty({B, G}, h.options());
    const bool has_ctx = ctx_proj.has_value() && ctx_proj->defined();
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "lstm_decode_step_cuda", [&] {
      for (int64_t l = 0; l < L; ++l) {
        at::Tensor ho = h_new.select(0, l);
        at::Tensor co = c_new.select(0, l);
        at::addmm_out(gh, weights[4 * l + 3], h.select(0, l), weights[4 * l + 1].t());
        if (l == 0) {
          if (has_ctx) {
            launch_lstm_cell<scalar_t>(B, H, &tok, &emb_proj, *ctx_proj, gh, c.select(0, 0), ho,
                                       co);
          } else {
            // the chapter's rule: the context is the incoming top-layer hidden state
            at::mm_out(gi, h.select(0, L - 1), weights[0].narrow(1, d.in0 - H, H).t());
            launch_lstm_cell<scalar_t>(B, H, &tok, &emb_proj, gi, gh, c.select(0, 0), ho, co);
          }
        } else {
          at::addmm_out(gi, weights[4 * l + 2], h_new.select(0, l - 1), weights[4 * l].t());
          launch_lstm_cell<scalar_t>(B, H, nullptr, nullptr, gi, gh, c.select(0, l), ho, co);
        }
      }
      at::addmm_out(logits2d, dense_bias, h_new.select(0, L - 1), dense_weight.t());
    });
  }
  return {logits, h_new, c_new};
}

}  // namespace

TORCH_LIBRARY_IMPL(seq2seq_ext, CUDA, m) { m.impl("lstm_decode_step", &lstm_decode_step_cuda); }

}  // namespace seq2seq_ext
