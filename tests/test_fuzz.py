"""Hostile-input fuzzing of every op: random shapes (empty dimensions included), layouts
(permuted, strided, offset, expanded views), dtypes (wrong ones included), lengths (negative,
fractional, huge, NaN, of any real dtype), labels and token ids (negative, out of range, of a wrong
dtype), NaN and infinite values, and mismatched arguments.

Each example either matches the oracle (the chapter's reference in ``seq2seq_ext.reference``, or
PyTorch's own GRU for the layer op; NaN where the oracle gives NaN) or raises a RuntimeError,
ValueError or TypeError whose message names the offending argument. In both cases no input is
written (compared bit for bit, the memory around a strided view included), except ``X`` of the
in-place sequence mask on valid input, which must then hold exactly the reference's result.

The number of examples per test is bounded so that the file runs in seconds; set
``SEQ2SEQ_EXT_FUZZ_EXAMPLES`` (e.g. 2000) for a longer campaign.
"""
import math
import os
import re

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import seq2seq_ext
from seq2seq_ext import ops, reference

O = torch.ops.seq2seq_ext
MAX_EXAMPLES = int(os.environ.get("SEQ2SEQ_EXT_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
ERRORS = (RuntimeError, ValueError, TypeError)

FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SPECIALS = [math.nan, math.inf, -math.inf, 1e30, -1e30, 0.0]
LAYOUTS = ["contiguous", "permuted", "strided", "offset"]


# ----------------------------------------------------------------------------------------------
# tensors: values, layouts, snapshots
# ----------------------------------------------------------------------------------------------

def _gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _poison(dtype):
    """A value for the memory around a view: reading it instead of the view's elements shows."""
    if dtype == torch.bool:
        return True
    if dtype.is_floating_point or dtype.is_complex:
        return math.nan
    return 99


class Arg:
    """A tensor argument: the view passed to the op, the base tensor that owns its memory, and
    the function that makes the view from a base (to build the expected base after an in-place
    call)."""

    def __init__(self, view, base, make):
        self.view, self.base, self.make = view, base, make


def _layout(value, kind, perm_seed=0):
    """``value`` (a contiguous tensor) re-laid out as ``kind``: a copy with the same values whose
    strides and storage offset differ."""
    value = value.contiguous()
    shape = tuple(value.shape)
    if kind == "permuted" and value.dim() >= 2:
        g = _gen(perm_seed)
        perm = torch.randperm(value.dim(), generator=g).tolist()
        inv = [perm.index(i) for i in range(value.dim())]
        base = value.permute(perm).contiguous()
        return Arg(base.permute(inv), base, lambda b: b.permute(inv))
    if kind == "strided" and value.dim() >= 1:
        big = torch.full([2 * s + 1 for s in shape], _poison(value.dtype), dtype=value.dtype)
        index = tuple(slice(1, None, 2) for _ in shape)
        big[index] = value
        return Arg(big[index], big, lambda b: b[index])
    if kind == "offset":
        flat = torch.full((value.numel() + 3,), _poison(value.dtype), dtype=value.dtype)
        flat[3:] = value.reshape(-1)
        return Arg(flat[3:].view(shape), flat, lambda b: b[3:].view(shape))
    base = value.clone()
    return Arg(base, base, lambda b: b)


def _bits(t):
    """The bytes of a tensor's elements, for exact comparisons (NaN payloads included)."""
    t = torch.empty(t.numel(), dtype=t.dtype).copy_(t.detach().reshape(-1))
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.view(torch.uint8).clone() if t.numel() else t.clone()


def _snapshot(values):
    """Bytes of every CPU tensor (and of the base owning its memory) in a nested structure."""
    out = []
    for v in values:
        if isinstance(v, (list, tuple)):
            out.append(_snapshot(v))
        elif isinstance(v, torch.Tensor) and v.device.type == "cpu":
            base = v._base if v._base is not None else v
            out.append((_bits(v), _bits(base)))
        else:
            out.append(None)
    return out


def _assert_unchanged(values, snap, what=""):
    for v, s in zip(values, snap):
        if isinstance(v, (list, tuple)):
            _assert_unchanged(v, s, what)
        elif s is not None:
            base = v._base if v._base is not None else v
            assert torch.equal(_bits(v), s[0]) and torch.equal(_bits(base), s[1]), \
                f"an input was written by {what}"


def _expect_error(fn, names):
    """``fn()`` raises one of ERRORS whose message names one of ``names``."""
    with pytest.raises(ERRORS) as info:
        fn()
    msg = str(info.value)
    assert any(re.search(rf"\b{re.escape(n)}\b", msg) for n in names), \
        f"the error does not name {names}: {msg[:300]}"


def _close(actual, expected, dtype, **tol):
    """assert_close with NaN where the oracle has NaN, tolerance by dtype."""
    if not tol:
        tol = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: {},
               torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
               torch.float16: dict(rtol=2e-3, atol=2e-3)}[dtype]
    torch.testing.assert_close(actual.detach().to(expected.dtype), expected.detach(),
                               equal_nan=True, **tol)


# ----------------------------------------------------------------------------------------------
# lengths
# ----------------------------------------------------------------------------------------------

VALID_LEN_KINDS = ["int64", "int32", "int16", "uint8", "bool", "float32", "float64", "float16",
                   "negative", "huge", "inf", "nan", "fractional"]


def _valid_len(kind, batch, steps, seed):
    """Valid (batch,) lengths of one kind; the op must treat them as the reference does."""
    g = _gen(seed)
    base = torch.randint(0, steps + 3, (batch,), generator=g)
    if kind == "negative":
        return base - steps - 3
    if kind == "huge":
        return torch.where(base % 2 == 0, torch.full_like(base, 2 ** 62), base)
    if kind == "inf":
        v = base.double()
        v[::2] = math.inf
        v[1::3] = -math.inf
        return v
    if kind == "nan":
        v = base.float()
        v[::2] = math.nan
        return v
    if kind == "fractional":
        return torch.rand(batch, generator=g, dtype=torch.float64) * (steps + 4) - 2
    if kind == "bool":
        return base % 2 == 0
    return base.to(getattr(torch, kind))


def _kept(valid_len, batch, steps):
    """The reference's mask (batch, steps): True where a step is kept."""
    return reference.sequence_mask(torch.ones(batch, steps), valid_len).bool()


# ----------------------------------------------------------------------------------------------
# masked softmax cross-entropy
# ----------------------------------------------------------------------------------------------

CE_BAD = [None, None, None, None, "pred_dim", "pred_int", "pred_complex", "pred_not_tensor",
          "label_float", "label_int16", "label_bool", "label_negative", "label_out_of_range",
          "label_huge", "label_masked_out_of_range", "label_shape", "label_3d",
          "valid_len_batch", "valid_len_2d", "valid_len_0d", "valid_len_complex"]


@st.composite
def ce_cases(draw):
    batch, steps, vocab = draw(st.integers(0, 4)), draw(st.integers(0, 5)), draw(st.integers(0, 9))
    dtype = draw(st.sampled_from(FLOATS))
    seed = draw(st.integers(0, 2 ** 20))
    g = _gen(seed)
    pred = torch.randn(batch, steps, vocab, generator=g, dtype=torch.float64) * 4
    for _ in range(draw(st.integers(0, 3))):
        if pred.numel():
            i = draw(st.integers(0, pred.numel() - 1))
            pred.view(-1)[i] = draw(st.sampled_from(SPECIALS))
    pred = pred.to(dtype)
    label = (torch.randint(0, max(vocab, 1), (batch, steps), generator=g)
             .to(draw(st.sampled_from([torch.int64, torch.int32]))))
    if vocab == 0:
        assume(batch * steps == 0)  # any label is out of range for an empty vocabulary
    valid_len = _valid_len(draw(st.sampled_from(VALID_LEN_KINDS)), batch, steps, seed)
    bad = draw(st.sampled_from(CE_BAD))
    names = None
    if bad is not None:
        names = [bad.split("_")[0] if not bad.startswith("valid_len") else "valid_len"]
        if bad == "pred_dim":
            pred = pred[0] if batch and draw(st.booleans()) else pred[None]
            names = ["pred"]
        elif bad == "pred_int":
            pred = pred.nan_to_num().clamp(-100, 100).to(torch.int64)
        elif bad == "pred_complex":
            pred = pred.to(torch.complex64)
        elif bad == "pred_not_tensor":
            pred = pred.tolist()
        elif bad == "label_float":
            label = label.float()
        elif bad == "label_int16":
            label = label.to(torch.int16)
        elif bad == "label_bool":
            label = label > 0
        elif bad in ("label_negative", "label_out_of_range", "label_huge",
                     "label_masked_out_of_range"):
            assume(batch * steps > 0)
            label = label.clone()
            b, t = draw(st.integers(0, batch - 1)), draw(st.integers(0, steps - 1))
            label[b, t] = {"label_negative": -1, "label_out_of_range": vocab,
                           "label_huge": 2 ** 31 - 1 if label.dtype == torch.int32 else 2 ** 40,
                           "label_masked_out_of_range": vocab + 5}[bad]
            if bad == "label_masked_out_of_range":  # checked even where masked
                valid_len = torch.zeros(batch, dtype=torch.int64)
        elif bad == "label_shape":
            label = label[:, :-1] if steps else torch.zeros(batch, 1, dtype=label.dtype)
        elif bad == "label_3d":
            label = label[..., None]
        elif bad == "valid_len_batch":
            valid_len = torch.cat([valid_len, valid_len[:1].clone() if batch else
                                   torch.ones(1, dtype=valid_len.dtype)])
        elif bad == "valid_len_2d":
            valid_len = valid_len[:, None]
        elif bad == "valid_len_0d":
            assume(batch != 1)
            valid_len = torch.tensor(2)
        elif bad == "valid_len_complex":
            valid_len = valid_len.to(torch.complex64)
    layouts = [draw(st.sampled_from(LAYOUTS)) for _ in range(3)]
    args = []
    for value, kind in zip((pred, label, valid_len), layouts):
        args.append(_layout(value, kind, seed).view if isinstance(value, torch.Tensor) else value)
    return args, names, draw(st.booleans())


def _ce_oracle(pred, label, valid_len):
    """The reference loss with the masked logits replaced by zeros (the fused op never reads
    them, as README documents) and its gradient; computed in float32 for reduced precision."""
    batch, steps, _ = pred.shape
    kept = _kept(valid_len, batch, steps)
    p = pred.detach().to(torch.float64 if pred.dtype == torch.float64 else torch.float32)
    p = torch.where(kept[..., None], p, torch.zeros_like(p)).requires_grad_()
    loss = reference.MaskedSoftmaxCELoss()(p, label.long(), valid_len)
    return loss, p


@FUZZ
@given(case=ce_cases())
def test_masked_softmax_ce_fuzz(case):
    """ops.masked_softmax_ce and its backward on hostile inputs."""
    args, names, with_grad = case
    snap = _snapshot(args)
    if names is not None:
        _expect_error(lambda: ops.masked_softmax_ce(*args), names)
        _expect_error(lambda: O.masked_softmax_ce(*args), names)
        _assert_unchanged(args, snap, "masked_softmax_ce")
        return
    pred, label, valid_len = args
    if with_grad and pred.numel():
        pred = pred.detach().requires_grad_()
    loss = ops.masked_softmax_ce(pred, label, valid_len)
    ref, p = _ce_oracle(pred, label, valid_len)
    assert loss.shape == ref.shape and loss.dtype == pred.dtype
    _close(loss, ref, pred.dtype)
    if pred.requires_grad:
        w = torch.linspace(-1.0, 2.0, loss.numel(), dtype=loss.dtype)
        (grad,) = torch.autograd.grad(loss, pred, w)
        (ref_grad,) = torch.autograd.grad(ref, p, w.to(ref.dtype))
        kept = _kept(valid_len, *pred.shape[:2])
        _close(grad, ref_grad, pred.dtype)  # huge logits included (exp((x - max) - log_sum))
        # masked positions get exactly zero, whatever their logits
        assert not grad[~kept].any()
    _assert_unchanged(args, snap, "masked_softmax_ce")


@FUZZ
@given(case=ce_cases(), bad=st.sampled_from(["grad_loss_batch", "grad_loss_2d", "lse_shape",
                                             "lse_2d", "lse_dtype", "label", "valid_len",
                                             "pred"]))
def test_masked_softmax_ce_backward_op_fuzz(case, bad):
    """The raw backward op rejects inconsistent saved tensors and gradients, naming them."""
    args, names, _ = case
    assume(names is None)
    pred, label, valid_len = args
    loss, lse = O.masked_softmax_ce(pred, label, valid_len)
    g = torch.ones_like(loss)
    batch, steps, vocab = pred.shape
    call = [g, pred, label, valid_len, lse]
    if bad == "grad_loss_batch":
        call[0] = torch.ones(batch + 1, dtype=loss.dtype)
    elif bad == "grad_loss_2d":
        call[0] = g[:, None]
    elif bad == "lse_shape":
        call[4] = torch.zeros(batch, steps + 1, 2, dtype=lse.dtype)
    elif bad == "lse_2d":  # one number a position: the parts' sum
        call[4] = lse.sum(dim=2)
    elif bad == "lse_dtype":
        call[4] = lse.double() if lse.dtype == torch.float32 else lse.float()
    elif bad == "label":
        assume(batch * steps > 0)
        call[2] = label.clone()
        call[2][0, 0] = vocab
    elif bad == "valid_len":
        call[3] = torch.zeros(batch + 2)
    elif bad == "pred":
        call[1] = pred[None]
    snap = _snapshot(call)
    name = {"grad_loss_batch": "grad_loss", "grad_loss_2d": "grad_loss", "lse_shape": "lse",
            "lse_2d": "lse", "lse_dtype": "lse"}.get(bad, bad)
    _expect_error(lambda: O.masked_softmax_ce_backward(*call), [name])
    _assert_unchanged(call, snap, "masked_softmax_ce_backward")


# ----------------------------------------------------------------------------------------------
# sequence mask (out of place and in place)
# ----------------------------------------------------------------------------------------------

MASK_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8,
               torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64]
