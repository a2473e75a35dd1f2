"""torch.compile and the extension: AOT-dispatch opchecks with static shapes, a compiled training
step and a compiled one-step decode, each against eager.

What ``torch.compile`` meets in the model (torch 2.13):

* ``Seq2SeqEncoder.forward`` / ``Seq2SeqDecoder.forward`` read their ``nn.GRU`` submodule (for its
  weights only; the GRU's own forward never runs under the extension backend). Dynamo refuses
  to wrap an RNN module unless ``torch._dynamo.config.allow_rnn = True`` ("Attempted to wrap
  RNN, GRU, or LSTM").
* ``ops.has_kernel`` (called by the models to pick the fused path) returns a Python bool from
  ``torch._C._dispatch_has_kernel_for_dispatch_key``; it is marked
  ``torch.compiler.assume_constant_result`` so that Dynamo folds it instead of breaking the graph.
* ``loss.backward()`` inside the compiled function: "Unsupported Tensor.backward() call" unless
  ``torch._dynamo.config.trace_autograd_ops = True``. Without it the forward and the loss
  compile as one graph and AOTAutograd compiles the backward graph, run by ``.backward()``
  outside.
* The decoder's one-step inference path (no grad) goes through the registered op while compiling:
  ``ops.direct_cpu_call_ok`` asks ``torch.compiler.is_compiling()`` first (the C++
  ``DecoderStepper`` fast path is opaque to Dynamo), and the embedding projection and a fixed
  context's projection are computed by torch ops. With ``allow_rnn`` the decoder module's step
  compiles as one graph, for every cell and context rule.
"""
import pytest
import torch
import torch.nn.functional as F

import seq2seq_ext as d2l
from seq2seq_ext import ops

from helpers import devices, random_ce_inputs, random_state, random_tokens

DEVICES = devices()
_ops = torch.ops.seq2seq_ext
STATIC = ("test_aot_dispatch_static",)


def _model(src_vocab=11, tgt_vocab=13, embed=6, hidden=8, layers=2, device="cpu", seed=0):
    torch.manual_seed(seed)
    net = d2l.EncoderDecoder(d2l.Seq2SeqEncoder(src_vocab, embed, hidden, layers),
                             d2l.Seq2SeqDecoder(tgt_vocab, embed, hidden, layers))
    with torch.no_grad():
        for p in net.parameters():
            p.uniform_(-0.5, 0.5)
    return net.to(device)


def _batch(device="cpu", batch=4, steps=5, src_vocab=11, tgt_vocab=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, src_vocab, (batch, steps), generator=g)
    Y = torch.randint(0, tgt_vocab, (batch, steps), generator=g)
    X_valid_len = torch.randint(1, steps + 1, (batch,), generator=g)
    Y_valid_len = torch.randint(0, steps + 1, (batch,), generator=g)
    dec_input = torch.cat([torch.ones(batch, 1, dtype=Y.dtype), Y[:, :-1]], 1)
    return [t.to(device) for t in (X, dec_input, X_valid_len, Y, Y_valid_len)]


def _emb_proj(decoder):
    """Layer 0's input projection of every target token, by torch ops (compilable)."""
    w_ih0, b_ih0 = decoder.rnn.weight_ih_l0, decoder.rnn.bias_ih_l0
    return F.linear(decoder.embedding.weight, w_ih0[:, :decoder.embedding.embedding_dim], b_ih0)


# ----------------------------------------------------------------------------------------------
# opcheck: test_aot_dispatch_static (the default test_utils, test_aot_dispatch_dynamic
# included, run in tests/ops/test_<op>.py)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_static_masked_softmax_ce(device):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        pred, label, valid_len = random_ce_inputs(3, 4, 6, dtype=dtype, device=device, seed=2)
        torch.library.opcheck(_ops.masked_softmax_ce, (pred.requires_grad_(), label, valid_len),
                              test_utils=STATIC)
        loss, lse = _ops.masked_softmax_ce(pred.detach(), label, valid_len)
        torch.library.opcheck(_ops.masked_softmax_ce_backward,
                              (torch.randn_like(loss), pred.detach(), label, valid_len, lse),
                              test_utils=STATIC)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_static_sequence_mask(device):
    X = torch.randn(3, 5, 2, device=device)
    valid_len = torch.tensor([0, 2, 7], device=device)
    torch.library.opcheck(_ops.sequence_mask, (X.clone().requires_grad_(), valid_len, 1.5),
                          test_utils=STATIC)
    torch.library.opcheck(_ops.sequence_mask_, (X.clone(), valid_len, -1.0), test_utils=STATIC)


