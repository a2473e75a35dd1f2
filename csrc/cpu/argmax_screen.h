// The exact argmax of a large output layer at batch 1, reading int8 copies of its rows first.
//
// What it buys: greedy decoding one sentence at a time reads the whole output layer at every
// token (3,909 x 256 at embed/hidden 256: 4 MB in float32, 2 MB in bfloat16, most of a token's
// bytes) to keep one index. Here each row v of the layer's matrix W (the values the decoder
// multiplies: float32 or the bfloat16 copy) is also stored as int8, q_v = round(W_v / s_v) with
// s_v = max|W_v| / 127, and the state h as hq = round(h / s_h), s_h = max|h| / 127. One pass of
// int8 dot products (AVX512-VNNI, or AVX2's vpmaddubsw; a quarter of the bytes of float32)
// gives every logit to within a bound,
//   |W_v . h - s_v s_h q_v . hq| <= e_v |h|_1 + s_v |q_v|_1 s_h / 2,
// e_v = max_k |W_vk - s_v q_vk| (measured when the copy is made), plus a margin for the float
// rounding of both sides. Only the rows whose upper bound reaches the largest lower bound can
// hold the maximum; their logits are then computed by the decoder's own product, the same
// operations as over the whole layer, and the first maximum among them is the answer: the same
// index as the full product's argmax, bit for bit the same logit. A state that is not finite,
// a row without a finite logit, or a CPU without either takes the full product instead.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "linear.h"

namespace seq2seq_ext {
namespace cpu {

// Whether this CPU runs the screen's int8 dot products (AVX512-VNNI in an AVX-512
// build; AVX2 and FMA in an AVX2 build).
bool argmax_screen_usable();

// The process-wide switch (on by default where usable): seq2seq_ext.ops.set_argmax_screen.
bool argmax_screen_enabled();
void set_argmax_screen(bool on);

// The int8 copy of a (V, K) matrix and what the bounds need, one entry per row.
struct ArgmaxScreen {
  int64_t V = 0, K = 0, Kp = 0;        // Kp: K padded with zeros to a multiple of 64
  std::vector<int8_t> q;               // (V, Kp)
  std::vector<float> scale;            // s_v
  std::vector<float> err;              // e_v
  std::vector<float> q_l1;             // |q_v|_1
  std::vector<int32_t> q_sum;          // sum of q_v (the dot products take h as unsigned)
  float min_scale = 0;                 // the smallest nonzero s_v (infinity: none)
};

// Whether a (V, K) output layer is worth screening: large enough that its bytes, not the
// candidates, bound a token, and small enough in K that the int8 sums convert to float exactly
// (127 * 127 * 1024 < 2^24).
inline bool argmax_screen_pays(int64_t V, int64_t K) {
  return V >= 512 && K >= 64 && K <= 1024 && V * K >= (int64_t(1) << 18);
}

// The screen of the float32 or bfloat16 (V, K) matrix w (row-major, contiguous), or null when
// it cannot be used: the switch is off, the CPU lacks the instructions, the size does not pay
// (argmax_screen_pays), or an entry is not finite.
std::shared_ptr<const ArgmaxScreen> make_argmax_screen(const at::Tensor& w);

// torch.argmax's rule: the first maximum, NaN counting as the maximum.
template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  int64_t best = 0;
  for (int64_t v = 1; v < n; ++v) {
    const bool best_nan = x[best] != x[best];
    if (best_nan) break;
    if (x[v] != x[v] || x[v] > x[best]) best = v;
  }
  return best;
}

// Scratch of the screen's passes, kept across the tokens of a loop.
struct ScreenScratch {
  std::vector<uint8_t> hq;
  std::vector<int32_t> dots;
  std::vector<float> upper, xe;
  std::vector<int64_t> rows;
};

// The rows that may hold the largest logit bias[v] + W_v . h for the float state h (K values),
// in increasing order, into `rows`; false (rows untouched) when h is not finite or so small
// that the bounds' arithmetic leaves float's normal range.
bool argmax_candidates(const ArgmaxScreen& s, const float* h, const float* bias,
                       ScreenScratch& scratch, std::vector<int64_t>& rows);

// argmax_row of the logits bias + W h of the row h (K values) against the (V, K) matrix W (row
// stride K, the values `s` screens) as linear_nt computes them in a product it does not give to
// BLAS: the candidates' logits by the same operations (linear_nt_value), the full product into
// `logits` (V values) when the screen cannot decide. *computed: how many logits were computed.
template <typename WT>
int64_t screened_argmax(const ArgmaxScreen& s, const float* h, const WT* W, const float* bias,
                        ScreenScratch& scratch, float* logits, int64_t* computed = nullptr) {
  const int64_t V = s.V, K = s.K;
  if (argmax_candidates(s, h, bias, scratch, scratch.rows)) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    // (elsewhere no screen runs, and linear_nt_value reads no de-interleaved state)
    if constexpr (std::is_same_v<WT, c10::BFloat16>) {
      constexpr int64_t P = 2 * at::vec::Vectorized<float>::size();
      scratch.xe.resize(K);
      deinterleave_blocks(h, K - K % P, scratch.xe.data());
    }
#endif
    int64_t best = -1;
    float top = 0;
    for (const int64_t v : scratch.rows) {
      const float y = bias[v] + linear_nt_value<float, WT>(h, scratch.xe.data(), K, W, K, V, v);
      if (!std::isfinite(y)) {  // argmax_row's rule for NaN: the full row decides
        best = -1;
        break;
      }
      if (best < 0 || y > top) {
        best = v;
        top = y;
      }
    }
    if (best >= 0) {
      if (computed) *computed = static_cast<int64_t>(scratch.rows.size());
      return best;
    }
  }
  linear_nt<float, WT>(h, K, 1, K, W, K, V, bias, logits, false);
  if (computed) *computed = V;
  return argmax_row<float>(logits, V);
}

}  // namespace cpu
}  // namespace seq2seq_ext