MASK_VALUES = [0, 1, -1, 0.5, -2.5, 1e30, -1e30, math.nan, math.inf, True, 300, -129, 2 ** 40,
               1 + 2j]
MASK_BAD = [None, None, None, None, "X_1d", "X_0d", "X_not_tensor", "valid_len_batch",
            "valid_len_2d", "valid_len_0d", "valid_len_complex", "value_not_scalar"]


@st.composite
def mask_cases(draw):
    batch, steps = draw(st.integers(0, 4)), draw(st.integers(0, 5))
    trailing = draw(st.lists(st.integers(0, 3), max_size=2))
    dtype = draw(st.sampled_from(MASK_DTYPES))
    seed = draw(st.integers(0, 2 ** 20))
    g = _gen(seed)
    shape = (batch, steps, *trailing)
    X = torch.randn(shape, generator=g, dtype=torch.float64) * 50
    if dtype.is_floating_point or dtype.is_complex:
        for _ in range(draw(st.integers(0, 2))):
            if X.numel():
                X.view(-1)[draw(st.integers(0, X.numel() - 1))] = draw(st.sampled_from(SPECIALS))
    X = X.to(dtype) if dtype.is_floating_point or dtype.is_complex else \
        (X > 0 if dtype == torch.bool else X.clamp(-100, 100).to(dtype))
    valid_len = _valid_len(draw(st.sampled_from(VALID_LEN_KINDS)), batch, steps, seed)
    value = draw(st.sampled_from(MASK_VALUES))
    bad = draw(st.sampled_from(MASK_BAD))
    names = None
    if bad is not None:
        names = ["X" if bad.startswith("X") else "value" if bad.startswith("value")
                 else "valid_len"]
        if bad == "X_1d":
            X = X.reshape(-1)
        elif bad == "X_0d":
            X = X.reshape(-1)[:1].reshape(()) if X.numel() else torch.tensor(1.0)
        elif bad == "X_not_tensor":
            X = "X"
        elif bad == "valid_len_batch":
            valid_len = torch.cat([valid_len, torch.ones(1, dtype=valid_len.dtype)])
        elif bad == "valid_len_2d":
            valid_len = valid_len[None, :]
        elif bad == "valid_len_0d":
            assume(batch != 1)
            valid_len = torch.tensor(1)
        elif bad == "valid_len_complex":
            valid_len = valid_len.to(torch.complex64)
        elif bad == "value_not_scalar":
            value = [1, 2]
    layout = draw(st.sampled_from(LAYOUTS + ["expanded"]))
    if isinstance(X, torch.Tensor):
        if layout == "expanded":
            # every element of a sequence shares one location (refused by the in-place op)
            base = X.reshape(-1)[:1].clone() if X.numel() else X.new_zeros(1)
            X = base.reshape([1] * X.dim()).expand(*X.shape) if X.dim() else base[0]
            X = Arg(X, base, None)
        else:
            X = _layout(X, layout, seed)
    vl = _layout(valid_len, draw(st.sampled_from(LAYOUTS)), seed).view
    return X, vl, value, names


