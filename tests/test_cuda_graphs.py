"""CUDA graphs: every op captured in a graph and replayed, the GRU layer's graph path
(``seq2seq_ext.cuda_graphs``) against its eager path, and the device-side range checks.

The rule and the cache of the graph path are plain Python and are tested on the CPU with stub
timers and stub graphs; everything that captures or replays needs CUDA and is skipped without
it.
"""
import contextlib
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import seq2seq_ext
from seq2seq_ext import cuda_graphs, ops
from seq2seq_ext.models import fused_decoder_args

from helpers import make_decoder, random_ce_inputs, random_state, random_tokens

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (CUDA graphs, device-side asserts)")
ROOT = Path(__file__).resolve().parents[1]
OPS = torch.ops.seq2seq_ext


@pytest.fixture(autouse=True)
def _fresh_graph_state():
    """Each test starts without measured choices or captured graphs, in the default mode."""
    cuda_graphs.clear()
    yield
    cuda_graphs.clear()


# ----------------------------------------------------------------------------------------------
# the rule and the cache (CPU: stub timers and stub graphs)
# ----------------------------------------------------------------------------------------------

class StubTimer:
    """Returns a fixed time per function name and counts the calls."""

    def __init__(self, eager, graph):
        self.times = {"eager": eager, "graph": graph}
        self.calls = []

    def __call__(self, fn):
        self.calls.append(fn.__name__)
        return self.times[fn.__name__]


def _pair(log):
    def eager():
        log.append("eager")

    def graph():
        log.append("graph")
    return eager, graph


@pytest.mark.parametrize("t_eager, t_graph, expected", [
    (10.0, 5.0, "graph"), (10.0, 9.0, "graph"), (10.0, 9.9, "eager"), (5.0, 10.0, "eager")])
def test_rule_keeps_the_faster_path_by_its_margin(t_eager, t_graph, expected):
    timer = StubTimer(t_eager, t_graph)
    rule = cuda_graphs.Rule(timer=timer, margin=0.95)
    log = []
    assert rule.choose("k", *_pair(log)) == expected
    assert sorted(timer.calls) == ["eager", "graph"]
    assert log == ["graph", "eager"]  # one warm-up call each before its timing
    assert rule.choices() == {"k": (expected, t_eager, t_graph)}


def test_rule_measures_once_per_shape_class():
    timer = StubTimer(10.0, 1.0)
    rule = cuda_graphs.Rule(timer=timer)
    log = []
    for _ in range(4):
        assert rule.choose("a", *_pair(log)) == "graph"
    assert len(timer.calls) == 2
    timer.times = {"eager": 1.0, "graph": 10.0}
    assert rule.choose("b", *_pair(log)) == "eager"  # another class is measured on its own
    assert rule.choose("a", *_pair(log)) == "graph"  # the first keeps its choice
    assert len(timer.calls) == 4
    rule.clear()
    assert rule.choose("a", *_pair(log)) == "eager"  # measured again after clear()


def test_rule_takes_eager_when_the_graph_fails():
    timer = StubTimer(10.0, 1.0)
    rule = cuda_graphs.Rule(timer=timer)

    def eager():
        pass

    def graph():
        raise RuntimeError("capture failed")
    assert rule.choose("k", eager, graph) == "eager"
    assert rule.choices()["k"] == ("eager", 10.0, None)


