// bf16 products (bf16_products.h): the process-wide mode and the tensor-level product.
#include "bf16_products.h"

#include <atomic>

namespace seq2seq_ext {
namespace {
std::atomic<Bf16Gemm> bf16_gemm_mode{Bf16Gemm::kRounded};
}  // namespace

Bf16Gemm bf16_gemm() { return bf16_gemm_mode.load(std::memory_order_relaxed); }
void set_bf16_gemm(Bf16Gemm mode) { bf16_gemm_mode.store(mode, std::memory_order_relaxed); }

at::Tensor bf16_values(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 ? t.to(at::kFloat) : t.to(at::kBFloat16).to(at::kFloat);
}

at::Tensor bf16_mm(const at::Tensor& a, const at::Tensor& b) {
  if (bf16_gemm() == Bf16Gemm::kNative)
    return at::mm(a.to(at::kBFloat16), b.to(at::kBFloat16)).to(at::kFloat);
  return at::mm(bf16_values(a), bf16_values(b));
}

void check_bf16_matrices(const at::Tensor& input, const char* name) {
  TORCH_CHECK(input.scalar_type() == at::kFloat && input.device().is_cpu(), name,
              ": bfloat16 weight matrices need a float32 input on the CPU (the op's autocast "
              "rule), got input ", input.scalar_type(), " on ", input.device());
}

}  // namespace seq2seq_ext
