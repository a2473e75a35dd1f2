#include "deferred_weight_grads.h"

#include <ATen/TensorSubclassLikeUtils.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <atomic>
#include <iterator>
#include <unordered_map>

#include "bf16_products.h"
#include "cpu/bf16.h"
#include "cpu/common.h"
#include "cpu/rnn_stack.h"

namespace seq2seq_ext {
namespace {

std::atomic<DeferGrads> g_mode{DeferGrads::kAuto};

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

// A matrix's current alias in one role, held weakly (it lives as long as a graph saved it), and
// the node the matrix's gradient goes to (its AccumulateGrad, or the grad_fn of a matrix made by
// an op, such as autocast's bf16 copy), held weakly too: while the alias lives, its WeightGradSum
// holds that node, so an entry whose alias is alive and whose node is the matrix's is the
// matrix's, whatever tensor once had its address. No reference of any kind to the matrix itself
// is kept: torch.utils.swap_tensors (`.to()` under torch.__future__'s swap rule) refuses a tensor
// that has one.
struct AliasEntry {
  WeakImpl alias;
  c10::weak_intrusive_ptr<torch::autograd::Node> node;
  uint32_t output_nr, version;
};

// The entries of this thread by matrix address and role (the address's low bits are zero), and
// the size above which the dead ones are swept.
struct AliasEntries {
  std::unordered_map<uintptr_t, AliasEntry> by_key;
  size_t sweep_at = 64;
};

// The node w's gradient goes to, if it has one yet (a leaf's AccumulateGrad is made on demand).
c10::intrusive_ptr<torch::autograd::Node> gradient_node(const at::Tensor& w) {
  return w.is_leaf() ? torch::autograd::impl::try_get_grad_accumulator(w) : w.grad_fn();
}

AliasEntries& alias_entries() {
  thread_local AliasEntries entries;
  return entries;
}

// A^T (G, all rows) for one bf16 GEMM, laid out straight from the calls' A (rows, G), each
// call's rows a block of columns (cpu::transpose_bf16_into).
at::Tensor transpose_pieces(const std::vector<at::Tensor>& a) {
  int64_t rows = 0;
  for (const at::Tensor& p : a) rows += p.size(0);
  at::Tensor a_t = cpu::empty_written_once({a[0].size(1), rows}, a[0].options());
  int64_t col = 0;
  for (const at::Tensor& p : a) {
    cpu::transpose_bf16_into(p, a_t.mutable_data_ptr<c10::BFloat16>() + col, rows);
    col += p.size(0);
  }
  return a_t;
}

// transpose_pieces for pieces two nodes received (W_ih and W_hh of a layer, which autograd runs
// one after the other on this thread): the first lays A^T out and keeps it with
// the pieces (held, so that no other tensor can take their place), the second takes it.
at::Tensor shared_transpose(const std::vector<at::Tensor>& a) {
  thread_local std::vector<at::Tensor> pieces;
  thread_local at::Tensor laid_out;
  const bool same = pieces.size() == a.size() &&
                    std::equal(a.begin(), a.end(), pieces.begin(),
                               [](const at::Tensor& x, const at::Tensor& y) { return x.is_same(y); });
  if (same) {
    at::Tensor out = std::move(laid_out);
    laid_out = at::Tensor();
    pieces.clear();
    return out;
  }
  laid_out = transpose_pieces(a);
  pieces = a;
  return laid_out;
}

}  // namespace

DeferGrads deferred_grads() { return g_mode.load(std::memory_order_relaxed); }

void set_deferred_grads(DeferGrads mode) { g_mode.store(mode, std::memory_order_relaxed); }

bool defers_grad(const at::Tensor& input, bool packed, const at::Tensor& w) {
  const DeferGrads mode = deferred_grads();
  if (mode == DeferGrads::kOff || packed || !w.defined() || !w.requires_grad()) return false;
  // fake and functional tensors (torch.compile's tracing) record the op as is; tested first: a
  // fake tensor's size() would fix every dimension of it
  if (at::isTensorSubclassLike(input) || at::isTensorSubclassLike(w)) return false;
  // (a call of no rows hands over none: its matrices' gradients are the per-call path's zeros)
  if (!input.is_cpu() || !w.is_cpu() || input.dim() != 3 || input.size(0) != 1 ||
      input.size(1) == 0 || w.dim() != 2 || w.layout() != at::kStrided)
    return false;
  return mode == DeferGrads::kAlways || w.numel() >= kDeferMinElements;
}

WeightGradSum::WeightGradSum(const at::Tensor& w)
    : Node(torch::autograd::collect_next_edges(w)), dtype_(w.scalar_type()) {}

namespace {

// Drops a backward's rows from a sum when the backward ends, however it ends: held by a callback
// queued on the backward's graph task, whose callbacks die with the task (it ran: the sum took
// its rows already; it stopped with an error: they would stay as long as the sum does, which a
// later graph over the same, unchanged matrices may keep alive, a failed backward after another).
struct RowsReaper {
  RowsReaper(WeightGradSum* node, int task)
      : sum(c10::intrusive_ptr<torch::autograd::Node>::unsafe_reclaim_from_nonowning(node)),
        task(task) {}
  RowsReaper(const RowsReaper&) = delete;
  RowsReaper& operator=(const RowsReaper&) = delete;
  c10::weak_intrusive_ptr<torch::autograd::Node> sum;
  int task;
  ~RowsReaper() {
    if (auto node = sum.lock()) static_cast<WeightGradSum*>(node.get())->drop_rows(task);
  }
};

}  // namespace

std::vector<WeightGradSum::Rows>::iterator WeightGradSum::find_rows(int task) {
  return std::find_if(rows_.begin(), rows_.end(), [&](const Rows& r) { return r.task == task; });
}

WeightGradSum::Rows WeightGradSum::take_rows(int task) {
  Rows taken;
  std::lock_guard<std::mutex> lock(mutex_);
  auto rows = find_rows(task);
  if (rows != rows_.end()) {
    taken = std::move(*rows);
    rows_.erase(rows);
  }
  return taken;
}

void WeightGradSum::drop_rows(int task) {
  take_rows(task);  // the rows are freed here, after the lock is released
}

void WeightGradSum::add_rows(at::Tensor a, at::Tensor x, bool shared, at::Tensor a_n) {
  if (!a.defined() || x.size(0) == 0) return;
  const int task = torch::autograd::get_current_graph_task_id();
  std::unique_lock<std::mutex> lock(mutex_);
  auto rows = find_rows(task);
  if (rows == rows_.end()) {
    rows = rows_.insert(rows_.end(), Rows{task});
    if (task >= 0) {  // (a backward of the engine's: always, for the calls that defer)
      lock.unlock();
      auto reaper = std::make_shared<RowsReaper>(this, task);
      torch::autograd::Engine::get_default_engine().queue_callback([reaper] {});
      lock.lock();
      rows = find_rows(task);
    }
  }
  rows->shared = rows->shared || shared;
  // A GRU's W_hh hands over its n columns apart (a_n) where the call deferred W_ih's gradient
  // too, else whole gate gradients. One W_hh may get both kinds in one graph (tied across
  // modules whose W_ih is deferred in one and not in the other): then every piece is whole.
  auto whole = [](const at::Tensor& a, const at::Tensor& a_n) {
    return at::cat({a.narrow(1, 0, a.size(1) - a_n.size(1)), a_n}, 1);
  };
  if (a_n.defined() && !rows->a.empty() && rows->a_n.empty()) {
    a = whole(a, a_n);
    a_n = at::Tensor();
  } else if (!a_n.defined() && !rows->a_n.empty()) {
    for (size_t i = 0; i < rows->a.size(); ++i) rows->a[i] = whole(rows->a[i], rows->a_n[i]);
    rows->a_n.clear();
  }
  if (a_n.defined()) rows->a_n.push_back(std::move(a_n));
  rows->a.push_back(std::move(a));
  rows->x.push_back(std::move(x));
}

torch::autograd::variable_list WeightGradSum::apply(torch::autograd::variable_list&& grads) {
  // the rows this backward handed over (see Rows)
  const Rows mine = take_rows(torch::autograd::get_current_graph_task_id());
  const std::vector<at::Tensor>& a = mine.a;
  const std::vector<at::Tensor>& x = mine.x;
  const std::vector<at::Tensor>& a_n = mine.a_n;
  at::Tensor grad;
  if (!a.empty()) {
    const at::Tensor x_all = x.size() == 1 ? x[0].contiguous() : at::cat(x);
    if (a[0].scalar_type() == at::kBFloat16) {
      const at::Tensor a_t = mine.shared ? shared_transpose(a) : transpose_pieces(a);
      if (a_n.empty()) {
        grad = at::mm(a_t, x_all);
      } else {  // the GRU's W_hh: its first rows from the A^T shared with W_ih, its n rows its own
        const int64_t n = a_n[0].size(1);
        grad = bf16_stacked_grad(a_t.narrow(0, 0, a_t.size(0) - n), transpose_pieces(a_n), x_all);
      }
    } else {
      const at::Tensor a_all = a.size() == 1 ? a[0].contiguous() : at::cat(a);
      AT_DISPATCH_FLOATING_TYPES(a_all.scalar_type(), "rnn_stack_weight_grad_sum", [&] {
        grad = cpu::matrix_grad<scalar_t>(a_all, x_all, dtype_ == at::kBFloat16);
      });
    }
    if (grad.scalar_type() != dtype_) grad = grad.to(dtype_);
  }
  // calls that returned their gradient (under create_graph), summed by autograd
  if (!grads.empty() && grads[0].defined()) grad = grad.defined() ? grad + grads[0] : grads[0];
  return {grad};
}

at::Tensor deferring_alias(const at::Tensor& w, int role) {
  auto& entries = alias_entries();
  const uint32_t version = w._version();
  const uintptr_t key = reinterpret_cast<uintptr_t>(w.unsafeGetTensorImpl()) | role;
  auto it = entries.by_key.find(key);
  if (it != entries.by_key.end()) {
    const AliasEntry& e = it->second;
    auto alias = e.alias.lock();
    auto node = e.node.lock();
    // the same matrix (its gradient's node), unchanged since (an optimizer step changes its
    // version), its alias alive and still over its values (`w.data = ...` and a module's
    // .double() give w other storage, or another dtype or layout, without a new version)
    if (alias && node && node == gradient_node(w) && e.output_nr == w.output_nr() &&
        e.version == version && alias->data() == w.const_data_ptr() &&
        alias->dtype() == w.dtype() && alias->sizes() == w.sizes() &&
        alias->strides() == w.strides())
      return at::Tensor(std::move(alias));
  }
  if (entries.by_key.size() >= entries.sweep_at) {  // drop the entries of dead aliases
    for (auto e = entries.by_key.begin(); e != entries.by_key.end();)
      e = e->second.alias.expired() ? entries.by_key.erase(e) : std::next(e);
    entries.sweep_at = std::max<size_t>(64, 2 * entries.by_key.size());
  }
  // w's values and version counter, without its autograd history
  at::Tensor alias = w.tensor_data();
  auto sum = c10::make_intrusive<WeightGradSum>(w);  // (makes a leaf's AccumulateGrad)
  torch::autograd::create_gradient_edge(alias, std::move(sum));
  entries.by_key.insert_or_assign(
      key, AliasEntry{WeakImpl(alias.getIntrusivePtr()),
                      c10::weak_intrusive_ptr<torch::autograd::Node>(gradient_node(w)),
                      static_cast<uint32_t>(w.output_nr()), version});
  return alias;
}

WeightGradSum* weight_grad_sum(const at::Tensor& t) {
  if (!t.defined()) return nullptr;
  const auto& fn = t.grad_fn();
  return fn ? dynamic_cast<WeightGradSum*>(fn.get()) : nullptr;
}

}  // namespace seq2seq_ext
