"""The GRU decoder's fused inference path: ``Seq2SeqDecoder.forward`` takes the decode step op
for one token without gradients (and not otherwise), the per-token call's shortcut through the
bound stepper honours module hooks, and the cached embedding projection (emb_proj) follows
every change of the weights; against the chapter's reference decoder."""
import pytest
import torch
from torch import nn

import seq2seq_ext
from seq2seq_ext import ops
from seq2seq_ext.models import fused_decoder_args

from helpers import (Spy, decode_tol, decoder_setup, devices, make_decoder, random_state,
                     random_tokens, reference_decoder, reference_step)

DEVICES = devices()


# ----------------------------------------------------------------------------------------------
# Seq2SeqDecoder.forward's fused path
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decoder_forward_one_step_is_fused_without_grad(device, dtype, monkeypatch):
    dec, ref, state = decoder_setup((19, 6, 10, 2, 5, dtype), device, seed=40)
    X = random_tokens(5, 19, device=device, seed=40)[:, None]
    spy = Spy(ops.gru_decode_step)
    monkeypatch.setattr(ops, "gru_decode_step", spy)
    # plain CPU inference normally calls the kernel through the decoder's bound stepper; send it
    # through ops.gru_decode_step so the spy sees every fused step
    monkeypatch.setattr(ops, "direct_cpu_call_ok", lambda state: False)
    monkeypatch.setattr(ops, "ext_shortcut_ok", lambda: False)
    with torch.no_grad():
        Y, new_state = dec(X, state)
        Y_ref, state_ref = ref(X, state)
    assert spy.calls == 1
    assert Y.shape == Y_ref.shape == (5, 1, 19)
    torch.testing.assert_close(Y, Y_ref, **decode_tol(dtype, device))
    torch.testing.assert_close(new_state, state_ref, **decode_tol(dtype, device))


@pytest.mark.parametrize("device", DEVICES)
def test_decoder_forward_with_grad_is_differentiable(device, monkeypatch):
    dec, ref, state = decoder_setup((19, 6, 10, 2, 5, torch.float32), device, seed=41)
    X = random_tokens(5, 19, device=device, seed=41)[:, None]
    spy = Spy(ops.gru_decode_step)
    monkeypatch.setattr(ops, "gru_decode_step", spy)
    # plain CPU inference normally calls the kernel through the decoder's bound stepper; send it
    # through ops.gru_decode_step so the spy sees every fused step
    monkeypatch.setattr(ops, "direct_cpu_call_ok", lambda state: False)
    monkeypatch.setattr(ops, "ext_shortcut_ok", lambda: False)
    Y, new_state = dec(X, state)
    assert spy.calls == 0
    assert Y.grad_fn is not None and new_state.grad_fn is not None
    (Y.square().sum() + new_state.sum()).backward()
    assert dec.dense.weight.grad is not None and dec.rnn.weight_hh_l0.grad is not None
    Y_ref, state_ref = ref(X, state)
    # the differentiable path runs the fused GRU layer op: equal up to GEMM/exp rounding
    torch.testing.assert_close(Y, Y_ref, **decode_tol(torch.float32, device))
    torch.testing.assert_close(new_state, state_ref, **decode_tol(torch.float32, device))
    # a multi-step input takes the layer op (not the decode step) even without gradients
    with torch.no_grad():
        X3 = random_tokens(15, 19, device=device, seed=42).reshape(5, 3)
        Y3, s3 = dec(X3, state)
        Y3_ref, s3_ref = ref(X3, state)
    assert spy.calls == 0
    torch.testing.assert_close(Y3, Y3_ref, **decode_tol(torch.float32, device))
    torch.testing.assert_close(s3, s3_ref, **decode_tol(torch.float32, device))