def test_a_bad_environment_value_is_refused_where_the_mode_is_read(tmp_path):
    """The package and its command line still import (one line, not a traceback at import);
    reading the mode names the variable."""
    env = dict(os.environ, SEQ2SEQ_EXT_CUDA_GRAPHS="bogus")
    code = ("from seq2seq_ext import cuda_graphs\n"
            "try:\n    cuda_graphs.get_mode()\nexcept ValueError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0 and "SEQ2SEQ_EXT_CUDA_GRAPHS" in out.stdout, out.stderr
    assert "'bogus'" in out.stdout
    cli = subprocess.run([sys.executable, "-m", "seq2seq_ext.cli", "--help"], env=env,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert cli.returncode == 0 and "usage: seq2seq-ext" in cli.stdout, cli.stderr


def test_modes_override_the_measurement():
    timer = StubTimer(10.0, 1.0)
    rule = cuda_graphs.Rule(timer=timer)
    with cuda_graphs.use_mode("eager"):
        assert cuda_graphs.get_mode() == "eager"
        assert rule.choose("k", *_pair([])) == "eager"
        with cuda_graphs.use_mode("graph"):
            assert rule.choose("k", *_pair([])) == "graph"
        assert cuda_graphs.get_mode() == "eager"
    assert cuda_graphs.get_mode() == "auto"
    assert timer.calls == [] and rule.choices() == {}
    with pytest.raises(ValueError, match="mode"):
        cuda_graphs.set_mode("sometimes")
    with pytest.raises(ValueError, match="mode"):
        with cuda_graphs.use_mode("never"):
            pass
    assert cuda_graphs.get_mode() == "auto"


def test_graph_cache_is_bounded_and_least_recently_used():
    made = []

    def make(key):
        def factory():
            made.append(key)
            return object()
        return factory

    cache = cuda_graphs.GraphCache(capacity=2)
    a = cache.get("a", make("a"))
    cache.get("b", make("b"))
    assert cache.get("a", make("a")) is a  # a hit: not made again, now the most recent
    cache.get("c", make("c"))              # drops b, the least recently used
    assert len(cache) == 2 and made == ["a", "b", "c"]
    assert cache.get("a", make("a")) is a
    cache.get("b", make("b"))
    assert made == ["a", "b", "c", "b"]
    with pytest.raises(ValueError, match="capacity"):
        cuda_graphs.GraphCache(capacity=0)
    for bad in (2.5, True, "3", None):  # refused at once, naming the argument
        with pytest.raises(TypeError, match="capacity"):
            cuda_graphs.GraphCache(capacity=bad)
    for kwargs, name in ((dict(margin="x"), "margin"), (dict(margin=float("nan")), "margin"),
                         (dict(margin=-1), "margin"), (dict(recapture_limit=1.5),
                                                       "recapture_limit")):
        with pytest.raises((TypeError, ValueError), match=name):
            cuda_graphs.Rule(**kwargs)


class Entry:
    """A stub cache entry that logs its name when closed."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def close(self):
        self.log.append(self.name)


def test_graph_cache_closes_the_entries_it_drops():
    closed = []
    cache = cuda_graphs.GraphCache(capacity=2)
    for name in "abc":
        cache.get(name, lambda name=name: Entry(name, closed))
    assert closed == ["a"] and "a" not in cache and "b" in cache
    cache.get("d", lambda: object())  # an entry without close() is dropped as it is
    assert closed == ["a", "b"]
    cache.clear()
    assert sorted(closed) == ["a", "b", "c"] and len(cache) == 0


def test_graph_cache_discards_and_keeps_the_first_of_two_makers():
    closed = []
    cache = cuda_graphs.GraphCache(capacity=4)
    for key in (("a", 1), ("a", 2), ("b", 1)):
        cache.get(key, lambda key=key: Entry(key, closed))
    cache.discard(lambda key: key[0] == "a")
    assert sorted(closed) == [("a", 1), ("a", 2)] and len(cache) == 1 and ("b", 1) in cache

    def racing():  # another thread makes and inserts the same key meanwhile
        first = cache.get(("c", 1), lambda: Entry("first", closed))
        assert first.name == "first"
        return Entry("second", closed)
    assert cache.get(("c", 1), racing).name == "first"
    assert closed[-1] == "second"  # the loser is closed, the cache keeps one entry


def test_rule_turns_a_class_that_keeps_capturing_to_eager():
    """Weights that are new tensors at every call capture at every call: after
    ``recapture_limit`` captures in more than half of the calls the class goes eager."""
    rule = cuda_graphs.Rule(timer=StubTimer(10.0, 1.0), recapture_limit=4)
    assert rule.choose("k", *_pair([])) == "graph"
    assert [rule.count_graph_call("k", captured=True) for _ in range(4)] == \
        ["graph"] * 3 + ["eager"]
    assert rule.choose("k", *_pair([])) == "eager"
    assert rule.choices()["k"][0] == "eager"
    rule.clear()
    assert rule.choose("k", *_pair([])) == "graph"  # measured again after clear()


def test_rule_keeps_a_class_whose_graphs_stay_cached():
    """A class with as many graphs as the limit (one per layer of its shapes), each captured
    once and then replayed, and a class that recaptures rarely, stay on the graph path."""
    rule = cuda_graphs.Rule(timer=StubTimer(10.0, 1.0), recapture_limit=4)
    for key in ("layers", "rare"):
        assert rule.choose(key, *_pair([])) == "graph"
    for call in range(4 + 200):
        assert rule.count_graph_call("layers", captured=call < 3) == "graph"
        assert rule.count_graph_call("rare", captured=call % 10 == 0) == "graph"
    assert rule.count_graph_call("unknown", captured=True) is None
    with pytest.raises(ValueError, match="recapture_limit"):
        cuda_graphs.Rule(recapture_limit=0)
    # captures in exactly half of the calls are not "more than half": the class stays
    assert rule.choose("half", *_pair([])) == "graph"
    assert [rule.count_graph_call("half", captured=call % 2 == 1) for call in range(40)] == \
        ["graph"] * 40


def test_graph_path_is_counted_and_turned_eager_on_recaptures(monkeypatch):
    """_run counts every graph-path call with whether it captured, and takes the eager op
    once the rule has turned the class (stub op and stub captures, on the CPU)."""
    calls, captures = [], []

    class Stub:
        def __init__(self, fn, args, copied):
            self.args = args  # as a captured call holds its weights, so their addresses stay
            captures.append(args[1])

        def __call__(self, args):
            calls.append("graph")
            return ("graph",)

    monkeypatch.setattr(cuda_graphs, "CapturedCall", Stub)
    monkeypatch.setattr(cuda_graphs, "rule",
                        cuda_graphs.Rule(timer=lambda fn: 1.0 if fn.__name__ == "replay" else 10.0,
                                         recapture_limit=3))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())

    def op(x, w):
        calls.append("eager")
        return ("eager",)

    x = torch.zeros(2)
    results = [cuda_graphs._run("stub", op, (x, torch.ones(3)), (0,), (1,))[0]
               for _ in range(5)]  # a new weight tensor every call
    # the first call measures (its capture is cached), the next three capture: the third
    # capture turns the class eager, from the fifth call on
    assert results == ["graph"] * 4 + ["eager"]
    assert len(captures) == 4
    assert len(cuda_graphs._graphs) == 0  # the class's graphs are dropped when it goes eager


def test_cpu_tensors_never_take_the_graph_path(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the CPU path reached the CUDA-graph path")
    monkeypatch.setattr(cuda_graphs, "gru_layer", refuse)
    monkeypatch.setattr(cuda_graphs, "gru_layer_backward", refuse)
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 6, dtype=torch.float64)
    w = [torch.randn(s, dtype=torch.float64, requires_grad=True)
         for s in ((18, 4), (18, 6), (18,), (18,))]
    with cuda_graphs.use_mode("graph"):
        assert not cuda_graphs.eligible(x, h0, *w, None)
        out, h_n = ops.gru_layer(x, h0, *w)
        (out.sum() + h_n.sum()).backward()
    assert x.grad is not None and w[1].grad is not None


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_backward_follows_the_forwards_mode_on_another_thread(monkeypatch, mode):
    """On a GPU the backward runs on autograd's device thread, where the caller's thread-local
    use_mode is not in force: the layer's backward takes the mode its forward ran under."""
    seen = []
    real = cuda_graphs.eligible

    def spy(*tensors):
        seen.append(cuda_graphs.get_mode())
        return real(*tensors)
    monkeypatch.setattr(cuda_graphs, "eligible", spy)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 5, dtype=torch.float64)
    w = [torch.randn(s, dtype=torch.float64, requires_grad=True)
         for s in ((15, 3), (15, 5), (15,), (15,))]
    with cuda_graphs.use_mode(mode):
        out, h_n = ops.gru_layer(x, h0, *w)
    worker = threading.Thread(target=lambda: (out.sum() + h_n.sum()).backward())
    worker.start()
    worker.join()
    assert seen == [mode, mode]  # forward, then backward on the other thread
    assert x.grad is not None and cuda_graphs.get_mode() == "auto"


@NEEDS_CUDA
def test_no_graph_path_without_the_caching_allocator(monkeypatch):
    """With PYTORCH_NO_CUDA_MEMORY_CACHING set a capture cannot allocate: the layer runs eager
    even in the graph mode, and gives the eager results."""
    monkeypatch.setattr(cuda_graphs, "_CACHING_DISABLED", True)
    def refuse(*args, **kwargs):
        raise AssertionError("the graph path was taken without the caching allocator")
    monkeypatch.setattr(cuda_graphs, "gru_layer", refuse)
    monkeypatch.setattr(cuda_graphs, "gru_layer_backward", refuse)
    x = torch.randn(5, 3, 4, device="cuda", requires_grad=True)
    h0 = torch.randn(3, 6, device="cuda")
    w = [torch.randn(s, device="cuda", requires_grad=True)
         for s in ((18, 4), (18, 6), (18,), (18,))]
    with cuda_graphs.use_mode("graph"):
        assert not cuda_graphs.eligible(x, h0, *w, None)
        out, h_n = ops.gru_layer(x, h0, *w)
        (out.sum() + h_n.sum()).backward()
    assert torch.isfinite(x.grad).all() and w[1].grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# every op in a CUDA graph
# ----------------------------------------------------------------------------------------------

def _capture(fn, static_args):
    """fn(*static_args) captured in a CUDA graph (warm-up on a side stream first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*static_args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static_args)
    return graph, out


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


# Graph against eager: the same kernels on the same values, but cuBLAS may pick another GEMM
# algorithm inside a capture (workspace, alignment of the graph's buffers), so float outputs are
# compared to float32 rounding; integer outputs exactly.
CLOSE = dict(rtol=1e-5, atol=1e-6)


def _check_replay(fn, static_args, fresh_args):
    """Capture fn on static_args, copy fresh_args in, replay: the outputs equal an eager call on
    fresh_args (a stale buffer or a host sync inside the op would fail here)."""
    graph, out = _capture(fn, static_args)
    for s, f in zip(static_args, fresh_args):
        if isinstance(s, torch.Tensor):
            s.copy_(f)
    graph.replay()
    expected = fn(*fresh_args)
    torch.cuda.synchronize()
    for got, want in zip(_as_tuple(out), _as_tuple(expected)):
        torch.testing.assert_close(got, want, **CLOSE)


def _ce(seed, dtype=torch.float32, vocab=201):
    return random_ce_inputs(6, 7, vocab, dtype=dtype, device="cuda", seed=seed)


def _decoder_case(seed, cell="gru"):
    dec = make_decoder(19, 8, 16, 2, device="cuda", seed=seed,
                       cls=(lambda *a: seq2seq_ext.Seq2SeqDecoder(*a, cell=cell)))
    return dec


CAPTURE_CASES = {}


def capture_case(name):
    def register(fn):
        CAPTURE_CASES[name] = fn
        return fn
    return register


@capture_case("masked_softmax_ce")
def _case_ce():
    return OPS.masked_softmax_ce, _ce(1), _ce(2)


@capture_case("masked_softmax_ce_bf16")
def _case_ce_bf16():
    return OPS.masked_softmax_ce, _ce(3, torch.bfloat16, 10000), _ce(4, torch.bfloat16, 10000)


@capture_case("masked_softmax_ce_backward")
def _case_ce_backward():
    def args(seed):
        pred, label, valid_len = _ce(seed)
        _, lse = OPS.masked_softmax_ce(pred, label, valid_len)
        return (torch.randn(pred.shape[0], device="cuda"), pred, label, valid_len, lse)
    return OPS.masked_softmax_ce_backward, args(5), args(6)


@capture_case("sequence_mask")
def _case_mask():
    def args(seed):
        pred, _, valid_len = _ce(seed)
        return pred, valid_len.float()
    return (lambda X, v: OPS.sequence_mask(X, v, -1.0)), args(7), args(8)


@capture_case("sequence_mask_")
def _case_mask_inplace():
    def fn(X, v):
        Y = X.clone()
        OPS.sequence_mask_(Y, v, 0)
        return Y

    def args(seed):
        pred, _, valid_len = _ce(seed)
        return pred, valid_len
    return fn, args(9), args(10)


def _layer_args(seed, extra=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 1.2 - 0.6).to("cuda", dtype)
    T, B, I, H = 9, 5, 7, 12
    return (r(T, B, I), r(B, H), r(3 * H, I), r(3 * H, H), r(3 * H), r(3 * H),
            r(B, 3 * H) if extra else None)


@capture_case("gru_layer")
def _case_layer():
    return OPS.gru_layer, _layer_args(11), _layer_args(12)


@capture_case("gru_layer_backward")
def _case_layer_backward():
    def args(seed):
        inp, h0, w_ih, w_hh, b_ih, b_hh, extra = _layer_args(seed)
        out, _, saved = OPS.gru_layer(inp, h0, w_ih, w_hh, b_ih, b_hh, extra)
        return (torch.randn_like(out), torch.randn_like(h0), inp, h0, w_ih, w_hh, out, saved,
                True)
    return OPS.gru_layer_backward, args(13), args(14)


@capture_case("gru_decode_step")
def _case_decode_step():
    dec = _decoder_case(15)
    emb_proj, ctx, weights, dw, db = fused_decoder_args(dec)

    def fn(token, state):
        return OPS.gru_decode_step(token, state, emb_proj, ctx, list(weights), dw, db)

    def args(seed):
        return (random_tokens(4, 19, device="cuda", seed=seed),
                random_state(2, 4, 16, device="cuda", seed=seed))
    return fn, args(16), args(17)


@capture_case("greedy_decode")
def _case_greedy():
    dec = _decoder_case(18)
    emb_proj, ctx, weights, dw, db = fused_decoder_args(dec)

    def fn(state):
        return OPS.greedy_decode(state, emb_proj, ctx, list(weights), dw, db, 1, 2, 8)
    return fn, (random_state(2, 4, 16, device="cuda", seed=19),), \
        (random_state(2, 4, 16, device="cuda", seed=20),)


@capture_case("lstm_decode_step")
def _case_lstm_step():
    dec = _decoder_case(21, cell="lstm")
    emb_proj, ctx, weights, dw, db = fused_decoder_args(dec)

    def fn(token, h, c):
        return OPS.lstm_decode_step(token, h, c, emb_proj, ctx, list(weights), dw, db)

    def args(seed):
        return (random_tokens(4, 19, device="cuda", seed=seed),
                random_state(2, 4, 16, device="cuda", seed=seed),
                random_state(2, 4, 16, device="cuda", seed=seed + 100))
    return fn, args(22), args(23)


def _stack_case(seed, cell):
    """rnn_stack's fixed weights and two sets of (input, h0, c0, dropout mask)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 1.2 - 0.6).to("cuda")
    T, B, I, H, L = 7, 5, 6, 10, 2
    G = (4 if cell == "lstm" else 3) * H
    weights = [w for layer in range(L) for w in (r(G, I if layer == 0 else H), r(G, H), r(G),
                                                   r(G))]

    def args():
        mask = ((torch.rand(L - 1, T, B, H, generator=g) > 0.3).double() / 0.7).to("cuda")
        return (r(T, B, I), r(L, B, H), r(L, B, H) if cell == "lstm" else None, mask)
    return [w.float() for w in weights], [tuple(a.float() if a is not None else None
                                                for a in args()) for _ in range(2)]


def _stack_forward_case(cell, seed):
    weights, (static, fresh) = _stack_case(seed, cell)

    def fn(x, h0, c0, mask):
        return OPS.rnn_stack(cell, x, h0, c0, weights, mask)
    return fn, static, fresh


def _stack_backward_case(cell, seed):
    weights, sets = _stack_case(seed, cell)

    def args(x, h0, c0, mask):
        out, h_n, c_n, saved = OPS.rnn_stack(cell, x, h0, c0, weights, mask)
        return (torch.randn_like(out), torch.randn_like(h_n),
                torch.randn_like(h_n) if cell == "lstm" else None, x, h0, c0, mask, saved)

    def fn(grad_out, grad_hn, grad_cn, x, h0, c0, mask, saved):
        gx, gh, gc, gw = OPS.rnn_stack_backward(cell, grad_out, grad_hn, grad_cn, x, h0, c0,
                                                weights, mask, saved)
        return (gx, gh, gc, *gw)
    return fn, args(*sets[0]), args(*sets[1])


for _cell in ("gru", "lstm"):
    capture_case(f"rnn_stack_{_cell}")(lambda cell=_cell: _stack_forward_case(cell, 24))
    capture_case(f"rnn_stack_backward_{_cell}")(lambda cell=_cell: _stack_backward_case(cell, 25))


@NEEDS_CUDA
@pytest.mark.parametrize("name", sorted(CAPTURE_CASES))
def test_op_can_be_captured_in_a_cuda_graph(name):
    """No op synchronises with the host (a sync inside a capture raises), and a replay on new
    inputs gives the eager results."""
    fn, static_args, fresh_args = CAPTURE_CASES[name]()
    _check_replay(fn, static_args, fresh_args)


# ----------------------------------------------------------------------------------------------
# the GRU layer's graph path
# ----------------------------------------------------------------------------------------------

def _layer_with_grads(args, mode):
    leaves = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    with cuda_graphs.use_mode(mode):
        out, h_n = ops.gru_layer(*leaves)
        grad_out = torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)
        torch.autograd.backward([out, h_n], [grad_out, torch.ones_like(h_n)])
    return out.detach(), h_n.detach(), [l.grad for l in leaves if l is not None]


