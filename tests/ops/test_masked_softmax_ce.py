"""The fused masked softmax cross-entropy: ``ops.masked_softmax_ce``, the
``torch.ops.seq2seq_ext.masked_softmax_ce`` / ``masked_softmax_ce_backward`` pair and the
``MaskedSoftmaxCELoss`` module, against the chapter's reference loss."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import seq2seq_ext
from seq2seq_ext import ops, reference

from helpers import (NOT_DIFFERENTIATED, devices, generator, random_ce_inputs, random_labels,
                     random_logits, reference_ce)

CE = torch.ops.seq2seq_ext.masked_softmax_ce
CE_BACKWARD = torch.ops.seq2seq_ext.masked_softmax_ce_backward
DEVICES = devices()

# float32: the fused kernel sums each sequence's kept losses in step order and divides by T,
# while the reference multiplies by the mask and takes mean(dim=1) (another reduction order),
# and computes the log-sum-exp with its own summation order: rtol 1e-5 for the loss.
F32_LOSS_TOL = dict(rtol=1e-5, atol=1e-5)


def _fused(pred, label, valid_len, grad_loss=None):
    """Loss and gradient w.r.t. pred of the public wrapper (a fresh leaf each time)."""
    p = pred.detach().clone().requires_grad_()
    loss = ops.masked_softmax_ce(p, label, valid_len)
    g = torch.ones_like(loss) if grad_loss is None else grad_loss
    loss.backward(g)
    return loss.detach(), p.grad


def _oracle(pred, label, valid_len, grad_loss=None):
    p = pred.detach().clone().requires_grad_()
    loss = reference_ce(p, label, valid_len)
    g = torch.ones_like(loss) if grad_loss is None else grad_loss
    loss.backward(g)
    return loss.detach(), p.grad


def _assert_parity(pred, label, valid_len, seed=0):
    grad_loss = torch.randn(pred.shape[0], generator=generator(seed + 7), dtype=torch.float64)
    grad_loss = grad_loss.to(device=pred.device, dtype=pred.dtype)
    loss, grad = _fused(pred, label, valid_len, grad_loss)
    ref_loss, ref_grad = _oracle(pred, label, valid_len, grad_loss)
    if pred.dtype == torch.float32:
        torch.testing.assert_close(loss, ref_loss, **F32_LOSS_TOL)
        torch.testing.assert_close(grad, ref_grad)
    else:
        torch.testing.assert_close(loss, ref_loss)
        torch.testing.assert_close(grad, ref_grad)


# ----------------------------------------------------------------------------------------------
# parity with the reference
# ----------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 7), steps=st.integers(1, 11), vocab=st.integers(1, 70),
       dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**31 - 1), float_len=st.booleans())
def test_parity_random(batch, steps, vocab, dtype, seed, float_len):
    pred, label, valid_len = random_ce_inputs(batch, steps, vocab, dtype=dtype, seed=seed)
    if float_len:
        valid_len = valid_len.to(torch.float32) - 0.5
    _assert_parity(pred, label, valid_len, seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (2, 9, 33), (5, 1, 130), (4, 13, 257),
                                   (1, 17, 1000)])
def test_parity_explicit(device, dtype, shape):
    pred, label, valid_len = random_ce_inputs(*shape, dtype=dtype, device=device, seed=sum(shape))
    _assert_parity(pred, label, valid_len, seed=len(shape))


@pytest.mark.parametrize("device", DEVICES)
def test_raw_op_returns_loss_and_lse(device):
    pred, label, valid_len = random_ce_inputs(3, 6, 11, dtype=torch.float64, device=device,
                                              seed=5)
    valid_len = torch.tensor([6, 2, 0], device=device)
    loss, lse = CE(pred, label, valid_len)
    assert loss.shape == (3,) and loss.dtype == torch.float64
    # the log-sum-exp in two parts: the row's maximum and log(sum(exp(x - maximum)))
    assert lse.shape == (3, 6, 2) and lse.dtype == torch.float64
    kept = torch.arange(6, device=device)[None, :] < valid_len[:, None]
    row_max = pred.max(dim=2).values
    torch.testing.assert_close(lse[..., 0][kept], row_max[kept], rtol=0, atol=0)
    torch.testing.assert_close(lse[..., 1][kept],
                               torch.logsumexp(pred - row_max[..., None], dim=2)[kept])
    assert not lse[~kept].any()
    torch.testing.assert_close(loss, reference_ce(pred, label, valid_len))
    grad_loss = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64, device=device)
    grad = CE_BACKWARD(grad_loss, pred, label, valid_len, lse)
    _, ref_grad = _oracle(pred, label, valid_len, grad_loss)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("device", DEVICES)
def test_lse_is_float32_for_reduced_precision(device):
    pred, label, valid_len = random_ce_inputs(2, 3, 5, dtype=torch.bfloat16, device=device)
    loss, lse = CE(pred, label, valid_len)
    assert loss.dtype == torch.bfloat16
    assert lse.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reduced_precision_error_within_twice_reference_error(device, dtype, seed):
    # DESIGN's rule for reduced precision: the error against a float64 ground truth is at most
    # twice the reference's own error when it runs in that precision.
    pred, label, valid_len = random_ce_inputs(8, 12, 50, dtype=dtype, device=device, seed=seed)
    valid_len = valid_len.clamp(min=1)
    truth_loss, truth_grad = _oracle(pred.double(), label, valid_len)
    ref_loss, ref_grad = _oracle(pred, label, valid_len)
    loss, grad = _fused(pred, label, valid_len)
    assert loss.dtype == dtype and grad.dtype == dtype
    ref_err = (ref_loss.double() - truth_loss).abs().max().item()
    err = (loss.double() - truth_loss).abs().max().item()
    assert err <= 2 * ref_err + 1e-6, (err, ref_err)
    ref_gerr = (ref_grad.double() - truth_grad).abs().max().item()
    gerr = (grad.double() - truth_grad).abs().max().item()
    assert gerr <= 2 * ref_gerr + 1e-6, (gerr, ref_gerr)


# ----------------------------------------------------------------------------------------------
# edge cases
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_valid_len_zero_gives_zero_loss_and_gradient(device):
    pred, label, _ = random_ce_inputs(3, 4, 6, device=device, seed=11)
    valid_len = torch.zeros(3, dtype=torch.int64, device=device)
    loss, grad = _fused(pred, label, valid_len)
    assert torch.equal(loss, torch.zeros(3, device=device))
    assert torch.equal(grad, torch.zeros_like(pred))


@pytest.mark.parametrize("device", DEVICES)
def test_valid_len_beyond_steps_keeps_every_step(device):
    pred, label, _ = random_ce_inputs(3, 4, 6, dtype=torch.float64, device=device, seed=12)
    full = torch.full((3,), 4, device=device)
    for big in (5, 100, 2**40):
        valid_len = torch.full((3,), big, dtype=torch.int64, device=device)
        loss, grad = _fused(pred, label, valid_len)
        full_loss, full_grad = _fused(pred, label, full)
        assert torch.equal(loss, full_loss) and torch.equal(grad, full_grad)
        _assert_parity(pred, label, valid_len)


@pytest.mark.parametrize("device", DEVICES)
def test_negative_and_float_valid_len(device):
    pred, label, _ = random_ce_inputs(4, 5, 7, dtype=torch.float64, device=device, seed=13)
    valid_len = torch.tensor([-3.0, 2.5, 0.2, 4.0], dtype=torch.float64, device=device)
    loss, grad = _fused(pred, label, valid_len)
    # the reference keeps step t when t < valid_len: 2.5 keeps 3 steps, 0.2 keeps 1, -3 none
    kept_steps = torch.tensor([0, 3, 1, 4], device=device)
    per_token = nn.functional.cross_entropy(pred.permute(0, 2, 1), label, reduction="none")
    mask = torch.arange(5, device=device)[None, :] < kept_steps[:, None]
    torch.testing.assert_close(loss, (per_token * mask).sum(1) / 5)
    assert loss[0] == 0 and torch.equal(grad[0], torch.zeros_like(grad[0]))
    assert torch.equal(grad[1, 3:], torch.zeros_like(grad[1, 3:]))
    assert (grad[1, :3] != 0).any()
    _assert_parity(pred, label, valid_len)
    # the same with a float32 and an int32 valid_len
    _assert_parity(pred, label, valid_len.float())
    _assert_parity(pred, label, torch.tensor([-3, 2, 0, 4], dtype=torch.int32, device=device))
    # and the unsigned dtypes the reference compares as well
    for dtype in (torch.uint16, torch.uint32, torch.uint64):
        _assert_parity(pred, label, torch.tensor([0, 2, 9, 4], dtype=dtype, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_nan_valid_len_masks_everything(device):
    pred, label, _ = random_ce_inputs(2, 3, 4, device=device, seed=14)
    valid_len = torch.tensor([float("nan"), 2.0], device=device)
    loss, grad = _fused(pred, label, valid_len)
    ref_loss, ref_grad = _oracle(pred, label, valid_len)
    assert loss[0] == 0 and torch.equal(grad[0], torch.zeros_like(grad[0]))
    torch.testing.assert_close(loss, ref_loss, **F32_LOSS_TOL)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 9), (1, 6, 9), (4, 1, 9), (3, 5, 1), (1, 1, 1)])
def test_degenerate_sizes(device, shape):
    pred, label, valid_len = random_ce_inputs(*shape, dtype=torch.float64, device=device,
                                              seed=15)
    _assert_parity(pred, label, valid_len)
    if shape[2] == 1:  # a single class: zero loss and zero gradient everywhere
        loss, grad = _fused(pred, label, valid_len)
        assert torch.equal(loss, torch.zeros_like(loss))
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    pred = torch.randn(0, 3, 5, device=device, requires_grad=True)
    label = torch.zeros(0, 3, dtype=torch.int64, device=device)
    valid_len = torch.zeros(0, device=device)
    loss = ops.masked_softmax_ce(pred, label, valid_len)
    assert loss.shape == (0,)
    loss.sum().backward()
    assert pred.grad.shape == pred.shape


def _layouts(batch, steps, vocab, dtype, device, seed):
    """(name, pred) pairs with the same values and different memory layouts."""
    base = random_logits(batch, steps, vocab, dtype=dtype, device=device, seed=seed)
    return [
        # the decoder's output: dense(output).permute(1, 0, 2) of a (T, B, V) tensor
        ("permuted", base.permute(1, 0, 2).contiguous().permute(1, 0, 2)),
        # vocab not the innermost dimension
        ("vocab-strided", base.permute(0, 2, 1).contiguous().permute(0, 2, 1)),
        # a slice of a wider tensor: non-unit vocab stride
        ("sliced", torch.stack([base, base], dim=3).flatten(2)[:, :, ::2]),
        ("narrowed", torch.cat([base, base], dim=1)[:, steps:]),
        ("contiguous", base),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_contiguous_pred(device, dtype):
    _, label, valid_len = random_ce_inputs(5, 7, 19, device=device, seed=16)
    results = []
    for name, pred in _layouts(5, 7, 19, dtype, device, seed=16):
        if name != "contiguous":
            assert not pred.is_contiguous(), name
        loss, grad = _fused(pred, label, valid_len)
        results.append((name, loss, grad))
        _assert_parity(pred, label, valid_len)
    # the layout changes nothing: on the CPU bitwise the same loss and gradient values
    for name, loss, grad in results:
        if device == "cpu":
            assert torch.equal(loss, results[-1][1]), name
            assert torch.equal(grad, results[-1][2]), name
        else:
            torch.testing.assert_close(loss, results[-1][1], **F32_LOSS_TOL)
            torch.testing.assert_close(grad, results[-1][2])


@pytest.mark.parametrize("device", DEVICES)
def test_permuted_pred_is_not_copied(device):
    t, b, v = 6, 4, 23
    logits = torch.randn(t, b, v, generator=generator(17)).to(device)
    pred = logits.permute(1, 0, 2)  # what Seq2SeqDecoder returns
    label = random_labels(b, t, v, device=device, seed=17)
    valid_len = torch.tensor([6, 3, 0, 9], device=device)
    # the gradient the op writes has the layout of pred: no contiguous copy was made
    loss, lse = CE(pred, label, valid_len)
    grad = CE_BACKWARD(torch.ones_like(loss), pred, label, valid_len, lse)
    assert grad.stride() == pred.stride()
    # and through autograd, on a leaf with that layout
    leaf = logits.clone().permute(1, 0, 2).requires_grad_()
    ops.masked_softmax_ce(leaf, label, valid_len).sum().backward()
    assert leaf.grad.stride() == pred.stride()
    _assert_parity(pred, label, valid_len)
    if device == "cpu":
        # no copy of the logits in the forward or the backward
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            loss, lse = CE(pred, label, valid_len)
            CE_BACKWARD(torch.ones_like(loss), pred, label, valid_len, lse)
        names = {e.name for e in prof.events()}
        assert not names & {"aten::copy_", "aten::clone", "aten::contiguous"}, names


@pytest.mark.parametrize("device", DEVICES)
def test_int32_labels(device):
    pred, label, valid_len = random_ce_inputs(4, 6, 13, dtype=torch.float64, device=device,
                                              seed=18)
    l64, g64 = _fused(pred, label, valid_len)
    l32, g32 = _fused(pred, label.int(), valid_len)
    assert torch.equal(l64, l32) and torch.equal(g64, g32)
    _assert_parity(pred, label.int(), valid_len)
    # int32 labels through a non-contiguous view
    wide = torch.stack([label, label], dim=2).int()[:, :, 0]
    assert not wide.is_contiguous()
    lw, gw = _fused(pred, wide, valid_len)
    assert torch.equal(lw, l64) and torch.equal(gw, g64)


@pytest.mark.parametrize("device", DEVICES)
def test_negative_infinity_logits(device):
    pred, label, _ = random_ce_inputs(3, 4, 6, dtype=torch.float64, device=device, seed=19)
    valid_len = torch.tensor([4, 4, 2], device=device)
    pred[0, 1, (label[0, 1] + 1) % 6] = -math.inf     # elsewhere than the label: finite loss
    pred[1, 2, label[1, 2]] = -math.inf               # at the label: infinite loss
    # at the label but masked: no effect (the reference gives NaN there, inf * 0; the fused op
    # never reads masked logits, as its kernel documents)
    pred[2, 3, label[2, 3]] = -math.inf
    loss, grad = _fused(pred, label, valid_len)
    ref_loss, ref_grad = _oracle(pred, label, valid_len)
    assert torch.isfinite(loss[0]) and loss[1] == math.inf and torch.isfinite(loss[2])
    torch.testing.assert_close(loss[:2], ref_loss[:2])
    # a -inf logit has zero probability: its gradient is exactly 0 (or -1/T at the label)
    assert grad[0, 1, (label[0, 1] + 1) % 6] == 0
    torch.testing.assert_close(grad[:2], ref_grad[:2])
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[2, 2:], torch.zeros_like(grad[2, 2:]))


@pytest.mark.parametrize("device", DEVICES)
def test_nan_in_kept_position_gives_nan_loss(device):
    pred, label, _ = random_ce_inputs(2, 4, 6, device=device, seed=20)
    valid_len = torch.tensor([3, 3], device=device)
    pred[0, 2, 4] = math.nan
    loss = ops.masked_softmax_ce(pred, label, valid_len)
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])
    assert torch.isnan(reference_ce(pred, label, valid_len)[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", [8, 16, 67])  # whole vectors of 8 / 16 lanes, a streamed row
def test_nan_in_kept_position_gives_nan_gradient_row(device, vocab):
    """A NaN logit makes its position's whole gradient row NaN, as in the reference (the
    vectorised exp must carry the NaN, also where a row is whole vectors)."""
    pred, label, _ = random_ce_inputs(2, 3, vocab, device=device, seed=21)
    valid_len = torch.tensor([3, 3], device=device)
    pred[0, 1, 0] = math.nan
    _, grad = _fused(pred, label, valid_len)
    _, ref_grad = _oracle(pred, label, valid_len)
    assert torch.isnan(ref_grad[0, 1]).all()
    assert torch.isnan(grad[0, 1]).all()
    torch.testing.assert_close(grad, ref_grad, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_positions_get_exactly_zero_gradient(device):
    pred, label, _ = random_ce_inputs(4, 6, 9, device=device, seed=21)
    valid_len = torch.tensor([0, 2, 5, 6], device=device)
    # masked logits are never read: not even NaN or inf there reach the loss or the gradient
    # (the reference's loss would be NaN: it multiplies the masked per-token loss by 0)
    pred[1, 3, 0] = math.nan
    pred[2, 5, :] = math.inf
    loss, grad = _fused(pred, label, valid_len, grad_loss=torch.full((4,), 3.0, device=device))
    assert torch.isfinite(loss).all()
    mask = torch.arange(6, device=device)[None, :] >= valid_len[:, None]
    assert torch.equal(grad[mask], torch.zeros_like(grad[mask]))
    assert (grad[~mask] != 0).any(dim=-1).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_incoming_gradient_reaches_masked_positions(device, bad):
    """A non-finite grad_loss[b] reaches sequence b's masked positions as NaN (a sequence
    without kept steps included), as the reference's product with the mask gives, and its
    kept positions as in the reference."""
    pred, label, _ = random_ce_inputs(3, 4, 6, dtype=torch.float64, device=device, seed=23)
    valid_len = torch.tensor([2, 0, 4], device=device)
    grad_loss = torch.tensor([bad, bad, 1.0], dtype=torch.float64, device=device)
    _, grad = _fused(pred, label, valid_len, grad_loss)
    _, ref_grad = _oracle(pred, label, valid_len, grad_loss)
    assert torch.isnan(ref_grad[0, 2:]).all() and torch.isnan(ref_grad[1]).all()
    torch.testing.assert_close(grad, ref_grad, equal_nan=True)


def test_batched_gradients_equal_the_reference():
    """``autograd.grad(..., is_grads_batched=True)`` runs the backward under vmap (functorch
    runs the backward op once per gradient)."""
    pred, label, _ = random_ce_inputs(3, 4, 6, dtype=torch.float64, seed=24)
    valid_len = torch.tensor([4, 1, 0])
    v = torch.randn(5, 3, dtype=torch.float64, generator=generator(25))
    p, q = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    (got,) = torch.autograd.grad(ops.masked_softmax_ce(p, label, valid_len), p, v,
                                 is_grads_batched=True)
    (want,) = torch.autograd.grad(reference_ce(q, label, valid_len), q, v,
                                  is_grads_batched=True)
    assert got.shape == (5, *pred.shape)
    torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_across_calls_and_threads(dtype):
    # DESIGN: deterministic on the CPU, bitwise, whatever the number of threads
    pred, label, valid_len = random_ce_inputs(16, 20, 300, dtype=dtype, seed=22)
    first = _fused(pred, label, valid_len)
    for _ in range(3):
        again = _fused(pred, label, valid_len)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(_fused(pred, label, valid_len))
    finally:
        torch.set_num_threads(before)
    for loss, grad in outs:
        assert torch.equal(loss, first[0]) and torch.equal(grad, first[1])


# ----------------------------------------------------------------------------------------------
# opcheck and gradcheck
# ----------------------------------------------------------------------------------------------

def _ce_samples(device):
    out = []
    pred, label, valid_len = random_ce_inputs(3, 5, 7, device=device, seed=30)
    out.append((pred, label, valid_len))
    pred, label, valid_len = random_ce_inputs(2, 4, 9, dtype=torch.float64, device=device,
                                              seed=31)
    out.append((pred.requires_grad_(), label.int(), valid_len.double() - 0.5))
    pred = random_logits(4, 3, 6, device=device, seed=32).permute(1, 0, 2)
    label = random_labels(3, 4, 6, device=device, seed=32)
    out.append((pred.requires_grad_(), label, torch.tensor([0, 2, 7], device=device)))
    pred, label, valid_len = random_ce_inputs(2, 3, 5, dtype=torch.bfloat16, device=device,
                                              seed=33)
    out.append((pred.requires_grad_(), label, valid_len))
    pred, label, _ = random_ce_inputs(1, 1, 1, device=device, seed=34)
    out.append((pred, label, torch.ones(1, device=device)))
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_forward(device):
    for args in _ce_samples(device):
        torch.library.opcheck(CE, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward(device):
    for pred, label, valid_len in _ce_samples(device):
        pred = pred.detach()
        loss, lse = CE(pred, label, valid_len)
        grad_loss = torch.randn(loss.shape, generator=generator(35)).to(loss)
        torch.library.opcheck(CE_BACKWARD, (grad_loss, pred, label, valid_len, lse))


def test_backward_op_has_no_derivative_of_its_own():
    """The backward op registered for autograd: it runs on inputs that require grad (opcheck's
    checks but the one that differentiates it), and differentiating its output names it
    (second derivatives come from the forward's backward with create_graph=True)."""
    pred, label, valid_len = random_ce_inputs(3, 4, 6, device="cpu", seed=36)
    loss, lse = CE(pred.detach(), label, valid_len)
    grad_loss = torch.randn(loss.shape, generator=generator(37)).requires_grad_()
    pred = pred.detach().requires_grad_()
    torch.library.opcheck(CE_BACKWARD, (grad_loss, pred, label, valid_len, lse),
                          test_utils=NOT_DIFFERENTIATED)
    grad = CE_BACKWARD(grad_loss, pred, label, valid_len, lse)
    with pytest.raises(RuntimeError, match="derivative for .*masked_softmax_ce_backward"):
        torch.autograd.grad(grad.sum(), pred)


@pytest.mark.parametrize("batch, steps, vocab, lengths", [
    (1, 1, 4, [1]),          # batch 1, one step
    (1, 1, 4, [0]),          # nothing kept
    (3, 2, 5, [7, 2, 0]),    # a length past the sequence
    (2, 3, 1, [3, 1.5]),     # one class, a fractional length
])
def test_gradcheck_at_the_edges(batch, steps, vocab, lengths):
    pred = random_logits(batch, steps, vocab, dtype=torch.float64, device="cpu", seed=38,
                         scale=1.0).requires_grad_()
    label = random_labels(batch, steps, vocab, device="cpu", seed=38)
    valid_len = torch.tensor(lengths, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: ops.masked_softmax_ce(p, label, valid_len), (pred,))
    torch.library.opcheck(CE, (pred, label, valid_len))


def test_opcheck_of_an_empty_batch():
    # (no steps gives the reference's NaN means, which opcheck's comparisons count as unequal)
    pred = torch.randn(0, 3, 5, requires_grad=True)
    torch.library.opcheck(CE, (pred, torch.zeros(0, 3, dtype=torch.long),
                               torch.zeros(0, dtype=torch.long)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
def test_gradcheck(device, layout):
    pred = random_logits(3, 4, 5, dtype=torch.float64, device=device, seed=36, scale=1.0)
    if layout == "permuted":
        pred = pred.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    label = random_labels(3, 4, 5, device=device, seed=36)
    valid_len = torch.tensor([4, 1.5, 0], dtype=torch.float64, device=device)
    pred.requires_grad_()
    assert torch.autograd.gradcheck(lambda p: ops.masked_softmax_ce(p, label, valid_len),
                                    (pred,))


def test_gradgradcheck():
    # create_graph=True: the backward recomputes the loss differentiably (ops._graph_grads)
    pred = random_logits(3, 4, 5, dtype=torch.float64, seed=37, scale=1.0).requires_grad_()
    label = random_labels(3, 4, 5, seed=37)
    valid_len = torch.tensor([4, 1.5, 0], dtype=torch.float64)
    assert torch.autograd.gradgradcheck(lambda p: ops.masked_softmax_ce(p, label, valid_len),
                                        (pred,))


@pytest.mark.parametrize("options", [dict(label_smoothing=0.2),
                                     dict(weight=torch.linspace(0.5, 2.0, 7)),
                                     dict(weight=torch.linspace(0.5, 2.0, 7), label_smoothing=0.1),
                                     dict(ignore_index=3), dict(ignore_index=0)])
def test_loss_module_honours_cross_entropy_options(options):
    """MaskedSoftmaxCELoss is an nn.CrossEntropyLoss: its weight, label_smoothing and
    ignore_index count, as in d2l's class (which runs CrossEntropyLoss's forward)."""
    pred = random_logits(3, 4, 7, dtype=torch.float64, seed=38, scale=1.0)
    label = random_labels(3, 4, 7, seed=38)
    if "ignore_index" in options:  # a kept position holds the ignored class
        label[0, 1] = label[1, 0] = options["ignore_index"]
    valid_len = torch.tensor([4, 2, 0])
    options = {k: (v.double() if torch.is_tensor(v) else v) for k, v in options.items()}
    got_p, want_p = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    got = seq2seq_ext.MaskedSoftmaxCELoss(**options)(got_p, label, valid_len)
    want = reference.MaskedSoftmaxCELoss(**options)(want_p, label, valid_len)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(got_p.grad, want_p.grad)
    plain = seq2seq_ext.MaskedSoftmaxCELoss()(pred, label, valid_len)
    assert not torch.allclose(plain, want)  # the options changed the loss


# ----------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, nothing written
# ----------------------------------------------------------------------------------------------

def _bad_cases(device):
    pred, label, valid_len = random_ce_inputs(3, 4, 6, device=device, seed=40)
    lab = label.clone()
    out_of_range = lab.clone()
    out_of_range[1, 2] = 6
    negative = lab.clone()
    negative[2, 3] = -1
    masked_out_of_range = lab.clone()
    masked_out_of_range[0, 3] = 100  # checked even where masked, as nn.CrossEntropyLoss does
    # Label values are checked on the host on the CPU only: a CUDA kernel stops with a
    # device-side assertion (test_cuda_graphs.py checks it in a process of its own).
    range_cases = [
        ("label", (pred, out_of_range, valid_len)),
        ("label", (pred, negative, valid_len)),
        ("label", (pred, masked_out_of_range, torch.zeros(3, device=device))),
        ("label", (pred, out_of_range.int(), valid_len)),
    ] if device == "cpu" else []
    return range_cases + [
        ("pred", (pred[0], lab, valid_len)),
        ("pred", (pred[None], lab, valid_len)),
        ("pred", (pred.to(torch.int64), lab, valid_len)),
        ("label", (pred, lab[:, :, None], valid_len)),
        ("label", (pred, lab[0], valid_len)),
        ("label", (pred, lab[:2], valid_len)),
        ("label", (pred, lab[:, :3], valid_len)),
        ("label", (pred, lab.float(), valid_len)),
        ("label", (pred, lab.to(torch.int16), valid_len)),
        ("valid_len", (pred, lab, valid_len[:2])),
        ("valid_len", (pred, lab, torch.ones(4, device=device))),
        ("valid_len", (pred, lab, valid_len[:, None])),
        ("valid_len", (pred, lab, valid_len.to(torch.complex64))),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("entry", ["wrapper", "op", "module"])
def test_bad_input_names_argument_and_changes_nothing(device, entry):
    fn = {"wrapper": ops.masked_softmax_ce,
          "op": CE,
          "module": seq2seq_ext.MaskedSoftmaxCELoss()}[entry]
    for name, args in _bad_cases(device):
        before = [a.clone() for a in args]
        with pytest.raises((RuntimeError, ValueError), match=rf"^{name}:"):
            fn(*args)
        for a, b in zip(args, before):
            assert torch.equal(a, b), name


def test_float8_logits_name_pred():
    pred, label, valid_len = random_ce_inputs(2, 3, 5, device="cpu", seed=40)
    with pytest.raises(RuntimeError, match=r"^pred: expected a floating-point tensor \(float64"):
        CE(pred.to(torch.float8_e5m2), label, valid_len)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_bad_input_names_argument(device):
    pred, label, valid_len = random_ce_inputs(3, 4, 6, device=device, seed=41)
    loss, lse = CE(pred, label, valid_len)
    g = torch.ones_like(loss)
    bad_label = label.clone()
    bad_label[0, 0] = 6
    cases = [
        ("grad_loss", (g[:2], pred, label, valid_len, lse)),
        ("grad_loss", (g[:, None], pred, label, valid_len, lse)),
        ("grad_loss", (g.to(torch.complex64), pred, label, valid_len, lse)),
        ("lse", (g, pred, label, valid_len, lse[:, :3])),
        ("lse", (g, pred, label, valid_len, lse.double())),
        ("valid_len", (g, pred, label, valid_len[:1], lse)),
        ("pred", (g, pred[0], label, valid_len, lse)),
    ]
    if device == "cpu":  # on CUDA a device-side assertion (test_cuda_graphs.py)
        cases.append(("label", (g, pred, bad_label, valid_len, lse)))
    for name, args in cases:
        before = [a.clone() for a in args]
        with pytest.raises(RuntimeError, match=rf"^{name}:"):
            CE_BACKWARD(*args)
        for a, b in zip(args, before):
            assert torch.equal(a, b), name


# ----------------------------------------------------------------------------------------------
# the loss module
# ----------------------------------------------------------------------------------------------

def test_loss_module_is_a_cross_entropy_loss():
    loss = seq2seq_ext.MaskedSoftmaxCELoss()
    assert isinstance(loss, nn.CrossEntropyLoss)


@pytest.mark.parametrize("device", DEVICES)
def test_loss_module_matches_reference_module(device):
    pred, label, valid_len = random_ce_inputs(4, 7, 12, dtype=torch.float64, device=device,
                                              seed=50)
    a = pred.clone().requires_grad_()
    b = pred.clone().requires_grad_()
    la = seq2seq_ext.MaskedSoftmaxCELoss()(a, label, valid_len)
    lb = reference.MaskedSoftmaxCELoss()(b, label, valid_len)
    torch.testing.assert_close(la, lb)
    la.sum().backward()
    lb.sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["ext", "reference"])
def test_loss_module_chapter_example(device, backend):
    # the chapter's check: three identical sequences with valid lengths 4, 2 and 0 give
    # losses in the ratio 2:1:0
    pred = torch.ones((3, 4, 10), device=device)
    label = torch.ones((3, 4), dtype=torch.long, device=device)
    with seq2seq_ext.use_backend(backend):
        loss = seq2seq_ext.MaskedSoftmaxCELoss()(pred, label, torch.tensor([4, 2, 0],
                                                                            device=device))
    expected = torch.tensor([math.log(10), math.log(10) / 2, 0.0], device=device)
    torch.testing.assert_close(loss, expected)
    assert loss[2] == 0
    torch.testing.assert_close(loss[0], 2 * loss[1])


@pytest.mark.parametrize("device", DEVICES)
def test_reference_backend_gives_the_reference(device):
    pred, label, valid_len = random_ce_inputs(3, 5, 8, device=device, seed=51)
    with seq2seq_ext.use_backend("reference"):
        loss = ops.masked_softmax_ce(pred, label, valid_len)
    assert torch.equal(loss, reference_ce(pred, label, valid_len))
    torch.testing.assert_close(ops.masked_softmax_ce(pred, label, valid_len), loss,
                               **F32_LOSS_TOL)
