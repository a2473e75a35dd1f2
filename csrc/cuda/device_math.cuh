// Device math shared by the CUDA cell kernels (float and double overloads), and the GRU cell's
// pointwise formula that the layer kernel (training) and the decode kernels (inference) share.
#pragma once

namespace seq2seq_ext {

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double dev_tanh(double x) { return tanh(x); }

template <typename T>
__device__ __forceinline__ T dev_sigmoid(T x) {
  return T(1) / (T(1) + dev_exp(-x));
}

// h' = n + z * (h - n), the CPU kernel's form of nn.GRU's (1 - z) * n + z * h, rounded after
// each operation as the CPU computes it (the _rn intrinsics keep nvcc from fusing a multiply-add).
__device__ __forceinline__ float gru_new_state(float n, float z, float h) {
  return __fadd_rn(n, __fmul_rn(z, __fsub_rn(h, n)));
}
__device__ __forceinline__ double gru_new_state(double n, double z, double h) {
  return __dadd_rn(n, __dmul_rn(z, __dsub_rn(h, n)));
}

}  // namespace seq2seq_ext