def _mask_reference(X, valid_len, value):
    """The reference's result on a copy of X, or the exception it raises."""
    try:
        return reference.sequence_mask(X.clone(), valid_len, value), None
    except ERRORS as exc:
        return None, exc


@FUZZ
@given(case=mask_cases(), inplace=st.booleans(), wrapper=st.booleans())
def test_sequence_mask_fuzz(case, inplace, wrapper):
    """ops.sequence_mask / sequence_mask_ (and the raw ops) on hostile inputs."""
    X_arg, valid_len, value, names = case
    X = X_arg.view if isinstance(X_arg, Arg) else X_arg
    if inplace:
        fn = ops.sequence_mask_ if wrapper else O.sequence_mask_
    else:
        fn = ops.sequence_mask if wrapper else O.sequence_mask
    # (the in-place wrapper's non-tensor X: test_inplace_mask_wrapper_refuses_a_non_tensor)
    assume(not (inplace and wrapper and not isinstance(X, torch.Tensor)))
    args = [X, valid_len]
    snap = _snapshot(args)
    if names is not None:
        _expect_error(lambda: fn(X, valid_len, value), names)
        _assert_unchanged(args, snap, "sequence_mask")
        return
    expanded = isinstance(X_arg, Arg) and X_arg.make is None
    if inplace and expanded and X.numel() > 1 and any(
            s == 0 and n > 1 for s, n in zip(X.stride(), X.shape)):
        _expect_error(lambda: fn(X, valid_len, value), ["X"])
        _assert_unchanged(args, snap, "sequence_mask_")
        return
    expected, ref_error = _mask_reference(X, valid_len, value)
    if ref_error is not None:
        # the reference cannot convert the value to X's dtype: neither can the op
        assert re.search(r"\bvalue\b", str(ref_error)), ref_error
        _expect_error(lambda: fn(X, valid_len, value), ["value"])
        _assert_unchanged(args, snap, "sequence_mask")
        return
    out = fn(X, valid_len, value)
    if inplace:
        if wrapper:
            assert out is X
        torch.testing.assert_close(X, expected, rtol=0, atol=0, equal_nan=True)
        # nothing outside X's elements was written, and valid_len is unchanged
        if X_arg.make is not None:
            before = _from_bits(snap[0][1], X_arg.base)
            after = X_arg.base.clone()
            X_arg.make(after).copy_(X_arg.make(before))
            assert torch.equal(_bits(after), snap[0][1]), "the in-place mask wrote outside X"
        _assert_unchanged([valid_len], snap[1:], "sequence_mask_")
    else:
        assert out.shape == X.shape and out.dtype == X.dtype
        torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
        _assert_unchanged(args, snap, "sequence_mask")


def _from_bits(bits, like):
    """A tensor like ``like`` rebuilt from bytes taken by :func:`_bits`."""
    if like.dtype == torch.bool:
        return bits.view(torch.uint8).to(torch.bool).reshape(like.shape)
    return bits.view(like.dtype).reshape(like.shape) if like.numel() else like.clone()


# ----------------------------------------------------------------------------------------------
# GRU layer (forward through the public wrapper, backward through autograd and the raw op)
# ----------------------------------------------------------------------------------------------

LAYER_BAD = [None, None, None, None, "input_2d", "input_half", "input_int", "h0_shape",
             "h0_dtype", "w_ih_features", "w_ih_gates", "w_hh_square", "w_hh_dtype", "b_ih_length",
             "b_hh_2d", "extra_shape", "extra_dtype", "w_ih_not_tensor"]


@st.composite
def layer_cases(draw):
    steps, batch = draw(st.integers(0, 4)), draw(st.integers(0, 3))
    in_size, hidden = draw(st.integers(0, 5)), draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2 ** 20))
    g = _gen(seed)

    def rnd(*shape):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 1.6 - 0.8).to(dtype)

    G = 3 * hidden
    t = dict(input=rnd(steps, batch, in_size) * 2, h0=rnd(batch, hidden), w_ih=rnd(G, in_size),
             w_hh=rnd(G, hidden), b_ih=rnd(G), b_hh=rnd(G),
             extra=rnd(batch, G) if draw(st.booleans()) else None)
    if draw(st.booleans()) and t["input"].numel():
        t["input"].view(-1)[draw(st.integers(0, t["input"].numel() - 1))] = draw(
            st.sampled_from(SPECIALS))
    bad = draw(st.sampled_from(LAYER_BAD))
    names = None
    if bad is not None:
        name = bad.rsplit("_", 1)[0] if not bad.startswith("w_ih_not") else "w_ih"
        if bad.startswith("w_") or bad.startswith("b_"):
            name = bad[:4]
        names = [name]
        if bad == "input_2d":
            t["input"] = t["input"].reshape(steps * batch, in_size)
        elif bad == "input_half":
            t["input"] = t["input"].half()
        elif bad == "input_int":
            t["input"] = t["input"].to(torch.int32)
        elif bad == "h0_shape":
            t["h0"] = rnd(batch + 1, hidden) if draw(st.booleans()) else rnd(1, batch, hidden)
        elif bad == "h0_dtype":
            t["h0"] = t["h0"].to(torch.float64 if dtype == torch.float32 else torch.float32)
        elif bad == "w_ih_features":
            t["w_ih"] = rnd(G, in_size + 1)
        elif bad == "w_ih_gates":
            t["w_ih"] = rnd(G + 1, in_size)
        elif bad == "w_hh_square":
            t["w_hh"] = rnd(hidden, hidden)
        elif bad == "w_hh_dtype":
            t["w_hh"] = t["w_hh"].to(torch.float64 if dtype == torch.float32 else torch.float32)
        elif bad == "b_ih_length":
            t["b_ih"] = rnd(G - 1)
        elif bad == "b_hh_2d":
            t["b_hh"] = t["b_hh"][None]
        elif bad == "extra_shape":
            t["extra"] = rnd(batch + 1, G)
        elif bad == "extra_dtype":
            t["extra"] = rnd(batch, G).to(torch.float64 if dtype == torch.float32
                                          else torch.float32)
        elif bad == "w_ih_not_tensor":
            t["w_ih"] = 3
    for k, v in t.items():
        if isinstance(v, torch.Tensor):
            t[k] = _layout(v, draw(st.sampled_from(LAYOUTS)), seed).view
    return t, names, draw(st.booleans())


