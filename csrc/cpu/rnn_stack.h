// The CPU kernels of rnn_stack and rnn_stack_backward, one template over the cell's equations
// (csrc/rnn_cells.h, under the lane policies of cells.h): L layers over T steps, each layer's
// input projection over all T steps one product, then per step one product with W_hh and one
// pointwise pass of the cell.
//
// Sizes here are what the seeds' models use (a batch of 1 to 128 rows, hidden 32 to 512): the
// products go through RowProduct and add_at_x, which pick loops of vector FMAs without ATen at
// small sizes (where an ATen call's fixed cost exceeds the arithmetic) and BLAS beyond.
//
// bfloat16 matrices (csrc/bf16_products.h): X is rounded to bf16 before each product, the
// matrices are used through float32 copies or, for products large enough for a bf16 GEMM
// under Bf16Gemm::kNative (native_product), as bf16 GEMMs; their gradients are summed in
// float32 and returned in bf16.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../rnn_cells.h"
#include "../bf16_products.h"
#include "../rnn_stack.h"
#include "amx_gemm.h"
#include "bf16.h"
#include "cells.h"
#include "common.h"
#include "linear.h"
#include "mkl_packed.h"

namespace seq2seq_ext {
namespace cpu {

// Whether the matrices of `weights` are bfloat16 (bf16 products, see the top of the file).
inline bool bf16_matrices(at::TensorList weights) {
  return !weights.empty() && weights[0].scalar_type() == at::kBFloat16;
}

// Y[m, :N] = X[m, :K] Wt (+ bias) for the rows m of X, with Wt a (K, N) matrix, by the cheapest
// of four ways for the rows the call will multiply (`rows`, over all its time steps):
//   kBlas    beyond L2 (K * N * sizeof(T) > 256 KiB) or for many rows a call (kBlasWork):
//            ATen's BLAS;
//   kInPlace Wt row-major with N a whole number of vectors: runs of vector FMAs over Wt
//            itself, four rows a block (linear_t_rows), no horizontal sums and no copy;
//   kDots    few rows (rows * 8 < K) and Wt the transpose of a row-major (N, K) weight: dot
//            products over that weight (linear_nt), whose horizontal sums cost less than laying
//            out the weight for so few rows (a decoder's one-step call at batch 1);
//   kPacked  otherwise: Wt copied once per call into a (K, Np) block, Np padded to whole
//            vectors with zeros (the bias likewise), then as kInPlace: at the seeds' sizes
//            (hidden 32, batch 32) several times faster than BLAS, whose per-call cost
//            dominates such products.
// Y has row stride ldy == padded(): the padding columns are written (zeros plus bias padding).
// A bfloat16 matrix: X is rounded to bf16 first and the product runs as the top of the file says
// (kBlas on the bf16 matrix itself under Bf16Gemm::kNative for a large enough product,
// native_product; else on its float32 copy).
template <typename T>
struct RowProduct {
  static constexpr int64_t kW = at::vec::Vectorized<T>::size();
  enum Mode { kBlas, kInPlace, kDots, kPacked };
  int64_t K = 0, N = 0, Np = 0;
  Mode mode = kBlas;
  const T* wt = nullptr;    // kInPlace, kPacked: (K, Np); kDots: the (N, K) weight, row stride ldw
  const T* bias = nullptr;  // kInPlace, kDots: N entries; kPacked: Np entries
  int64_t ldw = 0;
  std::vector<T> packed, packed_bias;
  at::Tensor w_kn;  // (K, N) view of the weight for BLAS (float32 copy of a bf16 matrix)
  at::Tensor b;     // bias for BLAS, undefined when none
  bool round = false;   // a bf16 matrix: X rounded to bf16 before the product
  bool native = false;  // kBlas on the bf16 matrix (w_low) as an ATen bf16 GEMM
  at::Tensor w_low;     // the bf16 (K, N) matrix when native
  std::shared_ptr<const AmxMatrix> amx;  // w_low laid out for AMX tiles (amx_product)
  std::shared_ptr<const MklPackedMatrix> mkl;  // w_kn packed once for several calls (float32)
  mutable std::vector<T> x_low;  // X rounded

  // Products of at least this many multiply-adds in one call go to BLAS: their rows reuse each
  // block of the weight from registers (BLAS's tiling), where the row loops reload it per row
  // (a 12-step input projection at batch 64, hidden 128 ran 2x slower in them).
  static constexpr int64_t kBlasWork = int64_t(1) << 18;

