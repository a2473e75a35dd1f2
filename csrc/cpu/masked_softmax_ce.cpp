// Fused masked softmax cross-entropy on the CPU, forward and backward.
//
// Forward, per position (b, t) with t < valid_len[b]: one pass for the row maximum m, one for
// log_sum = log(sum(exp(x - m))); loss_bt = (m - x[label]) + log_sum, and (m, log_sum) is saved.
// Masked positions are never read. The per-sequence loss is the sum over t of the kept losses
// divided by T (the reference's mean over all steps).
// Backward, per kept position: grad = (exp((x - m) - log_sum) - onehot(label)) * grad_loss[b] / T,
// written
// in one pass; masked positions get zeros (NaN for a non-finite grad_loss[b], as the
// reference's product with the mask gives) without their logits being read.
// Rows are independent and each sequence's sum runs in a fixed order, so results do not depend
// on the thread count.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <limits>

#include "../lengths.h"
#include "../masked_softmax_ce.h"
#include "common.h"
#include "linear.h"

namespace seq2seq_ext {
namespace cpu {
namespace {

using at::vec::Vectorized;

// Labels are checked everywhere, masked positions included, as nn.CrossEntropyLoss does.
template <typename index_t>
void check_labels(const at::Tensor& label, int64_t vocab) {
  const index_t* p = label.const_data_ptr<index_t>();
  const int64_t B = label.size(0), T = label.size(1);
  const int64_t sb = label.stride(0), st = label.stride(1);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t y = static_cast<int64_t>(p[b * sb + t * st]);
      TORCH_CHECK(y >= 0 && y < vocab, "label: expected class indices in [0, ", vocab,
                  "), got ", y, " at position [", b, ", ", t, "]");
    }
}

void check_label_values(const at::Tensor& label, int64_t vocab) {
  if (label.scalar_type() == at::kLong)
    check_labels<int64_t>(label, vocab);
  else
    check_labels<int32_t>(label, vocab);
}

inline int64_t label_at(const at::Tensor& label, int64_t b, int64_t t) {
  const int64_t off = b * label.stride(0) + t * label.stride(1);
  return label.scalar_type() == at::kLong ? label.const_data_ptr<int64_t>()[off]
                                          : label.const_data_ptr<int32_t>()[off];
}

template <typename acc_t>
inline acc_t nan_max(acc_t a, acc_t b) {
  return (a != a || a > b) ? a : b;  // propagates NaN like at::vec::maximum
}

// exp of x <= 0 (logits minus their maximum or their log-sum-exp): PyTorch's fast polynomial
// exp for float32 (at most 20 ULP, as its own softmax kernels use), Sleef's for float64. The
// polynomial's AVX2 form does not carry a NaN through (a row holding a NaN gave -inf gradients
// there where the reference gives NaN): NaN lanes are passed on as they are.
inline Vectorized<float> exp_nonpos(const Vectorized<float>& x) {
  return Vectorized<float>::blendv(x.exp_u20(), x, x.isnan());
}
inline Vectorized<double> exp_nonpos(const Vectorized<double>& x) { return x.exp(); }

// Log-sum-exp of a contiguous row, as its maximum and log(sum(exp(x - max))): the loss is
// formed as (max - x[label]) + log_sum, which keeps its precision when the logits are so large
// that max + log_sum rounds to max.
template <typename acc_t>
acc_t row_lse(const acc_t* x, int64_t n, acc_t* log_sum) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  int64_t i = 0;
  acc_t m = neg_inf;
  if (n >= W) {
    Vec vm(neg_inf);
    for (; i + W <= n; i += W) vm = at::vec::maximum(vm, Vec::loadu(x + i));
    acc_t lanes[W];
    vm.store(lanes);
    for (int64_t k = 0; k < W; ++k) m = nan_max(m, lanes[k]);
  }
  for (; i < n; ++i) m = nan_max(m, x[i]);
  Vec vs(acc_t(0));
  const Vec vmax(m);
  i = 0;
  for (; i + W <= n; i += W) vs = vs + exp_nonpos(Vec::loadu(x + i) - vmax);
  acc_t s = hsum(vs);
  for (; i < n; ++i) s += std::exp(x[i] - m);
  *log_sum = std::log(s);
  return m;
}

// Stores a vector to an aligned address without first reading its cache line: the gradient
// is written once and not read again here, so this saves the read-for-ownership traffic.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kStreamAlign = 64;
inline void stream_store(float* p, const Vectorized<float>& v) { _mm512_stream_ps(p, v); }
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int64_t kStreamAlign = 32;
inline void stream_store(float* p, const Vectorized<float>& v) { _mm256_stream_ps(p, v); }
#endif
template <typename T>
inline void stream_store(T* p, const Vectorized<T>& v) { v.store(p); }

// A row's saved log-sum-exp: its maximum and log(sum(exp(x - maximum))).
template <typename acc_t>
struct RowLse {
  acc_t max, log_sum;
};

// grad[v] = exp((x[v] - max) - log_sum) * scale, into a contiguous acc_t row.
template <typename acc_t>
void row_softmax_scaled(const acc_t* x, acc_t* g, int64_t n, RowLse<acc_t> lse, acc_t scale) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec vm(lse.max), vl(lse.log_sum), vsc(scale);
  const auto one = [&](int64_t v) { return std::exp((x[v] - lse.max) - lse.log_sum) * scale; };
  const auto vec = [&](int64_t v) { return exp_nonpos((Vec::loadu(x + v) - vm) - vl) * vsc; };
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (n >= 4 * W) {  // scalar head up to an aligned address, then streaming stores
      for (; i < n && reinterpret_cast<uintptr_t>(g + i) % kStreamAlign != 0; ++i) g[i] = one(i);
      for (; i + W <= n; i += W) stream_store(g + i, vec(i));
    }
  }
