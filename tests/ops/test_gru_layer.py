"""The fused GRU layer: ``ops.gru_layer`` / ``torch.ops.seq2seq_ext.gru_layer`` and
``gru_layer_backward``, and the multi-layer ``ops.gru`` built on it, against ``nn.GRU``. (The
encoder/decoder and the training loop that run on them: tests/test_model_parity.py.)

Tolerances (helpers.py): float64 is compared tightly (``GRU_F64_TOL``). In float32 the op
computes the input projection of all steps in one GEMM, adds the biases in another order than
``nn.GRU`` and evaluates tanh as ``expm1(2x) / (expm1(2x) + 2)``, so GEMM, summation and
transcendental rounding differ from ``nn.GRU``'s: ``GRU_F32_TOL`` is rtol 1e-5 / atol 1e-5.
"""
import contextlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from seq2seq_ext import ops, reference

from helpers import (GRU_F64_TOL, NOT_DIFFERENTIATED, assert_bf16_close, assert_close_dict,
                     devices, generator, gru_tol)

LAYER = torch.ops.seq2seq_ext.gru_layer.default
LAYER_BACKWARD = torch.ops.seq2seq_ext.gru_layer_backward.default
DEVICES = devices()
DTYPES = [torch.float32, torch.float64]

GRAD_NAMES = ("input", "h0", "w_ih", "w_hh", "b_ih", "b_hh")


def _uniform(shape, *, dtype, device, seed, scale):
    g = generator(seed)
    t = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * scale
    return t.to(device=device, dtype=dtype)


def _normal(shape, *, dtype, device, seed, scale=1.0):
    g = generator(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    return t.to(device=device, dtype=dtype)


def _layer_params(in_size, hidden, *, dtype, device, seed, scale=0.6):
    """(w_ih (3H, in), w_hh (3H, H), b_ih (3H,), b_hh (3H,)), uniform in (-scale, scale)."""
    shapes = [(3 * hidden, in_size), (3 * hidden, hidden), (3 * hidden,), (3 * hidden,)]
    return [_uniform(s, dtype=dtype, device=device, seed=seed * 10 + k, scale=scale)
            for k, s in enumerate(shapes)]


def _nn_gru(params, *, dtype, device):
    """A one-layer ``nn.GRU`` holding ``params``."""
    w_ih, w_hh = params[0], params[1]
    rnn = nn.GRU(w_ih.shape[1], w_hh.shape[1]).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p, v in zip(rnn._flat_weights, params):
            p.copy_(v)
    return rnn


def _seeded_gru(in_size, hidden, layers, *, dtype, device, seed, dropout=0.0, scale=0.6):
    """An ``nn.GRU`` with seeded weights uniform in (-scale, scale)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rnn = nn.GRU(in_size, hidden, layers, dropout=dropout)
    rnn = rnn.to(device=device, dtype=dtype)
    with torch.no_grad():
        for k, p in enumerate(rnn._flat_weights):
            p.copy_(_uniform(p.shape, dtype=dtype, device=device, seed=seed * 100 + k,
                             scale=scale))
    return rnn


def _leaf(t):
    """A fresh leaf with ``t``'s values and strides (a permuted tensor stays permuted)."""
    return t.detach().clone().requires_grad_()


def _loss(out, h_n, grad_out, grad_hn):
    return (out * grad_out).sum() + (h_n * grad_hn).sum()


def _reference_layer(x, h0, params, grad_out, grad_hn):
    """nn.GRU (one layer) output, final state and the gradients named in GRAD_NAMES."""
    rnn = _nn_gru(params, dtype=x.dtype, device=x.device)
    xl = _leaf(x)
    hl = h0.detach().unsqueeze(0).clone().requires_grad_()
    out, h_n = rnn(xl, hl)
    grads = torch.autograd.grad(_loss(out, h_n[0], grad_out, grad_hn),
                                [xl, hl, *rnn._flat_weights])
    grads = [grads[0], grads[1][0], *grads[2:]]
    return out.detach(), h_n[0].detach(), dict(zip(GRAD_NAMES, grads))


def _ext_layer(x, h0, params, grad_out, grad_hn, extra=None):
    leaves = [_leaf(t) for t in (x, h0, *params)]
    out, h_n = ops.gru_layer(*leaves, extra)
    grads = torch.autograd.grad(_loss(out, h_n, grad_out, grad_hn), leaves)
    return out.detach(), h_n.detach(), dict(zip(GRAD_NAMES, grads))


def _layer_inputs(steps, batch, in_size, hidden, *, dtype, device, seed, permuted=False,
                  x_scale=1.0):
    if permuted:  # (batch, steps, in) permuted to (steps, batch, in): not contiguous
        x = _normal((batch, steps, in_size), dtype=dtype, device=device, seed=seed,
                    scale=x_scale).permute(1, 0, 2)
    else:
        x = _normal((steps, batch, in_size), dtype=dtype, device=device, seed=seed,
                    scale=x_scale)
    h0 = _uniform((batch, hidden), dtype=dtype, device=device, seed=seed + 1, scale=0.9)
    params = _layer_params(in_size, hidden, dtype=dtype, device=device, seed=seed + 2)
    grad_out = _normal((steps, batch, hidden), dtype=dtype, device=device, seed=seed + 3)
    grad_hn = _normal((batch, hidden), dtype=dtype, device=device, seed=seed + 4)
    return x, h0, params, grad_out, grad_hn


def _check_layer_parity(steps, batch, in_size, hidden, dtype, device, seed, permuted=False,
                        x_scale=1.0):
    x, h0, params, grad_out, grad_hn = _layer_inputs(
        steps, batch, in_size, hidden, dtype=dtype, device=device, seed=seed,
        permuted=permuted, x_scale=x_scale)
    if permuted and steps > 1 and batch > 1:
        assert not x.is_contiguous()
    out, h_n, grads = _ext_layer(x, h0, params, grad_out, grad_hn)
    ref_out, ref_hn, ref_grads = _reference_layer(x, h0, params, grad_out, grad_hn)
    tol = gru_tol(dtype, device)
    assert out.shape == (steps, batch, hidden) and h_n.shape == (batch, hidden)
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(h_n, ref_hn, **tol)
    torch.testing.assert_close(h_n, out[-1], rtol=0, atol=0)
    assert_close_dict(grads, ref_grads, tol)


# ----------------------------------------------------------------------------------------------
# one layer against nn.GRU
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=30, deadline=None)
@given(steps=st.integers(1, 7), batch=st.integers(1, 6), in_size=st.integers(1, 11),
       hidden=st.integers(1, 21), dtype=st.sampled_from(DTYPES), permuted=st.booleans(),
       seed=st.integers(0, 10_000))
def test_layer_matches_nn_gru_random_sizes(device, steps, batch, in_size, hidden, dtype,
                                           permuted, seed):
    _check_layer_parity(steps, batch, in_size, hidden, dtype, device, seed, permuted)