def test_decoder_forward_not_fused_with_dropout_in_training_or_reference_backend(monkeypatch):
    spy = Spy(ops.gru_decode_step)
    monkeypatch.setattr(ops, "gru_decode_step", spy)
    # plain CPU inference normally calls the kernel through the decoder's bound stepper; send it
    # through ops.gru_decode_step so the spy sees every fused step
    monkeypatch.setattr(ops, "direct_cpu_call_ok", lambda state: False)
    monkeypatch.setattr(ops, "ext_shortcut_ok", lambda: False)
    torch.manual_seed(43)
    dec = seq2seq_ext.Seq2SeqDecoder(11, 4, 6, 2, dropout=0.5).train()
    state = random_state(2, 3, 6, seed=43)
    X = random_tokens(3, 11, seed=43)[:, None]
    with torch.no_grad():
        dec(X, state)
        assert spy.calls == 0
        dec.eval()
        with seq2seq_ext.use_backend("reference"):
            dec(X, state)
        assert spy.calls == 0
        dec(X, state)
        assert spy.calls == 1


# ----------------------------------------------------------------------------------------------
# the per-token call's shortcut
# ----------------------------------------------------------------------------------------------

def test_bound_decoder_call_honours_hooks_and_equals_forward():
    """The per-token call with a bound stepper (Seq2SeqDecoder.__call__'s shortcut) gives
    forward's result, and module hooks still run: a hook turns the shortcut off."""
    dec, ref, state = decoder_setup((19, 6, 10, 2, 1, torch.float32), "cpu", seed=44)
    dec.eval()
    X = random_tokens(1, 19, seed=44)[:, None]
    with torch.no_grad():
        first = dec(X, state)  # binds the stepper
        again = dec(X, state)  # the shortcut
        through_forward = dec.forward(X, state)
        expected = ref(X, state)
        for out in (first, again, through_forward):
            torch.testing.assert_close(out[0], expected[0])
            torch.testing.assert_close(out[1], expected[1])
        seen = []
        handle = dec.register_forward_hook(lambda mod, args, out: seen.append(out[0].shape))
        dec(X, state)
        handle.remove()
        pre = dec.register_forward_pre_hook(lambda mod, args: seen.append("pre"))
        dec(X, state)
        pre.remove()
        names = []
        glob = torch.nn.modules.module.register_module_forward_hook(
            lambda mod, args, out: names.append(type(mod).__name__))
        try:
            dec(X, state)
            got, names[:] = list(names), []
            ref(X, state)  # a global hook sees every module the reference calls
        finally:
            glob.remove()
        dec(X, state)  # no hooks again: nothing recorded
    assert seen == [(1, 1, 19), "pre"]
    assert got == names and got[-1] == "Seq2SeqDecoder" and "GRU" in got


def test_bound_decoder_call_takes_a_max_norm_set_after_binding():
    """An embedding's ``max_norm`` set after the stepper was bound makes the per-token call
    look its token up through the module, which renormalises the row, as the reference does."""
    dec, ref, state = decoder_setup((19, 6, 10, 2, 1, torch.float32), "cpu", seed=45)
    dec.eval()
    X = random_tokens(1, 19, seed=45)[:, None]
    with torch.no_grad():
        dec(X, state)  # binds the stepper
        dec.embedding.max_norm = ref.embedding.max_norm = 0.05
        got, expected = dec(X, state), ref(X, state)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    torch.testing.assert_close(dec.embedding.weight, ref.embedding.weight)
    assert float(dec.embedding.weight.detach()[X[0, 0]].norm()) <= 0.05 + 1e-6


# ----------------------------------------------------------------------------------------------
# the emb_proj cache
# ----------------------------------------------------------------------------------------------

