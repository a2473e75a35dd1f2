// Deferred weight gradients of rnn_stack's one-step calls.
//
// A decoder called once per token in a Python loop (the teacher-forcing pattern) runs rnn_stack
// once per step, and each call's backward would return a full (G, K) gradient of every weight
// matrix: a product over only the call's B rows, written out whole, which autograd then adds
// into the running sum (at hidden 512 and batch 128, about 1 ms a matrix a call, most of it
// memory traffic). Instead, such a call runs over an alias of each large matrix: the same
// values, whose gradient edge leads to one WeightGradSum node per matrix and graph. Each call's
// backward hands that node its rows (the gate gradients A and the layer inputs X) and no
// gradient; the node runs once all of them have (autograd runs a node after every node feeding
// it) and gives the matrix sum_calls A^T X as one product over the rows of all calls, where a
// GEMM's rate is highest.
//
// Rows are handed over only by a backward that will run the node (needs_input_grad: a
// torch.autograd.grad for other inputs leaves them out), and only without create_graph (then
// the call returns its gradient as before, which the node passes on).
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>

#include <memory>
#include <mutex>
#include <vector>

namespace seq2seq_ext {

// When one-step calls defer their matrices' gradients: kAuto for matrices of at least
// kDeferMinElements elements (smaller ones stay in cache, where the per-call sum costs little),
// kAlways for any (tests), kOff never. Chosen from Python (seq2seq_ext.ops.set_deferred_grads).
enum class DeferGrads { kOff, kAuto, kAlways };
constexpr int64_t kDeferMinElements = int64_t(1) << 16;
DeferGrads deferred_grads();
void set_deferred_grads(DeferGrads mode);

// Whether a call of rnn_stack with this input and batch_sizes defers the gradient of the weight
// matrix w (a dense one-step call of at least one row on the CPU, grad mode on, w requiring a
// gradient, the mode).
bool defers_grad(const at::Tensor& input, bool packed, const at::Tensor& w);

// The node that sums a matrix's gradient over the calls of a graph.
class WeightGradSum : public torch::autograd::Node {
 public:
  explicit WeightGradSum(const at::Tensor& w);
  // One call's rows, as cpu::stack_backward gives them: a (M, G) and x (M, K) in float32 or
  // float64, or in bfloat16 (the operands of a bf16 GEMM; a^T is laid out once, over all calls).
  // shared: another node of the graph receives the same a (the LSTM's W_ih and W_hh of a layer,
  // or the GRU's), so the two lay out a^T once between them. a_n (bf16, the GRU's W_hh): the
  // matrix's own last columns of A, whose first ones are those of the shared a. Rows with a_n
  // and rows without in one graph are all made whole (a with its last columns from a_n).
  void add_rows(at::Tensor a, at::Tensor x, bool shared = false, at::Tensor a_n = {});
  // Forgets the rows a backward (graph task) handed over, if the node has not taken them.
  void drop_rows(int task);
  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override;
  std::string name() const override { return "RnnStackWeightGradSum"; }

 private:
  // The rows one backward (a graph task) handed over: the node sums those of the backward that
  // runs it, and leaves those of any other. Backwards over graphs that share the node may run
  // at once (on two threads) or nested (a reentrant checkpoint's backward inside another), and
  // one that stops with an error leaves rows that no later backward may take: they are dropped
  // when that backward's graph task ends (add_rows queues a callback that does it).
  struct Rows {
    int task = -1;
    std::vector<at::Tensor> a, x, a_n;
    bool shared = false;
  };
  // The rows of a task (rows_.end() if none); the caller holds mutex_.
  std::vector<Rows>::iterator find_rows(int task);
  // Moves the rows of a task out (empty if none), under the lock; the caller frees them after.
  Rows take_rows(int task);
  std::mutex mutex_;
  std::vector<Rows> rows_;
  at::ScalarType dtype_;  // the matrix's
};

// The alias a call uses in place of w (see the top of the file) in a role (0: a layer's W_ih, 1:
// its W_hh; plus 2 for a GRU's, whose W_hh may hand over rows of its own): the same one while w
// is the same tensor, unchanged (its version), and an earlier call's alias for that role is still
// alive, else a new one. One sum holds one role's rows: a matrix tied across roles (W_hh of one
// layer, W_ih of another) gets a sum for each, and autograd adds their gradients.
at::Tensor deferring_alias(const at::Tensor& w, int role);

// The WeightGradSum behind an alias from deferring_alias, or null for any other tensor.
WeightGradSum* weight_grad_sum(const at::Tensor& t);

}  // namespace seq2seq_ext
