// MKL's packed sgemm, found in the running process (mkl_packed.h says why).
#include "mkl_packed.h"

#include <ATen/ops/mm_ops.h>

#include <algorithm>
#include <atomic>

#if defined(__linux__) || defined(__APPLE__)
#include <dlfcn.h>
#define SEQ2SEQ_EXT_DLSYM 1
#endif

namespace seq2seq_ext {
namespace cpu {
namespace {

// CBLAS's enumerations, as MKL's headers number them.
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;
using MklInt = int;  // the LP64 interface, the one PyTorch's x86 wheels link

using PackGetSize = size_t (*)(int identifier, MklInt m, MklInt n, MklInt k);
using Pack = void (*)(int layout, int identifier, int trans, MklInt m, MklInt n, MklInt k,
                      float alpha, const float* src, MklInt ld, float* dest);
using Compute = void (*)(int layout, MklInt transa, MklInt transb, MklInt m, MklInt n, MklInt k,
                         const float* a, MklInt lda, const float* b, MklInt ldb, float beta,
                         float* c, MklInt ldc);

struct Api {
  PackGetSize get_size = nullptr;
  Pack pack = nullptr;
  Compute compute = nullptr;
  bool found() const { return get_size && pack && compute; }
};

#ifdef SEQ2SEQ_EXT_DLSYM
Api lookup(void* handle) {
  Api a;
  a.get_size = reinterpret_cast<PackGetSize>(dlsym(handle, "cblas_sgemm_pack_get_size"));
  a.pack = reinterpret_cast<Pack>(dlsym(handle, "cblas_sgemm_pack"));
  a.compute = reinterpret_cast<Compute>(dlsym(handle, "cblas_sgemm_compute"));
  return a;
}
#endif

const Api& api() {
  static const Api found = [] {
    Api a;
#ifdef SEQ2SEQ_EXT_DLSYM
    // the process's global symbols, else those of the library that holds ATen's operators
    // (libtorch_cpu, loaded without RTLD_GLOBAL when torch is imported from Python)
    a = lookup(RTLD_DEFAULT);
    Dl_info info;
    if (!a.found() && dladdr(reinterpret_cast<void*>(&at::_ops::mm::call), &info) &&
        info.dli_fname != nullptr) {
      if (void* lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD)) {
        a = lookup(lib);
        if (!a.found()) dlclose(lib);  // else kept open, as the process keeps it anyway
      }
    }
#endif
    return a;
  }();
  return found;
}

std::atomic<bool> enabled{true};
std::atomic<int64_t> packs{0};

bool fits(int64_t v) { return v >= 0 && v <= int64_t(0x7fffffff); }

}  // namespace

bool mkl_packed_usable() { return api().found(); }

bool mkl_packed_products() { return mkl_packed_usable() && enabled.load(std::memory_order_relaxed); }

void set_mkl_packed_products(bool on) {
  TORCH_CHECK(!on || mkl_packed_usable(),
              "set_mkl_packed_products: PyTorch in this process is not built with MKL "
              "(cblas_sgemm_pack not found)");
  enabled.store(on, std::memory_order_relaxed);
}

int64_t mkl_packs_made() { return packs.load(std::memory_order_relaxed); }

bool mkl_packable(const at::Tensor& w_kn) {
  return w_kn.dim() == 2 && w_kn.scalar_type() == at::kFloat && w_kn.is_cpu() &&
         w_kn.stride(0) == 1 && w_kn.stride(1) >= std::max<int64_t>(w_kn.size(0), 1) &&
         fits(w_kn.size(0)) && fits(w_kn.size(1)) && fits(w_kn.stride(1));
}

std::unique_ptr<MklPackedMatrix> mkl_pack(const at::Tensor& w_kn, int64_t rows) {
  TORCH_INTERNAL_ASSERT(mkl_packed_usable() && mkl_packable(w_kn) && fits(rows));
  packs.fetch_add(1, std::memory_order_relaxed);
  auto out = std::make_unique<MklPackedMatrix>();
  const int64_t K = w_kn.size(0), N = w_kn.size(1);
  out->K = K;
  out->N = N;
  out->rows = rows;
  const Api& a = api();
  const size_t bytes = a.get_size(kBMatrix, rows, N, K);
  out->buffer = at::empty({static_cast<int64_t>(bytes)}, w_kn.options().dtype(at::kByte));
  // the (N, K) weight under w_kn, read transposed
  a.pack(kRowMajor, kBMatrix, kTrans, rows, N, K, 1.0f, w_kn.const_data_ptr<float>(),
         w_kn.stride(1), reinterpret_cast<float*>(out->buffer.mutable_data_ptr<uint8_t>()));
  return out;
}

std::unique_ptr<MklPackedMatrix> mkl_pack_if_it_pays(const at::Tensor& w_kn, int64_t rows,
                                                     int64_t calls) {
  if (!mkl_packed_pays(rows, calls) || !mkl_packed_products() || !mkl_packable(w_kn))
    return nullptr;
  return mkl_pack(w_kn, rows);
}

void mkl_packed_gemm(const float* X, int64_t ldx, int64_t M, const MklPackedMatrix& B,
                     const float* init, int64_t ld_init, float* Y, int64_t ldy) {
  TORCH_INTERNAL_ASSERT(M <= B.rows && mkl_packed_usable());
  const int64_t N = B.N;
  if (M == 0 || N == 0) return;
  if (init && (init != Y || ld_init != ldy))
    for (int64_t m = 0; m < M; ++m)
      std::copy(init + m * ld_init, init + m * ld_init + N, Y + m * ldy);
  if (B.K == 0) {  // no products: Y is init, or zeros
    if (!init)
      for (int64_t m = 0; m < M; ++m) std::fill(Y + m * ldy, Y + m * ldy + N, 0.f);
    return;
  }
  api().compute(kRowMajor, kNoTrans, kPacked, M, N, B.K, X, std::max<int64_t>(ldx, B.K),
                reinterpret_cast<const float*>(B.buffer.const_data_ptr<uint8_t>()), N,
                init ? 1.0f : 0.0f, Y, std::max<int64_t>(ldy, N));
}

}  // namespace cpu
}  // namespace seq2seq_ext
