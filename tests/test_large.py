"""Sizes past 2^31 elements: the loss (forward and backward) and the sequence mask index their
tensors with int64, so positions beyond 2^31 are read and written where they belong.

Each test builds a tensor whose last sequence lies entirely beyond element 2^31 and checks it
against an expectation computed independently from a few values. Marked slow (not in the default
run); each skips, saying why, when the machine has not enough free memory.
"""
import math

import pytest
import torch

from seq2seq_ext import ops

O = torch.ops.seq2seq_ext
GIB = 1 << 30
pytestmark = pytest.mark.slow


def available_bytes():
    """MemAvailable from /proc/meminfo, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def require_memory(needed):
    """Skip the test unless ``needed`` bytes (plus 2 GiB of headroom) are available."""
    avail = available_bytes()
    if avail is None:
        pytest.skip("free memory cannot be read (/proc/meminfo)")
    if avail < needed + 2 * GIB:
        pytest.skip(f"needs {(needed + 2 * GIB) / GIB:.1f} GiB of free memory, "
                    f"{avail / GIB:.1f} GiB available")


def test_loss_forward_and_backward_beyond_2_31_elements():
    """(9, 64, 2^22) bfloat16 logits (2.4e9 elements): sequence 8 starts at element 2^31. Its
    log-sum-exps, its loss and its gradient match the values computed from its few non-zero
    logits; the masked steps get exactly zero gradient."""
    B, T, V = 9, 64, 1 << 22
    assert B * T * V > 2 ** 31 and (B - 1) * T * V == 2 ** 31
    require_memory(2 * B * T * V * 2)  # the logits and their gradient, bfloat16
    g = torch.Generator().manual_seed(0)
    pred = torch.zeros(B, T, V, dtype=torch.bfloat16)
    # every row: zeros but for K non-positive logits (so the maximum is 0 and the float32 sums
    # of exp(0) = 1 are exact); the first one sits at a column of its own near the row's end and
    # its value depends on the row, so that reading another row's memory changes the gradient
    K = 8
    cols = torch.randint(0, V, (B, T, K), generator=g)
    cols[..., 0] = V - 1 - torch.arange(B * T).reshape(B, T)
    vals = (-4 * torch.rand(B, T, K, generator=g)).to(torch.bfloat16)
    vals[..., 0] = (-0.125 * (1 + torch.arange(B * T) % 32)).reshape(B, T).to(torch.bfloat16)
    pred.scatter_(2, cols, vals)
    # labels: at a special column for odd steps, at a zero column for even ones
    label = torch.where(torch.arange(T) % 2 == 1, cols[..., 1], (cols[..., 0] - 1) % V)
    valid_len = torch.full((B,), T)
    valid_len[-1] = T - 5

    loss, lse = O.masked_softmax_ce(pred, label, valid_len)

    def row_expectation(b, t):
        """(lse, loss term, values and columns of the non-zero logits) of row (b, t), float64."""
        c = cols[b, t]
        uniq = torch.unique(c)
        vu = pred[b, t, uniq].double()
        row_lse = math.log((V - uniq.numel()) + vu.exp().sum().item())
        x_label = pred[b, t, label[b, t]].double().item()
        return row_lse, row_lse - x_label, uniq, vu

    b = B - 1
    kept = int(valid_len[b])
    expected_loss = 0.0
    for t in range(T):
        if t < kept:
            row_lse, term, _, _ = row_expectation(b, t)
            assert lse[b, t].sum().item() == pytest.approx(row_lse, rel=1e-5)
            expected_loss += term
        else:
            assert not lse[b, t].any()
    expected_loss /= T
    assert loss[b].float().item() == pytest.approx(expected_loss, rel=1e-2)
    # and a sequence before 2^31, computed the same way
    row_lse, _, _, _ = row_expectation(0, 3)
    assert lse[0, 3].sum().item() == pytest.approx(row_lse, rel=1e-5)

    grad_loss = torch.linspace(0.5, 1.5, B)
    grad = O.masked_softmax_ce_backward(grad_loss, pred, label, valid_len, lse)
    assert grad.shape == pred.shape and grad.dtype == torch.bfloat16
    scale = grad_loss[b].item() / T
    for t in (0, 1, kept - 1):
        row_lse, _, uniq, vu = row_expectation(b, t)
        expected = (vu - row_lse).exp() * scale
        y = int(label[b, t])
        expected -= scale * (uniq == y).double()
        torch.testing.assert_close(grad[b, t, uniq].double(), expected, rtol=2e-2, atol=1e-9)
        zero_col = int((cols[b, t, 0] + 1) % V)
        if zero_col not in uniq.tolist() and zero_col != y:
            assert grad[b, t, zero_col].double().item() == pytest.approx(
                math.exp(-row_lse) * scale, rel=2e-2)
        if y not in uniq.tolist():
            assert grad[b, t, y].double().item() == pytest.approx(
                (math.exp(-row_lse) - 1) * scale, rel=2e-2)
    # masked steps of the last sequence: exactly zero over whole rows
    assert not grad[b, kept:].any()
    # the row sums of a kept row's gradient are 0 (softmax minus one-hot)
    assert abs(grad[b, 2].float().sum().item()) < 1e-3 * scale * V ** 0.5


def test_sequence_mask_beyond_2_31_elements():
    """(5, 512, 2^20) uint8 (2.7e9 elements): sequence 4 starts at element 2^31. The out-of-place
    and in-place masks write the value exactly at its masked steps and nowhere else."""
    B, T, D = 5, 512, 1 << 20
    assert (B - 1) * T * D == 2 ** 31
    require_memory(2 * B * T * D)  # X and the out-of-place result
    X = torch.ones(B, T, D, dtype=torch.uint8)
    valid_len = torch.tensor([T, 0, 100, 511, 300.5])  # fractional: steps 0..300 are kept

    def check(out):
        b = B - 1
        assert out[b, :301].min() == 1 and out[b, :301].max() == 1
        assert out[b, 301:].min() == 7 and out[b, 301:].max() == 7
        assert out[0].min() == 1  # nothing masked
        assert out[1].max() == 7 and out[1].min() == 7  # everything masked
        assert out[2, 99].min() == 1 and out[2, 100].max() == 7
        assert out[3, 510].min() == 1 and out[3, 511].max() == 7

    out = ops.sequence_mask(X, valid_len, 7)
    check(out)
    assert X.min() == 1 and X.max() == 1  # the input is untouched
    del out
    assert ops.sequence_mask_(X, valid_len, 7) is X
    check(X)