  // The (K, N) matrix is w, or its transpose when `transposed` (read through w's strides: no
  // view is made unless BLAS needs one, a view costing more than a small product); w is T or
  // bfloat16 and must outlive the RowProduct (kInPlace and kDots read its data). bias_t: (N,)
  // contiguous or undefined; rows: the rows multiplied over all calls, call_rows: in one call.
  RowProduct(const at::Tensor& w, bool transposed, const at::Tensor& bias_t, int64_t rows,
             int64_t call_rows)
      : b(bias_t) {
    const int d0 = transposed ? 1 : 0, d1 = 1 - d0;
    K = w.size(d0);
    N = w.size(d1);
    Np = (N + kW - 1) / kW * kW;
    const bool blas =
        K * Np * static_cast<int64_t>(sizeof(T)) > (256 << 10) || call_rows * K * N >= kBlasWork;
    auto as_kn = [&](const at::Tensor& m) { return transposed ? m.t() : m; };
    const T* src;
    int64_t s0, s1;
    if (w.scalar_type() == at::kBFloat16) {
      round = true;
      native = blas && native_product(call_rows, K, N);
      if (native) {
        w_low = as_kn(w);
        mode = kBlas;
        if constexpr (std::is_same_v<T, float>) {
          if (amx_product(call_rows, K, N)) amx = amx_matrix(w_low);
        }
        return;
      }
      w_kn = as_kn(w.to(c10::CppTypeToScalarType<T>::value));  // exact; keeps w's strides
      src = w_kn.const_data_ptr<T>();
      s0 = w_kn.stride(0);
      s1 = w_kn.stride(1);
    } else {
      if (blas) w_kn = as_kn(w);
      src = w.const_data_ptr<T>();
      s0 = w.stride(d0);
      s1 = w.stride(d1);
    }
    const T* bp = bias_t.defined() ? bias_t.const_data_ptr<T>() : nullptr;
    if (blas) {
      mode = kBlas;
      // several calls over one matrix (a layer's time steps): MKL lays it out once for all
      if constexpr (std::is_same_v<T, float>) {
        mkl = mkl_pack_if_it_pays(w_kn, call_rows, rows / std::max<int64_t>(call_rows, 1));
      }
    } else if (s1 == 1 && s0 == N && N == Np) {
      mode = kInPlace;
      wt = src;
      bias = bp;
    } else if (s0 == 1 && rows * 8 < K) {
      mode = kDots;
      wt = src;
      ldw = s1;
      bias = bp;
      Np = N;
    } else {
      mode = kPacked;
      packed.assign(K * Np, T(0));
      for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k) packed[k * Np + n] = src[k * s0 + n * s1];
      wt = packed.data();
      if (bp) {
        packed_bias.assign(Np, T(0));
        std::copy(bp, bp + N, packed_bias.data());
        bias = packed_bias.data();
      }
    }
  }
  int64_t padded() const { return mode == kBlas ? N : Np; }

  // Under `native`: y (M, N) = x_low W (+ bias) for rows already in bf16 (the backward's gate
  // gradients, converted once for several products): on AMX tiles over the laid-out matrix, or
  // the ATen bf16 GEMM's result widened into y with the bias added, in one pass (widen_rows).
  void native_into(const at::Tensor& x_low, at::Tensor& y) const {
    if constexpr (std::is_same_v<T, float>) {
      if (amx) {
        TORCH_INTERNAL_ASSERT(x_low.stride(1) == 1 && y.stride(1) == 1);
        amx_gemm(x_low.const_data_ptr<c10::BFloat16>(), x_low.stride(0), x_low.size(0), *amx,
                 b.defined() ? b.const_data_ptr<float>() : nullptr, 0, y.mutable_data_ptr<float>(),
                 y.stride(0));
        return;
      }
    }
    const at::Tensor r = at::mm(x_low, w_low);
    widen_rows<T>(r.const_data_ptr<c10::BFloat16>(), y.size(0), y.size(1),
                  b.defined() ? b.const_data_ptr<T>() : nullptr, y.mutable_data_ptr<T>(),
                  y.stride(0));
  }

