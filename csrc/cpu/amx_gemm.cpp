// AMX-BF16 products over a matrix laid out once (see amx_gemm.h).
#include "amx_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <unordered_map>

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define SEQ2SEQ_EXT_AMX 1
#endif

namespace seq2seq_ext {
namespace cpu {
namespace {

#ifdef SEQ2SEQ_EXT_AMX
// Linux's arch_prctl request for an extended state component (tile data is component 18)
constexpr int kReqXcompPerm = 0x1023;
constexpr int kXfeatureTileData = 18;

bool amx_probe() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = (d >> 24) & 1, bf16 = (d >> 22) & 1;
  if (!tile || !bf16) return false;
  // the kernel grants a process the tile state on request (once; oneDNN asks the same)
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureTileData) == 0;
}

// palette 1: tiles 0-3 the 2 x 2 blocks of 16 x 16 float32 sums, 4-5 two 16-row blocks of A
// (32 bf16 a row), 6-7 two blocks of B (16 rows of 16 pairs); every tile 16 rows of 64 bytes
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

__attribute__((target("amx-tile,amx-bf16"))) void configure_tiles() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  _tile_loadconfig(&cfg);
}

// One block of 32 rows and 32 columns: C (ldc floats) = init + A (32 rows, lda values) x panel
// (the K / 32 pairs of B tiles of these columns); init: 32 rows, row stride ld_init (0: one row
// for all, a bias), or null for zeros.
// pf: pf_lines cache lines of B to prefetch per block of K, from there on (the next chunk's).
__attribute__((target("amx-tile,amx-bf16"))) inline void block_32x32(
    const c10::BFloat16* A, int64_t lda, const c10::BFloat16* panel, int64_t kblocks,
    const float* init, int64_t ld_init, float* C, int64_t ldc, const char* pf,
    int64_t pf_lines) {
  if (init) {
    const int64_t s = ld_init * static_cast<int64_t>(sizeof(float));
    _tile_loadd(0, init, s);
    _tile_loadd(1, init + 16, s);
    _tile_loadd(2, init + 16 * ld_init, s);
    _tile_loadd(3, init + 16 * ld_init + 16, s);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  const int64_t a_stride = lda * static_cast<int64_t>(sizeof(c10::BFloat16));
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    for (int64_t i = 0; i < pf_lines; ++i)
      _mm_prefetch(pf + (kb * pf_lines + i) * 64, _MM_HINT_T0);
    // each load just before the first product that reads it
    _tile_loadd(4, A + kb * 32, a_stride);
    _tile_loadd(6, panel + kb * 1024, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, panel + kb * 1024 + 512, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, A + 16 * lda + kb * 32, a_stride);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  const int64_t c_stride = ldc * static_cast<int64_t>(sizeof(float));
  _tile_stored(0, C, c_stride);
  _tile_stored(1, C + 16, c_stride);
  _tile_stored(2, C + 16 * ldc, c_stride);
  _tile_stored(3, C + 16 * ldc + 16, c_stride);
}

constexpr int64_t kChunk = 256;

__attribute__((target("amx-tile,amx-bf16"))) void gemm(const c10::BFloat16* A, int64_t lda,
                                                        int64_t M, const AmxMatrix& B,
                                                        const float* init, int64_t ld_init,
                                                        float* C, int64_t ldc) {
  const int64_t K = B.K, N = B.N, full = M / 32 * 32, blocks = (M + 31) / 32;
  const c10::BFloat16* packed = B.data.const_data_ptr<c10::BFloat16>();
  // the last M % 32 rows: copied into 32 zero-padded rows, their sums into a 32 x 32 block
  std::vector<c10::BFloat16> a_tail(full < M ? 32 * K : 0, c10::BFloat16(0.0f));
  for (int64_t m = full; m < M; ++m)
    std::memcpy(a_tail.data() + (m - full) * K, A + m * lda, K * sizeof(c10::BFloat16));
  alignas(64) float c_tail[32 * 32];
  configure_tiles();
  // columns outside, then chunks of kChunk values of K, rows inside: a chunk of a panel of B
  // (kChunk x 32, 16 KiB) stays in L1 for every 32 rows; the sums of a chunk start from the
  // previous chunk's, stored in C
  for (int64_t n0 = 0; n0 < N; n0 += 32) {
    const c10::BFloat16* panel = packed + n0 * K;
    const float* i0 = init ? init + n0 : nullptr;
    if (full < M && i0) {  // the tail rows' start values into their block
      for (int64_t m = full; m < M; ++m)
        std::memcpy(c_tail + (m - full) * 32, i0 + m * ld_init, 32 * sizeof(float));
    }
    for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
      const int64_t kb = std::min(kChunk, K - k0) / 32;
      const c10::BFloat16* chunk = panel + k0 * 32;
      // the blocks of rows share the prefetching of the next chunk of B (it follows this one
      // in memory, in this panel or the next), 32 lines per block of K over all of them
      const char* next = reinterpret_cast<const char*>(chunk + kb * 1024);
      const int64_t pf_lines = std::max<int64_t>(1, 32 / blocks);
      int64_t block = 0;
      for (int64_t m0 = 0; m0 < full; m0 += 32, ++block) {
        float* c = C + m0 * ldc + n0;
        const float* start = k0 > 0 ? c : i0 ? i0 + m0 * ld_init : nullptr;
        block_32x32(A + m0 * lda + k0, lda, chunk, kb, start, k0 > 0 ? ldc : ld_init, c, ldc,
                    next + block * kb * pf_lines * 64, pf_lines);
      }
      if (full < M) {
        const float* start = k0 > 0 || i0 ? c_tail : nullptr;
        block_32x32(a_tail.data() + k0, K, chunk, kb, start, 32, c_tail, 32,
                    next + block * kb * pf_lines * 64, pf_lines);
      }
    }
    for (int64_t m = full; m < M; ++m)
      std::memcpy(C + m * ldc + n0, c_tail + (m - full) * 32, 32 * sizeof(float));
  }
  _tile_release();
}
#endif  // SEQ2SEQ_EXT_AMX

