// bf16 products (bf16_products.h): the process-wide mode and the tensor-level product.
#include "bf16_products.h"

#include <ATen/autocast_mode.h>

#include "cpu/amx_gemm.h"
#include "cpu/bf16.h"

#include <atomic>

namespace seq2seq_ext {
namespace {
std::atomic<Bf16Gemm> bf16_gemm_mode{Bf16Gemm::kRounded};
std::atomic<bool> amx_mode{false};
}  // namespace

Bf16Gemm bf16_gemm() { return bf16_gemm_mode.load(std::memory_order_relaxed); }

bool native_product(int64_t m, int64_t k, int64_t n) {
  return bf16_gemm() == Bf16Gemm::kNative && m * k * n >= kNativeProductWork;
}
void set_bf16_gemm(Bf16Gemm mode) { bf16_gemm_mode.store(mode, std::memory_order_relaxed); }

bool amx_products() { return amx_mode.load(std::memory_order_relaxed); }

void set_amx_products(bool on) {
  TORCH_CHECK(!on || cpu::amx_usable(),
              "set_amx_products: this CPU or OS does not run AMX-BF16 (cpuid's AMX-TILE and "
              "AMX-BF16, and Linux's permission for tile data)");
  amx_mode.store(on, std::memory_order_relaxed);
}

bool amx_product(int64_t m, int64_t k, int64_t n) {
  return amx_products() && m <= kAmxRows && native_product(m, k, n) && cpu::amx_shape(k, n);
}

at::Tensor bf16_values(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 ? t.to(at::kFloat) : t.to(at::kBFloat16).to(at::kFloat);
}

at::Tensor bf16_mm(const at::Tensor& a, const at::Tensor& b) {
  if (native_product(a.size(0), a.size(1), b.size(1)))
    return at::mm(a.to(at::kBFloat16), b.to(at::kBFloat16)).to(at::kFloat);
  return at::mm(bf16_values(a), bf16_values(b));
}

void bf16_addmm_out(at::Tensor& out, const at::Tensor& c, const at::Tensor& a,
                    const at::Tensor& b) {
  // the AMX sums start from c: a bias of out's width, or a matrix of out's shape
  const bool c_ok = c.scalar_type() == at::kFloat && out.dim() == 2 &&
                    (c.dim() == 1 ? c.is_contiguous() && c.size(0) == out.size(1)
                                  : c.dim() == 2 && c.sizes() == out.sizes() && c.stride(1) == 1);
  if (amx_product(a.size(0), a.size(1), b.size(1)) && out.is_cpu() &&
      out.scalar_type() == at::kFloat && out.stride(1) == 1 && b.scalar_type() == at::kBFloat16 &&
      c_ok) {
    const at::Tensor a_low = bf16_rows(a);
    cpu::amx_gemm(a_low.const_data_ptr<c10::BFloat16>(), a_low.stride(0), a_low.size(0),
                  *cpu::amx_matrix(b), c.const_data_ptr<float>(), c.dim() == 1 ? 0 : c.stride(0),
                  out.mutable_data_ptr<float>(), out.stride(0));
    return;
  }
  if (native_product(a.size(0), a.size(1), b.size(1)))  // widened in place, then c added:
    out.copy_(at::mm(a.to(at::kBFloat16), b.to(at::kBFloat16))).add_(c);  // 0.7x a mixed add
  else
    at::addmm_out(out, c, bf16_values(a), bf16_values(b));
}

at::Tensor bf16_matrix_grad(const at::Tensor& a, const at::Tensor& x, at::Tensor* a_t) {
  if (native_product(a.size(1), a.size(0), x.size(1)) && a.is_cpu()) {  // a^T laid out
    at::Tensor own;
    at::Tensor& t = a_t ? *a_t : own;
    if (!t.defined()) t = cpu::transposed_bf16(a.stride(1) == 1 ? a : a.contiguous());
    return at::mm(t, bf16_rows(x));
  }
  return at::mm(bf16_values(a).t(), bf16_values(x)).to(at::kBFloat16);
}

at::Tensor bf16_rows(const at::Tensor& x) {
  if (x.scalar_type() == at::kFloat && x.stride(1) == 1 && x.is_cpu())
    return cpu::narrowed_rows(x.const_data_ptr<float>(), x.stride(0), x.size(0), x.size(1));
  return x.to(at::kBFloat16, false, false, at::MemoryFormat::Contiguous);
}

at::Tensor bf16_stacked_grad(const at::Tensor& first_t, const at::Tensor& last_t,
                             const at::Tensor& x) {
  const int64_t first = first_t.size(0);
  at::Tensor grad = at::empty({first + last_t.size(0), x.size(1)}, x.options());
  at::Tensor top = grad.narrow(0, 0, first), bottom = grad.narrow(0, first, last_t.size(0));
  at::mm_out(top, first_t, x);
  at::mm_out(bottom, last_t, x);
  return grad;
}

at::Tensor autocast_cpu_float(const at::Tensor& t) {
  return at::autocast::cached_cast(at::kFloat, t, c10::DeviceType::CPU);
}

std::optional<at::Tensor> autocast_cpu_float(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? std::optional<at::Tensor>(autocast_cpu_float(*t)) : t;
}

at::Tensor autocast_cpu_matrix(const at::Tensor& w) {
  return at::autocast::get_autocast_dtype(at::kCPU) == at::kBFloat16
             ? at::autocast::cached_cast(at::kBFloat16, w, c10::DeviceType::CPU)
             : autocast_cpu_float(w);
}

void check_bf16_matrices(const at::Tensor& input, const char* name) {
  TORCH_CHECK(input.scalar_type() == at::kFloat && input.device().is_cpu(), name,
              ": bfloat16 weight matrices need a float32 input on the CPU (the op's autocast "
              "rule), got input ", input.scalar_type(), " on ", input.device());
}

}  // namespace seq2seq_ext