def _layer_oracle(input, h0, w_ih, w_hh, b_ih, b_hh, extra):
    """PyTorch's GRU (one layer): the constant ``extra`` term enters as extra input columns
    multiplying a one-hot of the batch index."""
    steps, batch, _ = input.shape
    if steps == 0 or batch == 0:
        return input.new_zeros(steps, batch, h0.shape[1]) + 0 * h0.sum(), h0 + 0
    if extra is not None:
        onehot = torch.eye(batch, dtype=input.dtype).expand(steps, batch, batch)
        input = torch.cat([input, onehot], 2)
        w_ih = torch.cat([w_ih, extra.t()], 1)
    out, h_n = torch._VF.gru(input, h0[None], [w_ih, w_hh, b_ih, b_hh], True, 1, 0.0, False,
                             False, False)
    return out, h_n[0]


@FUZZ
@given(case=layer_cases())
def test_gru_layer_fuzz(case):
    """ops.gru_layer (and its gradients) on hostile inputs."""
    t, names, with_grad = case
    values = list(t.values())
    snap = _snapshot(values)
    if names is not None:
        _expect_error(lambda: ops.gru_layer(**t), names)
        with torch.no_grad():  # the direct CPU call checks the same things
            _expect_error(lambda: ops.gru_layer(**t), names)
        _assert_unchanged(values, snap, "gru_layer")
        return
    if with_grad:
        t = {k: (v.detach().requires_grad_() if v is not None else None) for k, v in t.items()}
        out, h_n = ops.gru_layer(**t)
    else:
        with torch.no_grad():
            out, h_n = ops.gru_layer(**t)
    ref_t = {k: (v.detach().clone().requires_grad_() if v is not None else None)
             for k, v in t.items()}
    ref_out, ref_h = _layer_oracle(**ref_t)
    dtype = t["input"].dtype
    tol = dict(rtol=1e-5, atol=2e-5) if dtype == torch.float32 else {}
    _close(out, ref_out, dtype, **tol)
    _close(h_n, ref_h, dtype, **tol)
    if with_grad and torch.isfinite(ref_out).all():
        g_out = torch.linspace(-1, 1, out.numel(), dtype=dtype).reshape(out.shape)
        g_h = torch.linspace(1, -0.5, h_n.numel(), dtype=dtype).reshape(h_n.shape)
        keys = [k for k, v in t.items() if v is not None]
        grads = torch.autograd.grad((out, h_n), [t[k] for k in keys], (g_out, g_h),
                                    allow_unused=True)
        ref_grads = torch.autograd.grad((ref_out, ref_h), [ref_t[k] for k in keys], (g_out, g_h),
                                        allow_unused=True)
        for k, a, b in zip(keys, grads, ref_grads):
            a = torch.zeros_like(t[k]) if a is None else a
            b = torch.zeros_like(t[k]) if b is None else b
            _close(a, b, dtype, **(dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}))
    _assert_unchanged(values, snap, "gru_layer")


LAYER_BACKWARD_BAD = ["grad_output_shape", "output_hidden", "output_dtype", "saved_shape",
                      "saved_dtype", "grad_hn_shape", "grad_hn_dtype", "output_steps"]


@FUZZ
@given(case=layer_cases(), bad=st.sampled_from(LAYER_BACKWARD_BAD))
def test_gru_layer_backward_op_fuzz(case, bad):
    """The raw backward op rejects saved tensors and gradients of the wrong shape or dtype,
    naming them, before it reads them (a narrower ``output`` would be read past its end)."""
    t, names, _ = case
    assume(names is None)
    x, h0, w_ih, w_hh = t["input"], t["h0"], t["w_ih"], t["w_hh"]
    out, h_n, saved = O.gru_layer(x, h0, w_ih, w_hh, t["b_ih"], t["b_hh"], t["extra"])
    steps, batch, hidden = out.shape
    other = torch.float64 if x.dtype == torch.float32 else torch.float32
    grad_out, grad_hn = torch.ones_like(out), torch.ones_like(h_n)
    if bad == "grad_output_shape":
        grad_out = torch.ones(steps + 1, batch, hidden, dtype=x.dtype)
    elif bad == "output_hidden":
        # as narrow as possible, with a gradient of the same (broadcastable) shape
        out = out[..., :1].contiguous() if hidden > 1 else torch.zeros(steps, batch, 2,
                                                                       dtype=x.dtype)
        grad_out = torch.ones_like(out)
    elif bad == "output_steps":
        out = torch.zeros(steps + 1, batch, hidden, dtype=x.dtype)
        grad_out = torch.ones_like(out)
    elif bad == "output_dtype":
        out = out.to(other)
        grad_out = grad_out.to(other)
    elif bad == "saved_shape":
        saved = saved[..., :-1]
    elif bad == "saved_dtype":
        saved = saved.to(other)
    elif bad == "grad_hn_shape":
        grad_hn = torch.ones(batch, 1 if hidden > 1 else 2, dtype=x.dtype)
    elif bad == "grad_hn_dtype":
        # a gradient of another dtype is converted (not an error): the result matches
        grads = O.gru_layer_backward(grad_out, grad_hn.to(other), x, h0, w_ih, w_hh, out, saved,
                                     t["extra"] is not None)
        ref = O.gru_layer_backward(grad_out, grad_hn, x, h0, w_ih, w_hh, out, saved,
                                   t["extra"] is not None)
        for a, b in zip(grads, ref):
            torch.testing.assert_close(a, b, equal_nan=True, atol=1e-6, rtol=1e-6)
        return
    name = {"grad_output_shape": "grad_output", "grad_hn_shape": "grad_hn"}.get(
        bad, bad.split("_")[0])
    call = [grad_out, grad_hn, x, h0, w_ih, w_hh, out, saved]
    snap = _snapshot(call)
    _expect_error(lambda: O.gru_layer_backward(*call, t["extra"] is not None),
                  [name, "grad_output"] if name == "output" else [name])
    _assert_unchanged(call, snap, "gru_layer_backward")


# ----------------------------------------------------------------------------------------------
# decode ops
# ----------------------------------------------------------------------------------------------