  // Y = X Wt (+ bias); X (M, K) with row stride ldx, Y (M, padded()) with row stride ldy.
  void operator()(const T* X, int64_t ldx, int64_t M, T* Y, int64_t ldy) const {
    if (M == 0) return;
    if (round && !native) {  // a native bf16 GEMM rounds X itself
      X = rounded_to_bf16(X, ldx, M, K, x_low);
      ldx = K;
    }
    switch (mode) {
      case kDots:
        TORCH_INTERNAL_ASSERT(ldy == N);
        linear_nt<T>(X, ldx, M, K, wt, ldw, N, bias, Y, false);
        return;
      case kInPlace:
      case kPacked:
        at::parallel_for(0, M, std::max<int64_t>(4, 65536 / std::max<int64_t>(1, K * Np)),
                         [&](int64_t m0, int64_t m1) {
                           linear_t_rows<T>(X + m0 * ldx, ldx, m1 - m0, K, wt, Np, bias,
                                            Y + m0 * ldy, ldy, false);
                         });
        return;
      case kBlas: {
        auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
        at::Tensor x = at::from_blob(const_cast<T*>(X), {M, K}, {ldx, 1}, opts);
        at::Tensor y = at::from_blob(Y, {M, N}, {ldy, 1}, opts);
        if (native) {
          native_into(narrowed_rows(X, ldx, M, K), y);
        } else if (mkl) {
          if constexpr (std::is_same_v<T, float>)
            mkl_packed_gemm(X, ldx, M, *mkl, b.defined() ? b.const_data_ptr<float>() : nullptr,
                            0, Y, ldy);
        } else if (b.defined()) {
          addmm_over_bias_rows<T>(y, Y, ldy, b.const_data_ptr<T>(), x, w_kn);
        } else
          at::mm_out(y, x, w_kn);
        return;
      }
    }
  }
};

// Forward. input (T, B, I) contiguous; h0, c0 (L, B, H) contiguous (c0 undefined for the GRU);
// mask (L-1, T, B, H) contiguous or undefined. Writes saved (L, T, B, S*H); output, h_n, c_n are
// filled by the caller from saved. Packed (d.is_packed), the (T, B) rows are the N rows of the
// steps one after the other, step t running the first batch_sizes[t] rows of the batch.
template <class Cell, typename T>
void stack_forward(const StackDims& d, const at::Tensor& input, const at::Tensor& h0,
                   const at::Tensor& c0, at::TensorList weights, const at::Tensor& mask,
                   at::Tensor& saved) {
  const int64_t L = d.layers, Ts = d.steps, B = d.batch, H = d.hidden;
  const int64_t S = Cell::kSaved * H;
  const std::vector<int64_t> off = d.offsets();
  const int64_t M = off[Ts];  // rows over all steps
  Scratch<T> gi, gh, dropped;
  T* sv = saved.data_ptr<T>();
  for (int64_t l = 0; l < L; ++l) {
    // this layer's input, (M, K) with row stride ldx
    const T* x;
    int64_t K, ldx;
    if (l == 0) {
      x = input.const_data_ptr<T>();
      K = ldx = d.input;
    } else if (mask.defined()) {
      dropped.resize(M * H);
      const T* m = mask.const_data_ptr<T>() + (l - 1) * M * H;
      const T* prev = sv + (l - 1) * M * S;
      for (int64_t r = 0; r < M; ++r)
        for (int64_t j = 0; j < H; ++j) dropped[r * H + j] = prev[r * S + j] * m[r * H + j];
      x = dropped.data();
      K = ldx = H;
    } else {
      x = sv + (l - 1) * M * S;
      K = H;
      ldx = S;
    }
    const at::Tensor& w_ih = stack_weight(weights, d, l, 0);
    const at::Tensor& w_hh = stack_weight(weights, d, l, 1);
    const at::Tensor none;
    const RowProduct<T> in_proj(w_ih, true, d.bias ? stack_weight(weights, d, l, 2) : none, M,
                                M);
    const RowProduct<T> hid_proj(w_hh, true, d.bias ? stack_weight(weights, d, l, 3) : none, M,
                                 B);
    const int64_t ldi = in_proj.padded(), ldg = hid_proj.padded();
    gi.resize(M * ldi);
    gh.resize(B * ldg);
    in_proj(x, ldx, M, gi.data(), ldi);
    const T* h = h0.const_data_ptr<T>() + l * B * H;
    const T* c = Cell::kHasCellState ? c0.const_data_ptr<T>() + l * B * H : nullptr;
    int64_t ldh = H;
    T* layer_saved = sv + l * M * S;
    for (int64_t t = 0; t < Ts; ++t) {
      const int64_t rows = off[t + 1] - off[t];
      hid_proj(h, ldh, rows, gh.data(), ldg);
      T* s = layer_saved + off[t] * S;
      const T* git = gi.data() + off[t] * ldi;
      for (int64_t b = 0; b < rows; ++b) {
        const T* gib = git + b * ldi;
        const T* ghb = gh.data() + b * ldg;
        const T* hb = h + b * ldh;
        const T* cb = c ? c + b * ldh : nullptr;
        T* sb = s + b * S;
        over_row<T>(H, [&](auto lanes, int64_t j) {
          using Lanes = decltype(lanes);
          Cell::template forward<Lanes>(gib + j, ghb + j, hb + j, cb ? cb + j : nullptr, sb + j,
                                        H);
        });
      }
      // the next step's rows are a prefix of this step's
      h = s;
      c = Cell::kHasCellState ? s + H : nullptr;
      ldh = S;
    }
  }
}

// The forward's outputs from `saved` (L, M, S) over the M rows of all steps: output (M, H), the
// top layer's h at every row; h_n and c_n (L, B, H), every layer's state after each row's last
// step (h0's / c0's row for a row in no step; c_n undefined for the GRU). Plain row copies:
// three ATen copies of strided views cost more than the step itself at batch 1.
template <typename T>
void stack_outputs(const StackDims& d, int64_t S, const at::Tensor& saved, const at::Tensor& h0,
                   const at::Tensor& c0, at::Tensor& output, at::Tensor& h_n, at::Tensor& c_n) {
  const int64_t L = d.layers, Ts = d.steps, B = d.batch, H = d.hidden;
  const std::vector<int64_t> off = d.offsets();
  const int64_t M = off[Ts];
  const T* sv = saved.const_data_ptr<T>();
  T* out = output.data_ptr<T>();
  const T* top = sv + (L - 1) * M * S;
  for (int64_t r = 0; r < M; ++r) std::copy(top + r * S, top + r * S + H, out + r * H);
  T* hn = h_n.data_ptr<T>();
  T* cn = c_n.defined() ? c_n.data_ptr<T>() : nullptr;
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t b = 0; b < B; ++b) {
      // the row's last step: the last t whose rows include b
      int64_t t = Ts - 1;
      while (t >= 0 && off[t + 1] - off[t] <= b) --t;
      const T* h_src = t >= 0 ? sv + (l * M + off[t] + b) * S : h0.const_data_ptr<T>() + (l * B + b) * H;
      std::copy(h_src, h_src + H, hn + (l * B + b) * H);
      if (cn) {
        const T* c_src =
            t >= 0 ? sv + (l * M + off[t] + b) * S + H : c0.const_data_ptr<T>() + (l * B + b) * H;
        std::copy(c_src, c_src + H, cn + (l * B + b) * H);
      }
    }
  }
}

