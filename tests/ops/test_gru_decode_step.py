"""The GRU decoder's inference step: ``ops.gru_decode_step`` /
``torch.ops.seq2seq_ext.gru_decode_step`` (all layers and the output layer for one token)
against the chapter's reference decoder, with the chapter's context rule and a fixed context;
opcheck; bad input."""
import re

import pytest
import torch

from seq2seq_ext import ops
from seq2seq_ext.models import fused_decoder_args

from helpers import (assert_unchanged, ctx_projection, decode_bad_cases, decode_base_args,
                     decode_samples, decode_tol, decoder_setup, devices, fixed_context_step,
                     random_state, random_tokens, reference_step, snapshot)

STEP = torch.ops.seq2seq_ext.gru_decode_step
DEVICES = devices()


# (tgt_vocab, embed, hidden, layers, batch, dtype); the last two are large enough for the
# kernel's BLAS path, the others take its dot-product path.
CONFIGS = [
    (13, 5, 7, 1, 4, torch.float32),
    (29, 8, 16, 2, 3, torch.float64),
    (11, 3, 9, 3, 1, torch.float32),
    (37, 6, 33, 2, 5, torch.float32),
    (41, 16, 64, 3, 17, torch.float64),
    (300, 16, 64, 2, 9, torch.float32),
]
CONFIG_IDS = [f"V{v}-E{e}-H{h}-L{l}-B{b}-{str(d)[6:]}" for v, e, h, l, b, d in CONFIGS]


# ----------------------------------------------------------------------------------------------
# one step against the reference decoder
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_step_matches_reference(device, config):
    dec, ref, state = decoder_setup(config, device, seed=1)
    vocab, batch, dtype = config[0], config[4], config[5]
    token = random_tokens(batch, vocab, device=device, seed=1)
    state_before = state.clone()
    ref_logits, ref_state = reference_step(ref, token, state)
    args = fused_decoder_args(dec)
    # token (B,) -> logits (B, V)
    logits, new_state = STEP(token, state, *args)
    assert logits.shape == (batch, vocab) and logits.dtype == dtype
    assert new_state.shape == state.shape and new_state.dtype == dtype
    torch.testing.assert_close(logits, ref_logits, **decode_tol(dtype, device))
    torch.testing.assert_close(new_state, ref_state, **decode_tol(dtype, device))
    assert torch.equal(state, state_before)
    # token (B, 1) -> logits (B, 1, V), the shape of the decoder's output for one step
    logits1, new_state1 = ops.gru_decode_step(token[:, None], state, *args)
    assert logits1.shape == (batch, 1, vocab)
    assert torch.equal(logits1[:, 0], logits) and torch.equal(new_state1, new_state)
    # int32 ids give the same result
    logits32, _ = STEP(token.int(), state, *args)
    assert torch.equal(logits32, logits)


@pytest.mark.parametrize("device", DEVICES)
def test_step_several_steps_in_a_row(device):
    dec, ref, state = decoder_setup((17, 6, 11, 2, 5, torch.float64), device, seed=2)
    token = random_tokens(5, 17, device=device, seed=2)
    s_ext, s_ref, tok = state, state, token
    for _ in range(6):
        logits, s_ext = ops.gru_decode_step(tok, s_ext, *fused_decoder_args(dec))
        ref_logits, s_ref = reference_step(ref, tok, s_ref)
        torch.testing.assert_close(logits, ref_logits)
        torch.testing.assert_close(s_ext, s_ref)
        tok = ref_logits.argmax(dim=1)


@pytest.mark.parametrize("device", DEVICES)
def test_step_non_contiguous_state_and_token(device):
    dec, ref, _ = decoder_setup((19, 4, 10, 2, 6, torch.float64), device, seed=3)
    state = random_state(6, 2, 10, dtype=torch.float64, device=device, seed=3).transpose(0, 1)
    assert not state.is_contiguous()
    token = random_tokens(12, 19, device=device, seed=3)[::2]
    logits, new_state = STEP(token, state, *fused_decoder_args(dec))
    ref_logits, ref_state = reference_step(ref, token, state)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(new_state, ref_state)