DECODE_BAD = [None, None, None, None, None, "token_out_of_range", "token_negative", "token_float",
              "token_shape", "token_2d_wide", "state_2d", "state_half", "state_int",
              "weights_short", "weights_long", "weights_shape", "weights_dtype",
              "weights_not_tensor", "emb_proj_shape", "emb_proj_dtype", "ctx_proj_shape",
              "ctx_proj_dtype", "dense_weight_shape", "dense_weight_dtype", "dense_bias_shape",
              "dense_bias_dtype"]
LSTM_BAD = ["c_2d", "c_batch", "c_hidden", "c_dtype"]
GREEDY_BAD = ["bos_out_of_range", "bos_negative", "bos_float", "num_steps_negative",
              "num_steps_huge", "dense_weight_rows", "dense_weight_empty"]


STACK_BAD = [None, None, None, "input_2d", "input_int", "h0_batch", "h0_layers", "c0_missing",
             "c0_for_gru", "weights_count", "w_ih_columns", "w_hh_rows", "dropout_mask_shape"]


@st.composite
def stack_cases(draw):
    cell = draw(st.sampled_from(["gru", "lstm"]))
    layers, steps, batch = draw(st.integers(1, 3)), draw(st.integers(0, 4)), draw(st.integers(0, 3))
    in_size, hidden = draw(st.integers(1, 5)), draw(st.integers(1, 4))  # (the oracle needs in >= 1)
    bias, masked = draw(st.booleans()), layers > 1 and draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2 ** 20))
    g = _gen(seed)

    def rnd(*shape):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * 1.6 - 0.8).to(dtype)

    G = (4 if cell == "lstm" else 3) * hidden
    weights = []
    for layer in range(layers):
        weights += [rnd(G, in_size if layer == 0 else hidden), rnd(G, hidden)]
        weights += [rnd(G), rnd(G)] if bias else []
    t = dict(input=rnd(steps, batch, in_size) * 2, h0=rnd(layers, batch, hidden),
             c0=rnd(layers, batch, hidden) if cell == "lstm" else None, weights=weights,
             dropout_mask=(rnd(layers - 1, steps, batch, hidden).gt(0).to(dtype) * 2
                           if masked else None))
    if draw(st.booleans()) and t["input"].numel():
        t["input"].view(-1)[draw(st.integers(0, t["input"].numel() - 1))] = draw(
            st.sampled_from(SPECIALS))
    bad = draw(st.sampled_from(STACK_BAD))
    names = None
    if bad == "input_2d":
        t["input"], names = t["input"].reshape(steps * batch, in_size), ["input"]
    elif bad == "input_int":
        t["input"], names = t["input"].to(torch.int32), ["input"]
    elif bad == "h0_batch":
        t["h0"], names = rnd(layers, batch + 1, hidden), ["h0", "c0"]
    elif bad == "h0_layers":
        t["h0"], names = rnd(layers + 1, batch, hidden), ["h0", "weights", "c0"]
    elif bad == "c0_missing" and cell == "lstm":
        t["c0"], names = None, ["c0"]
    elif bad == "c0_for_gru" and cell == "gru":
        t["c0"], names = rnd(layers, batch, hidden), ["c0"]
    elif bad == "weights_count":
        t["weights"], names = weights[:-1], ["weights"]
    elif bad == "w_ih_columns":
        weights[0], names = rnd(G, in_size + 1), ["weights"]
    elif bad == "w_hh_rows":
        weights[1], names = rnd(G + 1, hidden), ["weights"]
    elif bad == "dropout_mask_shape" and masked:
        t["dropout_mask"], names = rnd(layers, steps, batch, hidden), ["dropout_mask"]
    for k, v in t.items():
        if isinstance(v, torch.Tensor):
            t[k] = _layout(v, draw(st.sampled_from(LAYOUTS)), seed).view
    t["weights"] = [_layout(w, draw(st.sampled_from(LAYOUTS)), seed).view for w in t["weights"]]
    return cell, t, names, draw(st.booleans())


@FUZZ
@given(case=stack_cases())
def test_rnn_stack_fuzz(case):
    """ops.rnn_stack (GRU and LSTM, 1-3 layers, with and without biases and dropout masks) and
    its gradients on hostile inputs, against reference.rnn_stack."""
    cell, t, names, with_grad = case
    values = [t["input"], t["h0"], t["c0"], t["weights"], t["dropout_mask"]]
    snap = _snapshot(values)
    if names is not None:
        _expect_error(lambda: ops.rnn_stack(cell, **t), names)
        with torch.no_grad():
            _expect_error(lambda: ops.rnn_stack(cell, **t), names)
        _assert_unchanged(values, snap, "rnn_stack")
        return
    diff = ["input", "h0"] + (["c0"] if cell == "lstm" else [])

    def leaves(d):
        d = dict(d, weights=[w.detach().clone().requires_grad_() for w in d["weights"]])
        for k in diff:
            d[k] = d[k].detach().clone().requires_grad_()
        return d
    got_t, ref_t = (leaves(t), leaves(t)) if with_grad else (t, t)
    with torch.set_grad_enabled(with_grad):
        got = ops.rnn_stack(cell, **got_t)
    want = reference.rnn_stack(cell, **ref_t)
    dtype = t["input"].dtype
    tol = dict(rtol=1e-5, atol=2e-5) if dtype == torch.float32 else {}
    for a, b in zip(got, want):
        if b is not None:
            _close(a, b, dtype, **tol)
    if (with_grad and t["input"].numel() and all(torch.isfinite(w).all() for w in want
                                                  if w is not None)):
        outs = [o for o in got if o is not None]
        ref_outs = [o for o in want if o is not None]
        seeds = [torch.linspace(-1, 1, o.numel(), dtype=dtype).reshape(o.shape) for o in outs]
        inputs = [got_t[k] for k in diff] + got_t["weights"]
        ref_inputs = [ref_t[k] for k in diff] + ref_t["weights"]
        grads = torch.autograd.grad(outs, inputs, seeds, allow_unused=True)
        ref_grads = torch.autograd.grad(ref_outs, ref_inputs, seeds, allow_unused=True)
        for x, a, b in zip(inputs, grads, ref_grads):
            a = torch.zeros_like(x) if a is None else a
            b = torch.zeros_like(x) if b is None else b
            _close(a, b, dtype, **(dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}))
    _assert_unchanged(values, snap, "rnn_stack")


def _decoder(vocab, embed, hidden, layers, dtype, seed, cell="gru"):
    """The chapter's decoder (GRU), or the package's LSTM variant of it, with seeded weights
    spread enough for distinct argmaxes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cell == "gru":
            dec = reference.Seq2SeqDecoder(vocab, embed, hidden, layers)
        else:
            dec = seq2seq_ext.Seq2SeqDecoder(vocab, embed, hidden, layers, cell=cell)
        with torch.no_grad():
            for p in dec.rnn.parameters():
                p.uniform_(-0.8, 0.8)
            dec.dense.weight.mul_(3.0)
    return dec.to(dtype).eval()


def _op_args(dec):
    """The decode ops' weight arguments for a reference decoder."""
    with torch.no_grad():
        E = dec.embedding.embedding_dim
        w = [p.detach().clone() for p in dec.rnn._flat_weights]
        emb_proj = dec.embedding.weight @ w[0][:, :E].t() + w[2]
    return dict(emb_proj=emb_proj, weights=w, dense_weight=dec.dense.weight.detach().clone(),
                dense_bias=dec.dense.bias.detach().clone())


