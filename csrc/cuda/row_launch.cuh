// The launch shape of the recurrent layers' pointwise kernels (gru_layer.cu, rnn_stack.cu): B rows
// of H hidden units, a 2-D grid-stride loop whose grid.y walks the rows and grid.x a row's units.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace seq2seq_ext {
namespace cuda {

constexpr int kRowThreads = 128;  // the kernels' __launch_bounds__
constexpr int64_t kMaxGridX = 1 << 16;
constexpr int64_t kMaxGridY = 65535;

struct RowLaunch {
  dim3 grid, block;
};

// Blocks of a multiple of 32 threads, no wider than a row needs; grid.x covers a row, grid.y the
// rows (grid-stride beyond the limits). B, H > 0 (H = 0 would give one warp; no caller launches
// it).
inline RowLaunch launch_for(int64_t B, int64_t H) {
  const int64_t threads =
      std::max<int64_t>(32, std::min<int64_t>(kRowThreads, (H + 31) / 32 * 32));
  const int64_t gx = std::min<int64_t>((H + threads - 1) / threads, kMaxGridX);
  const int64_t gy = std::min<int64_t>(B, kMaxGridY);
  return {dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)),
          dim3(static_cast<unsigned>(threads))};
}

}  // namespace cuda
}  // namespace seq2seq_ext
