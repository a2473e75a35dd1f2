// The kernels of seq2seq_ext::gru_layer and gru_layer_backward (contract and entry:
// csrc/gru_layer.cpp). The entry has checked the arguments and allocated the outputs.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace seq2seq_ext {

struct GruLayerDims {
  int64_t steps, batch, input, hidden;
  // The packed layout, when is_packed (else the dense (T, B) one): step t holds batch_sizes[t]
  // rows, the first batch_sizes[t] of the batch (non-increasing, as torch.nn.utils.rnn packs a
  // batch sorted by decreasing length), stored one step after the other; a row takes part in
  // the steps before its length and no others. batch_sizes points into the op's argument,
  // valid for the call.
  c10::IntArrayRef batch_sizes = {};
  bool is_packed = false;
  bool packed() const { return is_packed; }
  // the first row of each step among the rows of all steps, and their number (T + 1 entries)
  std::vector<int64_t> offsets() const {
    std::vector<int64_t> o(steps + 1, 0);
    for (int64_t t = 0; t < steps; ++t) o[t + 1] = o[t] + (is_packed ? batch_sizes[t] : batch);
    return o;
  }
};

// Forward, T > 0 and B > 0: fills output (T, B, H) and saved (T, B, 4H) = [r, z, n, gh_n]
// ((N, H) and (N, 4H) over the N rows of the packed layout).
// Backward, from the last step to the first: fills dgi and dgh (T, B, 3H), the gradients of the
// input-side and hidden-side gate pre-activations, and carries dh (B, H), on entry the gradient
// of the final state, to the gradient of h0. h0 and output are contiguous.
using GruLayerKernel = void(const GruLayerDims& d, const at::Tensor& input,
                           const at::Tensor& h0, const at::Tensor& w_ih,
                           const at::Tensor& w_hh, const at::Tensor& b_ih,
                           const at::Tensor& b_hh, const std::optional<at::Tensor>& extra,
                           at::Tensor& output, at::Tensor& saved);
// The backward may also sum the gate gradients over the rows while it has each step's rows in
// cache (the CPU's does): into sums, whatever it leaves undefined is summed from dgi and dgh
// afterwards (gru_grads.h).
struct GruGateSums {
  at::Tensor b_ih, b_hh;  // (3H,): the biases' gradients
  at::Tensor extra;       // (B, 3H): extra's gradient, when the op has an extra
};
using GruLayerBackwardKernel = void(const GruLayerDims& d, const at::Tensor& grad_output,
                                   const at::Tensor& h0, const at::Tensor& w_hh,
                                   const at::Tensor& output, const at::Tensor& saved,
                                   at::Tensor& dgi, at::Tensor& dgh, at::Tensor& dh,
                                   bool has_extra, GruGateSums& sums);
namespace cpu {
GruLayerKernel gru_layer;
GruLayerBackwardKernel gru_layer_backward;
// The forward's steps over the input projection gi (N, 3H) contiguous, N the rows of all steps
// (input W_ih^T + b_ih, plus extra): what gru_layer runs after its input GEMM, and what
// gru_layer_projected_cpu runs over rows of a table. With a bfloat16 W_hh beside a float32
// state, round_state: each product takes the state rounded to bf16 (bf16 products, the op under
// autocast); else the float32 state times the bf16 weights as they are, summed in float32
// (decoding's bf16 weights).
void gru_layer_steps(const GruLayerDims& d, const at::Tensor& gi, const at::Tensor& h0,
                     const at::Tensor& w_hh, const at::Tensor& b_hh, at::Tensor& output,
                     at::Tensor& saved, bool round_state = true);
}  // namespace cpu
namespace cuda {
GruLayerKernel gru_layer;
GruLayerBackwardKernel gru_layer_backward;
}  // namespace cuda

// CPU inference over a given input projection: gi (T, B, 3H), float32 or float64, is layer
// 0's `input W_ih^T + b_ih` of every step (the encoder's: a row of a table per token, made once
// per set of weights), h0 (B, H), w_hh (3H, H) and b_hh (3H) in gi's dtype, or w_hh in bfloat16
// beside float32 (gru_layer_steps without round_state). Returns (output (T, B, H), h_n (B, H)),
// gru_layer's values for that projection. The _C module's gru_layer_projected_cpu; no graph is
// recorded (the caller runs it without grad).
std::tuple<at::Tensor, at::Tensor> gru_layer_projected_cpu(const at::Tensor& gi,
                                                           const at::Tensor& h0,
                                                           const at::Tensor& w_hh,
                                                           const at::Tensor& b_hh);

// x (N, K) float32 times a bfloat16 w (M, K), plus b (M), summed in float32: (N, M). The input
// projection of a layer whose weights decoding reads in bfloat16; the _C module's
// linear_bf16_weights_cpu.
at::Tensor linear_bf16_weights_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);

// A multi-layer GRU in CPU inference over layer 0's given input projection gi0 (T, B, 3H):
// h0 (L, B, H), flat (nn.GRU's flat weights, 4 a layer; matrices float32, or bfloat16 beside
// float32 biases). Layer 0 is gru_layer_projected_cpu; each layer above projects its input by
// linear_bf16_weights_cpu and runs gru_layer_projected_cpu (bfloat16 matrices) or gru_layer.
// Returns (output (T, B, H), state (L, B, H)). The _C module's gru_over_projection_cpu
// (seq2seq_ext.ops.gru_over_projection).
std::tuple<at::Tensor, at::Tensor> gru_over_projection_cpu(const at::Tensor& gi0,
                                                           const at::Tensor& h0,
                                                           at::TensorList flat);

// The GRU encoder over its table in CPU inference: (output (T, B, H), state (L, B, H)) for the
// tokens X (B, T) from zero states of (layers, B, hidden), layer 0's input projection a row of
// table (vocab, 3H) per token (at::embedding's gather), the layers gru_over_projection_cpu's.
// The _C module's encode_over_table_cpu (seq2seq_ext.models), and translate_ids's encoder.
std::tuple<at::Tensor, at::Tensor> encode_over_table_cpu(const at::Tensor& X,
                                                         const at::Tensor& table,
                                                         at::TensorList flat, int64_t layers,
                                                         int64_t hidden);

// The entry of gru_layer, which the _C module also calls directly (CPU inference).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_layer(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const at::Tensor& b_ih, const at::Tensor& b_hh, const std::optional<at::Tensor>& extra,
    at::OptionalIntArrayRef batch_sizes = std::nullopt);

}  // namespace seq2seq_ext