@st.composite
def decode_cases(draw, greedy=False, cell="gru"):
    """(decoder, the op's arguments by name, the names a bad argument's error may give or
    None). For the LSTM ``state`` is h and ``c`` the cell state."""
    vocab, embed = draw(st.integers(1, 10)), draw(st.integers(1, 4))
    hidden, layers = draw(st.integers(1, 5)), draw(st.integers(1, 3))
    batch = draw(st.integers(0, 4))
    gates = 3 if cell == "gru" else 4
    dtype = torch.float64 if greedy else draw(st.sampled_from([torch.float32, torch.float64]))
    seed = draw(st.integers(0, 2 ** 20))
    g = _gen(seed)
    dec = _decoder(vocab, embed, hidden, layers, dtype, seed, cell)
    a = _op_args(dec)
    states = ["state"] if cell == "gru" else ["state", "c"]
    for name, scale in zip(states, (0.9, 2.0)):
        value = (torch.rand(layers, batch, hidden, generator=g, dtype=torch.float64) * 2 - 1)
        value *= scale
        if not greedy and draw(st.booleans()) and value.numel():
            value.view(-1)[draw(st.integers(0, value.numel() - 1))] = \
                draw(st.sampled_from(SPECIALS))
        a[name] = value.to(dtype)
    a["ctx_proj"] = None
    if draw(st.booleans()):  # the fixed context equal to the reference's first-step context
        a["ctx_proj"] = (a["state"][-1] @ a["weights"][0][:, embed:].t()).contiguous()
    token = torch.randint(0, vocab, (batch,), generator=g).to(
        draw(st.sampled_from([torch.int64, torch.int32])))
    if draw(st.booleans()):
        token = token[:, None]
    if greedy:
        a.update(bos=draw(st.integers(0, vocab - 1)), eos=draw(st.integers(-2, vocab + 2)),
                 num_steps=draw(st.integers(0, 6)))
        if a["ctx_proj"] is not None and draw(st.booleans()):
            a["ctx_proj"] = None
    else:
        a["token"] = token
    bad = draw(st.sampled_from(DECODE_BAD + (GREEDY_BAD if greedy else [])
                               + (LSTM_BAD if cell == "lstm" else [])))
    if greedy and bad is not None and bad.startswith("token"):
        bad = None
    names = None
    other = torch.float32 if dtype == torch.float64 else torch.float64
    w = a["weights"]
    if bad is not None:
        names = [next(n for n in ("dense_weight", "dense_bias", "emb_proj", "ctx_proj", "token",
                                  "state", "weights", "bos", "num_steps", "c") if bad.startswith(n))]
        if names == ["state"] and cell == "lstm":
            names = ["h"]
        if bad == "token_out_of_range":
            assume(batch > 0)
            a["token"] = a["token"].clone()
            a["token"].view(-1)[-1] = vocab
        elif bad == "token_negative":
            assume(batch > 0)
            a["token"] = a["token"].clone()
            a["token"].view(-1)[0] = -1
        elif bad == "token_float":
            a["token"] = a["token"].float()
        elif bad == "token_shape":
            a["token"] = torch.zeros(batch + 1, dtype=torch.int64)
        elif bad == "token_2d_wide":
            a["token"] = torch.zeros(batch, 2, dtype=torch.int64)
        elif bad == "state_2d":
            a["state"] = a["state"][0]
        elif bad == "state_half":
            a["state"] = a["state"].half()
        elif bad == "state_int":
            a["state"] = a["state"].to(torch.int64)
        elif bad == "weights_short":
            a["weights"] = w[:-1]
        elif bad == "weights_long":
            a["weights"] = w + w[-4:]
        elif bad == "weights_shape":
            i = draw(st.integers(0, len(w) - 1))
            a["weights"] = w[:i] + [w[i][:-1]] + w[i + 1:]
        elif bad == "weights_dtype":
            i = draw(st.integers(0, len(w) - 1))
            a["weights"] = w[:i] + [w[i].to(other)] + w[i + 1:]
        elif bad == "weights_not_tensor":
            a["weights"] = w[:-1] + [1.0]
        elif bad == "emb_proj_shape":
            a["emb_proj"] = a["emb_proj"][:, :-1]
        elif bad == "emb_proj_dtype":
            a["emb_proj"] = a["emb_proj"].to(other)
        elif bad == "ctx_proj_shape":
            a["ctx_proj"] = torch.zeros(batch + 1, gates * hidden, dtype=dtype)
        elif bad == "ctx_proj_dtype":
            a["ctx_proj"] = torch.zeros(batch, gates * hidden, dtype=other)
        elif bad == "c_2d":
            a["c"] = a["c"][0]
        elif bad == "c_batch":
            a["c"] = torch.zeros(layers, batch + 1, hidden, dtype=dtype)
        elif bad == "c_hidden":
            a["c"] = torch.zeros(layers, batch, hidden + 1, dtype=dtype)
        elif bad == "c_dtype":
            a["c"] = a["c"].to(other)
        elif bad == "dense_weight_shape":
            a["dense_weight"] = a["dense_weight"][:, :-1]
        elif bad == "dense_weight_dtype":
            a["dense_weight"] = a["dense_weight"].to(other)
        elif bad == "dense_bias_shape":
            a["dense_bias"] = a["dense_bias"][:-1]
        elif bad == "dense_bias_dtype":
            a["dense_bias"] = a["dense_bias"].to(other)
        elif bad == "bos_out_of_range":
            a["bos"] = vocab
        elif bad == "bos_negative":
            a["bos"] = -1
        elif bad == "bos_float":
            a["bos"] = 0.5
        elif bad == "num_steps_negative":
            a["num_steps"] = -draw(st.integers(1, 2 ** 40))
        elif bad == "num_steps_huge":
            # an output that cannot be allocated: an allocation error, never a crash
            assume(batch > 0)
            a["num_steps"] = 2 ** 62
            names = ["num_steps", "overflowed", "allocate"]
        elif bad == "dense_weight_empty":  # no logits to take the argmax of
            assume(batch > 0 and a["num_steps"] > 0)
            a["dense_weight"] = torch.zeros(0, hidden, dtype=dtype)
            a["dense_bias"] = torch.zeros(0, dtype=dtype)
        elif bad == "dense_weight_rows":
            a["dense_weight"] = torch.zeros(vocab + 1, hidden, dtype=dtype)
            a["dense_bias"] = torch.zeros(vocab + 1, dtype=dtype)
    for k in ("state", "c", "emb_proj", "ctx_proj", "dense_weight", "dense_bias", "token"):
        if isinstance(a.get(k), torch.Tensor):
            a[k] = _layout(a[k], draw(st.sampled_from(LAYOUTS)), seed).view
    if draw(st.booleans()):
        a["weights"] = [_layout(x, "strided").view if isinstance(x, torch.Tensor) else x
                        for x in a["weights"]]
    return dec, a, names


def _decode_args(a, keys):
    return [a[k] for k in keys]


def _refused(op, args, names, snap):
    """For a case with a bad argument (``names`` not None): ``op(*args)`` raises naming it and
    writes nothing; True then (the caller's case is done)."""
    if names is None:
        return False
    _expect_error(lambda: op(*args), names)
    _assert_unchanged(args, snap, getattr(op, "__name__", str(op)))
    return True


STEP_KEYS = ["token", "state", "emb_proj", "ctx_proj", "weights", "dense_weight", "dense_bias"]
GREEDY_KEYS = ["state", "emb_proj", "ctx_proj", "weights", "dense_weight", "dense_bias", "bos",
               "eos", "num_steps"]