def _layer_args(device, with_extra, dtype=torch.float32, steps=4, batch=3, in_size=5, hidden=6):
    g = torch.Generator().manual_seed(7)

    def r(*shape):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) - 0.5).to(device, dtype)

    extra = r(batch, 3 * hidden) if with_extra else None
    return [r(steps, batch, in_size), r(batch, hidden), r(3 * hidden, in_size),
            r(3 * hidden, hidden), r(3 * hidden), r(3 * hidden), extra]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_extra", [False, True])
def test_opcheck_static_gru_layer(device, with_extra):
    args = _layer_args(device, with_extra)
    torch.library.opcheck(_ops.gru_layer, tuple(a if a is None else a.clone().requires_grad_()
                                                for a in args), test_utils=STATIC)
    out, h_n, saved = _ops.gru_layer(*args)  # the backward op takes tensors without grad
    torch.library.opcheck(_ops.gru_layer_backward,
                          (torch.randn_like(out), torch.randn_like(h_n), *args[:4], out, saved,
                           with_extra), test_utils=STATIC)


def _decoder_args(device, dtype, batch=3, with_ctx=False):
    dec = _model(device=device).decoder.to(dtype).eval()
    state = random_state(2, batch, 8, dtype=dtype, device=device, seed=3)
    ctx = (torch.randn(batch, 24, dtype=dtype, device=device) if with_ctx else None)
    weights = [w.detach() for w in dec.rnn._flat_weights]
    return dec, state, ctx, weights


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_static_decode_ops(device, dtype):
    for with_ctx in (False, True):
        dec, state, ctx, weights = _decoder_args(device, dtype, with_ctx=with_ctx)
        emb_proj = _emb_proj(dec).detach()
        dw, db = dec.dense.weight.detach(), dec.dense.bias.detach()
        token = random_tokens(3, 13, device=device, seed=4)
        torch.library.opcheck(_ops.gru_decode_step,
                              (token[:, None], state, emb_proj, ctx, weights, dw, db),
                              test_utils=STATIC)
        torch.library.opcheck(_ops.greedy_decode,
                              (state, emb_proj, ctx, weights, dw, db, 1, 2, 4),
                              test_utils=STATIC)


# ----------------------------------------------------------------------------------------------
# a compiled training step
# ----------------------------------------------------------------------------------------------

def _train_step(net, loss):
    def step(X, dec_input, X_valid_len, Y, Y_valid_len):
        Y_hat, _ = net(X, dec_input, X_valid_len)
        return loss(Y_hat, Y, Y_valid_len).sum()
    return step


def _train_step_with_backward(net, loss):
    forward = _train_step(net, loss)

    def step(*batch):
        l = forward(*batch)
        l.backward()
        return l.detach()
    return step


def _eager_reference(device):
    net = _model(device=device)
    batch = _batch(device)
    l = _train_step(net, d2l.MaskedSoftmaxCELoss())(*batch)
    l.backward()
    return l.detach(), [p.grad.clone() for p in net.parameters()], batch


