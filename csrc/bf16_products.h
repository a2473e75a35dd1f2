// bf16 products: the weight matrices of the recurrent layer ops in bfloat16 beside float32
// activations (the ops under CPU autocast to bfloat16). Every product takes bf16 operands and
// sums in float32, as a bf16 GEMM with float32 accumulation does; gate arithmetic, states,
// biases and gradients stay float32 (a matrix's gradient is rounded to bf16 once, at the end).
//
// A product of two bf16 values is exact in float32, so float32 kernels on operands rounded to
// bf16 values (Bf16Gemm::kRounded) give a bf16 GEMM's products at float32's rate, on any CPU;
// Bf16Gemm::kNative (CPUs with bf16 instructions) runs the large products as ATen bf16 GEMMs
// (oneDNN), whose results are rounded to bf16 before they meet the float32 gates, or, those of
// few rows on CPUs with AMX, on AMX tiles with float32 results (amx_products). The mode is
// chosen once per process, from Python (seq2seq_ext/ops.py, set_bf16_gemm).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace seq2seq_ext {

enum class Bf16Gemm { kRounded, kNative };
Bf16Gemm bf16_gemm();
void set_bf16_gemm(Bf16Gemm mode);

// Under kNative, the products of at least this many multiply-adds run as bf16 GEMMs; smaller
// ones as under kRounded, where an ATen bf16 GEMM's fixed cost and conversions exceed the
// arithmetic (measured with AMX, one thread: 64 x 128 x 512 breaks even at about 40 us; at
// 64 x 32 x 128, the chapter's sizes, float32 takes 5 us and bf16 23). native_product(m, k, n):
// an (m, k) x (k, n) one.
constexpr int64_t kNativeProductWork = int64_t(1) << 22;
bool native_product(int64_t m, int64_t k, int64_t n);

// Under kNative, whether the products of few rows (at most kAmxRows: a time step's or a one-step
// call's) with a matrix both of whose sizes are multiples of 32 run on AMX tiles over the matrix
// laid out once per matrix and version (cpu/amx_gemm.h), float32 results, instead of ATen bf16
// GEMMs that lay the matrix out at every call. On by default where the CPU and OS run AMX-BF16
// (seq2seq_ext/ops.py, set_amx_products); set_amx_products(true) needs cpu::amx_usable().
constexpr int64_t kAmxRows = 256;
bool amx_products();
void set_amx_products(bool on);
// amx_products() and an (m, k) x (k, n) product that takes them (native_product, m <= kAmxRows,
// cpu::amx_shape(k, n)).
bool amx_product(int64_t m, int64_t k, int64_t n);

// t's values rounded to bfloat16, as a float32 tensor (t float32 or bfloat16).
at::Tensor bf16_values(const at::Tensor& t);

// a @ b (2-D, float32 or bfloat16) with both operands rounded to bf16 and float32 sums: a
// float32 result, computed as bf16_gemm() says.
at::Tensor bf16_mm(const at::Tensor& a, const at::Tensor& b);

// out = c + a @ b with a @ b as bf16_mm computes it (c broadcast like a bias, or a matrix of
// out's shape, not overlapping out); under Bf16Gemm::kNative the bf16 GEMM's result is widened
// into out itself, with no float32 temporary, or, for an amx_product, the AMX sums are added to
// c into out (b laid out once, cached).
void bf16_addmm_out(at::Tensor& out, const at::Tensor& c, const at::Tensor& a,
                    const at::Tensor& b);

// x (2-D, float32 or bfloat16) as bfloat16 rows with unit column stride: float32 rows with unit
// column stride rounded in one pass (cpu::narrow_rows), bfloat16 ones as they are.
at::Tensor bf16_rows(const at::Tensor& x);

// a^T @ x (a (M, N), x (M, K), float32 or bfloat16), both rounded to bf16 with float32 sums:
// the (N, K) gradient of a bf16 weight matrix over M rows, in bfloat16, rounded once. Under
// Bf16Gemm::kNative one bf16 GEMM on bf16 copies: a^T laid out (cpu::transposed_bf16), x
// contiguous.
// a_t, when given, keeps a^T laid out for another gradient over the same a (the LSTM's W_ih and
// W_hh): made by the first call, reused by the next.
at::Tensor bf16_matrix_grad(const at::Tensor& a, const at::Tensor& x, at::Tensor* a_t = nullptr);

// The bf16 gradient of a matrix whose A^T is laid out in two parts, first_t over last_t (the
// GRU's W_hh: its r and z rows are those of W_ih's laid-out gate gradients), times x (M, K)
// bf16: one GEMM into each part's rows.
at::Tensor bf16_stacked_grad(const at::Tensor& first_t, const at::Tensor& last_t,
                             const at::Tensor& x);

// The layer ops' CPU autocast rules, through autocast's cast cache: a floating argument in
// float32 (float64 stays), a weight matrix in bfloat16 when autocast's dtype is bfloat16 (else
// as a floating argument).
at::Tensor autocast_cpu_float(const at::Tensor& t);
std::optional<at::Tensor> autocast_cpu_float(const std::optional<at::Tensor>& t);
at::Tensor autocast_cpu_matrix(const at::Tensor& w);

// The check every recurrent op runs on its weight matrices: bfloat16 matrices only beside a
// float32 input on the CPU (the ops' autocast rules); `name` names the first matrix.
void check_bf16_matrices(const at::Tensor& input, const char* name);

}  // namespace seq2seq_ext