@FUZZ
@given(case=decode_cases())
def test_gru_decode_step_fuzz(case):
    """ops.gru_decode_step (and the bound stepper) on hostile inputs, against one step of the
    chapter's decoder."""
    dec, a, names = case
    args = _decode_args(a, STEP_KEYS)
    snap = _snapshot(args)
    if _refused(ops.gru_decode_step, args, names, snap):
        return
    logits, new_state = ops.gru_decode_step(*args)
    token, state = a["token"], a["state"]
    batch = state.shape[1]
    assert logits.shape == (*token.shape, dec.dense.out_features)
    assert new_state.shape == state.shape
    if batch:
        with torch.no_grad():
            ref_y, ref_state = dec(token.reshape(-1, 1).long(), state.contiguous())
        tol = dict(rtol=1e-5, atol=1e-5) if state.dtype == torch.float32 else {}
        _close(logits.reshape(batch, -1), ref_y[:, 0], state.dtype, **tol)
        _close(new_state, ref_state, state.dtype, **tol)
        if a["ctx_proj"] is None:
            with torch.no_grad():
                stepper = ops.decoder_stepper(dec.embedding.weight, a["weights"],
                                              a["dense_weight"], a["dense_bias"])
                s_logits, s_state = stepper.step(token, state)
            _close(s_logits, ref_y[:, 0].reshape(logits.shape), state.dtype, **tol)
            _close(s_state, ref_state, state.dtype, **tol)
    _assert_unchanged(args, snap, "gru_decode_step")


LSTM_STEP_KEYS = ["token", "state", "c", "emb_proj", "ctx_proj", "weights", "dense_weight",
                  "dense_bias"]


@FUZZ
@given(case=decode_cases(cell="lstm"))
def test_lstm_decode_step_fuzz(case):
    """ops.lstm_decode_step (and the bound stepper's lstm_step) on hostile inputs, against
    reference.lstm_decode_step on contiguous copies."""
    dec, a, names = case
    args = _decode_args(a, LSTM_STEP_KEYS)
    snap = _snapshot(args)
    if _refused(O.lstm_decode_step, args, names, snap):
        return
    logits, h2, c2 = O.lstm_decode_step(*args)
    token, h, c = a["token"], a["state"], a["c"]
    assert logits.shape == (*token.shape, dec.dense.out_features)
    assert h2.shape == h.shape and c2.shape == c.shape
    if not h.shape[1]:  # no rows (the oracle's reshape cannot infer the vocabulary then)
        _assert_unchanged(args, snap, "lstm_decode_step")
        return
    plain = [x.contiguous() if isinstance(x, torch.Tensor) else
             [w.contiguous() for w in x] if isinstance(x, list) else x for x in args]
    ref_logits, ref_h, ref_c = reference.lstm_decode_step(*plain)
    tol = dict(rtol=1e-5, atol=1e-5) if h.dtype == torch.float32 else {}
    _close(logits, ref_logits, h.dtype, **tol)
    _close(h2, ref_h, h.dtype, **tol)
    _close(c2, ref_c, h.dtype, **tol)
    if a["ctx_proj"] is None:
        with torch.no_grad():
            stepper = ops.decoder_stepper(dec.embedding.weight, a["weights"],
                                          a["dense_weight"], a["dense_bias"])
            s_logits, s_h, s_c = stepper.lstm_step(token, h, c)
        _close(s_logits, ref_logits, h.dtype, **tol)
        _close(s_h, ref_h, h.dtype, **tol)
        _close(s_c, ref_c, h.dtype, **tol)
    _assert_unchanged(args, snap, "lstm_decode_step")


def _reference_greedy(dec, state, bos, eos, num_steps):
    """predict_seq2seq's loop for each sentence of the batch."""
    tokens, lengths = [], []
    for b in range(state.shape[1]):
        s, x, out = state[:, b:b + 1].contiguous(), torch.tensor([[bos]]), []
        for _ in range(num_steps):
            with torch.no_grad():
                Y, s = dec(x, s)
            x = Y.argmax(dim=2)
            pred = x.squeeze().item()
            if pred == eos:
                break
            out.append(pred)
        lengths.append(len(out))
        tokens.append(out + [eos] * (num_steps - len(out)))
    return tokens, lengths


@FUZZ
@given(case=decode_cases(greedy=True))
def test_greedy_decode_fuzz(case):
    """ops.greedy_decode on hostile inputs, against predict_seq2seq's loop."""
    dec, a, names = case
    args = _decode_args(a, GREEDY_KEYS)
    snap = _snapshot(args)
    if names is not None:
        _expect_error(lambda: O.greedy_decode(*args), names)
        _assert_unchanged(args, snap, "greedy_decode")
        return
    tokens, lengths = ops.greedy_decode(*args)
    state, num_steps = a["state"], a["num_steps"]
    assert tokens.shape == (state.shape[1], num_steps) and lengths.shape == (state.shape[1],)
    if a["ctx_proj"] is None:
        ref_tokens, ref_lengths = _reference_greedy(dec, state, a["bos"], a["eos"], num_steps)
        assert tokens.tolist() == ref_tokens and lengths.tolist() == ref_lengths
    else:  # the fixed context: the steps of gru_decode_step with the same ctx_proj
        x = torch.full((state.shape[1],), a["bos"], dtype=torch.int64)
        s, free = state, []
        for _ in range(num_steps):
            y, s = ops.gru_decode_step(x, s, a["emb_proj"], a["ctx_proj"], a["weights"],
                                       a["dense_weight"], a["dense_bias"])
            x = y.argmax(dim=1)
            free.append(x)
        for b in range(state.shape[1]):
            row = [int(f[b]) for f in free]
            n = row.index(a["eos"]) if a["eos"] in row else num_steps
            assert lengths[b] == n and tokens[b, :n].tolist() == row[:n]
            assert (tokens[b, n:] == a["eos"]).all()
    _assert_unchanged(args, snap, "greedy_decode")


# ----------------------------------------------------------------------------------------------
# an argument on another device (a meta tensor beside CPU tensors)
# ----------------------------------------------------------------------------------------------

def _meta_cases():
    """(op, the argument moved to the meta device, the call's arguments)."""
    pred, label, vl = torch.randn(2, 3, 4), torch.randint(0, 4, (2, 3)), torch.tensor([1, 3])
    X = torch.randn(2, 3, 2)
    T, B, I, H = 2, 2, 3, 2
    layer = [torch.randn(T, B, I), torch.randn(B, H), torch.randn(3 * H, I),
             torch.randn(3 * H, H), torch.randn(3 * H), torch.randn(3 * H)]
    dec = _decoder(5, 2, 3, 1, torch.float32, 0)
    a = _op_args(dec)
    state, token = torch.rand(1, 2, 3), torch.tensor([0, 4])
    step = [token, state, a["emb_proj"], None, a["weights"], a["dense_weight"], a["dense_bias"]]
    meta = lambda t: t.to("meta")  # noqa: E731
    return [
        ("masked_softmax_ce", "label", lambda: O.masked_softmax_ce(pred, meta(label), vl)),
        ("masked_softmax_ce", "valid_len", lambda: O.masked_softmax_ce(pred, label, meta(vl))),
        ("sequence_mask", "valid_len", lambda: O.sequence_mask(X, meta(vl))),
        ("sequence_mask_", "valid_len", lambda: O.sequence_mask_(X.clone(), meta(vl))),
        ("gru_layer", "h0", lambda: O.gru_layer(layer[0], meta(layer[1]), *layer[2:], None)),
        ("gru_layer", "w_hh", lambda: O.gru_layer(*layer[:3], meta(layer[3]), *layer[4:], None)),
        ("gru_decode_step", "token", lambda: O.gru_decode_step(meta(token), *step[1:])),
        ("gru_decode_step", "weights",
         lambda: O.gru_decode_step(*step[:4], [meta(a["weights"][0])] + a["weights"][1:],
                                   *step[5:])),
        ("greedy_decode", "dense_bias",
         lambda: O.greedy_decode(state, a["emb_proj"], None, a["weights"], a["dense_weight"],
                                 meta(a["dense_bias"]), 0, 1, 3)),
    ]