# (steps, batch, in, hidden, permuted, x_scale); hidden 37 runs the vectorised gate loop and
# its scalar tail; x_scale 20 drives the gates into saturation.
EXPLICIT_CASES = [
    pytest.param(1, 4, 5, 6, False, 1.0, id="steps1"),
    pytest.param(6, 1, 5, 6, False, 1.0, id="batch1"),
    pytest.param(5, 3, 4, 1, False, 1.0, id="hidden1"),
    pytest.param(5, 3, 1, 7, False, 1.0, id="in1"),
    pytest.param(1, 1, 1, 1, False, 1.0, id="all1"),
    pytest.param(7, 5, 6, 9, True, 1.0, id="permuted_input"),
    pytest.param(9, 6, 13, 37, False, 1.0, id="hidden37"),
    pytest.param(6, 4, 5, 37, True, 20.0, id="saturated"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("steps,batch,in_size,hidden,permuted,x_scale", EXPLICIT_CASES)
def test_layer_matches_nn_gru_explicit(device, dtype, steps, batch, in_size, hidden, permuted,
                                       x_scale):
    _check_layer_parity(steps, batch, in_size, hidden, dtype, device, seed=17,
                        permuted=permuted, x_scale=x_scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_column_slice_w_ih(device, dtype):
    """w_ih given as ``W[:, :I]`` (a non-contiguous view): forward equals nn.GRU with that
    block, and the gradient lands in W's first I columns only."""
    steps, batch, in_size, extra_cols, hidden = 6, 4, 5, 7, 8
    x, h0, params, grad_out, grad_hn = _layer_inputs(steps, batch, in_size, hidden, dtype=dtype,
                                                     device=device, seed=5)
    big = _uniform((3 * hidden, in_size + extra_cols), dtype=dtype, device=device, seed=99,
                   scale=0.6).requires_grad_()
    w_ih = big[:, :in_size]
    assert not w_ih.is_contiguous()
    rest = [_leaf(t) for t in (x, h0, params[1], params[2], params[3])]
    out, h_n = ops.gru_layer(rest[0], rest[1], w_ih, *rest[2:])
    grads = torch.autograd.grad(_loss(out, h_n, grad_out, grad_hn), [big, *rest])

    ref_params = [big.detach()[:, :in_size].contiguous(), *params[1:]]
    ref_out, ref_hn, ref = _reference_layer(x, h0, ref_params, grad_out, grad_hn)
    tol = gru_tol(dtype, device)
    torch.testing.assert_close(out.detach(), ref_out, **tol)
    torch.testing.assert_close(h_n.detach(), ref_hn, **tol)
    torch.testing.assert_close(grads[0][:, :in_size], ref["w_ih"], **tol)
    assert torch.count_nonzero(grads[0][:, in_size:]) == 0
    for got, name in zip(grads[1:], ("input", "h0", "w_hh", "b_ih", "b_hh")):
        torch.testing.assert_close(got, ref[name], **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use", ["output", "state"])
def test_layer_gradient_through_one_output_only(device, use):
    """Only the output, or only the final state, reaches the loss: the other gradient is
    None in the autograd formula and must count as zero."""
    dtype = torch.float64
    x, h0, params, grad_out, grad_hn = _layer_inputs(5, 3, 4, 6, dtype=dtype, device=device,
                                                     seed=31)
    if use == "output":
        grad_hn = torch.zeros_like(grad_hn)
    else:
        grad_out = torch.zeros_like(grad_out)
    leaves = [_leaf(t) for t in (x, h0, *params)]
    out, h_n = ops.gru_layer(*leaves)
    loss = (out * grad_out).sum() if use == "output" else (h_n * grad_hn).sum()
    grads = dict(zip(GRAD_NAMES, torch.autograd.grad(loss, leaves)))
    _, _, ref = _reference_layer(x, h0, params, grad_out, grad_hn)
    assert_close_dict(grads, ref, GRU_F64_TOL)


# ----------------------------------------------------------------------------------------------
# extra: the decoder's constant context
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("steps,batch,embed,ctx_size,hidden",
                         [(7, 4, 5, 6, 6), (1, 3, 4, 2, 5), (5, 1, 1, 3, 1), (8, 5, 9, 19, 19)])
def test_extra_equals_context_concatenation(device, dtype, steps, batch, embed, ctx_size,
                                            hidden):
    """``gru_layer(x, h0, W[:, :E], ..., extra=ctx @ W[:, E:]^T)`` is nn.GRU on
    ``cat(x, ctx.expand(T, ...))``, gradients with respect to ctx and W included."""
    x = _normal((steps, batch, embed), dtype=dtype, device=device, seed=41)
    ctx = _uniform((batch, ctx_size), dtype=dtype, device=device, seed=42, scale=0.9)
    h0 = _uniform((batch, hidden), dtype=dtype, device=device, seed=43, scale=0.9)
    w = _uniform((3 * hidden, embed + ctx_size), dtype=dtype, device=device, seed=44, scale=0.6)
    params = _layer_params(1, hidden, dtype=dtype, device=device, seed=45)[1:]
    grad_out = _normal((steps, batch, hidden), dtype=dtype, device=device, seed=46)
    grad_hn = _normal((batch, hidden), dtype=dtype, device=device, seed=47)

    leaves = [_leaf(t) for t in (x, ctx, h0, w, *params)]
    xl, cl, hl, wl, w_hh, b_ih, b_hh = leaves
    extra = cl @ wl[:, embed:].t()
    out, h_n = ops.gru_layer(xl, hl, wl[:, :embed], w_hh, b_ih, b_hh, extra)
    grads = torch.autograd.grad(_loss(out, h_n, grad_out, grad_hn), leaves)

    rnn = _nn_gru([w, *params], dtype=dtype, device=device)
    rx, rc, rh = _leaf(x), _leaf(ctx), h0.detach().unsqueeze(0).clone().requires_grad_()
    ref_out, ref_hn = rnn(torch.cat((rx, rc.expand(steps, batch, ctx_size)), 2), rh)
    ref = torch.autograd.grad(_loss(ref_out, ref_hn[0], grad_out, grad_hn),
                              [rx, rc, rh, *rnn._flat_weights])
    ref = [ref[0], ref[1], ref[2][0], *ref[3:]]

    tol = gru_tol(dtype, device)
    torch.testing.assert_close(out.detach(), ref_out.detach(), **tol)
    torch.testing.assert_close(h_n.detach(), ref_hn[0].detach(), **tol)
    for name, got, want in zip(("input", "ctx", "h0", "W", "w_hh", "b_ih", "b_hh"), grads, ref):
        torch.testing.assert_close(got, want, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_extra_gradient_is_sum_over_steps(device):
    """grad_extra is the sum over steps of the input-side gate gradients, i.e. the gradient
    of b_ih split per batch row: summed over the batch it equals grad b_ih."""
    x, h0, params, grad_out, grad_hn = _layer_inputs(6, 4, 3, 5, dtype=torch.float64,
                                                     device=device, seed=51)
    extra = _normal((4, 15), dtype=torch.float64, device=device, seed=52, scale=0.5)
    leaves = [_leaf(t) for t in (x, h0, *params, extra)]
    out, h_n = ops.gru_layer(*leaves)
    grads = torch.autograd.grad(_loss(out, h_n, grad_out, grad_hn), leaves)
    torch.testing.assert_close(grads[-1].sum(0), grads[4], **GRU_F64_TOL)
    assert grads[-1].shape == extra.shape


# ----------------------------------------------------------------------------------------------
# multi-layer ops.gru
# ----------------------------------------------------------------------------------------------

def _reference_gru(rnn, x, h0, grad_out, grad_hn, ctx=None):
    xl, hl = _leaf(x), _leaf(h0)
    inp = xl
    extra_leaves = []
    if ctx is not None:
        cl = _leaf(ctx)
        extra_leaves = [cl]
        inp = torch.cat((xl, cl.expand(x.shape[0], *ctx.shape)), 2)
    # cuDNN's RNN backward refuses a module in eval mode; PyTorch's own GRU is the reference there
    off = contextlib.nullcontext() if rnn.training else torch.backends.cudnn.flags(enabled=False)
    with off:
        out, h_n = rnn(inp, hl)
        grads = torch.autograd.grad(_loss(out, h_n, grad_out, grad_hn),
                                    [xl, hl, *extra_leaves, *rnn._flat_weights])
    return out.detach(), h_n.detach(), grads


def _ext_gru(rnn, x, h0, grad_out, grad_hn, dropout=0.0, training=False, ctx=None):
    flat = [_leaf(p) for p in rnn._flat_weights]
    xl, hl = _leaf(x), _leaf(h0)
    if ctx is None:
        extra_leaves, kwargs = [], {}
    else:
        cl = _leaf(ctx)
        extra_leaves = [cl]
        embed = x.shape[-1]
        kwargs = dict(w_ih0=flat[0][:, :embed], extra0=cl @ flat[0][:, embed:].t())
    out, h_n = ops.gru(xl, hl, flat, dropout, training, **kwargs)
    grads = torch.autograd.grad(_loss(out, h_n, grad_out, grad_hn),
                                [xl, hl, *extra_leaves, *flat])
    return out.detach(), h_n.detach(), grads


def _gru_inputs(steps, batch, in_size, hidden, layers, *, dtype, device, seed):
    x = _normal((steps, batch, in_size), dtype=dtype, device=device, seed=seed)
    h0 = _uniform((layers, batch, hidden), dtype=dtype, device=device, seed=seed + 1,
                  scale=0.9)
    grad_out = _normal((steps, batch, hidden), dtype=dtype, device=device, seed=seed + 2)
    grad_hn = _normal((layers, batch, hidden), dtype=dtype, device=device, seed=seed + 3)
    return x, h0, grad_out, grad_hn


def _assert_grads(got, want, tol, names):
    assert len(got) == len(want) == len(names)
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_gru_multilayer_matches_nn_gru(device, dtype, layers):
    steps, batch, in_size, hidden = 7, 5, 6, 9
    rnn = _seeded_gru(in_size, hidden, layers, dtype=dtype, device=device, seed=layers)
    x, h0, grad_out, grad_hn = _gru_inputs(steps, batch, in_size, hidden, layers, dtype=dtype,
                                           device=device, seed=60 + layers)
    out, h_n, grads = _ext_gru(rnn, x, h0, grad_out, grad_hn)
    ref_out, ref_hn, ref = _reference_gru(rnn, x, h0, grad_out, grad_hn)
    tol = gru_tol(dtype, device)
    assert h_n.shape == (layers, batch, hidden)
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(h_n, ref_hn, **tol)
    _assert_grads(grads, ref, tol, ["input", "h0", *rnn._flat_weights_names])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layers", [1, 2])
def test_gru_context_trick_matches_nn_gru(device, dtype, layers):
    """``ops.gru(..., w_ih0=W0[:, :E], extra0=ctx @ W0[:, E:]^T)`` is nn.GRU on the input
    concatenated with the repeated context, as the decoder uses it."""
    steps, batch, embed, hidden = 6, 4, 5, 7
    rnn = _seeded_gru(embed + hidden, hidden, layers, dtype=dtype, device=device,
                      seed=70 + layers)
    x, h0, grad_out, grad_hn = _gru_inputs(steps, batch, embed, hidden, layers, dtype=dtype,
                                           device=device, seed=80 + layers)
    ctx = h0[-1]
    out, h_n, grads = _ext_gru(rnn, x, h0, grad_out, grad_hn, ctx=ctx)
    ref_out, ref_hn, ref = _reference_gru(rnn, x, h0, grad_out, grad_hn, ctx=ctx)
    tol = gru_tol(dtype, device)
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(h_n, ref_hn, **tol)
    _assert_grads(grads, ref, tol, ["input", "h0", "ctx", *rnn._flat_weights_names])


# ----------------------------------------------------------------------------------------------
# dropout between layers
# ----------------------------------------------------------------------------------------------

def test_gru_dropout_draws_the_same_masks_as_nn_gru():
    """Training, dropout 0.4, 3 layers, same seed: ops.gru draws the inter-layer masks as
    nn.GRU does on the CPU (one ``dropout`` of each layer's output but the last, in layer
    order), so outputs, states and gradients agree to float64 rounding (the GEMMs are grouped
    differently, so bitwise equality is not expected)."""
    device, dtype, layers, p = "cpu", torch.float64, 3, 0.4
    steps, batch, in_size, hidden = 6, 4, 5, 7
    rnn = _seeded_gru(in_size, hidden, layers, dtype=dtype, device=device, seed=90, dropout=p)
    rnn.train()
    x, h0, grad_out, grad_hn = _gru_inputs(steps, batch, in_size, hidden, layers, dtype=dtype,
                                           device=device, seed=91)
    torch.manual_seed(1234)
    out, h_n, grads = _ext_gru(rnn, x, h0, grad_out, grad_hn, dropout=p, training=True)
    torch.manual_seed(1234)
    ref_out, ref_hn, ref = _reference_gru(rnn, x, h0, grad_out, grad_hn)
    torch.testing.assert_close(out, ref_out, **GRU_F64_TOL)
    torch.testing.assert_close(h_n, ref_hn, **GRU_F64_TOL)
    _assert_grads(grads, ref, GRU_F64_TOL, ["input", "h0", *rnn._flat_weights_names])

    # the masks are really there: another seed, or no dropout, gives another output
    torch.manual_seed(4321)
    other, _, _ = _ext_gru(rnn, x, h0, grad_out, grad_hn, dropout=p, training=True)
    plain, _, _ = _ext_gru(rnn, x, h0, grad_out, grad_hn)
    assert (other - out).abs().max() > 1e-3
    assert (plain - out).abs().max() > 1e-3


@pytest.mark.parametrize("packed", [False, True])
def test_gru_refuses_bad_dropout_and_weight_lists(packed):
    """``ops.gru``: a dropout outside [0, 1], a weight list that is not 4 tensors a layer and a
    state of another layer count are refused by name, on the padded and packed layouts alike;
    ``gru_over_projection`` checks the same."""
    rnn = _seeded_gru(4, 5, 2, dtype=torch.float64, device="cpu", seed=97)
    flat = list(rnn._flat_weights)
    x, h0, _, _ = _gru_inputs(3, 2, 4, 5, 2, dtype=torch.float64, device="cpu", seed=98)
    kwargs = {}
    if packed:
        kwargs = dict(batch_sizes=[2, 2, 1], positions=torch.tensor([0, 1, 2, 3, 4]))
        x = x.reshape(6, 4)[:5]
    for p in (1.5, -0.5, float("nan")):  # refused where torch.nn refuses it: in training
        with pytest.raises(RuntimeError, match="^dropout probability has to be between 0 and 1"):
            ops.gru(x, h0, flat, p, True, **kwargs)
        ops.gru(x, h0, flat, p, False, **kwargs)
    with pytest.raises(ValueError, match="^flat_weights: expected nn.GRU's flat weights"):
        ops.gru(x, h0[:1], flat[:6], **kwargs)
    with pytest.raises(RuntimeError, match="^h0: expected the state of a 2-layer GRU"):
        ops.gru(x, h0[:1], flat, **kwargs)
    with torch.no_grad():
        gi0 = torch.nn.functional.linear(x.reshape(3, 2, 4) if not packed else x[:4].view(2, 2, 4),
                                         flat[0], flat[2])
        with pytest.raises(ValueError, match="^flat_weights: expected nn.GRU's flat weights"):
            ops.gru_over_projection(gi0, h0[:1], flat[:6])
        for layers in (1, 3):
            with pytest.raises(RuntimeError, match="^h0: expected the state of a 2-layer GRU"):
                ops.gru_over_projection(gi0, torch.zeros(layers, 2, 5, dtype=torch.float64),
                                        flat)


@pytest.mark.parametrize("device", DEVICES)
def test_gru_dropout_statistics(device, monkeypatch):
    """The input of layer 2 is layer 1's output with a fraction ~p of its units zeroed and the
    others scaled by 1/(1-p), so that the mean is preserved."""
    p, layers, steps, batch, in_size, hidden = 0.3, 2, 20, 50, 8, 40
    rnn = _seeded_gru(in_size, hidden, layers, dtype=torch.float32, device=device, seed=95)
    x, h0, _, _ = _gru_inputs(steps, batch, in_size, hidden, layers, dtype=torch.float32,
                              device=device, seed=96)
    calls = []
    real = ops.gru_layer

    def spy(input, h0, *args):
        out = real(input, h0, *args)
        calls.append((input.detach(), out[0].detach()))
        return out

    monkeypatch.setattr(ops, "gru_layer", spy)
    torch.manual_seed(7)
    with torch.no_grad():
        ops.gru(x, h0, rnn._flat_weights, p, True)
    assert len(calls) == layers
    first_out, second_in = calls[0][1], calls[1][0]
    n = first_out.numel()
    dropped = second_in == 0
    assert torch.count_nonzero(first_out == 0) == 0
    frac = dropped.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac - p) < 6 * sigma, frac
    kept = ~dropped
    torch.testing.assert_close(second_in[kept], first_out[kept] / (1 - p), rtol=1e-6,
                               atol=0)
    diff_mean = (second_in - first_out).double().mean().item()
    mean_sigma = math.sqrt((first_out.double() ** 2).mean().item() * p / (1 - p) / n)
    assert abs(diff_mean) < 6 * mean_sigma
    # the last layer's output is not dropped
    assert torch.count_nonzero(calls[1][1] == 0) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gru_dropout_has_no_effect_in_eval(device, dtype):
    layers, p = 3, 0.5
    rnn = _seeded_gru(5, 6, layers, dtype=dtype, device=device, seed=97, dropout=p).eval()
    x, h0, grad_out, grad_hn = _gru_inputs(4, 3, 5, 6, layers, dtype=dtype, device=device,
                                           seed=98)
    rng = torch.get_rng_state()
    torch.manual_seed(1)
    out1, h1, grads = _ext_gru(rnn, x, h0, grad_out, grad_hn, dropout=p, training=False)
    torch.manual_seed(2)
    out2, h2, _ = _ext_gru(rnn, x, h0, grad_out, grad_hn, dropout=p, training=False)
    torch.set_rng_state(rng)
    assert torch.equal(out1, out2) and torch.equal(h1, h2)
    ref_out, ref_hn, ref = _reference_gru(rnn, x, h0, grad_out, grad_hn)
    tol = gru_tol(dtype, device)
    torch.testing.assert_close(out1, ref_out, **tol)
    torch.testing.assert_close(h1, ref_hn, **tol)
    _assert_grads(grads, ref, tol, ["input", "h0", *rnn._flat_weights_names])


# ----------------------------------------------------------------------------------------------
# gradcheck and opcheck
# ----------------------------------------------------------------------------------------------

def _small_layer_args(device, *, with_extra, seed, steps=3, batch=2, in_size=3, hidden=2,
                      dtype=torch.float64, requires_grad=True):
    x, h0, params, _, _ = _layer_inputs(steps, batch, in_size, hidden, dtype=dtype,
                                        device=device, seed=seed)
    extra = (_normal((batch, 3 * hidden), dtype=dtype, device=device, seed=seed + 9, scale=0.5)
             if with_extra else None)
    args = [x, h0, *params, extra]
    if requires_grad:
        args = [None if t is None else t.detach().clone().requires_grad_() for t in args]
    return args


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_extra", [False, True])
def test_gradcheck_layer(device, with_extra):
    args = _small_layer_args(device, with_extra=with_extra, seed=101)
    assert torch.autograd.gradcheck(lambda *a: ops.gru_layer(*a), tuple(args))


@pytest.mark.parametrize("with_extra", [False, True])
def test_gradgradcheck_layer(with_extra):
    # create_graph=True: the backward recomputes the call differentiably (ops._graph_grads)
    args = _small_layer_args("cpu", with_extra=with_extra, seed=102)
    assert torch.autograd.gradgradcheck(lambda *a: ops.gru_layer(*a), tuple(args))


def test_biases_made_in_inference_mode():
    """Frozen biases that are inference tensors (no version counter) beside weights that
    require grad: the gradients are the reference's."""
    args = _small_layer_args("cpu", with_extra=False, seed=107)
    with torch.inference_mode():
        args[4], args[5] = args[4].detach().clone(), args[5].detach().clone()
    out = ops.gru_layer(*args)[0]
    want = reference.gru_layer(*args)[0]
    torch.testing.assert_close(torch.autograd.grad(out.sum(), args[2]),
                               torch.autograd.grad(want.sum(), args[2]))
    # a create_graph backward (second derivatives) too: nothing to compare the biases with
    got = torch.autograd.grad(ops.gru_layer(*args)[0].square().sum(), args[2],
                              create_graph=True)[0]
    want = torch.autograd.grad(reference.gru_layer(*args)[0].square().sum(), args[2],
                               create_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(got.sum(), args[0]),
                               torch.autograd.grad(want.sum(), args[0]))


@pytest.mark.parametrize("name", ["b_ih", "b_hh", "extra"])
def test_create_graph_after_an_in_place_change_raises(name):
    """The biases and ``extra`` are kept without being saved (a first-order backward does not
    read them); a backward with create_graph, which recomputes the layer from them, refuses
    one changed in place since the forward, as autograd refuses a saved tensor."""
    args = _small_layer_args("cpu", with_extra=True, seed=106)
    out = ops.gru_layer(*args)[0]
    changed = {"b_ih": args[4], "b_hh": args[5], "extra": args[6]}[name]
    with torch.no_grad():
        changed.add_(1.0)
    with pytest.raises(RuntimeError,
                       match=rf"modified by an inplace operation: gru_layer's {name}"):
        torch.autograd.grad(out.sum(), args[0], create_graph=True)
    # the first-order backward does not read them
    assert torch.autograd.grad(out.sum(), args[0])[0].shape == args[0].shape


@pytest.mark.parametrize("with_extra", [False, True])
def test_batched_gradients_equal_the_reference(with_extra):
    """``autograd.grad(..., is_grads_batched=True)`` runs the backward under vmap (functorch
    runs the backward op once per gradient)."""
    args = _small_layer_args("cpu", with_extra=with_extra, seed=104)
    wrt = [t for t in args if t is not None]
    out, h_n = ops.gru_layer(*args)[:2]
    ref_out, ref_hn = reference.gru_layer(*args)[:2]
    v_out = torch.randn(4, *out.shape, dtype=out.dtype, generator=generator(105))
    v_hn = torch.randn(4, *h_n.shape, dtype=out.dtype, generator=generator(106))
    got = torch.autograd.grad((out, h_n), wrt, (v_out, v_hn), is_grads_batched=True)
    want = torch.autograd.grad((ref_out, ref_hn), wrt, (v_out, v_hn), is_grads_batched=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_layer_one_step_wide(device):
    args = _small_layer_args(device, with_extra=True, seed=103, steps=1, batch=3, in_size=2,
                             hidden=5)
    assert torch.autograd.gradcheck(lambda *a: ops.gru_layer(*a), tuple(args))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_gradcheck_two_layer_gru(device, dropout):
    """Two layers; with dropout the function reseeds itself, so every evaluation draws the
    same mask and the gradient through the mask is checked too."""
    rnn = _seeded_gru(3, 2, 2, dtype=torch.float64, device=device, seed=105)
    x, h0, _, _ = _gru_inputs(3, 2, 3, 2, 2, dtype=torch.float64, device=device, seed=106)
    leaves = [_leaf(t) for t in (x, h0, *rnn._flat_weights)]

    def f(x, h0, *flat):
        if dropout:
            torch.manual_seed(0)
        return ops.gru(x, h0, list(flat), dropout, bool(dropout))

    assert torch.autograd.gradcheck(f, tuple(leaves))


def _opcheck_samples(device):
    samples = []
    configs = [(4, 3, 5, 6, torch.float32, False, True),
               (3, 2, 4, 5, torch.float64, True, True),
               (1, 1, 1, 1, torch.float32, True, True),
               (5, 4, 3, 17, torch.float64, False, False),
               (6, 3, 7, 4, torch.float32, True, False)]
    for i, (steps, batch, in_size, hidden, dtype, with_extra, grad) in enumerate(configs):
        args = _small_layer_args(device, with_extra=with_extra, seed=110 + i, steps=steps,
                                 batch=batch, in_size=in_size, hidden=hidden, dtype=dtype,
                                 requires_grad=grad)
        samples.append(args)
    return samples


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_gru_layer(device):
    samples = _opcheck_samples(device)
    # a permuted input and a column-slice w_ih
    x, h0, w_ih, w_hh, b_ih, b_hh, extra = _small_layer_args(device, with_extra=True, seed=120,
                                                             steps=4, batch=3, in_size=5,
                                                             hidden=3, requires_grad=False)
    x = x.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    big = torch.cat((w_ih, torch.ones_like(w_ih)), 1)
    samples.append([x.requires_grad_(), h0, big[:, :5].requires_grad_(), w_hh, b_ih, b_hh,
                    extra])
    for args in samples:
        torch.library.opcheck(LAYER, tuple(args))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_gru_layer_backward(device):
    for i, args in enumerate(_opcheck_samples(device)):
        args = [None if t is None else t.detach() for t in args]
        x, h0, w_ih, w_hh, b_ih, b_hh, extra = args
        out, h_n, saved = LAYER(*args)
        grad_out = _normal(out.shape, dtype=out.dtype, device=device, seed=130 + i)
        grad_hn = (None if i % 2 else
                   _normal(h_n.shape, dtype=out.dtype, device=device, seed=140 + i))
        torch.library.opcheck(LAYER_BACKWARD, (grad_out, grad_hn, x, h0, w_ih, w_hh, out,
                                               saved, extra is not None))


@pytest.mark.parametrize("steps, batch, in_size", [(0, 2, 3), (3, 0, 3), (3, 2, 0), (1, 1, 3)])
def test_opcheck_and_gradcheck_at_the_edges(steps, batch, in_size):
    """No steps, an empty batch, no input features, and a single step of batch 1."""
    args = _small_layer_args("cpu", with_extra=True, seed=121, steps=steps, batch=batch,
                             in_size=in_size, hidden=2)
    torch.library.opcheck(LAYER, tuple(args))
    if steps * batch * in_size:
        assert torch.autograd.gradcheck(lambda *a: ops.gru_layer(*a), tuple(args))


def test_gru_layer_backward_has_no_derivative_of_its_own():
    """The backward op on inputs that require grad runs (opcheck's checks but the one that
    differentiates it), and differentiating its outputs names it, where its kernel's out=
    products raised before."""
    args = [None if t is None else t.detach() for t in _opcheck_samples("cpu")[0]]
    x, h0, w_ih, w_hh, b_ih, b_hh, extra = args
    out, h_n, saved = LAYER(*args)
    grad_out = _normal(out.shape, dtype=out.dtype, device="cpu", seed=131).requires_grad_()
    w_hh = w_hh.clone().requires_grad_()
    call = (grad_out, None, x, h0, w_ih, w_hh, out, saved, extra is not None)
    torch.library.opcheck(LAYER_BACKWARD, call, test_utils=NOT_DIFFERENTIATED)
    grads = LAYER_BACKWARD(*call)
    with pytest.raises(RuntimeError, match="derivative for .*gru_layer_backward"):
        torch.autograd.grad(grads[0].sum(), grad_out)


@pytest.mark.parametrize("device", DEVICES)
def test_layer_raw_op_outputs(device):
    """The raw op returns (output, final state, saved activations (T, B, 4H) = r, z, n,
    W_hn h + b_hn), and the backward's grad_extra is empty without extra."""
    steps, batch, in_size, hidden = 4, 3, 5, 6
    x, h0, params, _, _ = _layer_inputs(steps, batch, in_size, hidden, dtype=torch.float64,
                                        device=device, seed=150)
    out, h_n, saved = LAYER(x, h0, *params, None)
    assert saved.shape == (steps, batch, 4 * hidden)
    w_ih, w_hh, b_ih, b_hh = params
    h = h0
    for t in range(steps):
        gi = x[t] @ w_ih.t() + b_ih
        gh = h @ w_hh.t() + b_hh
        r = torch.sigmoid(gi[:, :hidden] + gh[:, :hidden])
        z = torch.sigmoid(gi[:, hidden:2 * hidden] + gh[:, hidden:2 * hidden])
        n = torch.tanh(gi[:, 2 * hidden:] + r * gh[:, 2 * hidden:])
        want = torch.cat((r, z, n, gh[:, 2 * hidden:]), 1)
        torch.testing.assert_close(saved[t], want, **GRU_F64_TOL)
        h = (1 - z) * n + z * h
        torch.testing.assert_close(out[t], h, **GRU_F64_TOL)
    torch.testing.assert_close(h_n, h, **GRU_F64_TOL)
    grads = LAYER_BACKWARD(torch.ones_like(out), None, x, h0, w_ih, w_hh, out, saved, False)
    assert grads[6].numel() == 0
    assert [tuple(g.shape) for g in grads[:6]] == [tuple(t.shape) for t in (x, h0, *params)]


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

def _bad_base(device):
    steps, batch, in_size, hidden = 4, 3, 5, 6
    x, h0, params, _, _ = _layer_inputs(steps, batch, in_size, hidden, dtype=torch.float32,
                                        device=device, seed=160)
    extra = _normal((batch, 3 * hidden), dtype=torch.float32, device=device, seed=161)
    w_ih, w_hh, b_ih, b_hh = params
    return dict(input=x, h0=h0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, extra=extra)


def _bad_cases(device):
    H, B, I = 6, 3, 5
    f32 = dict(dtype=torch.float32, device=device)
    return [
        ("input_2d", dict(input=torch.zeros(4, I, **f32)), "input"),
        ("input_4d", dict(input=torch.zeros(4, B, I, 1, **f32)), "input"),
        ("input_int", dict(input=torch.zeros(4, B, I, dtype=torch.int64, device=device)),
         "input"),
        ("input_half", dict(input=torch.zeros(4, B, I, dtype=torch.float16, device=device)),
         "input"),
        ("h0_3d", dict(h0=torch.zeros(1, B, H, **f32)), "h0"),
        ("h0_1d", dict(h0=torch.zeros(H, **f32)), "h0"),
        ("h0_batch", dict(h0=torch.zeros(B + 1, H, **f32)), "h0"),
        ("h0_hidden", dict(h0=torch.zeros(B, H + 1, **f32)), "h0"),
        ("h0_dtype", dict(h0=torch.zeros(B, H, dtype=torch.float64, device=device)), "h0"),
        ("w_ih_features", dict(w_ih=torch.zeros(3 * H, I + 1, **f32)), "w_ih"),
        ("w_ih_gates", dict(w_ih=torch.zeros(3 * H + 3, I, **f32)), "w_ih"),
        ("w_ih_1d", dict(w_ih=torch.zeros(3 * H, **f32)), "w_ih"),
        ("w_ih_dtype", dict(w_ih=torch.zeros(3 * H, I, dtype=torch.float64, device=device)),
         "w_ih"),
        ("w_hh_cols", dict(w_hh=torch.zeros(3 * H, H + 1, **f32)), "w_hh"),
        ("w_hh_rows", dict(w_hh=torch.zeros(3 * H + 1, H, **f32)), "w_hh"),
        ("w_hh_square", dict(w_hh=torch.zeros(H, H, **f32)), "w_hh"),
        ("w_hh_1d", dict(w_hh=torch.zeros(3 * H, **f32)), "w_hh"),
        ("w_hh_0d", dict(w_hh=torch.zeros((), **f32)), "w_hh"),
        ("w_hh_dtype", dict(w_hh=torch.zeros(3 * H, H, dtype=torch.float64, device=device)),
         "w_hh"),
        ("b_ih_long", dict(b_ih=torch.zeros(3 * H + 1, **f32)), "b_ih"),
        ("b_ih_2d", dict(b_ih=torch.zeros(1, 3 * H, **f32)), "b_ih"),
        ("b_hh_short", dict(b_hh=torch.zeros(3 * H - 1, **f32)), "b_hh"),
        ("b_hh_dtype", dict(b_hh=torch.zeros(3 * H, dtype=torch.float64, device=device)),
         "b_hh"),
        ("extra_gates", dict(extra=torch.zeros(B, 3 * H + 1, **f32)), "extra"),
        ("extra_batch", dict(extra=torch.zeros(B + 1, 3 * H, **f32)), "extra"),
        ("extra_1d", dict(extra=torch.zeros(3 * H, **f32)), "extra"),
        ("extra_3d", dict(extra=torch.zeros(1, B, 3 * H, **f32)), "extra"),
        ("extra_dtype", dict(extra=torch.zeros(B, 3 * H, dtype=torch.float64, device=device)),
         "extra"),
    ]


BAD_CASE_IDS = [c[0] for c in _bad_cases("cpu")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", BAD_CASE_IDS)
def test_bad_input_names_the_argument(device, case):
    (_, change, name), = [c for c in _bad_cases(device) if c[0] == case]
    args = _bad_base(device)
    args.update(change)
    with pytest.raises(RuntimeError, match=rf"\b{name}\b"):
        ops.gru_layer(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["h0", "w_ih", "w_hh", "b_ih", "b_hh", "extra"])
def test_bad_input_cuda_device_mismatch(name):
    args = _bad_base("cuda")
    args[name] = args[name].cpu()
    with pytest.raises(RuntimeError, match=rf"\b{name}\b"):
        ops.gru_layer(**args)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_backward(device):
    args = _bad_base(device)
    x, h0, w_ih, w_hh, b_ih, b_hh = (args[k] for k in ("input", "h0", "w_ih", "w_hh", "b_ih",
                                                       "b_hh"))
    out, h_n, saved = LAYER(x, h0, w_ih, w_hh, b_ih, b_hh, None)
    with pytest.raises(RuntimeError, match=r"\bgrad_output\b"):
        LAYER_BACKWARD(out[:-1], None, x, h0, w_ih, w_hh, out, saved, False)
    with pytest.raises(RuntimeError, match=r"\bsaved\b"):
        LAYER_BACKWARD(out, None, x, h0, w_ih, w_hh, out, saved[..., :-1], False)
    # a complex incoming gradient is refused, not read as its real part
    with pytest.raises(RuntimeError, match=r"^grad_output: expected a floating-point tensor"):
        LAYER_BACKWARD(out.to(torch.complex128), None, x, h0, w_ih, w_hh, out, saved, False)
    with pytest.raises(RuntimeError, match=r"^grad_hn: expected a floating-point tensor"):
        LAYER_BACKWARD(out, h_n.to(torch.complex128), x, h0, w_ih, w_hh, out, saved, False)
    with pytest.raises(RuntimeError, match=r"^w_hh: expected a 2-D tensor"):
        LAYER_BACKWARD(out, None, x, h0, w_ih, w_hh[0, 0], out, saved, False)


# ----------------------------------------------------------------------------------------------
# the packed layout (batch_sizes): the padded positions are skipped
# ----------------------------------------------------------------------------------------------

def _packed_case(lengths, in_size, hidden, *, dtype, seed, with_extra):
    """Packed inputs for rows of the given (non-increasing) lengths: (args, batch_sizes)."""
    steps = max(lengths, default=0)
    batch_sizes = [sum(1 for n in lengths if n > t) for t in range(steps)]
    args = _small_layer_args("cpu", with_extra=with_extra, seed=seed, steps=1,
                             batch=len(lengths), in_size=in_size, hidden=hidden, dtype=dtype)
    x = _normal((sum(batch_sizes), in_size), dtype=dtype, device="cpu", seed=seed + 7)
    args[0] = x.requires_grad_()
    return args, batch_sizes


def _packed_loss(out, h_n, seed):
    g_out = _normal(out.shape, dtype=out.dtype, device="cpu", seed=seed)
    g_hn = _normal(h_n.shape, dtype=out.dtype, device="cpu", seed=seed + 1)
    return (out * g_out).sum() + (h_n * g_hn).sum()


def _check_packed_parity(lengths, in_size, hidden, dtype, with_extra, seed):
    """gru_layer on packed rows of the given lengths against the reference: outputs, final
    state and every gradient."""
    args, batch_sizes = _packed_case(lengths, in_size, hidden, dtype=dtype, seed=seed,
                                     with_extra=with_extra)
    got = ops.gru_layer(*args, batch_sizes=batch_sizes)
    ref_args = [None if a is None else a.detach().clone().requires_grad_() for a in args]
    from seq2seq_ext import reference
    want = reference.gru_layer(*ref_args, batch_sizes=batch_sizes)
    tol = gru_tol(dtype)
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    leaves = [a for a in args if a is not None]
    ref_leaves = [a for a in ref_args if a is not None]
    grads = torch.autograd.grad(_packed_loss(*got, seed), leaves, allow_unused=True,
                                materialize_grads=True)
    ref_grads = torch.autograd.grad(_packed_loss(*want, seed), ref_leaves, allow_unused=True,
                                    materialize_grads=True)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **tol)


class TestPackedLayer:
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("with_extra", [False, True])
    @pytest.mark.parametrize("lengths", [[5, 5, 3, 2, 2, 1, 0], [4, 4, 4], [3], [1, 0, 0],
                                         [0, 0], [7, 2]])
    def test_matches_reference(self, dtype, with_extra, lengths):
        _check_packed_parity(lengths, 5, 9, dtype, with_extra,
                             seed=300 + len(lengths) + sum(lengths))

    @pytest.mark.parametrize("with_extra", [False, True])
    def test_hidden_128(self, with_extra):
        """Per-step products through BLAS over the packed rows (float64)."""
        _check_packed_parity([4, 4, 3, 1], 10, 128, torch.float64, with_extra, seed=41)

    def test_matches_nn_gru_on_a_packed_sequence(self):
        """The layout is PackedSequence's: nn.GRU on the packed batch gives the same data and
        final state."""
        lengths = [6, 4, 4, 1]
        rnn = _seeded_gru(3, 5, 1, dtype=torch.float64, device="cpu", seed=320)
        padded = _normal((6, 4, 3), dtype=torch.float64, device="cpu", seed=321)
        h0 = _normal((1, 4, 5), dtype=torch.float64, device="cpu", seed=322)
        packed = nn.utils.rnn.pack_padded_sequence(padded, torch.tensor(lengths))
        want_out, want_hn = rnn(packed, h0)
        out, h_n = ops.gru_layer(packed.data, h0[0], *rnn._flat_weights,
                                 batch_sizes=packed.batch_sizes.tolist())
        torch.testing.assert_close(out, want_out.data, **GRU_F64_TOL)
        torch.testing.assert_close(h_n, want_hn[0], **GRU_F64_TOL)

    def test_equals_the_dense_layer_at_the_kept_positions(self):
        """Packing changes which positions run, not what they compute (float32, odd sizes)."""
        lengths = [9, 8, 8, 5, 3, 3, 3, 2, 1, 1, 0]
        steps, batch = 9, len(lengths)
        args = _small_layer_args("cpu", with_extra=True, seed=330, steps=steps, batch=batch,
                                 in_size=13, hidden=19, dtype=torch.float32)
        dense_out, _ = ops.gru_layer(*args)
        batch_sizes = [sum(1 for n in lengths if n > t) for t in range(steps)]
        from seq2seq_ext.models import packed_rows
        rows = packed_rows(batch_sizes, batch)
        x = args[0].detach().reshape(steps * batch, -1).index_select(0, rows)
        out, _ = ops.gru_layer(x, *args[1:], batch_sizes=batch_sizes)
        torch.testing.assert_close(out, dense_out.reshape(steps * batch, -1)[rows],
                                   rtol=1e-6, atol=1e-6)

    @pytest.mark.parametrize("dropout", [0.0, 0.4])
    def test_multilayer_gru_packed(self, dropout):
        """ops.gru packs every layer: two layers on the packed rows equal the dense stack at the
        kept positions, gradients included; given the packed rows' positions, dropout draws the
        dense call's masks for the same seed."""
        rnn = _seeded_gru(4, 6, 2, dtype=torch.float64, device="cpu", seed=340)
        lengths = [5, 3, 3, 1]
        steps, batch = 5, 4
        x, h0, _, _ = _gru_inputs(steps, batch, 4, 6, 2, dtype=torch.float64, device="cpu",
                                  seed=341)
        batch_sizes = [sum(1 for n in lengths if n > t) for t in range(steps)]
        from seq2seq_ext.models import packed_rows
        rows = packed_rows(batch_sizes, batch)
        xd = _leaf(x)
        torch.manual_seed(3)
        out_d, _ = ops.gru(xd, h0, list(rnn._flat_weights), dropout, True)
        xp = _leaf(x.reshape(steps * batch, -1).index_select(0, rows))
        torch.manual_seed(3)
        out_p, _ = ops.gru(xp, h0, list(rnn._flat_weights), dropout, True,
                           batch_sizes=batch_sizes, positions=rows)
        torch.testing.assert_close(out_p, out_d.reshape(steps * batch, -1)[rows], **GRU_F64_TOL)
        g = _normal(out_p.shape, dtype=torch.float64, device="cpu", seed=342)
        gd = torch.autograd.grad((out_d.reshape(steps * batch, -1)[rows] * g).sum(),
                                 [xd, *rnn._flat_weights])
        gp = torch.autograd.grad((out_p * g).sum(), [xp, *rnn._flat_weights])
        torch.testing.assert_close(gp[0], gd[0].reshape(steps * batch, -1)[rows], **GRU_F64_TOL)
        for a, b in zip(gp[1:], gd[1:]):
            torch.testing.assert_close(a, b, **GRU_F64_TOL)

    @pytest.mark.parametrize("with_extra", [False, True])
    def test_gradcheck(self, with_extra):
        args, batch_sizes = _packed_case([3, 2, 2, 0], 3, 2, dtype=torch.float64, seed=350,
                                         with_extra=with_extra)
        assert torch.autograd.gradcheck(
            lambda *a: ops.gru_layer(*a, batch_sizes=batch_sizes), tuple(args))
        assert torch.autograd.gradgradcheck(
            lambda *a: ops.gru_layer(*a, batch_sizes=batch_sizes), tuple(args))

    def test_opcheck(self):
        for i, (lengths, extra) in enumerate([([4, 2, 2, 1], True), ([3, 3], False),
                                               ([2, 0], True)]):
            args, batch_sizes = _packed_case(lengths, 3, 5, dtype=torch.float32,
                                             seed=360 + i, with_extra=extra)
            torch.library.opcheck(LAYER, (*args, batch_sizes))
            detached = [None if a is None else a.detach() for a in args]
            out, h_n, saved = LAYER(*detached, batch_sizes)
            grad_out = _normal(out.shape, dtype=out.dtype, device="cpu", seed=370 + i)
            x, h0, w_ih, w_hh = detached[:4]
            torch.library.opcheck(LAYER_BACKWARD, (grad_out, h_n, x, h0, w_ih, w_hh, out,
                                                   saved, extra, batch_sizes))

    @pytest.mark.parametrize("batch_sizes, message", [
        ([2, 3], "batch_sizes: expected non-increasing"),
        ([5], "batch_sizes: expected non-increasing sizes between 0 and the batch"),
        ([-1], "batch_sizes: expected non-increasing"),
        ([3, 1], r"input: expected 4 rows \(the sum of batch_sizes\)"),
    ])
    def test_bad_batch_sizes_raise_naming_them(self, batch_sizes, message):
        args, _ = _packed_case([2, 2, 1], 3, 4, dtype=torch.float32, seed=380, with_extra=False)
        with pytest.raises(RuntimeError, match=message):
            LAYER(*[None if a is None else a.detach() for a in args], batch_sizes)

    def test_dense_input_with_batch_sizes_raises(self):
        args = _small_layer_args("cpu", with_extra=False, seed=390, requires_grad=False)
        with pytest.raises(RuntimeError, match="input: expected a 2-D tensor"):
            LAYER(*args, [2, 2, 2])


class TestGruLayerBf16Matrices:
    """w_ih and w_hh in bfloat16 beside a float32 input (the op under CPU autocast): every
    product takes bf16 operands and sums in float32, forward and backward, as
    ``reference.gru_layer(..., product_dtype=torch.bfloat16)`` writes out; the matrices'
    gradients come back in bf16, the others in float32."""

    def run_both(self, steps, batch, in_size, hidden, *, seed, with_extra, lengths=None):
        params = _layer_params(in_size, hidden, dtype=torch.float32, device="cpu", seed=seed,
                               scale=0.4)
        params[0], params[1] = params[0].bfloat16(), params[1].bfloat16()
        sizes = None
        if lengths is None:
            x = _normal((steps, batch, in_size), dtype=torch.float32, device="cpu", seed=seed + 1)
        else:
            sizes = [sum(1 for n in lengths if n > t) for t in range(max(lengths))]
            x = _normal((sum(sizes), in_size), dtype=torch.float32, device="cpu", seed=seed + 1)
        h0 = _normal((batch, hidden), dtype=torch.float32, device="cpu", seed=seed + 2, scale=0.5)
        extra = (_normal((batch, 3 * hidden), dtype=torch.float32, device="cpu", seed=seed + 3,
                         scale=0.3) if with_extra else None)
        leaves = [_leaf(t) for t in [x, h0, *params] + ([extra] if with_extra else [])]
        ref = [_leaf(t.detach().float()) for t in leaves]
        got = ops.gru_layer(*leaves[:6], leaves[6] if with_extra else None, sizes)
        want = reference.gru_layer(*ref[:6], ref[6] if with_extra else None, sizes,
                                   product_dtype=torch.bfloat16)
        g = _normal(got[0].shape, dtype=torch.float32, device="cpu", seed=seed + 4)
        got_g = torch.autograd.grad((got[0] * g).sum() + got[1].sum(), leaves)
        want_g = torch.autograd.grad((want[0] * g).sum() + want[1].sum(), ref)
        return got, want, got_g, want_g

    @pytest.mark.usefixtures("rounded_bf16_gemm")
    @pytest.mark.parametrize("steps,batch,in_size,hidden,with_extra", [
        (1, 1, 5, 7, False),
        (5, 3, 7, 9, True),     # the decoder's context projection as extra
        (4, 16, 32, 32, True),
        (9, 8, 48, 24, False),  # the input projection through BLAS
    ])
    def test_matches_the_bf16_products_reference(self, steps, batch, in_size, hidden,
                                                 with_extra):
        got, want, got_g, want_g = self.run_both(steps, batch, in_size, hidden, seed=steps + 40,
                                                 with_extra=with_extra)
        for g, w in zip(got, want):
            assert g.dtype == torch.float32
            assert_bf16_close(g, w)
        for k, (g, w) in enumerate(zip(got_g, want_g)):
            assert g.dtype == (torch.bfloat16 if k in (2, 3) else torch.float32)
            assert_bf16_close(g, w)

    @pytest.mark.usefixtures("rounded_bf16_gemm")
    def test_packed(self):
        got, want, got_g, want_g = self.run_both(0, 4, 6, 10, seed=90, with_extra=True,
                                                 lengths=[5, 3, 3, 1])
        for g, w in zip(got, want):
            assert_bf16_close(g, w)
        for g, w in zip(got_g, want_g):
            assert_bf16_close(g, w)

    def test_either_way_of_running_products(self, bf16_gemm):
        """Large enough for bf16 GEMMs (native_product): "native" rounds their results to bf16,
        within bf16's precision of the exact products that "rounded" computes."""
        got, want, got_g, want_g = self.run_both(6, 64, 64, 64, seed=7, with_extra=False)
        if bf16_gemm == "rounded":
            assert_bf16_close(got[0], want[0])
        else:
            torch.testing.assert_close(got[0], want[0], rtol=0, atol=0.05)
            assert not torch.allclose(got[0], want[0], rtol=1e-4, atol=1e-5)
            for g, w in zip(got_g, want_g):
                assert (g.float() - w).norm() <= 2e-2 * w.norm()

    def test_opcheck(self):
        args = _small_layer_args("cpu", with_extra=True, seed=5, dtype=torch.float32)
        args = [t.detach().bfloat16().requires_grad_() if k in (2, 3) else t
                for k, t in enumerate(args)]
        torch.library.opcheck(LAYER, tuple(args))

    def test_opcheck_backward(self):
        """The backward's fake gives the real kernel's dtypes: bf16 for the matrices' gradients,
        float32 for the biases' (a wrong one made compiled training read garbage)."""
        args = _small_layer_args("cpu", with_extra=True, seed=8, dtype=torch.float32,
                                 requires_grad=False)
        args[2], args[3] = args[2].bfloat16(), args[3].bfloat16()
        out, _, saved = LAYER(*args)
        grad_out = _normal(out.shape, dtype=torch.float32, device="cpu", seed=9)
        x, h0, w_ih, w_hh = args[:4]
        torch.library.opcheck(LAYER_BACKWARD, (grad_out, None, x, h0, w_ih, w_hh, out, saved,
                                               True))

    @pytest.mark.parametrize("change,match", [
        (lambda a: a.__setitem__(3, a[3].float()),
         "w_hh: expected bfloat16 like the other weight matrix, got Float"),
        (lambda a: [a.__setitem__(k, a[k].double()) for k in (0, 1, 4, 5)],
         "w_ih: bfloat16 weight matrices need a float32 input on the CPU"),
    ])
    def test_bad_dtypes_name_the_argument(self, change, match):
        args = _small_layer_args("cpu", with_extra=False, seed=6, dtype=torch.float32,
                                 requires_grad=False)
        args[2], args[3] = args[2].bfloat16(), args[3].bfloat16()
        change(args)
        with pytest.raises(RuntimeError, match=match):
            LAYER(*args)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_with_no_hidden_unit(device):
    """hidden 0: the layer's outputs are empty, its input and weight gradients zero-sized or
    zero, as the reference's autograd gives them."""
    kw = dict(dtype=torch.float64, device=device, requires_grad=True)
    x = torch.randn(3, 2, 4, **kw)
    h0, w_ih, w_hh = torch.zeros(2, 0, **kw), torch.zeros(0, 4, **kw), torch.zeros(0, 0, **kw)
    b_ih, b_hh = torch.zeros(0, **kw), torch.zeros(0, **kw)
    out, h_n = ops.gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh)
    assert out.shape == (3, 2, 0) and h_n.shape == (2, 0)
    grads = torch.autograd.grad((out.sum() + h_n.sum()), (x, h0, w_ih, w_hh), allow_unused=True)
    assert torch.equal(grads[0], torch.zeros_like(x))
    assert [tuple(g.shape) for g in grads[1:]] == [(2, 0), (0, 4), (0, 0)]
