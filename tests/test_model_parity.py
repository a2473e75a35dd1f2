"""The encoder/decoder on the fused GRU layer op against the reference classes: a
teacher-forced batch in train mode (outputs, state, loss, parameter gradients; dropout too), and
20 epochs of ``fit`` under the ext and the reference backends. (The op itself:
tests/ops/test_gru_layer.py.)"""
import pytest
import torch

import seq2seq_ext
from seq2seq_ext import models, ops, reference
from seq2seq_ext.data import load_data_pairs, number_pairs
from seq2seq_ext.training import fit

from helpers import assert_close_dict, devices, generator, gru_tol

DEVICES = devices()
DTYPES = [torch.float32, torch.float64]


# ----------------------------------------------------------------------------------------------
# encoder / decoder against the reference classes
# ----------------------------------------------------------------------------------------------

def _model_pair(dropout, dtype, device, src_vocab=11, tgt_vocab=13, embed=6, hidden=7,
                layers=2, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ext = models.EncoderDecoder(
            models.Seq2SeqEncoder(src_vocab, embed, hidden, layers, dropout),
            models.Seq2SeqDecoder(tgt_vocab, embed, hidden, layers, dropout))
    ref = reference.EncoderDecoder(
        reference.Seq2SeqEncoder(src_vocab, embed, hidden, layers, dropout),
        reference.Seq2SeqDecoder(tgt_vocab, embed, hidden, layers, dropout))
    ref.load_state_dict(ext.state_dict())
    ext = ext.to(device=device, dtype=dtype).train()
    ref = ref.to(device=device, dtype=dtype).train()
    return ext, ref


def _teacher_forced_batch(device, batch=5, src_steps=6, tgt_steps=7, src_vocab=11,
                          tgt_vocab=13, seed=0):
    g = generator(seed)
    X = torch.randint(0, src_vocab, (batch, src_steps), generator=g)
    X_valid = torch.randint(1, src_steps + 1, (batch,), generator=g)
    Y = torch.randint(0, tgt_vocab, (batch, tgt_steps), generator=g)
    Y_valid = torch.randint(1, tgt_steps + 1, (batch,), generator=g)
    dec_X = torch.cat([torch.full((batch, 1), 1), Y[:, :-1]], 1)
    return [t.to(device) for t in (X, X_valid, Y, Y_valid, dec_X)]


def _model_step(net, batch, seed):
    X, X_valid, Y, Y_valid, dec_X = batch
    net.zero_grad()
    torch.manual_seed(seed)
    Y_hat, state = net(X, dec_X, X_valid)
    loss = reference.MaskedSoftmaxCELoss()(Y_hat, Y, Y_valid)
    loss.sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    return Y_hat.detach(), state.detach(), loss.detach(), grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_models_match_reference(device, dtype, dropout, monkeypatch):
    """A teacher-forced batch in train mode: the ext encoder/decoder give the reference's
    outputs, state, loss and parameter gradients (with dropout: the same masks under the
    same seed), and they really run ``ops.gru`` (the decoder with the context trick)."""
    if dropout and device != "cpu":
        pytest.skip("cuDNN's GRU draws its dropout masks with its own generator")
    ext, ref = _model_pair(dropout, dtype, device)
    batch = _teacher_forced_batch(device)
    calls = []
    real = ops.gru

    def spy(input, h0, flat_weights, *args, **kwargs):
        calls.append(kwargs)
        return real(input, h0, flat_weights, *args, **kwargs)

    monkeypatch.setattr(ops, "gru", spy)
    with seq2seq_ext.use_backend("ext"):
        got = _model_step(ext, batch, seed=11)
    assert len(calls) == 2, "encoder and decoder should each call ops.gru once"
    assert calls[0].get("extra0") is None
    assert calls[1].get("extra0") is not None and calls[1]["extra0"].shape == (5, 21)
    assert calls[1]["w_ih0"].shape == (21, 6)
    with seq2seq_ext.use_backend("reference"):
        want = _model_step(ref, batch, seed=11)
    assert len(calls) == 2
    tol = gru_tol(dtype, device)
    for name, g, w in zip(("Y_hat", "state", "loss"), got[:3], want[:3]):
        torch.testing.assert_close(g, w, **tol, msg=lambda m, n=name: f"{n}: {m}")
    assert_close_dict(got[3], want[3], tol)
    if dropout:  # the masks matter: another seed gives another output
        with seq2seq_ext.use_backend("ext"):
            other = _model_step(ext, batch, seed=12)
        assert (other[0] - got[0]).abs().max() > 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_models_reference_backend_does_not_call_the_op(device, monkeypatch):
    ext, _ = _model_pair(0.0, torch.float32, device)
    batch = _teacher_forced_batch(device)
    calls = []
    monkeypatch.setattr(ops, "gru", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(ops, "gru_layer", lambda *a, **k: calls.append(1))
    with seq2seq_ext.use_backend("reference"):
        _model_step(ext, batch, seed=0)
    assert calls == []


# ----------------------------------------------------------------------------------------------
# training parity over 20 epochs
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def number_batches():
    """300 English-French number pairs as a fixed list of five batches of 64 (10 steps), and
    the vocabularies."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        data_iter, src_vocab, tgt_vocab = load_data_pairs(number_pairs(0, 300), 64, 10)
        batches = list(data_iter)
    assert len(batches) == 5
    return batches, src_vocab, tgt_vocab


def _fit_losses(number_batches, backend, dtype, epochs=20):
    """Per-epoch losses of ``fit`` (chapter sizes: embed 32, hidden 32, 2 layers, dropout 0,
    lr 0.005) from the same initial weights under ``backend``."""
    batches, src_vocab, tgt_vocab = number_batches
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        net = models.EncoderDecoder(
            models.Seq2SeqEncoder(len(src_vocab), 32, 32, 2, 0.0),
            models.Seq2SeqDecoder(len(tgt_vocab), 32, 32, 2, 0.0)).to(dtype)
        losses = []
        with seq2seq_ext.use_backend(backend):
            torch.manual_seed(2)  # fit re-initialises the weights: the same draws for both
            fit(net, batches, 0.005, epochs, tgt_vocab, "cpu",
                on_epoch=lambda epoch, loss, speed: losses.append(loss), plot=False)
    assert len(losses) == epochs
    return torch.tensor(losses, dtype=torch.float64)


def _max_rel(a, b):
    return ((a - b).abs() / b.abs()).max().item()


def test_training_parity_20_epochs(number_batches, one_thread):
    """Chapter sizes on 300 number pairs, the same five batches in the same order every epoch
    and the same initial weights: the 20 per-epoch losses of ``fit`` under the ext backend
    (fused GRU layer and loss ops) and under the reference backend (nn.GRU and the reference
    loss) agree within float32 rounding drift.

    Measured (AVX512 CPU): max relative difference 1.2e-5, reached at epoch 20 (at most 6.5e-7
    through epoch 19, 2.7e-8 through epoch 12); a build of the kernels at commit 15cabc3, which
    rounds differently, gave 6.1e-5. Around epoch 20 this run starts to amplify rounding: the
    reference alone, with its initial weights scaled by (1 + 2^-23), differs from itself by
    8.9e-5 at epoch 20 and by 2.8e-3 at epoch 22. The bound, 3e-4, is 5x the larger figure; the
    float64 test below shows the two paths agree to 1e-15, so the float32 gap is rounding."""
    ext = _fit_losses(number_batches, "ext", torch.float32)
    ref = _fit_losses(number_batches, "reference", torch.float32)
    assert ext[-1] < 0.5 * ext[0]  # it learns
    rel = _max_rel(ext, ref)
    assert rel < 3e-4, f"max relative difference of the epoch losses: {rel:.3g}"


def test_training_parity_20_epochs_float64(number_batches, one_thread):
    """The same run in float64: ext and reference losses agree to rounding over all 20 epochs
    (measured max relative difference 5.6e-16; bound 1e-12)."""
    ext = _fit_losses(number_batches, "ext", torch.float64)
    ref = _fit_losses(number_batches, "reference", torch.float64)
    rel = _max_rel(ext, ref)
    assert rel < 1e-12, f"max relative difference of the epoch losses: {rel:.3g}"
