// Sequence mask on CUDA: X[b, t, ...] = value for every step t at or after valid_len[b].
//
// X is seen as (B, T, inner) where inner is the product of the trailing dimensions, which must
// form one contiguous run (the usual case); other layouts go through ATen's masked_fill_ with a
// broadcast (B, T, 1, ...) mask. The kernel is a 2-D grid-stride loop: grid.y walks sequences,
// grid.x walks the flat index j = t * inner + i of one sequence's masked region
// [start[b] * inner, T * inner), so threads touch only masked elements and never divide when
// steps are also contiguous (stride(1) == inner). Each sequence's first masked step is computed
// from valid_len inside the kernel: one launch, no host synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../lengths.h"
#include "../sequence_mask.h"
#include "device_index.cuh"

namespace seq2seq_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kTargetBlocks = 1 << 16;

template <typename scalar_t, bool kStepsContiguous>
__global__ void sequence_mask_kernel(scalar_t* __restrict__ X, int64_t B, int64_t T,
                                     int64_t inner, int64_t sb, int64_t st,
                                     DeviceLengths len, scalar_t value) {
  const int64_t span = T * inner;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    scalar_t* base = X + b * sb;
    for (int64_t j = first_masked_step(len, b, T) * inner + static_cast<int64_t>(blockIdx.x) * blockDim.x +
                     threadIdx.x;
         j < span; j += step) {
      if constexpr (kStepsContiguous) {
        base[j] = value;
      } else {
        const int64_t t = j / inner;
        base[t * st + (j - t * inner)] = value;
      }
    }
  }
}

}  // namespace

void sequence_mask_(at::Tensor& X, const at::Tensor& valid_len, const at::Scalar& value) {
  const int64_t batch = X.size(0), steps = X.size(1);
  const c10::cuda::CUDAGuard guard(X.device());
  const int64_t inner = contiguous_inner(X);
  if (inner < 0) {  // rare layouts: a broadcast mask through ATen, no host synchronisation
    const at::Tensor start = first_masked_steps_tensor(valid_len, steps);
    const at::Tensor t = at::arange(steps, start.options());
    std::vector<int64_t> shape(X.dim(), 1);
    shape[0] = batch;
    shape[1] = steps;
    X.masked_fill_(t.unsqueeze(0).ge(start.unsqueeze(1)).view(shape), mask_scalar(X, value));
    return;
  }
  const int64_t sb = X.stride(0), st = X.stride(1);
  const int64_t span = steps * inner;
  const int64_t grid_y = std::min(batch, kMaxGridY);
  const int64_t grid_x = std::max<int64_t>(
      1, std::min<int64_t>((span + kThreads - 1) / kThreads,
                           std::max<int64_t>(1, kTargetBlocks / grid_y)));
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const HostLengths len = device_lengths(valid_len);
  AT_DISPATCH_ALL_TYPES_AND_COMPLEX_AND3(at::kBool, at::kHalf, at::kBFloat16, X.scalar_type(),
                                         "sequence_mask_cuda", [&] {
    const scalar_t v = mask_value<scalar_t>(value, X.scalar_type());
    scalar_t* data = X.mutable_data_ptr<scalar_t>();
    if (st == inner) {
      sequence_mask_kernel<scalar_t, true>
          <<<grid, kThreads, 0, stream>>>(data, batch, steps, inner, sb, st, len.lengths, v);
    } else {
      sequence_mask_kernel<scalar_t, false>
          <<<grid, kThreads, 0, stream>>>(data, batch, steps, inner, sb, st, len.lengths, v);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace seq2seq_ext