def _check_compiled_step(step_factory, device, backend, fullgraph):
    expected_loss, expected_grads, batch = _eager_reference(device)
    net = _model(device=device)
    torch._dynamo.reset()
    compiled = torch.compile(step_factory(net, d2l.MaskedSoftmaxCELoss()), backend=backend,
                             fullgraph=fullgraph)
    l = compiled(*batch)
    if l.requires_grad:
        l.backward()
    # the compiled graph may reorder the float32 reductions
    torch.testing.assert_close(l.detach(), expected_loss, rtol=1e-5, atol=1e-6)
    for p, g in zip(net.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


@pytest.fixture
def fullgraph_model():
    """The settings under which the training step compiles as one graph: RNN modules allowed
    (the GRU module is only read for its weights) and ``Tensor.backward`` traced."""
    with torch._dynamo.config.patch(allow_rnn=True, trace_autograd_ops=True):
        yield


@pytest.fixture
def new_process_mode_state(monkeypatch):
    """The CUDA-graph mode's thread-local state as a new process has it, before any
    ``use_mode`` (earlier tests leave theirs behind)."""
    from seq2seq_ext import cuda_graphs
    monkeypatch.setattr(cuda_graphs, "_mode_state", cuda_graphs._ModeState())


@pytest.mark.parametrize("device", DEVICES)
def test_training_step_compiles_with_graph_breaks(device, new_process_mode_state):
    """As the package stands (default Dynamo settings): forward + loss + backward compiled with
    fullgraph=False give the eager loss and gradients."""
    _check_compiled_step(_train_step_with_backward, device, "aot_eager", fullgraph=False)


@pytest.mark.parametrize("device", DEVICES)
def test_training_step_graph_break_reasons(device, new_process_mode_state):
    """The graph breaks are the documented ones (module docstring), and nothing else; the
    backward Dynamo traces (the ops' Python backward) runs in a new process too (it once set up
    the CUDA-graph mode's state inside the traced frame, which Dynamo rejects)."""
    net = _model(device=device)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(_train_step_with_backward(net, d2l.MaskedSoftmaxCELoss()))(
        *_batch(device))
    reasons = " | ".join(str(b.reason) for b in explained.break_reasons)
    assert explained.graph_break_count >= 1
    known = ("Attempted to wrap RNN, GRU, or LSTM", "torch.* op returned non-Tensor",
             "Tensor.backward")
    for b in explained.break_reasons:
        assert any(k in str(b.reason) for k in known), reasons


@pytest.mark.parametrize("device", DEVICES)
def test_training_step_fullgraph(device, fullgraph_model):
    """forward + loss + backward as one graph (aot_eager: Dynamo, AOTAutograd, the fake
    kernels and the autograd formulas of the ops, without code generation)."""
    _check_compiled_step(_train_step_with_backward, device, "aot_eager", fullgraph=True)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_and_loss_fullgraph_backward_outside(device, fullgraph_model):
    """The usual pattern: the compiled forward + loss, ``.backward()`` on its output runs the
    backward graph AOTAutograd compiled."""
    with torch._dynamo.config.patch(trace_autograd_ops=False):
        _check_compiled_step(_train_step, device, "aot_eager", fullgraph=True)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_training_step_fullgraph_inductor(device, fullgraph_model):
    """The same with Inductor's code generation (about a minute on 2 CPU cores)."""
    _check_compiled_step(_train_step_with_backward, device, "inductor", fullgraph=True)


# ----------------------------------------------------------------------------------------------
# a compiled one-step decode
# ----------------------------------------------------------------------------------------------

def _decode_step_inputs(device):
    net = _model(device=device).eval()
    state = random_state(2, 4, 8, device=device, seed=5)
    token = random_tokens(4, 13, device=device, seed=5)[:, None]
    with torch.no_grad():
        expected = net.decoder(token, state)
        reference_out = d2l.reference.Seq2SeqDecoder.forward(net.decoder, token, state)
    torch.testing.assert_close(expected[0], reference_out[0])
    return net, token, state, expected


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_one_step_decode_fullgraph(device, backend):
    """The decode step op with the embedding projection computed by torch ops: one graph."""
    net, token, state, (exp_out, exp_state) = _decode_step_inputs(device)
    dec = net.decoder

    def step(token, state):
        return ops.gru_decode_step(token, state, _emb_proj(dec), None, dec.rnn._flat_weights,
                                   dec.dense.weight, dec.dense.bias)

    torch._dynamo.reset()
    with torch.no_grad(), torch._dynamo.config.patch(allow_rnn=True):
        out, new_state = torch.compile(step, backend=backend, fullgraph=True)(token, state)
    torch.testing.assert_close(out, exp_out)
    torch.testing.assert_close(new_state, exp_state)


@pytest.mark.parametrize("device", DEVICES)
def test_decoder_module_step_compiles_with_graph_breaks(device):
    """``net.decoder(token, state)`` (no grad) compiled with fullgraph=False: the eager result
    (the C++ DecoderStepper and the dispatch-stack check run outside the graph)."""
    net, token, state, (exp_out, exp_state) = _decode_step_inputs(device)

    def step(token, state):
        with torch.no_grad():
            return net.decoder(token, state)

    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=True):
        out, new_state = torch.compile(step, backend="aot_eager")(token, state)
    torch.testing.assert_close(out, exp_out)
    torch.testing.assert_close(new_state, exp_state)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", [{}, {"fixed_context": True}, {"cell": "lstm"},
                                     {"cell": "lstm", "fixed_context": True}],
                         ids=["gru", "gru-fixed", "lstm", "lstm-fixed"])
