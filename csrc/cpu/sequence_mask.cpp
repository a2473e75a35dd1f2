// Sequence mask on the CPU: X[b, t, ...] = value for every step t at or after valid_len[b].
#include <ATen/Parallel.h>

#include "../lengths.h"
#include "../sequence_mask.h"

namespace seq2seq_ext {
namespace cpu {
void sequence_mask_(at::Tensor& X, const at::Tensor& valid_len, const at::Scalar& value) {
  const int64_t batch = X.size(0), steps = X.size(1);
  const auto start = first_masked_steps(valid_len, steps);
  const int64_t inner = contiguous_inner(X);
  if (inner < 0) {  // rare layouts: fill through ATen, one sequence at a time
    const at::Scalar v = mask_scalar(X, value);
    for (int64_t b = 0; b < batch; ++b)
      if (start[b] < steps) X.select(0, b).narrow(0, start[b], steps - start[b]).fill_(v);
    return;
  }
  const int64_t sb = X.stride(0), st = X.stride(1);
  AT_DISPATCH_ALL_TYPES_AND_COMPLEX_AND3(at::kBool, at::kHalf, at::kBFloat16, X.scalar_type(),
                                         "sequence_mask_cpu", [&] {
    const scalar_t v = mask_value<scalar_t>(value, X.scalar_type());
    scalar_t* base = X.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, steps * inner));
    at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        scalar_t* row = base + b * sb;
        if (st == inner) {
          std::fill(row + start[b] * st, row + steps * st, v);
        } else {
          for (int64_t t = start[b]; t < steps; ++t) std::fill(row + t * st, row + t * st + inner, v);
        }
      }
    });
  });
}

}  // namespace cpu
}  // namespace seq2seq_ext
