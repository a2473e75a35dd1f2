// Fused masked softmax cross-entropy on CUDA, forward and backward: one kernel launch each.
//
// Rows are the (b, t) positions of pred (B, T, V). A group of G threads owns one row at a time
// (G = 32: one warp per row, 8 rows per 256-thread block, for small vocabularies; G = 128 or 256
// with 4 rows per block for larger ones), accumulating in at::opmath_type (float for
// half/bf16/float, double for double).
//
// Forward, one block per sequence: every thread keeps an online (max, sum of exp(x - max)) pair
// over its elements of a kept row, the group merges the pairs in a fixed order, and the group's
// first thread writes lse = (max, log(sum)) and adds the row loss (max - x[label]) + log(sum) to
// its running sum. Masked rows are never read: their lse is (0, 0). The block then adds its
// groups' sums in group order and divides by T, so the result is deterministic.
// Backward, one pass per row: grad = (exp((x - max) - log(sum)) - onehot(label)) * grad_loss[b] / T
// (exact for huge logits, where max + log(sum) would round to max); masked rows get zeros (NaN
// for a non-finite grad_loss[b], as the reference's product with the mask) without their logits
// being read.
//
// Both kernels compute each sequence's first masked step from valid_len and check every label
// themselves (device_index.cuh): no helper kernels, no host synchronisation. Rows are read (and
// the gradient written) with 16-byte vector accesses after a short scalar head that reaches
// 16-byte alignment; a pred whose vocabulary stride is not 1 is copied to that layout once.
// Offsets are int64 throughout.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../masked_softmax_ce.h"
#include "device_index.cuh"

