// bf16 products on AMX tiles, with the matrix laid out once and reused.
//
// What it buys: a recurrent layer multiplies the same weight matrix once per time step (and a
// decoder's one-step calls once per call) by 128 rows or fewer. An ATen bf16 GEMM (oneDNN)
// lays the matrix out in its tile format at every call, so at batch 128 and hidden 512 such a
// product ran at 470-570 GFLOP/s in the training step, a quarter of the rate of the step's large
// GEMMs. Here the matrix is laid out once per matrix and version (an optimizer step changes the
// version; autocast's bf16 copy of a weight is a new tensor each step) and every product reads
// the laid-out copy: 2 x 2 tiles of 16 x 16 float32 sums per block of 32 rows and 32 columns,
// TDPBF16PS over 32 values of the inner dimension at a time. The result is float32 (a bf16 GEMM
// through ATen rounds it to bf16), with the bias added as the sums start.
//
// Used where the CPU and the OS run AMX-BF16 (amx_usable: cpuid and the kernel's permission for
// tile data, asked once per process) and the matrix's both sizes are multiples of 32
// (amx_shape); the callers run ATen's GEMM otherwise.
#pragma once

#include <ATen/ATen.h>

#include <memory>

namespace seq2seq_ext {
namespace cpu {

bool amx_usable();

// Whether a (K, N) matrix can be laid out for amx_gemm.
inline bool amx_shape(int64_t K, int64_t N) { return K > 0 && N > 0 && K % 32 == 0 && N % 32 == 0; }

// A (K, N) bf16 matrix laid out as AMX-BF16 B tiles: for each 32 columns, for each 32 values of
// K, two tiles (16 columns each) of 16 rows of 16 pairs (K even, K odd).
struct AmxMatrix {
  int64_t K = 0, N = 0;
  at::Tensor data;  // bf16, K * N values in the order above
};

// w_kn: a (K, N) bf16 matrix, any strides (a weight or its transpose), amx_shape(K, N).
std::shared_ptr<const AmxMatrix> amx_layout(const at::Tensor& w_kn);

// amx_layout(w_kn) cached for this thread by the memory w_kn views (storage, offset, sizes,
// strides) and its version: the same copy while the storage is alive and unchanged, whichever
// view of it asks.
std::shared_ptr<const AmxMatrix> amx_matrix(const at::Tensor& w_kn);

// C (M, N), row stride ldc, = init + A (M, K) bf16, row stride lda, times B, in float32 sums.
// init: (M, N) floats with row stride ld_init, or one row for all (ld_init 0: a bias), or null
// for none; it may be C itself. amx_usable() must hold.
void amx_gemm(const c10::BFloat16* A, int64_t lda, int64_t M, const AmxMatrix& B,
              const float* init, int64_t ld_init, float* C, int64_t ldc);

}  // namespace cpu
}  // namespace seq2seq_ext
