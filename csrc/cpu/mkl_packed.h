// float32 products over a matrix that MKL lays out once and every time step reuses.
//
// What it buys: ATen's float32 GEMM on this CPU build is MKL's sgemm, which copies a weight it
// reads transposed into its internal blocked layout at every call. A recurrent layer's forward
// multiplies the batch's rows by the same W_hh^T once per time step, so that copy is repeated T
// times per layer; MKL's packed API (sgemm_pack once, sgemm_compute per step) keeps one copy
// for the whole call. A 12-step GRU forward at hidden 512 ran 1.05x faster at batch 128 and
// 1.46x at batch 8 on an Intel Xeon (one thread, benchmarks/RESULTS.md). On an AMD EPYC (Zen 4),
// where MKL does not run its own fastest code, the packed products bought nothing and cost 11% at
// batch 8: the Python package switches them on by default on Intel CPUs only.
//
// The API is MKL's, not PyTorch's: its three C symbols are looked up once in the running
// process, where libtorch_cpu exports them when PyTorch is built with MKL (the x86 wheels).
// Where they are absent (another BLAS) mkl_packed_usable() is false and the callers use ATen.
#pragma once

#include <ATen/ATen.h>

#include <memory>

namespace seq2seq_ext {
namespace cpu {

// Whether MKL's packed sgemm is in the process and packed products are switched on
// (set_mkl_packed_products; ops.mkl_packed_default() says when it starts on).
bool mkl_packed_usable();
bool mkl_packed_products();
void set_mkl_packed_products(bool on);
// How many matrices mkl_pack has laid out in this process (the tests see which calls take the
// packed products by it).
int64_t mkl_packs_made();

// Whether laying a matrix out once pays for `calls` products of at most `rows` rows: its layout
// costs about what three 128-row products save (0.35-0.45 ms for a 512 x 1536 matrix, one
// thread), and a product of one row is a matrix-vector product, which MKL runs without a layout
// and faster than over a packed matrix.
inline bool mkl_packed_pays(int64_t rows, int64_t calls) { return rows >= 4 && calls >= 4; }

// A (K, N) float32 matrix in MKL's packed layout, for products of at most `rows` rows.
struct MklPackedMatrix {
  int64_t K = 0, N = 0, rows = 0;
  at::Tensor buffer;  // bytes; MKL's layout, not to be moved
};

// Whether a (K, N) view is packed here: float32, the transpose of a row-major (N, K) weight
// (the forward's W_hh^T). Over a row-major (K, N) matrix (the backward's W_hh) MKL's GEMM reads
// the matrix where it is, and laying it out bought nothing: the backward's products got no
// faster, while the layout costs about 0.4 ms a 512 x 1536 matrix.
bool mkl_packable(const at::Tensor& w_kn);

// w_kn packed for products of at most `rows` rows; mkl_packed_usable() and mkl_packable(w_kn)
// must hold.
std::unique_ptr<MklPackedMatrix> mkl_pack(const at::Tensor& w_kn, int64_t rows);

// mkl_pack(w_kn, rows) for `calls` products that the caller runs through BLAS, where packed
// products are on, w_kn is packable and the layout pays (mkl_packed_pays); null otherwise.
std::unique_ptr<MklPackedMatrix> mkl_pack_if_it_pays(const at::Tensor& w_kn, int64_t rows,
                                                     int64_t calls);

// Y (M, N), row stride ldy, = init + X (M, K), row stride ldx, times the packed matrix;
// M <= B.rows. init as amx_gemm's: (M, N) floats with row stride ld_init, or one row for all
// (ld_init 0: a bias), or null for none; it may be Y itself.
void mkl_packed_gemm(const float* X, int64_t ldx, int64_t M, const MklPackedMatrix& B,
                     const float* init, int64_t ld_init, float* Y, int64_t ldy);

}  // namespace cpu
}  // namespace seq2seq_ext