// Weight-gradient products of at least this many multiply-adds go to BLAS (add_at_x).
constexpr int64_t kGradBlasWork = int64_t(1) << 18;

// Whether the gradient of a bf16 matrix (`low`) over M rows of an (N, K) product is one bf16
// GEMM (Bf16Gemm::kNative, large enough: native_product): its result is the bf16
// gradient itself, summed in float32 inside the GEMM, with no float32 buffer to zero, add
// into and round afterwards.
inline bool native_matrix_grad(bool low, int64_t M, int64_t N, int64_t K) {
  return low && native_product(N, M, K);
}

// M rows of `cols` values, row stride ld, as an (M, cols) tensor over that memory (no copy).
template <typename T>
at::Tensor rows_view(const T* p, int64_t M, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(p), {M, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// out (N, K) += A^T X over M rows: A (M, N) with row stride lda, X (M, K) with row stride ldx,
// out contiguous. The weight gradients of the backward. Small products (the seeds' sizes) as
// rank-one updates, one vector of out per FMA and no horizontal sums; large ones through BLAS.
// low: the gradient of a bf16 matrix, A and X rounded to bf16 first (see the top of the file;
// under Bf16Gemm::kNative a large one is a bf16 GEMM instead, native_matrix_grad).
template <typename T>
void add_at_x(const T* A, int64_t lda, const T* X, int64_t ldx, int64_t M, int64_t N, int64_t K,
              T* out, bool low = false) {
  if (M == 0 || N == 0 || K == 0) return;
  const bool blas = M * N * K >= kGradBlasWork;
  std::vector<T> a_low, x_low;
  if (low) {
    A = rounded_to_bf16(A, lda, M, N, a_low);
    X = rounded_to_bf16(X, ldx, M, K, x_low);
    lda = N;
    ldx = K;
  }
  if (blas) {
    auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    at::Tensor a = at::from_blob(const_cast<T*>(A), {M, N}, {lda, 1}, opts);
    at::Tensor x = at::from_blob(const_cast<T*>(X), {M, K}, {ldx, 1}, opts);
    at::Tensor o = at::from_blob(out, {N, K}, opts);
    o.addmm_(a.t(), x);
    return;
  }
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  // NB rows of out at a time, two vectors (then one) of each in registers over all M rows:
  // 2 * NB independent FMA chains sharing each load of X and each broadcast of A
  auto block = [&](auto nb, int64_t n) {
    constexpr int NB = decltype(nb)::value;
    int64_t k = 0;
    for (; k + 2 * W <= K; k += 2 * W) {
      Vec acc[NB][2];
      for (int i = 0; i < NB; ++i) {
        acc[i][0] = Vec::loadu(out + (n + i) * K + k);
        acc[i][1] = Vec::loadu(out + (n + i) * K + k + W);
      }
      for (int64_t m = 0; m < M; ++m) {
        const Vec x0 = Vec::loadu(X + m * ldx + k), x1 = Vec::loadu(X + m * ldx + k + W);
        const T* a = A + m * lda + n;
        for (int i = 0; i < NB; ++i) {
          const Vec av(a[i]);
          acc[i][0] = at::vec::fmadd(av, x0, acc[i][0]);
          acc[i][1] = at::vec::fmadd(av, x1, acc[i][1]);
        }
      }
      for (int i = 0; i < NB; ++i) {
        acc[i][0].store(out + (n + i) * K + k);
        acc[i][1].store(out + (n + i) * K + k + W);
      }
    }
    for (; k < K; k += W) {
      const int64_t kw = std::min<int64_t>(W, K - k);
      Vec acc[NB];
      for (int i = 0; i < NB; ++i) acc[i] = Vec::loadu(out + (n + i) * K + k, kw);
      for (int64_t m = 0; m < M; ++m) {
        const Vec xv = Vec::loadu(X + m * ldx + k, kw);
        const T* a = A + m * lda + n;
        for (int i = 0; i < NB; ++i) acc[i] = at::vec::fmadd(Vec(a[i]), xv, acc[i]);
      }
      for (int i = 0; i < NB; ++i) acc[i].store(out + (n + i) * K + k, kw);
    }
  };
  const int64_t blocks = (N + 3) / 4;
  at::parallel_for(0, blocks, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, M * K)),
                   [&](int64_t q0, int64_t q1) {
                     for (int64_t q = q0; q < q1; ++q) {
                       const int64_t n = 4 * q;
                       if (n + 4 <= N) {
                         block(std::integral_constant<int, 4>{}, n);
                       } else {
                         for (int64_t r = n; r < N; ++r) block(std::integral_constant<int, 1>{}, r);
                       }
                     }
                   });
}

