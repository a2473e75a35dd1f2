// What every op's entry (csrc/<op>.cpp) shares: an entry is one device-independent function per
// op that checks the arguments, allocates the outputs and calls the kernel of the arguments'
// device, cpu::<op> (csrc/cpu/<op>.cpp) or cuda::<op> (csrc/cuda/<op>.cu). It is registered for
// the CPU dispatch key and, in a CUDA build, for the CUDA key.
#pragma once

#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

// The kernel of `op` for the device of tensor `on`.
#ifdef SEQ2SEQ_EXT_WITH_CUDA
#define SEQ2SEQ_EXT_KERNEL(on, op) ((on).is_cuda() ? &::seq2seq_ext::cuda::op : &::seq2seq_ext::cpu::op)
#else
#define SEQ2SEQ_EXT_KERNEL(on, op) (&::seq2seq_ext::cpu::op)
#endif

// Registers entries for every device with kernels, written like TORCH_LIBRARY_IMPL:
//   SEQ2SEQ_EXT_ENTRIES(m) { m.impl("op", &op); }
#define SEQ2SEQ_EXT_ENTRIES(m)                                                  \
  static void seq2seq_ext_register_entries(torch::Library&);                    \
  SEQ2SEQ_EXT_ENTRIES_FOR_DEVICES                                               \
  static void seq2seq_ext_register_entries(torch::Library& m)

#ifdef SEQ2SEQ_EXT_WITH_CUDA
#define SEQ2SEQ_EXT_ENTRIES_FOR_DEVICES                                                   \
  TORCH_LIBRARY_IMPL(seq2seq_ext, CPU, lib) { seq2seq_ext_register_entries(lib); }        \
  TORCH_LIBRARY_IMPL(seq2seq_ext, CUDA, lib) { seq2seq_ext_register_entries(lib); }
#else
#define SEQ2SEQ_EXT_ENTRIES_FOR_DEVICES \
  TORCH_LIBRARY_IMPL(seq2seq_ext, CPU, lib) { seq2seq_ext_register_entries(lib); }
#endif

// A backward op's Autograd kernel: the op runs below autograd, and differentiating its outputs
// raises autograd's "the derivative for '<op>' is not implemented" (second derivatives come from
// the forward op's backward with create_graph=True, which recomputes differentiably). Without
// one, PyTorch's deprecated fallback warns and gives every input a None gradient.
#define SEQ2SEQ_EXT_NO_DERIVATIVE(op)                                  \
  TORCH_LIBRARY_IMPL(seq2seq_ext, Autograd, m) {                       \
    m.impl(op, torch::autograd::autogradNotImplementedFallback());     \
  }
