"""CUDA-graph replay of the GRU layer op's time loop (forward and backward).

On CUDA, ``gru_layer`` launches a GEMM and a pointwise kernel per time step, and its backward
does the same from the last step to the first: at small sizes the launches, not the
arithmetic, take the time. This module captures one call of the op per shape in a CUDA graph
and replays it: the activations are copied into the graph's input buffers, the weights are read
where they are (the graph is keyed on their addresses, which an optimizer's in-place updates
keep), the graph is replayed with one launch, and the outputs are copied out (a later replay
overwrites the graph's own).

Eager or graph is decided by :class:`Rule`, the one place that decides: the first time a shape
class is seen, both are timed and the faster is kept for that shape class. The environment
variable ``SEQ2SEQ_EXT_CUDA_GRAPHS`` (``auto``, the default; ``eager``; ``graph``) or
:func:`use_mode` overrides the measurement.

The graph path is taken only for plain CUDA tensors in eager mode: never on the CPU, under
``torch.compile`` tracing, a dispatch or function mode (``opcheck``, FakeTensor), autocast, or
while the current stream is itself being captured, nor with PyTorch's caching allocator turned
off (``PYTORCH_NO_CUDA_MEMORY_CACHING``: capture cannot allocate then). Its autograd formula
is the op's own.
"""
import collections
import contextlib
import os
import statistics
import threading
import time

import torch

from ._checks import check_int

__all__ = ["MODES", "MODE_ENV", "get_mode", "set_mode", "use_mode", "Rule", "GraphCache",
           "rule", "eligible", "gru_layer", "gru_layer_backward", "clear"]

MODES = ("auto", "eager", "graph")
MODE_ENV = "SEQ2SEQ_EXT_CUDA_GRAPHS"


def _check_mode(name, what="mode"):
    if name not in MODES:
        raise ValueError(f"{what}: expected one of {MODES}, got {name!r}")
    return name


class _ModeState(threading.local):
    def __init__(self):
        # made in each thread before its first use: code that torch.compile traces (an op's
        # backward entering use_mode) reads the stack and never creates it
        self.stack = []


_mode_state = _ModeState()
# read at import, checked at the first get_mode(): a bad value is an error where the mode is
# used (the CUDA GRU layer), not one that stops every import of the package
_ENV_MODE = os.environ.get(MODE_ENV, "auto") or "auto"
_default_mode = None

# Capturing needs PyTorch's caching allocator: with PYTORCH_NO_CUDA_MEMORY_CACHING set, every
# allocation inside a capture is a cudaMalloc, which stream capture forbids, so the graph path
# is never taken (compute-sanitizer runs, for one, set it).
_CACHING_DISABLED = os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING", "") not in ("", "0")


def get_mode():
    """The mode in force: ``"auto"`` (the measured rule), ``"eager"`` or ``"graph"``."""
    stack = _mode_state.stack
    if stack:
        return stack[-1]
    if _default_mode is not None:
        return _default_mode
    return _check_mode(_ENV_MODE, f"mode (the environment variable {MODE_ENV})")


def set_mode(name):
    """Set the mode for the whole process."""
    global _default_mode
    _default_mode = _check_mode(name)


@contextlib.contextmanager
def use_mode(name):
    """Context manager: the mode for the current thread inside a ``with`` block."""
    _check_mode(name)
    _mode_state.stack.append(name)
    try:
        yield name
    finally:
        _mode_state.stack.pop()


# ----------------------------------------------------------------------------------------------
# the rule
# ----------------------------------------------------------------------------------------------

def wall_time(fn, *, calls=5, rounds=3):
    """Median over ``rounds`` of the wall time of ``calls`` calls of ``fn`` (the current device
    synchronised before and after each round): the caller's view, launch overhead included."""
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