def test_inplace_mask_wrapper_refuses_a_non_tensor():
    """ops.sequence_mask_ with a non-tensor X: an error naming X, as the raw op gives."""
    _expect_error(lambda: O.sequence_mask_("X", torch.tensor([1]), 0), ["X"])
    _expect_error(lambda: ops.sequence_mask_([[1.0, 2.0]], torch.tensor([1]), 0), ["X"])


@pytest.mark.parametrize("case", range(9), ids=[f"{c[0]}-{c[1]}" for c in _meta_cases()])
def test_argument_on_another_device_is_refused(case):
    """An argument on the meta device beside CPU tensors is an error naming it."""
    _, name, call = _meta_cases()[case]
    _expect_error(call, [name])


# ----------------------------------------------------------------------------------------------
# regressions: cases the fuzzing found, pinned
# ----------------------------------------------------------------------------------------------

def _layer_forward(steps=3, batch=2, in_size=4, hidden=8, seed=0):
    g = _gen(seed)
    x, h0 = torch.randn(steps, batch, in_size, generator=g), torch.randn(batch, hidden, generator=g)
    w_ih = torch.randn(3 * hidden, in_size, generator=g)
    w_hh = torch.randn(3 * hidden, hidden, generator=g)
    b = torch.randn(3 * hidden, generator=g)
    out, h_n, saved = O.gru_layer(x, h0, w_ih, w_hh, b, b, None)
    return x, h0, w_ih, w_hh, out, h_n, saved


@pytest.mark.parametrize("hidden_of_output", [1, 3, 9])
def test_gru_layer_backward_refuses_an_output_of_another_hidden_size(hidden_of_output):
    """An ``output`` narrower than (steps, batch, hidden) was read past its end (AddressSanitizer:
    heap-buffer-overflow in the backward's pointwise pass) before an unrelated size error; it is
    now refused up front, naming it."""
    x, h0, w_ih, w_hh, out, _, saved = _layer_forward()
    other = torch.randn(3, 2, hidden_of_output)
    with pytest.raises(RuntimeError, match=r"^(output|grad_output)\b"):
        O.gru_layer_backward(torch.ones_like(other), None, x, h0, w_ih, w_hh, other, saved, False)


def test_gru_layer_backward_refuses_saved_and_output_of_another_dtype():
    x, h0, w_ih, w_hh, out, _, saved = _layer_forward()
    with pytest.raises(RuntimeError, match=r"^output\b"):
        O.gru_layer_backward(torch.ones_like(out), None, x, h0, w_ih, w_hh, out.double(), saved,
                             False)
    with pytest.raises(RuntimeError, match=r"^saved\b"):
        O.gru_layer_backward(torch.ones_like(out), None, x, h0, w_ih, w_hh, out, saved.double(),
                             False)


def test_gru_layer_backward_converts_grad_hn_of_another_dtype():
    """grad_hn in float64 for a float32 layer is converted (it used to fail on a raw pointer of
    the wrong type with a message naming no argument)."""
    x, h0, w_ih, w_hh, out, h_n, saved = _layer_forward()
    g = torch.linspace(-1, 1, h_n.numel()).reshape(h_n.shape)
    a = O.gru_layer_backward(torch.ones_like(out), g.double(), x, h0, w_ih, w_hh, out, saved,
                             False)
    b = O.gru_layer_backward(torch.ones_like(out), g, x, h0, w_ih, w_hh, out, saved, False)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)


@pytest.mark.parametrize("batch,lengths", [(0, []), (2, [3, 3]), (2, [3.5, 7])])
@pytest.mark.parametrize("fn", [ops.sequence_mask, ops.sequence_mask_])
def test_sequence_mask_value_is_checked_even_when_nothing_is_masked(batch, lengths, fn):
    """The reference converts the value whatever the lengths: 300 for int8 is an error even for
    an empty X or when every step is kept (it used to pass silently there)."""
    X = torch.zeros(batch, 3, dtype=torch.int8)
    valid_len = torch.tensor(lengths, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"\bvalue\b"):
        reference.sequence_mask(X.clone(), valid_len, 300)
    with pytest.raises(RuntimeError, match=r"\bvalue\b"):
        fn(X, valid_len, 300)
    assert not X.any()


def test_greedy_decode_refuses_an_output_layer_without_outputs():
    """No logits to take the argmax of: an error naming dense_weight (it used to emit token 0)."""
    dec = _decoder(5, 2, 3, 1, torch.float32, 0)
    a = _op_args(dec)
    state = torch.zeros(1, 2, 3)
    with pytest.raises(RuntimeError, match=r"^dense_weight\b"):
        O.greedy_decode(state, a["emb_proj"], None, a["weights"], torch.zeros(0, 3),
                        torch.zeros(0), 0, 1, 4)
    # nothing to decode: no error
    tokens, lengths = O.greedy_decode(state, a["emb_proj"], None, a["weights"],
                                      torch.zeros(0, 3), torch.zeros(0), 0, 1, 0)
    assert tokens.shape == (2, 0) and lengths.tolist() == [0, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("offset", [1e6, 1e30])
def test_masked_softmax_ce_keeps_precision_for_huge_logits(dtype, offset):
    """Logits around ``offset`` with differences of order 1: the loss is (max - x[label]) +
    log(sum(exp(x - max))) and the gradient's softmax exp((x - max) - log(sum)), as the
    reference computes them; forming max + log(sum) first rounded the log-sum away (the loss of
    [1e30, 1e30] came out 0 instead of log 2, and the gradient gave each of k tied maxima the
    weight 1 instead of 1/k)."""
    base = torch.tensor([[0.0, 0.0, -50.0], [0.0, -1.0, 0.0], [2.0, 0.5, 1.0]],
                        dtype=torch.float64)
    pred = (base[None] + offset).to(dtype)  # (1, 3, 3); the differences survive the rounding
    pred.requires_grad_()
    label = torch.tensor([[2, 0, 1]])
    valid_len = torch.tensor([3])
    loss = ops.masked_softmax_ce(pred, label, valid_len)
    ref = reference.MaskedSoftmaxCELoss()(pred, label, valid_len)
    d = (pred - pred.max(dim=2, keepdim=True).values).detach().double()[0]
    expected = (torch.logsumexp(d, dim=1) - d.gather(1, label.t()).squeeze(1)).mean()
    torch.testing.assert_close(loss.double(), expected[None], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, ref)
    (grad,) = torch.autograd.grad(loss.sum(), pred)
    (ref_grad,) = torch.autograd.grad(ref.sum(), pred)
    expected_grad = (torch.softmax(d, dim=1) - torch.nn.functional.one_hot(label[0], 3)) / 3
    torch.testing.assert_close(grad[0].double(), expected_grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, ref_grad)