// A laid-out matrix by the memory it was laid out from: its storage, offset, sizes and strides
// (any view of the same values finds it), with the storage held weakly and its version.
struct Key {
  const c10::StorageImpl* storage;
  int64_t offset, K, N, sk, sn;
  bool operator==(const Key& o) const {
    return storage == o.storage && offset == o.offset && K == o.K && N == o.N && sk == o.sk &&
           sn == o.sn;
  }
};
struct KeyHash {
  size_t operator()(const Key& k) const {
    size_t h = std::hash<const void*>()(k.storage);
    for (int64_t v : {k.offset, k.K, k.N, k.sk, k.sn}) h = h * 1000003u ^ std::hash<int64_t>()(v);
    return h;
  }
};
struct Entry {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  uint32_t version;
  std::shared_ptr<const AmxMatrix> matrix;
};

}  // namespace

bool amx_usable() {
#ifdef SEQ2SEQ_EXT_AMX
  static const bool usable = amx_probe();
  return usable;
#else
  return false;
#endif
}

std::shared_ptr<const AmxMatrix> amx_layout(const at::Tensor& w_kn) {
  TORCH_INTERNAL_ASSERT(w_kn.dim() == 2 && w_kn.scalar_type() == at::kBFloat16 &&
                        amx_shape(w_kn.size(0), w_kn.size(1)));
  auto out = std::make_shared<AmxMatrix>();
  const int64_t K = w_kn.size(0), N = w_kn.size(1);
  out->K = K;
  out->N = N;
  out->data = at::empty({K * N}, w_kn.options().memory_format(at::MemoryFormat::Contiguous));
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w_kn.const_data_ptr<c10::BFloat16>());
  uint16_t* dst = reinterpret_cast<uint16_t*>(out->data.mutable_data_ptr<c10::BFloat16>());
  const int64_t sk = w_kn.stride(0), sn = w_kn.stride(1);
  // dst[n / 32][k / 32][(n % 32) / 16][(k % 32) / 2][n % 16][k % 2] = w_kn[k][n]: each tile a
  // 16 x 16 block of (K even, K odd) pairs
  const bool pairs = sk == 1 && sn % 2 == 0 && reinterpret_cast<uintptr_t>(src) % 4 == 0;
  at::parallel_for(0, N / 32, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      uint16_t* o = dst + p * 32 * K;
      for (int64_t k0 = 0; k0 < K; k0 += 32)
        for (int64_t t = 0; t < 2; ++t, o += 512) {
          const uint16_t* from = src + k0 * sk + (p * 32 + t * 16) * sn;
          if (pairs) {  // the transpose of a weight: its rows hold the pairs, a 16 x 16 transpose
            at::vec::transpose_mxn<float>(reinterpret_cast<const float*>(from), sn / 2,
                                          reinterpret_cast<float*>(o), 16, 16, 16);
            continue;
          }
#if defined(CPU_CAPABILITY_AVX512)
          if (sn == 1) {  // a row-major weight: rows k and k + 1 interleaved
            const __m512i order = _mm512_set_epi16(
                31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5,
                20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
            for (int64_t r = 0; r < 16; ++r) {
              const uint16_t* even = from + 2 * r * sk;
              const __m512i both = _mm512_inserti64x4(
                  _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(even))),
                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(even + sk)), 1);
              _mm512_storeu_si512(o + 32 * r, _mm512_permutexvar_epi16(order, both));
            }
            continue;
          }
