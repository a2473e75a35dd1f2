// Device math shared by the CUDA GRU kernels (float and double overloads).
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

}  // namespace seq2seq_ext