#endif
  for (; i + W <= n; i += W) vec(i).store(g + i);
  for (; i < n; ++i) g[i] = one(i);
}

// A row of pred as a contiguous acc_t array: the row itself when it already is one, otherwise
// a copy into `buf` (strided rows and reduced-precision inputs).
template <typename scalar_t, typename acc_t>
const acc_t* load_row(const scalar_t* src, int64_t n, int64_t stride, std::vector<acc_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (stride == 1) return src;
  }
  buf.resize(n);
  for (int64_t v = 0; v < n; ++v) buf[v] = static_cast<acc_t>(src[v * stride]);
  return buf.data();
}

// Writes (softmax(x) - onehot(y)) * scale into a row of the gradient with stride gv.
template <typename scalar_t, typename acc_t>
void store_row_grad(const acc_t* x, scalar_t* grow, int64_t gv, int64_t n, RowLse<acc_t> lse,
                    acc_t scale, int64_t y, std::vector<acc_t>& gbuf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (gv == 1) {
      row_softmax_scaled<acc_t>(x, grow, n, lse, scale);
      grow[y] -= scale;
      return;
    }
  }
  gbuf.resize(n);
  row_softmax_scaled<acc_t>(x, gbuf.data(), n, lse, scale);
  gbuf[y] -= scale;
  for (int64_t v = 0; v < n; ++v) grow[v * gv] = static_cast<scalar_t>(gbuf[v]);
}

}  // namespace

void masked_softmax_ce(const at::Tensor& pred, const at::Tensor& label,
                       const at::Tensor& valid_len, at::Tensor& loss, at::Tensor& lse) {
  const int64_t B = pred.size(0), T = pred.size(1), V = pred.size(2);
  check_label_values(label, V);
  const auto start = first_masked_steps(valid_len, T);
  const int64_t sb = pred.stride(0), st = pred.stride(1), sv = pred.stride(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(),
                                  "masked_softmax_ce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* p = pred.const_data_ptr<scalar_t>();
    acc_t* lse_p = lse.data_ptr<acc_t>();
    std::vector<acc_t> row_loss(B * T, acc_t(0));
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1));
    at::parallel_for(0, B * T, grain, [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> buf;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / T, t = r % T;
        if (t >= start[b]) {
          lse_p[2 * r] = lse_p[2 * r + 1] = acc_t(0);
          continue;
        }
        const scalar_t* row = p + b * sb + t * st;
        const acc_t* x = load_row<scalar_t, acc_t>(row, V, sv, buf);
        acc_t log_sum;
        const acc_t m = row_lse<acc_t>(x, V, &log_sum);
        lse_p[2 * r] = m;
        lse_p[2 * r + 1] = log_sum;
        row_loss[r] = (m - x[label_at(label, b, t)]) + log_sum;
      }
    });
    scalar_t* out = loss.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      acc_t s = 0;
      for (int64_t t = 0; t < start[b]; ++t) s += row_loss[b * T + t];
      out[b] = static_cast<scalar_t>(s / static_cast<acc_t>(T));
    }
  });
}

void masked_softmax_ce_backward(const at::Tensor& grad_loss, const at::Tensor& pred,
                                const at::Tensor& label, const at::Tensor& valid_len,
                                const at::Tensor& lse, at::Tensor& grad) {
  const int64_t B = pred.size(0), T = pred.size(1), V = pred.size(2);
  check_label_values(label, V);
  if (grad.numel() == 0) return;
  advise_huge_pages(grad);
  const auto start = first_masked_steps(valid_len, T);
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor g_up = grad_loss.to(lse.scalar_type());
  const int64_t sb = pred.stride(0), st = pred.stride(1), sv = pred.stride(2);
  const int64_t gb = grad.stride(0), gt = grad.stride(1), gv = grad.stride(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(),
                                  "masked_softmax_ce_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* p = pred.const_data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    const acc_t* lse_p = lse_c.const_data_ptr<acc_t>();
    const acc_t* up = g_up.const_data_ptr<acc_t>();
    const int64_t up_s = g_up.stride(0);
    const acc_t inv_T = acc_t(1) / static_cast<acc_t>(T);
    const int64_t grain = std::max<int64_t>(1, 16384 / V);
    at::parallel_for(0, B * T, grain, [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> buf, gbuf;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / T, t = r % T;
        scalar_t* grow = g + b * gb + t * gt;
        const acc_t scale = up[b * up_s] * inv_T;
        if (t >= start[b]) {
          // the reference multiplies the masked losses by 0: zeros, or NaN for a non-finite
          // incoming gradient (0 * inf)
          const scalar_t zero = static_cast<scalar_t>(scale * acc_t(0));
          if (gv == 1)
            std::fill(grow, grow + V, zero);
          else
            for (int64_t v = 0; v < V; ++v) grow[v * gv] = zero;
          continue;
        }
        const acc_t* x = load_row<scalar_t, acc_t>(p + b * sb + t * st, V, sv, buf);
        const RowLse<acc_t> lse_r{lse_p[2 * r], lse_p[2 * r + 1]};
        store_row_grad<scalar_t, acc_t>(x, grow, gv, V, lse_r, scale, label_at(label, b, t),
                                        gbuf);
      }
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
      _mm_sfence();  // this thread's streaming stores are visible before the gradient is used
#endif
    });
  });
}

}  // namespace cpu
}  // namespace seq2seq_ext