#endif
          for (int64_t r = 0; r < 16; ++r)
            for (int64_t c = 0; c < 16; ++c) {
              o[32 * r + 2 * c] = from[2 * r * sk + c * sn];
              o[32 * r + 2 * c + 1] = from[(2 * r + 1) * sk + c * sn];
            }
        }
    }
  });
  return out;
}

std::shared_ptr<const AmxMatrix> amx_matrix(const at::Tensor& w_kn) {
  // per thread; an entry whose storage is gone is dropped at the next insertion (under autocast
  // every weight has a new bf16 copy each training step)
  thread_local std::unordered_map<Key, Entry, KeyHash> table;
  const Key key{w_kn.storage().unsafeGetStorageImpl(), w_kn.storage_offset(), w_kn.size(0),
                w_kn.size(1), w_kn.stride(0), w_kn.stride(1)};
  const uint32_t version = w_kn._version();
  auto it = table.find(key);
  if (it != table.end()) {
    auto alive = it->second.storage.lock();
    if (alive && it->second.version == version)  // a live weak pointer: the same storage
      return it->second.matrix;
  }
  for (auto e = table.begin(); e != table.end();)
    e = e->second.storage.expired() ? table.erase(e) : std::next(e);
  auto matrix = amx_layout(w_kn);
  table.insert_or_assign(key, Entry{w_kn.storage().getWeakStorageImpl(), version, matrix});
  return matrix;
}

void amx_gemm(const c10::BFloat16* A, int64_t lda, int64_t M, const AmxMatrix& B,
              const float* init, int64_t ld_init, float* C, int64_t ldc) {
#ifdef SEQ2SEQ_EXT_AMX
  TORCH_INTERNAL_ASSERT(amx_usable());
  if (M > 0) gemm(A, lda, M, B, init, ld_init, C, ldc);
#else
  (void)A, (void)lda, (void)M, (void)B, (void)init, (void)ld_init, (void)C, (void)ldc;
  TORCH_INTERNAL_ASSERT(false, "amx_gemm: not built for this CPU");
#endif
}

}  // namespace cpu
}  // namespace seq2seq_ext