class Rule:
    """Eager or graph for a shape class, decided once by measurement.

    ``choose(key, eager, graph)``: in ``auto`` mode, the first call for ``key`` times
    ``eager()`` and ``graph()`` with ``timer`` (one warm-up call each first) and keeps
    ``"graph"`` when it took less than ``margin`` times the eager time, else ``"eager"``; later
    calls return the kept choice. ``graph`` may raise (a capture that failed): the choice is then
    ``"eager"``. In the ``eager`` and ``graph`` modes nothing is measured.

    ``count_graph_call(key, captured)`` keeps the graph choice honest afterwards: a shape class
    kept on the graph path whose calls keep capturing (``recapture_limit`` captures or more, in
    more than half of its calls) is turned to ``"eager"`` for good. That is a class whose weights
    are new tensors at every call (a parametrization, ``torch.func.functional_call``) or whose
    graphs do not fit the cache: each call then pays a capture, far more than an eager call. A
    class's distinct graphs, one per layer of its shapes, are at most the cache's capacity, so a
    limit above it never turns a model whose graphs stay cached.
    """

    def __init__(self, timer=wall_time, margin=0.95, recapture_limit=64):
        check_int("recapture_limit", recapture_limit)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin > 0:
            raise ValueError(f"margin: expected a number > 0, got {margin!r}")
        self.timer = timer
        self.margin = margin
        self.recapture_limit = recapture_limit
        self._choices = {}
        self._times = {}
        self._use = {}  # key -> [graph-path calls, captures among them]
        self._lock = threading.Lock()

    def choose(self, key, eager, graph):
        mode = get_mode()
        if mode != "auto":
            return mode
        with self._lock:
            found = self._choices.get(key)
        if found is not None:
            return found
        try:
            graph()  # warm-up; captures the graph on first use
            t_graph = self.timer(graph)
        except (RuntimeError, torch.cuda.OutOfMemoryError):
            t_graph = None
        eager()
        t_eager = self.timer(eager)
        choice = "graph" if t_graph is not None and t_graph < self.margin * t_eager else "eager"
        with self._lock:
            self._choices[key] = choice
            self._times[key] = (t_eager, t_graph)
        return choice

    def count_graph_call(self, key, captured):
        """Count a graph-path call of ``key`` (``captured``: it had to capture its graph first);
        returns the class's choice from now on. Only the measured (``auto``) choices change."""
        with self._lock:
            choice = self._choices.get(key)
            if choice != "graph":
                return choice
            use = self._use.setdefault(key, [0, 0])
            use[0] += 1
            use[1] += bool(captured)
            if use[1] >= self.recapture_limit and 2 * use[1] > use[0]:
                self._choices[key] = choice = "eager"
            return choice

    def choices(self):
        """{key: (choice, eager seconds, graph seconds or None)} of the shape classes measured."""
        with self._lock:
            return {k: (c, *self._times[k]) for k, c in self._choices.items()}

    def clear(self):
        with self._lock:
            self._choices.clear()
            self._times.clear()
            self._use.clear()


class GraphCache:
    """At most ``capacity`` captured calls, least recently used dropped first. Each entry holds
    its graph's memory pool and the weights it was captured with (so their addresses stay
    valid); a model of L layers with its batches of one shape uses 4L entries (forward and
    backward of encoder and decoder layers). ``get(key, make)`` returns the entry for ``key``,
    made by ``make()`` when absent. An entry dropped (or cleared) is closed first when it has a
    ``close()``: a captured call waits there for its last replay, whose buffers are freed with
    it."""

    def __init__(self, capacity=32):
        check_int("capacity", capacity)
        self.capacity = capacity
        self._entries = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, make):
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
        made = make()
        with self._lock:
            entry = self._entries.setdefault(key, made)  # another thread's may have come first
            self._entries.move_to_end(key)
            dropped = [self._entries.popitem(last=False)[1]
                       for _ in range(len(self._entries) - self.capacity)]
        if entry is not made:
            dropped.append(made)
        _close_all(dropped)
        return entry

    def discard(self, predicate):
        """Drop (and close) the entries whose key satisfies ``predicate``."""
        with self._lock:
            keys = [k for k in self._entries if predicate(k)]
            dropped = [self._entries.pop(k) for k in keys]
        _close_all(dropped)

    def __contains__(self, key):
        with self._lock:
            return key in self._entries

    def __len__(self):
        return len(self._entries)

    def clear(self):
        with self._lock:
            dropped = list(self._entries.values())
            self._entries.clear()
        _close_all(dropped)


def _close_all(entries):
    for entry in entries:
        close = getattr(entry, "close", None)
        if close is not None:
            close()


_graphs = GraphCache()
rule = Rule(recapture_limit=2 * _graphs.capacity)


def clear():
    """Forget every measured choice and captured graph."""
    rule.clear()
    _graphs.clear()


# ----------------------------------------------------------------------------------------------
# capture and replay
# ----------------------------------------------------------------------------------------------