namespace seq2seq_ext {
namespace cuda {
namespace {

constexpr int kVecBytes = 16;
constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride loops cover the rest

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_log(float x) { return logf(x); }
__device__ __forceinline__ double dev_log(double x) { return log(x); }

// +inf and NaN in the accumulation type (plain constants: no relaxed-constexpr calls on device).
template <typename acc_t>
__device__ __forceinline__ acc_t dev_inf() {
  return static_cast<acc_t>(INFINITY);
}
template <typename acc_t>
__device__ __forceinline__ acc_t dev_nan() {
  return static_cast<acc_t>(NAN);
}

// Elements before the first 16-byte boundary of a row, at most n. Rows are element-aligned
// (torch never offsets storage by a fraction of an element), so the division is exact.
template <typename T>
__device__ __forceinline__ int64_t head_elems(const T* p, int64_t n) {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  const int64_t head = static_cast<int64_t>(((kVecBytes - (addr % kVecBytes)) % kVecBytes) / sizeof(T));
  return head < n ? head : n;
}

// ---------------------------------------------------------------------------------------------
// Online log-sum-exp.
//
// State (m, s): m is the largest non-NaN element seen (-inf before any), s the sum of
// exp(x - m) over the elements seen, NaN once a NaN was seen. Elements equal to -inf add
// nothing (exp(-inf - m) = 0 for any m the row ends with, except m = -inf, handled at the end).
// The final lse is m + log(s) when m is finite and NaN otherwise (the saved log(s) is NaN then
// too), which is what the CPU kernel's two passes give: a row whose maximum is +inf or whose elements are all -inf has
// exp(inf - inf) = NaN in its sum there.

template <typename acc_t>
__device__ __forceinline__ void online_add(acc_t& m, acc_t& s, acc_t x) {
  if (x > m) {
    s = s * dev_exp(m - x) + acc_t(1);  // m = -inf: s * 0 (s is 0, or NaN which must stay)
    m = x;
  } else if (x != -dev_inf<acc_t>()) {
    s += dev_exp(x - m);  // NaN x makes s NaN
  }
}

template <typename acc_t>
__device__ __forceinline__ void online_merge(acc_t& m, acc_t& s, acc_t m2, acc_t s2) {
  const acc_t mx = m > m2 ? m : m2;  // neither is NaN
  // An equal maximum takes its sum as is: exp(m - mx) would be NaN for m = mx = +-inf.
  const acc_t a = (m == mx) ? s : s * dev_exp(m - mx);
  const acc_t b = (m2 == mx) ? s2 : s2 * dev_exp(m2 - mx);
  m = mx;
  s = a + b;
}

template <typename acc_t>
__device__ __forceinline__ acc_t online_finish(acc_t m, acc_t s) {
  const acc_t inf = dev_inf<acc_t>();
  if (m == inf || m == -inf) return dev_nan<acc_t>();
  return m + dev_log(s);
}

// Merges the (m, s) pairs of a group of G threads; every thread of the group gets the result.
// For G > 32 this uses the block's shared memory and __syncthreads(), so every thread of the
// block must call it the same number of times.
template <typename acc_t, int G, int RPB>
__device__ __forceinline__ void group_merge(acc_t& m, acc_t& s, acc_t* sh_m, acc_t* sh_s,
                                            int group, int lane) {
  constexpr int kWarpWidth = G < 32 ? G : 32;
#pragma unroll
  for (int off = kWarpWidth / 2; off > 0; off /= 2) {
    const acc_t m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const acc_t s2 = __shfl_xor_sync(0xffffffffu, s, off);
    online_merge(m, s, m2, s2);
  }
  if constexpr (G > 32) {
    constexpr int W = G / 32;
    const int warp = lane / 32;
    if ((lane & 31) == 0) {
      sh_m[group * W + warp] = m;
      sh_s[group * W + warp] = s;
    }
    __syncthreads();
    m = sh_m[group * W];
    s = sh_s[group * W];
#pragma unroll
    for (int w = 1; w < W; ++w) online_merge(m, s, sh_m[group * W + w], sh_s[group * W + w]);
    __syncthreads();  // the slots are rewritten for the next row
  }
}

// This thread's share of a contiguous row: elements lane, lane + G, ... in 16-byte vectors
// after a scalar head that reaches 16-byte alignment.
template <typename scalar_t, typename acc_t, int G>
__device__ __forceinline__ void row_online_lse(const scalar_t* __restrict__ row, int64_t V,
                                               int lane, acc_t& m, acc_t& s) {
  constexpr int N = kVecBytes / sizeof(scalar_t);
  using P = Pack<scalar_t, N>;
  const int64_t head = head_elems(row, V);  // < N <= G
  if (lane < head) online_add(m, s, static_cast<acc_t>(row[lane]));
  const int64_t nvec = (V - head) / N;
  const P* vp = reinterpret_cast<const P*>(row + head);
#pragma unroll 2
  for (int64_t k = lane; k < nvec; k += G) {
    const P p = vp[k];
#pragma unroll
    for (int i = 0; i < N; ++i) online_add(m, s, static_cast<acc_t>(p.v[i]));
  }
  for (int64_t v = head + nvec * N + lane; v < V; v += G)  // tail: fewer than N elements
    online_add(m, s, static_cast<acc_t>(row[v]));
}

// Forward, one block per sequence b (grid-stride over sequences): the block's RPB groups take
// the kept steps t = group, group + RPB, ... in turn; each group's first thread adds its rows'
// losses in step order, and the block adds the groups' sums in group order, so the result is
// deterministic. The block also checks every label of the sequence (masked steps included) and
// writes lse = (0, 0) for the masked steps. The loss is the only launch of the op.
template <typename scalar_t, typename acc_t, int G, int RPB>
__global__ void __launch_bounds__(G * RPB)
    ce_forward_kernel(const scalar_t* __restrict__ pred, int64_t sb, int64_t st, int64_t B,
                      int64_t T, int64_t V, DeviceIndex2d label, DeviceLengths len,
                      acc_t* __restrict__ lse, scalar_t* __restrict__ loss) {
  __shared__ acc_t sh_m[G > 32 ? RPB * (G / 32) : 1];
  __shared__ acc_t sh_s[G > 32 ? RPB * (G / 32) : 1];
  __shared__ acc_t sh_sum[RPB];
  const int group = threadIdx.x / G;
  const int lane = threadIdx.x % G;
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {  // uniform over the block
    const int64_t start = first_masked_step(len, b, T);
    for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
      (void)checked_label(label, b, t, V);
      if (t >= start) lse[2 * (b * T + t)] = lse[2 * (b * T + t) + 1] = acc_t(0);
    }
    acc_t sum = acc_t(0);
    const int64_t rounds = (start + RPB - 1) / RPB;  // uniform: group_merge may synchronise
    for (int64_t k = 0; k < rounds; ++k) {
      const int64_t t = k * RPB + group;
      const bool kept = t < start;
      const scalar_t* row = pred + b * sb + (kept ? t : 0) * st;
      acc_t m = -dev_inf<acc_t>();
      acc_t s = acc_t(0);
      if (kept) row_online_lse<scalar_t, acc_t, G>(row, V, lane, m, s);
      group_merge<acc_t, G, RPB>(m, s, sh_m, sh_s, group, lane);
      if (kept && lane == 0) {
        const int64_t y = checked_label(label, b, t, V);
        const acc_t l = online_finish(m, s);
        // (m - x[label]) + log(s), not lse - x[label]: keeps its precision when the logits are
        // so large that m + log(s) rounds to m (as on the CPU); NaN with l when m is not finite
        const acc_t x_y = static_cast<acc_t>(row[y]);
        const acc_t log_sum = (l != l) ? l : dev_log(s);
        lse[2 * (b * T + t)] = m;
        lse[2 * (b * T + t) + 1] = log_sum;
        sum += (l != l) ? l : (m - x_y) + log_sum;
      }
    }
    if (lane == 0) sh_sum[group] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
      acc_t total = sh_sum[0];
#pragma unroll
      for (int g = 1; g < RPB; ++g) total += sh_sum[g];
      loss[b] = static_cast<scalar_t>(total / static_cast<acc_t>(T));
    }
    __syncthreads();  // sh_sum is rewritten for the next sequence
  }
}

// ---------------------------------------------------------------------------------------------
// Backward.

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t grad_elem(scalar_t x, int64_t v, int64_t y, acc_t m,
                                              acc_t l, acc_t scale) {
  acc_t g = dev_exp((static_cast<acc_t>(x) - m) - l) * scale;
  if (v == y) g -= scale;
  return static_cast<scalar_t>(g);
}

template <typename scalar_t, int G>
__device__ __forceinline__ void fill_row(scalar_t* __restrict__ grow, int64_t V, int lane,
                                         scalar_t zero) {
  constexpr int N = kVecBytes / sizeof(scalar_t);
  using P = Pack<scalar_t, N>;
  const int64_t head = head_elems(grow, V);
  if (lane < head) grow[lane] = zero;
  const int64_t nvec = (V - head) / N;
  P z;
#pragma unroll
  for (int i = 0; i < N; ++i) z.v[i] = zero;
  P* vp = reinterpret_cast<P*>(grow + head);
  for (int64_t k = lane; k < nvec; k += G) vp[k] = z;
  for (int64_t v = head + nvec * N + lane; v < V; v += G) grow[v] = zero;
}

// Backward, a group of G threads per row (b, t), rows in a grid-stride loop: the first masked
// step, the label check and the upstream gradient are read here, so this is the op's only
// launch. Rows of pred and grad are contiguous (unit vocabulary stride); up_t is the dtype of
// grad_loss (pred's, or the accumulation type).
template <typename scalar_t, typename acc_t, typename up_t, int G, int RPB>
__global__ void __launch_bounds__(G * RPB)
    ce_backward_kernel(const scalar_t* __restrict__ pred, int64_t sb, int64_t st, int64_t B,
                       int64_t T, int64_t V, DeviceIndex2d label, DeviceLengths len,
                       const acc_t* __restrict__ lse, int64_t ls0, int64_t ls1, int64_t ls2,
                       const up_t* __restrict__ up, int64_t up_s, acc_t inv_T,
                       scalar_t* __restrict__ grad, int64_t gb, int64_t gt) {
  const int group = threadIdx.x / G;
  const int lane = threadIdx.x % G;
  const int64_t R = B * T;
  // No block-wide synchronisation here, so each group strides over rows on its own.
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * RPB + group; r < R;
       r += static_cast<int64_t>(gridDim.x) * RPB) {
    const int64_t b = r / T, t = r - b * T;
    const int64_t y = checked_label(label, b, t, V);
    scalar_t* grow = grad + b * gb + t * gt;
    const acc_t scale = static_cast<acc_t>(up[b * up_s]) * inv_T;
    if (t >= first_masked_step(len, b, T)) {  // 0, or NaN for a non-finite scale (0 * inf)
      fill_row<scalar_t, G>(grow, V, lane, static_cast<scalar_t>(scale * acc_t(0)));
      continue;
    }
    const acc_t m = lse[b * ls0 + t * ls1];
    const acc_t l = lse[b * ls0 + t * ls1 + ls2];
    const scalar_t* row = pred + b * sb + t * st;
    constexpr int N = kVecBytes / sizeof(scalar_t);
    const int64_t head = head_elems(row, V);
    if (head == head_elems(grow, V)) {
      // Both rows equally misaligned: vectors after a common scalar head.
      using P = Pack<scalar_t, N>;
      if (lane < head) grow[lane] = grad_elem(row[lane], lane, y, m, l, scale);
      const int64_t nvec = (V - head) / N;
      const P* xp = reinterpret_cast<const P*>(row + head);
      P* gp = reinterpret_cast<P*>(grow + head);
#pragma unroll 2
      for (int64_t k = lane; k < nvec; k += G) {
        const P x = xp[k];
        P g;
        const int64_t v0 = head + k * N;
#pragma unroll
        for (int i = 0; i < N; ++i) g.v[i] = grad_elem(x.v[i], v0 + i, y, m, l, scale);
        gp[k] = g;
      }
      for (int64_t v = head + nvec * N + lane; v < V; v += G)
        grow[v] = grad_elem(row[v], v, y, m, l, scale);
    } else {
      for (int64_t v = lane; v < V; v += G) grow[v] = grad_elem(row[v], v, y, m, l, scale);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers. The group width follows the vocabulary: a warp per row up to 1024 classes (at most
// 32 elements a thread), 128 threads up to 8192, then 256; RPB groups per block.

template <typename Fn>
void with_group_shape(int64_t V, Fn&& fn) {
  if (V <= 1024) {
    fn(std::integral_constant<int, 32>{}, std::integral_constant<int, 8>{});
  } else if (V <= 8192) {
    fn(std::integral_constant<int, 128>{}, std::integral_constant<int, 4>{});
  } else {
    fn(std::integral_constant<int, 256>{}, std::integral_constant<int, 4>{});
  }
}

unsigned grid_for(int64_t units, int64_t per_block) {
  return static_cast<unsigned>(std::max<int64_t>(
      1, std::min<int64_t>((units + per_block - 1) / per_block, kMaxBlocks)));
}

// pred with a unit vocabulary stride: rows are then read in 16-byte vectors by adjacent threads.
// Another layout (a transposed or sliced tensor) is copied once rather than read with strided,
// uncoalesced loads.
at::Tensor rows_contiguous(const at::Tensor& pred) {
  return pred.size(2) <= 1 || pred.stride(2) == 1 ? pred : pred.contiguous();
}

template <typename scalar_t>
void launch_forward(const at::Tensor& pred, const at::Tensor& label, const DeviceLengths& len,
                    at::Tensor& lse, at::Tensor& loss) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = pred.size(0), T = pred.size(1), V = pred.size(2);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  with_group_shape(V, [&](auto g, auto rpb) {
    constexpr int G = decltype(g)::value;
    constexpr int RPB = decltype(rpb)::value;
    ce_forward_kernel<scalar_t, acc_t, G, RPB><<<grid_for(B, 1), G * RPB, 0, stream>>>(
        pred.const_data_ptr<scalar_t>(), pred.stride(0), pred.stride(1), B, T, V,
        device_index_2d(label), len, lse.mutable_data_ptr<acc_t>(),
        loss.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t, typename up_t>
void launch_backward(const at::Tensor& pred, const at::Tensor& label, const DeviceLengths& len,
                     const at::Tensor& lse, const at::Tensor& up, at::Tensor& grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = pred.size(0), T = pred.size(1), V = pred.size(2);
  const acc_t inv_T = acc_t(1) / static_cast<acc_t>(T);  // the CPU kernel's scale
  const auto stream = c10::cuda::getCurrentCUDAStream();
  with_group_shape(V, [&](auto g, auto rpb) {
    constexpr int G = decltype(g)::value;
    constexpr int RPB = decltype(rpb)::value;
    ce_backward_kernel<scalar_t, acc_t, up_t, G, RPB>
        <<<grid_for(B * T, RPB), G * RPB, 0, stream>>>(
            pred.const_data_ptr<scalar_t>(), pred.stride(0), pred.stride(1), B, T, V,
            device_index_2d(label), len, lse.const_data_ptr<acc_t>(), lse.stride(0),
            lse.stride(1), lse.stride(2), up.const_data_ptr<up_t>(), up.stride(0), inv_T,
            grad.mutable_data_ptr<scalar_t>(), grad.stride(0), grad.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

void masked_softmax_ce(const at::Tensor& pred, const at::Tensor& label,
                       const at::Tensor& valid_len, at::Tensor& loss, at::Tensor& lse) {
  const c10::cuda::CUDAGuard guard(pred.device());
  const HostLengths len = device_lengths(valid_len);
  const at::Tensor x = rows_contiguous(pred);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(),
                                  "masked_softmax_ce_cuda", [&] {
    launch_forward<scalar_t>(x, label, len.lengths, lse, loss);
  });
}

void masked_softmax_ce_backward(const at::Tensor& grad_loss, const at::Tensor& pred,
                                const at::Tensor& label, const at::Tensor& valid_len,
                                const at::Tensor& lse, at::Tensor& grad) {
  const c10::cuda::CUDAGuard guard(pred.device());
  const HostLengths len = device_lengths(valid_len);
  const at::Tensor x = rows_contiguous(pred);
  // the gradient has pred's layout; with another vocabulary stride it is computed contiguous
  // (coalesced) and copied once
  const bool direct = pred.size(2) <= 1 || grad.stride(2) == 1;
  at::Tensor g = direct ? grad : at::empty(pred.sizes(), pred.options());
  const auto acc_type = lse.scalar_type();
  const at::Tensor up = grad_loss.scalar_type() == pred.scalar_type() ||
                                grad_loss.scalar_type() == acc_type
                            ? grad_loss
                            : grad_loss.to(acc_type);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(),
                                  "masked_softmax_ce_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (up.scalar_type() == pred.scalar_type())
      launch_backward<scalar_t, scalar_t>(x, label, len.lengths, lse, up, g);
    else
      launch_backward<scalar_t, acc_t>(x, label, len.lengths, lse, up, g);
  });
  if (!direct) grad.copy_(g);
}

}  // namespace cuda
}  // namespace seq2seq_ext