@pytest.mark.parametrize("device", DEVICES)
def test_step_inputs_requiring_grad(device):
    # the decoder's own parameters require grad: the op runs below autograd and its outputs
    # carry no graph
    dec, ref, state = decoder_setup((15, 5, 8, 2, 3, torch.float32), device, seed=4)
    token = random_tokens(3, 15, device=device, seed=4)
    emb_proj, ctx, weights, dw, db = fused_decoder_args(dec)
    assert weights[0].requires_grad and dw.requires_grad
    logits, new_state = ops.gru_decode_step(token, state.requires_grad_(), emb_proj, ctx,
                                            weights, dw, db)
    assert not logits.requires_grad and not new_state.requires_grad
    ref_logits, ref_state = reference_step(ref, token, state.detach())
    torch.testing.assert_close(logits, ref_logits, **decode_tol(torch.float32, device))


# ----------------------------------------------------------------------------------------------
# the fixed-context rule
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS[:5], ids=CONFIG_IDS[:5])
def test_step_with_fixed_context(device, config):
    dec, _, state = decoder_setup(config, device, seed=5)
    vocab, hidden, batch, dtype = config[0], config[2], config[4], config[5]
    token = random_tokens(batch, vocab, device=device, seed=5)
    context = random_state(1, batch, hidden, dtype=dtype, device=device, seed=55)[0]
    emb_proj, _, weights, dw, db = fused_decoder_args(dec)
    logits, new_state = STEP(token, state, emb_proj, ctx_projection(dec, context), weights, dw,
                             db)
    ref_logits, ref_state = fixed_context_step(dec, token, state, context)
    torch.testing.assert_close(logits, ref_logits, **decode_tol(dtype, device))
    torch.testing.assert_close(new_state, ref_state, **decode_tol(dtype, device))
    # a context equal to state[-1] is the reference decoder's rule
    same, _ = STEP(token, state, emb_proj, ctx_projection(dec, state[-1]), weights, dw, db)
    free, _ = STEP(token, state, emb_proj, None, weights, dw, db)
    torch.testing.assert_close(same, free, **decode_tol(dtype, device))


# ----------------------------------------------------------------------------------------------
# opcheck
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_gru_decode_step(device):
    for i, (dec, state, context, token) in enumerate(decode_samples(device)):
        emb_proj, _, weights, dw, db = fused_decoder_args(dec)
        ctx = None if context is None else ctx_projection(dec, context)
        if i % 2:
            token = token[:, None]
        if i == 0:  # the decoder's parameters as they come: requiring grad
            weights, dw, db = list(weights), dw, db
        else:
            weights, dw, db = [w.detach() for w in weights], dw.detach(), db.detach()
        torch.library.opcheck(STEP, (token, state, emb_proj, ctx, weights, dw, db))


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_step_bad_input_names_argument(device):
    a = decode_base_args(device)
    token = a["token"]
    # token values are checked on the host on the CPU only: a CUDA kernel stops with a
    # device-side assertion (test_cuda_graphs.py checks it in a process of its own)
    range_cases = [
        ("token", dict(token=torch.tensor([0, 15, 1], device=device))),
        ("token", dict(token=torch.tensor([0, 1, -1], device=device))),
        ("token", dict(token=torch.tensor([[0], [1000]], device=device).repeat(2, 1)[:3])),
    ] if device == "cpu" else []
    cases = decode_bad_cases(a, device) + range_cases + [
        ("token", dict(token=token[:2])),
        ("token", dict(token=token[:, None].repeat(1, 2))),
        ("token", dict(token=token[None])),
        ("token", dict(token=token.float())),
    ]
    if device != "cpu":
        cases.append(("token", dict(token=token.cpu())))
        cases.append(("weights", dict(weights=[a["weights"][0].cpu()] + a["weights"][1:])))
    for name, change in cases:
        args = {**a, **change}
        snap = snapshot(args)
        with pytest.raises(RuntimeError, match=rf"^{re.escape(name)}\b"):
            STEP(**args)
        assert_unchanged(args, snap)


def test_opcheck_of_an_empty_batch():
    a = decode_base_args("cpu")
    torch.library.opcheck(STEP, (a["token"][:0], a["state"][:, :0], a["emb_proj"],
                                 a["ctx_proj"][:0], a["weights"], a["dense_weight"],
                                 a["dense_bias"]))