class CapturedCall:
    """``fn(*args)`` captured in a CUDA graph. The arguments at the positions ``copied`` are
    copied into buffers of the graph at every call; the others (tensors or not) are the ones
    given at capture, read in place. ``__call__(args)`` replays and returns clones of the
    outputs."""

    def __init__(self, fn, args, copied):
        self.copied = tuple(i for i in copied if args[i] is not None)
        self.static = list(args)
        for i in self.copied:
            self.static[i] = torch.empty_like(args[i], memory_format=torch.contiguous_format)
            self.static[i].copy_(args[i])
        self.device = device = next(a.device for a in args if isinstance(a, torch.Tensor))
        stream = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(stream)
        # everything on the arguments' device, whichever is current: the op launches on its
        # tensors' device, so a capture begun on another device's stream would record nothing.
        # The capture's errors are this thread's own ("thread_local"): a data loader's thread
        # pinning memory meanwhile is not refused.
        with torch.cuda.device(device):
            with torch.no_grad(), torch.cuda.stream(side):
                fn(*self.static)  # warm-up outside the capture: handles, workspaces
            stream.wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(self.graph, stream=side,
                                                   capture_error_mode="thread_local"):
                self.outputs = fn(*self.static)
        self.last_stream = stream
        self._lock = threading.Lock()

    def close(self):
        """Wait for the last replay: the graph, its pool and the input buffers may be freed."""
        with self._lock:
            self.last_stream.synchronize()

    def __call__(self, args):
        # one replay at a time: threads sharing this entry share its buffers
        with self._lock:
            stream = torch.cuda.current_stream(self.device)
            if stream != self.last_stream:
                stream.wait_stream(self.last_stream)  # the previous replay's buffers are reused
            self.last_stream = stream
            with torch.cuda.device(self.device):
                for i in self.copied:
                    self.static[i].copy_(args[i])
                self.graph.replay()
                return tuple(o.clone() for o in self.outputs)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eligible(*tensors):
    """True when the graph path may run for these arguments (None entries are ignored): plain
    CUDA tensors or parameters on one device, no torch.compile tracing, no dispatch or function mode, no
    autocast, no capture in progress on the current stream, the caching allocator on, and a mode
    other than ``eager``."""
    # is_compiling first: Dynamo folds it to True and traces none of the rest
    if torch.compiler.is_compiling():
        return False
    first = None
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN or not t.is_cuda:
            return False
        if first is None:
            first = t
        elif t.device != first.device:
            return False
    if first is None or get_mode() == "eager" or _CACHING_DISABLED:
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    return (not torch.is_autocast_enabled("cuda")
            and not torch.cuda.is_current_stream_capturing())


def _layout(t):
    return None if t is None else (tuple(t.shape), t.dtype)


def _address(t):
    return None if t is None else (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


def _run(name, op, args, copied, in_place):
    """``op(*args)``, eager or replayed, as the rule chooses for the call's shape class."""
    shape_class = (name, args[0].device, tuple(_layout(a) if isinstance(a, torch.Tensor) or a is None
                                               else a for a in args))
    graph_key = (shape_class, tuple(_address(args[i]) for i in in_place))

    def replay():
        return _graphs.get(graph_key, lambda: CapturedCall(op, args, copied))(args)

    def eager():
        return op(*args)

    # the arguments' device current (whichever the caller's is): the rule's timer synchronises
    # it, and the capture records on it
    with torch.no_grad(), torch.cuda.device(args[0].device):
        if rule.choose(shape_class, eager, replay) != "graph":
            return eager()
        captured = graph_key not in _graphs
        out = replay()
        if rule.count_graph_call(shape_class, captured) == "eager":  # turned eager just now
            _graphs.discard(lambda key: key[0] == shape_class)
        return out


_LAYER_COPIED = (0, 1, 6)       # input, h0, extra
_LAYER_IN_PLACE = (2, 3, 4, 5)  # w_ih, w_hh, b_ih, b_hh
_BACKWARD_COPIED = (0, 1, 2, 3, 6, 7)  # grad_output, grad_hn, input, h0, output, saved
_BACKWARD_IN_PLACE = (4, 5)            # w_ih, w_hh


def _layer_op(*args):
    return torch.ops.seq2seq_ext.gru_layer(*args)


def _layer_backward_op(*args):
    return torch.ops.seq2seq_ext.gru_layer_backward(*args)


class _GraphedLayer(torch.autograd.Function):
    """gru_layer through :func:`_run`, with the op's own autograd formula."""

    @staticmethod
    def forward(input, h0, w_ih, w_hh, b_ih, b_hh, extra):
        return _run("gru_layer", _layer_op, (input, h0, w_ih, w_hh, b_ih, b_hh, extra),
                    _LAYER_COPIED, _LAYER_IN_PLACE)

    @staticmethod
    def setup_context(ctx, inputs, output):
        from . import ops
        ops._gru_setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_out, grad_hn, grad_saved):
        from . import ops
        return ops._gru_backward(ctx, grad_out, grad_hn, grad_saved)


def gru_layer(input, h0, w_ih, w_hh, b_ih, b_hh, extra=None):
    """``torch.ops.seq2seq_ext.gru_layer`` through the rule (eager or replayed); the caller has
    checked :func:`eligible`. Returns (output, h_n, saved)."""
    return _GraphedLayer.apply(input, h0, w_ih, w_hh, b_ih, b_hh, extra)


def gru_layer_backward(grad_output, grad_hn, input, h0, w_ih, w_hh, output, saved, has_extra):
    """``torch.ops.seq2seq_ext.gru_layer_backward`` through the rule (eager or replayed)."""
    return _run("gru_layer_backward", _layer_backward_op,
                (grad_output, grad_hn, input, h0, w_ih, w_hh, output, saved, bool(has_extra)),
                _BACKWARD_COPIED, _BACKWARD_IN_PLACE)