def test_decoder_module_step_fullgraph(device, variant):
    """``net.decoder(token, state)`` (no grad) as one graph, equal to eager, for every variant."""
    torch.manual_seed(3)
    cell = variant.get("cell", "gru")
    enc = d2l.Seq2SeqEncoder(11, 6, 8, 2, cell=cell).to(device).eval()
    dec = d2l.Seq2SeqDecoder(13, 6, 8, 2, **variant).to(device).eval()
    state = dec.init_state(enc(torch.randint(0, 11, (4, 5), device=device)))
    token = random_tokens(4, 13, device=device, seed=7)[:, None]
    with torch.no_grad():
        expected = dec(token, state)
        torch._dynamo.reset()
        with torch._dynamo.config.patch(allow_rnn=True):
            out = torch.compile(lambda t, s: dec(t, s), backend="aot_eager",
                                fullgraph=True)(token, state)
    torch.testing.assert_close(out[0], expected[0])
    torch.testing.assert_close(out[1], expected[1])


# ----------------------------------------------------------------------------------------------
# compiled autograd: the backward graph compiled too (torch._dynamo.compiled_autograd)
# ----------------------------------------------------------------------------------------------

def _grads_under(compiled_backward, fn, params):
    for p in params:
        p.grad = None
    if compiled_backward:
        torch._dynamo.reset()
        with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
            fn()
    else:
        fn()
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_compiled_autograd_drop_in_layers_and_one_step_loop(cell):
    """The fused stack op's autograd node (C++) under compiled autograd: a sequence through the
    drop-in layer, then a decoder's one-step calls in a Python loop (the seeds' teacher-forcing
    pattern, whose matrices' gradients are summed over the calls), the eager gradients."""
    torch.manual_seed(3)
    cls = d2l.nn.GRU if cell == "gru" else d2l.nn.LSTM
    enc, dec = cls(5, 7, 2), cls(7, 7, 2, batch_first=True)
    params = list(enc.parameters()) + list(dec.parameters())
    x = torch.randn(6, 3, 5)

    def run():
        out, state = enc(x)
        total = out.sum()
        step_in = out[-1].unsqueeze(1)
        for _ in range(4):  # one time step a call, batch_first
            step_out, state = dec(step_in, state)
            total = total + step_out.square().sum()
            step_in = step_out
        total.backward()

    want = _grads_under(False, run, params)
    got = _grads_under(True, run, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: d2l.accelerate(torch.nn.GRU(6, 8, 2, batch_first=True)),
    lambda: d2l.accelerate(torch.nn.LSTM(6, 8, 2, batch_first=True)),
], ids=["gru", "lstm"])
def test_training_keeps_the_batch_size_dynamic(make):
    """The fused layer op under compiled training reads its arguments' sizes symbolically: a
    batch dimension marked dynamic stays dynamic (no ConstraintViolationError), and new batch
    sizes reuse the graph instead of recompiling each."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    layer = make()
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(allow_rnn=True):
        step = torch.compile(lambda x: layer(x)[0].sum(), backend="aot_eager")
        x = torch.randn(5, 3, 6, requires_grad=True)
        torch._dynamo.mark_dynamic(x, 0)
        step(x).backward()
        graphs = counters["stats"]["unique_graphs"]
        for batch in (4, 7):
            x = torch.randn(batch, 3, 6, requires_grad=True)
            step(x).backward()
            want = torch.autograd.grad(layer(x)[0].sum(), x)[0]  # eager
            torch.testing.assert_close(x.grad, want)
        assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_export_of_drop_in_layers_and_package_models(cell):
    """torch.export of a drop-in layer records PyTorch's own layer (as torch.jit.trace does), and
    of a package model its registered ops or PyTorch's; the exported programs give the eager
    results on new inputs of the traced shapes."""
    torch.manual_seed(0)
    layer = (d2l.nn.GRU if cell == "gru" else d2l.nn.LSTM)(5, 7, 2, batch_first=True).eval()
    x = torch.randn(3, 4, 5)
    program = torch.export.export(layer, (x,))
    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert (torch.ops.aten.gru.input if cell == "gru" else torch.ops.aten.lstm.input) in targets
    x = torch.randn(3, 4, 5)
    torch.testing.assert_close(program.module()(x), layer(x))

    net = d2l.EncoderDecoder(d2l.Seq2SeqEncoder(11, 6, 8, 2, cell=cell),
                             d2l.Seq2SeqDecoder(13, 6, 8, 2, cell=cell)).eval()
    X, dec_input, X_valid_len = _batch()[:3]
    program = torch.export.export(net, (X, dec_input, X_valid_len))
    X, dec_input, X_valid_len = _batch(seed=2)[:3]
    torch.testing.assert_close(program.module()(X, dec_input, X_valid_len),
                               net(X, dec_input, X_valid_len))