// The (N, K) gradient A^T X of a weight matrix over the M rows of a (M, N) and x (M, K)
// (contiguous, T): BLAS's product, or for a bf16 matrix (`low`, returned in bfloat16) as the
// backward computes it, one bf16 GEMM (native_matrix_grad) or add_at_x into a zeroed sum.
template <typename T>
at::Tensor matrix_grad(const at::Tensor& a, const at::Tensor& x, bool low) {
  const int64_t M = a.size(0), N = a.size(1), K = x.size(1);
  if (!low) return at::mm(a.t(), x);
  if (native_matrix_grad(low, M, N, K)) return bf16_matrix_grad(a, x);
  at::Tensor out = at::zeros({N, K}, a.options());
  add_at_x<T>(a.const_data_ptr<T>(), N, x.const_data_ptr<T>(), K, M, N, K, out.data_ptr<T>(),
              low);
  return out.to(at::kBFloat16);
}

// Backward. grad_output (T, B, H) and grad_hn, grad_cn (L, B, H): contiguous or undefined (no
// gradient). Returns (grad_input, grad_h0, grad_c0 (undefined for the GRU), weight gradients in
// the order of `weights`). Per layer, top down: the steps in reverse (the cell's backward and
// the product with W_hh per step), then the weight gradients and the gradient of the layer's
// input over all steps at once; no ATen operator runs below BLAS sizes (at batch 32 and hidden
// 32 their per-call costs were most of the backward). Packed, the rows as in stack_forward: a
// row's state gradient waits, untouched, in dh / dc until the steps reach its last one.
// defer (one flag per weight, or null): the matrices whose gradient A^T X is not computed here;
// their operands go to rows[3k] and rows[3k + 1] instead, and their entry of the weight
// gradients stays undefined (csrc/deferred_weight_grads.h sums them over the calls of a graph):
// A (M, G) and X (M, K) in T (X possibly a view of input or saved), or, for bf16 matrices under
// Bf16Gemm::kNative, in bfloat16 (the node lays out A^T for the bf16 GEMM over all calls). The
// GRU's W_hh beside a deferred W_ih, in bf16: A is W_ih's, whose r and z columns are W_hh's too,
// and rows[3k + 2] the (M, H) n columns of W_hh's own.
template <class Cell, typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> stack_backward(
    const StackDims& d, const at::Tensor& grad_output, const at::Tensor& grad_hn,
    const at::Tensor& grad_cn, const at::Tensor& input, const at::Tensor& h0,
    const at::Tensor& c0, at::TensorList weights, const at::Tensor& mask,
    const at::Tensor& saved, const std::vector<bool>* defer = nullptr,
    std::vector<at::Tensor>* rows = nullptr) {
  const int64_t L = d.layers, Ts = d.steps, B = d.batch, H = d.hidden;
  const std::vector<int64_t> off = d.offsets();
  const int64_t M = off[Ts];
  const int64_t G = Cell::kGates * H, S = Cell::kSaved * H;
  constexpr bool kLstm = Cell::kHasCellState;
  // the leading gate columns whose gradients are the same on the input and the hidden side
  // (every LSTM gate; the GRU's r and z, not n, whose hidden side is scaled by r): b_hh's
  // gradient there is b_ih's
  const int64_t shared_cols = kLstm ? G : 2 * H;
  auto opts = input.options();
  at::Tensor grad_input = at::empty(input.sizes(), opts);
  at::Tensor grad_h0 = at::empty({L, B, H}, opts);
  at::Tensor grad_c0 = kLstm ? at::empty({L, B, H}, opts) : at::Tensor();
  std::vector<at::Tensor> grad_w(weights.size());
  // float32 sums; a bf16 matrix's gradient is rounded to bf16 at the end
  const bool low = bf16_matrices(weights);
  const int64_t per = d.bias ? 4 : 2;
  auto deferred = [&](int64_t k) { return defer != nullptr && (*defer)[k]; };
  if (defer != nullptr) rows->assign(3 * weights.size(), at::Tensor());
  const bool gemm_rows = low && bf16_gemm() == Bf16Gemm::kNative;  // deferred rows in bf16
  // A from the (M, G) gate gradients at p, or their bf16 rounding when the steps' products made
  // one, `rounded` (the same values, kept as they are)
  auto deferred_a = [&](const T* p, const at::Tensor& rounded) {
    if (!gemm_rows) return rows_view(p, M, G, G).clone();
    return rounded.defined() ? rounded : narrowed_rows(p, G, M, G);
  };
  auto deferred_x = [&](const at::Tensor& x, bool fresh) {
    if (gemm_rows) return narrowed_rows(x.const_data_ptr<T>(), x.stride(0), x.size(0), x.size(1));
    return fresh ? x : x.clone();
  };
  for (size_t k = 0; k < weights.size(); ++k) {  // zeroed here: at::zeros is an op call each
    // a matrix whose gradient is one bf16 GEMM (native_matrix_grad) gets it there
    const int64_t layer = static_cast<int64_t>(k) / per;
    if (deferred(k)) continue;
    if (static_cast<int64_t>(k) % per < 2 &&
        native_matrix_grad(low, M, G, k % per == 0 && layer == 0 ? d.input : H))
      continue;
    grad_w[k] = empty_written_once(weights[k].sizes(), opts);
    std::fill_n(grad_w[k].data_ptr<T>(), grad_w[k].numel(), T(0));
  }
  const T* sv = saved.const_data_ptr<T>();
  const T* msk = mask.defined() ? mask.const_data_ptr<T>() : nullptr;
  // dy: the gradient reaching this layer's output (M, H), null when there is none
  const T* dy = grad_output.defined() ? grad_output.const_data_ptr<T>() : nullptr;
  Scratch<T> dgi, dgh, dy_below, dx, x_dropped, h_prev;  // every element written before read
  dgi.resize(M * G);
  if (!kLstm) dgh.resize(M * G);
  T* dgh_p = kLstm ? dgi.data() : dgh.data();
  std::vector<T> dh(B * H), dc(kLstm ? B * H : 0), dh_direct(B * H);
  std::vector<T> step_b(d.bias ? 2 * G : 0);  // a step's sums of b_ih's and b_hh's gradients
  Scratch<T> dh_rec, step_gi, step_gh;
  for (int64_t l = L - 1; l >= 0; --l) {
    const at::Tensor& w_ih = stack_weight(weights, d, l, 0);
    const at::Tensor& w_hh = stack_weight(weights, d, l, 1);
    const int64_t K = l == 0 ? d.input : H;
    // dh_prev = dh_direct + dgh W_hh: W_hh is the (K, N) = (G, H) matrix of the product
    const RowProduct<T> rec(w_hh, false, at::Tensor(), M, B);
    const int64_t ldr = rec.padded();
    dh_rec.resize(B * ldr);
    // a native bf16 product rounds each step's gate gradients to bf16: into one buffer over all
    // rows, which W_hh's gradient (and the LSTM's W_ih's: the same gradients) then reads
    at::Tensor dgh_low = rec.native ? at::empty({M, G}, opts.dtype(at::kBFloat16)) : at::Tensor();
    const int64_t base = (d.bias ? 4 : 2) * l;
    // the input's gradient dgi W_ih: W_ih is the (K, N) = (G, K) matrix of the product
    const RowProduct<T> back_in(w_ih, false, at::Tensor(), M, M);
    // Every product of the layer a native bf16 GEMM: each row's gate gradients go to bf16 rows
    // (and into the biases' sums) from a row's scratch, in L1, as soon as the cell makes them,
    // and no float32 buffer over all rows is written, then read again
    const bool full = rec.native && back_in.native &&
                      (deferred(base) || native_matrix_grad(low, M, G, K)) &&
                      (deferred(base + 1) || native_matrix_grad(low, M, G, H));
    if (full) {
      step_gi.resize(G);
      if (!kLstm) step_gh.resize(G);
    }
    // dgi in bf16, made once for the gradients that are bf16 GEMMs (the LSTM's: dgh_low)
    at::Tensor dgi_low = kLstm ? dgh_low
                         : full ? at::empty({M, G}, opts.dtype(at::kBFloat16))
                                : at::Tensor();
    // the biases' gradients: each row added to its step's sums as the cell makes it, while it
    // is in L1, and each step's sums to the biases'
    T* gb_ih = d.bias ? grad_w[base + 2].data_ptr<T>() : nullptr;
    T* gb_hh = d.bias ? grad_w[base + 3].data_ptr<T>() : nullptr;
    const T* layer_saved = sv + l * M * S;
    if (grad_hn.defined()) {
      const T* p = grad_hn.const_data_ptr<T>() + l * B * H;
      std::copy(p, p + B * H, dh.begin());
    } else {
      std::fill(dh.begin(), dh.end(), T(0));
    }
    if (kLstm) {
      if (grad_cn.defined()) {
        const T* p = grad_cn.const_data_ptr<T>() + l * B * H;
        std::copy(p, p + B * H, dc.begin());
      } else {
        std::fill(dc.begin(), dc.end(), T(0));
      }
    }
    const T* h0l = h0.const_data_ptr<T>() + l * B * H;
    const T* c0l = kLstm ? c0.const_data_ptr<T>() + l * B * H : nullptr;
    for (int64_t t = Ts - 1; t >= 0; --t) {
      const int64_t rows = off[t + 1] - off[t];
      const T* s = layer_saved + off[t] * S;
      const T* hp = t > 0 ? layer_saved + off[t - 1] * S : h0l;
      const int64_t ldh = t > 0 ? S : H;
      const T* cp = kLstm ? (t > 0 ? layer_saved + off[t - 1] * S + H : c0l) : nullptr;
      if (dy)
        for (int64_t k = 0; k < rows * H; ++k) dh[k] += dy[off[t] * H + k];
      std::fill(step_b.begin(), step_b.end(), T(0));
      // this step's gate gradients: in the buffers over all rows, or, full, one row at a time
      // in a row's scratch, then in bf16 in dgh_low's and dgi_low's rows (the LSTM's are one)
      T* gi_rows = full ? step_gi.data() : dgi.data() + off[t] * G;
      T* gh_rows = kLstm ? gi_rows : full ? step_gh.data() : dgh_p + off[t] * G;
      const int64_t ld_rows = full ? 0 : G;
      for (int64_t b = 0; b < rows; ++b) {
        T* dgib = gi_rows + b * ld_rows;
        T* dghb = gh_rows + b * ld_rows;
        over_row<T>(H, [&](auto lanes, int64_t j) {
          using Lanes = decltype(lanes);
          Cell::template backward<Lanes>(dh.data() + b * H + j,
                                         kLstm ? dc.data() + b * H + j : nullptr,
                                         hp + b * ldh + j, cp ? cp + b * ldh + j : nullptr,
                                         s + b * S + j, dgib + j, dghb + j,
                                         dh_direct.data() + b * H + j, H);
        });
        if (full) {
          const int64_t r = off[t] + b;
          narrow_rows(dghb, G, 1, G, dgh_low.mutable_data_ptr<c10::BFloat16>() + r * G);
          if (!kLstm) narrow_rows(dgib, G, 1, G, dgi_low.mutable_data_ptr<c10::BFloat16>() + r * G);
        }
        if (gb_ih) {
          add_column_sums<T>(dgib, G, 1, G, step_b.data());
          // b_hh's gradient takes the columns its gates do not share with b_ih's (below)
          if (shared_cols < G)
            add_column_sums<T>(dghb + shared_cols, G, 1, G - shared_cols,
                               step_b.data() + G + shared_cols);
        }
      }
      if (gb_ih) {
        for (int64_t n = 0; n < G; ++n) gb_ih[n] += step_b[n];
        for (int64_t n = shared_cols; n < G; ++n) gb_hh[n] += step_b[G + n];
      }
      if (dgh_low.defined() && rows > 0) {
        at::Tensor step_low = dgh_low.narrow(0, off[t], rows);
        if (!full) narrow_rows(gh_rows, G, rows, G, step_low.mutable_data_ptr<c10::BFloat16>());
        at::Tensor y = rows_view(dh_rec.data(), rows, H, ldr);
        rec.native_into(step_low, y);
      } else {
        rec(gh_rows, G, rows, dh_rec.data(), ldr);
      }
      for (int64_t b = 0; b < rows; ++b)
        for (int64_t j = 0; j < H; ++j)
          dh[b * H + j] = dh_direct[b * H + j] + dh_rec[b * ldr + j];
    }
    if (gb_ih) std::copy(gb_ih, gb_ih + shared_cols, gb_hh);
    std::copy(dh.begin(), dh.end(), grad_h0.data_ptr<T>() + l * B * H);
    if (kLstm) std::copy(dc.begin(), dc.end(), grad_c0.data_ptr<T>() + l * B * H);
    // this layer's input (M, K): the input, or the layer below's output (times its mask)
    const T* x;
    int64_t ldx;
    const T* layer_mask = msk && l > 0 ? msk + (l - 1) * M * H : nullptr;
    if (l == 0) {
      x = input.const_data_ptr<T>();
      ldx = d.input;
    } else if (layer_mask) {
      x_dropped.resize(M * H);
      const T* below = sv + (l - 1) * M * S;
      for (int64_t r = 0; r < M; ++r)
        for (int64_t j = 0; j < H; ++j)
          x_dropped[r * H + j] = below[r * S + j] * layer_mask[r * H + j];
      x = x_dropped.data();
      ldx = H;
    } else {
      x = sv + (l - 1) * M * S;
      ldx = S;
    }
    if (M == 0) continue;
    auto low_dgi = [&]() -> const at::Tensor& {
      if (!dgi_low.defined()) dgi_low = narrowed_rows(dgi.data(), G, M, G);
      return dgi_low;
    };
    // a deferred matrix's A: the gate gradients, copied out of the scratch (the LSTM's W_ih and
    // W_hh share them)
    at::Tensor dgi_rows;
    // W_ih's gate gradients laid out for its gradient, reused by W_hh's: the LSTM's are the
    // same, the GRU's share their r and z columns
    at::Tensor a_t;
    if (deferred(base) || (kLstm && deferred(base + 1)))
      dgi_rows = deferred_a(dgi.data(), dgi_low);
    if (deferred(base)) {
      (*rows)[3 * base] = dgi_rows;
      (*rows)[3 * base + 1] =
          l == 0       ? deferred_x(input.view({M, K}), true)
          : layer_mask ? deferred_x(rows_view(x, M, K, ldx), false)
                       : deferred_x(saved.select(0, l - 1).view({M, S}).narrow(1, 0, H), true);
    } else if (native_matrix_grad(low, M, G, K))
      grad_w[base] = bf16_matrix_grad(low_dgi(), rows_view(x, M, K, ldx), &a_t);
    else
      add_at_x<T>(dgi.data(), G, x, ldx, M, G, K, grad_w[base].data_ptr<T>(), low);
    // W_hh's gradient: the state row b of step t started from is h0's row b for t = 0, else
    // row b of step t - 1: dense, the rows B earlier; packed, gathered first
    if (d.is_packed && M > off[1]) {
      h_prev.resize((M - off[1]) * H);
      for (int64_t t = 1; t < Ts; ++t)
        for (int64_t b = 0; b < off[t + 1] - off[t]; ++b)
          std::copy(layer_saved + (off[t - 1] + b) * S, layer_saved + (off[t - 1] + b) * S + H,
                    h_prev.data() + (off[t] - off[1] + b) * H);
    }
    // the rows after step 0's: dense, layer_saved's with row stride S; packed, h_prev's
    const T* later = d.is_packed ? h_prev.data() : layer_saved;
    const int64_t ld_later = d.is_packed ? H : S;
    // the (M, H) states the rows started from, in `dtype`: h0's rows themselves (a view) when
    // every row is step 0's and no conversion is asked
    auto start_states = [&](at::ScalarType dtype) {
      if (M == off[1] && dtype == opts.dtype().toScalarType())
        return h0.select(0, l).narrow(0, 0, off[1]);
      at::Tensor h_rows = at::empty({M, H}, opts.dtype(dtype));
      h_rows.narrow(0, 0, off[1]).copy_(rows_view(h0l, off[1], H, H));
      if (M > off[1])
        h_rows.narrow(0, off[1], M - off[1]).copy_(rows_view(later, M - off[1], H, ld_later));
      return h_rows;
    };
    if (deferred(base + 1)) {
      // the GRU's W_hh beside a deferred W_ih, in bf16 rows: W_ih's A (the r and z columns are
      // the same), so that the two nodes lay those rows out once, and its own n columns
      const bool share_rz = !kLstm && gemm_rows && deferred(base);
      (*rows)[3 * (base + 1)] = kLstm || share_rz ? dgi_rows : deferred_a(dgh_p, dgh_low);
      if (share_rz) (*rows)[3 * (base + 1) + 2] = deferred_a(dgh_p, dgh_low).narrow(1, 2 * H, H);
      (*rows)[3 * (base + 1) + 1] = deferred_x(start_states(opts.dtype().toScalarType()), true);
    } else if (native_matrix_grad(low, M, G, H)) {
      const at::Tensor h_rows = start_states(at::kBFloat16);
      // the hidden-side gate gradients in bf16 as the steps made them, else converted here (the
      // LSTM's are its input-side ones: dgh_p is dgi)
      const at::Tensor a_hh =
          dgh_low.defined() ? dgh_low : kLstm ? low_dgi() : rows_view(dgh_p, M, G, G);
      if (!kLstm && a_t.defined() && a_hh.scalar_type() == at::kBFloat16) {
        // the GRU's r and z gate gradients are the same on both sides: those rows of W_ih's
        // A^T, laid out above, serve W_hh too, and only its n rows are laid out here
        grad_w[base + 1] = bf16_stacked_grad(
            a_t.narrow(0, 0, 2 * H), transposed_bf16(a_hh.narrow(1, 2 * H, H)), h_rows);
      } else {
        grad_w[base + 1] = bf16_matrix_grad(a_hh, h_rows, kLstm ? &a_t : nullptr);
      }
    } else {
      T* gw_hh = grad_w[base + 1].data_ptr<T>();
      add_at_x<T>(dgh_p, G, h0l, H, off[1], G, H, gw_hh, low);
      if (M > off[1])
        add_at_x<T>(dgh_p + off[1] * G, G, later, ld_later, M - off[1], G, H, gw_hh, low);
    }
    // the input's gradient: a native bf16 product reads the bf16 dgi made for the gradients
    // above, when there is one
    const int64_t ldd = back_in.padded();
    auto product = [&](T* out) {
      if (back_in.native && dgi_low.defined()) {
        at::Tensor y = rows_view(out, M, K, ldd);
        back_in.native_into(dgi_low, y);
      } else {
        back_in(dgi.data(), G, M, out, ldd);
      }
    };
    if (l == 0 && ldd == K) {
      product(grad_input.data_ptr<T>());
      continue;
    }
    dx.resize(M * ldd);
    product(dx.data());
    T* dst;
    if (l == 0) {
      dst = grad_input.data_ptr<T>();
    } else {
      dy_below.resize(M * H);
      dst = dy_below.data();
    }
    for (int64_t r = 0; r < M; ++r)
      for (int64_t j = 0; j < K; ++j)
        dst[r * K + j] = dx[r * ldd + j] * (layer_mask ? layer_mask[r * H + j] : T(1));
    dy = dy_below.data();
  }
  if (low)
    for (size_t k = 0; k < weights.size(); ++k)
      if (grad_w[k].defined()) grad_w[k] = grad_w[k].to(weights[k].scalar_type());
  return {grad_input, grad_h0, grad_c0, grad_w};
}

}  // namespace cpu
}  // namespace seq2seq_ext