@NEEDS_CUDA
@pytest.mark.parametrize("extra", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_graph_path_equals_eager_forward_and_backward(extra, dtype):
    args = _layer_args(31, extra, dtype)
    eager = _layer_with_grads(args, "eager")
    graph = _layer_with_grads(args, "graph")
    torch.testing.assert_close(graph[0], eager[0], **CLOSE)
    torch.testing.assert_close(graph[1], eager[1], **CLOSE)
    for g, e in zip(graph[2], eager[2]):
        torch.testing.assert_close(g, e, **CLOSE)
    assert len(cuda_graphs._graphs) == 2  # the forward and the backward, captured once each


@NEEDS_CUDA
def test_graph_path_follows_in_place_weight_updates_and_new_activations():
    args = list(_layer_args(32))
    with torch.no_grad(), cuda_graphs.use_mode("graph"):
        first = ops.gru_layer(*args)
        args[3].mul_(0.5)                      # w_hh updated in place (an optimizer step)
        args[0] = args[0] + 0.25               # a new input tensor
        second = ops.gru_layer(*args)
    with torch.no_grad(), cuda_graphs.use_mode("eager"):
        expected = ops.gru_layer(*args)
    assert not torch.allclose(first[0], second[0])
    torch.testing.assert_close(second[0], expected[0], **CLOSE)
    torch.testing.assert_close(second[1], expected[1], **CLOSE)
    assert len(cuda_graphs._graphs) == 1


@NEEDS_CUDA
def test_graph_path_after_another_capture_and_with_another_current_device():
    """A graph captured earlier in the process (PyTorch's shared capture stream then exists)
    and, with two GPUs, tensors on a device other than the current one: the layer's graph is
    captured on its tensors' device and stream, so replays follow new inputs."""
    side = torch.cuda.CUDAGraph()
    static = torch.zeros(4, device="cuda")
    with torch.cuda.graph(side):
        static.add_(1)
    devices = ["cuda:0"] + (["cuda:1"] if torch.cuda.device_count() > 1 else [])
    for device in devices:
        args = [None if a is None else a.to(device) for a in _layer_args(34)]
        with torch.no_grad(), torch.cuda.device(0), cuda_graphs.use_mode("graph"):
            first = ops.gru_layer(*args)
            args[0] = args[0] * 0.5
            second = ops.gru_layer(*args)
        with torch.no_grad(), cuda_graphs.use_mode("eager"):
            expected = ops.gru_layer(*args)
        assert second[0].device == torch.device(device)
        assert not torch.allclose(first[0], second[0])
        torch.testing.assert_close(second[0], expected[0], **CLOSE)


@NEEDS_CUDA
def test_weights_new_at_every_call_turn_the_class_eager(monkeypatch):
    """Weights recomputed at every call (as a parametrization does) capture at every call
    until the rule turns the class eager; every result equals the eager op's."""
    monkeypatch.setattr(cuda_graphs, "rule", cuda_graphs.Rule(
        timer=lambda fn: 1.0 if fn.__name__ == "replay" else 10.0, recapture_limit=3))
    args = list(_layer_args(35))
    w_hh = args[3]
    with torch.no_grad():
        for i in range(6):
            args[3] = w_hh * (1.0 + 0.1 * i)  # a new tensor, new values
            got = ops.gru_layer(*args)
            with cuda_graphs.use_mode("eager"):
                expected = ops.gru_layer(*args)
            torch.testing.assert_close(got[0], expected[0], **CLOSE)
    (choice, _, _), = cuda_graphs.rule.choices().values()
    assert choice == "eager"
    assert len(cuda_graphs._graphs) == 0  # its four graphs dropped when it went eager


@NEEDS_CUDA
def test_threads_replaying_one_graph_get_their_own_results():
    """Two threads replay the same captured call with their own inputs: each replay copies its
    inputs into the shared buffers and clones the outputs under the entry's lock."""
    base = list(_layer_args(36))
    inputs = [base[0] * (1.0 + 0.05 * k) for k in range(8)]
    with torch.no_grad(), cuda_graphs.use_mode("eager"):
        expected = [ops.gru_layer(x, *base[1:])[0] for x in inputs]
    failures = []

    def work(offset):
        try:
            with torch.no_grad(), cuda_graphs.use_mode("graph"):
                for r in range(40):
                    k = (offset + r) % len(inputs)
                    got = ops.gru_layer(inputs[k], *base[1:])[0]
                    torch.cuda.current_stream().synchronize()
                    if not torch.allclose(got, expected[k], **CLOSE):
                        failures.append(k)
        except Exception as e:  # reported below, with the thread's error
            failures.append(repr(e))

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert len(cuda_graphs._graphs) == 1


@NEEDS_CUDA
def test_auto_mode_measures_each_shape_class_once():
    args = _layer_args(33)
    with torch.no_grad():
        expected = OPS.gru_layer(*args)
        for _ in range(3):
            got = ops.gru_layer(*args)
            torch.testing.assert_close(got[0], expected[0], **CLOSE)
    choices = cuda_graphs.rule.choices()
    assert len(choices) == 1
    (choice, t_eager, t_graph), = choices.values()
    assert choice in ("eager", "graph") and t_eager > 0 and t_graph > 0


@NEEDS_CUDA
def test_model_training_step_with_graphs_equals_eager():
    torch.manual_seed(0)
    net = seq2seq_ext.EncoderDecoder(seq2seq_ext.Seq2SeqEncoder(23, 8, 16, 2),
                                     seq2seq_ext.Seq2SeqDecoder(29, 8, 16, 2)).cuda()
    X = torch.randint(0, 23, (6, 7), device="cuda")
    Y = torch.randint(0, 29, (6, 7), device="cuda")
    results = []
    for mode in ("eager", "graph"):
        net.zero_grad()
        with cuda_graphs.use_mode(mode):
            out, _ = net(X, Y)
            out.square().mean().backward()
        results.append([out.detach()] + [p.grad.clone() for p in net.parameters()])
        # eager mode captures nothing; graph mode captures the layers (their weights are
        # nn.Parameter objects) forward and backward
        assert len(cuda_graphs._graphs) == (0 if mode == "eager" else 8)
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, **CLOSE)