def _step_output(dec, X, state):
    with torch.no_grad():
        return dec(X, state)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_emb_proj_cache_follows_optimizer_steps(device, optimizer):
    dec, _, state = decoder_setup((23, 7, 12, 2, 4, torch.float32), device, seed=44)
    X = random_tokens(4, 23, device=device, seed=44)[:, None]
    table = fused_decoder_args(dec)[0]
    assert fused_decoder_args(dec)[0] is table  # cached while the weights are unchanged
    before, _ = _step_output(dec, X, state)
    opt = (torch.optim.SGD(dec.parameters(), lr=0.5) if optimizer == "sgd"
           else torch.optim.Adam(dec.parameters(), lr=0.05))
    for _ in range(2):
        opt.zero_grad()
        Y, _ = dec(random_tokens(12, 23, device=device, seed=45).reshape(4, 3), state)
        Y.square().mean().backward()
        opt.step()
        after, after_state = _step_output(dec, X, state)
        ref_out, ref_state = reference_step(reference_decoder(dec), X, state)
        torch.testing.assert_close(after[:, 0], ref_out, **decode_tol(torch.float32, device))
        torch.testing.assert_close(after_state, ref_state, **decode_tol(torch.float32, device))
    assert not torch.allclose(after, before)
    assert fused_decoder_args(dec)[0] is not table


@pytest.mark.parametrize("device", DEVICES)
def test_emb_proj_cache_follows_in_place_changes(device):
    dec, _, state = decoder_setup((23, 7, 12, 2, 4, torch.float32), device, seed=46)
    X = random_tokens(4, 23, device=device, seed=46)[:, None]
    _step_output(dec, X, state)
    other = make_decoder(23, 7, 12, 2, device=device, seed=47)
    changes = [
        lambda: dec.embedding.weight.mul_(1.5),                  # the embedding
        lambda: dec.rnn.weight_ih_l0[:, :7].add_(0.1),           # layer 0's embedding columns
        lambda: dec.rnn.weight_ih_l0[:, 7:].add_(0.1),           # layer 0's context columns
        lambda: dec.rnn.bias_ih_l0.sub_(0.2),
        lambda: dec.rnn.weight_hh_l1.mul_(0.5),
        lambda: dec.dense.bias.add_(1.0),
        lambda: dec.load_state_dict(other.state_dict()),
    ]
    for i, change in enumerate(changes):
        with torch.no_grad():
            change()
        out, new_state = _step_output(dec, X, state)
        ref_out, ref_state = reference_step(reference_decoder(dec), X, state)
        torch.testing.assert_close(out[:, 0], ref_out, **decode_tol(torch.float32, device), msg=str(i))
        torch.testing.assert_close(new_state, ref_state, **decode_tol(torch.float32, device), msg=str(i))


def test_emb_proj_cache_follows_dtype_conversion():
    dec, _, state = decoder_setup((23, 7, 12, 2, 4, torch.float32), "cpu", seed=48)
    X = random_tokens(4, 23, seed=48)[:, None]
    _step_output(dec, X, state)
    dec = dec.double()
    out, _ = _step_output(dec, X, state.double())
    assert out.dtype == torch.float64
    ref_out, _ = reference_step(reference_decoder(dec), X, state.double())
    torch.testing.assert_close(out[:, 0], ref_out)


def test_emb_proj_cache_follows_replaced_output_layer():
    # replacing a submodule's parameter (or the submodule) is an ordinary way to change a
    # model's weights; the fused step must use the decoder's current output layer
    dec, _, state = decoder_setup((23, 7, 12, 2, 4, torch.float32), "cpu", seed=49)
    X = random_tokens(4, 23, seed=49)[:, None]
    _step_output(dec, X, state)
    torch.manual_seed(50)
    dec.dense = nn.Linear(12, 23)
    out, _ = _step_output(dec, X, state)
    ref_out, _ = reference_step(reference_decoder(dec), X, state)
    torch.testing.assert_close(out[:, 0], ref_out, **decode_tol(torch.float32))
    dec.dense.bias = nn.Parameter(torch.randn(23))
    out, _ = _step_output(dec, X, state)
    ref_out, _ = reference_step(reference_decoder(dec), X, state)
    torch.testing.assert_close(out[:, 0], ref_out, **decode_tol(torch.float32))