# ----------------------------------------------------------------------------------------------
# device-side range checks (each in its own process: a device-side assert ends the context)
# ----------------------------------------------------------------------------------------------

BAD_INDEX_SCRIPTS = {
    "label": """
        import torch, seq2seq_ext
        pred = torch.randn(2, 3, 5, device="cuda")
        label = torch.tensor([[0, 1, 2], [3, 5, 0]], device="cuda")
        loss, _ = torch.ops.seq2seq_ext.masked_softmax_ce(pred, label, torch.tensor([3, 1], device="cuda"))
        torch.cuda.synchronize()
    """,
    "token": """
        import torch, seq2seq_ext
        from seq2seq_ext.models import fused_decoder_args
        dec = seq2seq_ext.Seq2SeqDecoder(7, 4, 6, 2).cuda().eval()
        state = torch.zeros(2, 3, 6, device="cuda")
        token = torch.tensor([1, 7, 0], device="cuda")
        torch.ops.seq2seq_ext.gru_decode_step(token, state, *fused_decoder_args(dec))
        torch.cuda.synchronize()
    """,
}
BAD_INDEX_MESSAGES = {
    "label": "label: expected class indices in [0, 5), got 5 at position [1, 1]",
    "token": "token: expected ids in [0, 7) (the rows of emb_proj), got 7 at position 1",
}


@NEEDS_CUDA
@pytest.mark.parametrize("name", sorted(BAD_INDEX_SCRIPTS))
def test_out_of_range_ids_stop_the_cuda_kernel_with_the_cpu_message(name):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(BAD_INDEX_SCRIPTS[name])],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert BAD_INDEX_MESSAGES[name] in proc.stdout + proc.stderr
    assert "device-side assert" in proc.stderr
