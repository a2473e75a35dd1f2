"""Greedy decoding in one call: ``ops.greedy_decode`` / ``torch.ops.seq2seq_ext.greedy_decode``
against the chapter's loop (one sentence at a time, stopping at ``<eos>``), with the chapter's
context rule and a fixed context; opcheck; bad input."""
import re

import pytest
import torch

from seq2seq_ext import ops
from seq2seq_ext.models import fused_decoder_args

from helpers import (assert_unchanged, ctx_projection, decode_bad_cases, decode_base_args,
                     decode_samples, decoder_setup, devices, free_run, make_decoder, pick_eos,
                     random_state, reference_decoder, reference_greedy, snapshot)

STEP = torch.ops.seq2seq_ext.gru_decode_step
GREEDY = torch.ops.seq2seq_ext.greedy_decode
DEVICES = devices()


# ----------------------------------------------------------------------------------------------
# against the chapter's loop
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config,seed", [
    ((13, 5, 7, 1, 9, torch.float64), 10),
    ((23, 6, 12, 2, 12, torch.float64), 11),
    ((31, 4, 9, 3, 7, torch.float32), 12),
    ((40, 8, 16, 2, 24, torch.float32), 13),
])
def test_greedy_matches_reference_loop(device, config, seed):
    vocab, batch, num_steps, bos = config[0], config[4], 11, 1
    dec = make_decoder(*config[:4], dtype=config[5], device=device, seed=seed, dense_scale=3.0)
    ref = reference_decoder(dec)
    state = random_state(config[3], batch, config[2], dtype=config[5], device=device, seed=seed)
    eos = pick_eos(free_run(ref, state, bos, num_steps), vocab, num_steps)
    ref_tokens, ref_lengths = reference_greedy(ref, state, bos, eos, num_steps)
    # the test is meaningful: sentences stop at different points, some before num_steps
    assert len(set(ref_lengths)) >= 2 and min(ref_lengths) < num_steps
    tokens, lengths = ops.greedy_decode(state, *fused_decoder_args(dec), bos, eos, num_steps)
    assert tokens.dtype == torch.int64 and lengths.dtype == torch.int64
    assert tokens.shape == (batch, num_steps) and lengths.shape == (batch,)
    assert tokens.tolist() == ref_tokens
    assert lengths.tolist() == ref_lengths
    for row, n in zip(tokens.tolist(), lengths.tolist()):
        assert eos not in row[:n] and all(t == eos for t in row[n:])


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_with_fixed_context(device):
    vocab, hidden, layers, batch, num_steps, bos = 21, 10, 2, 8, 9, 2
    dec = make_decoder(vocab, 5, hidden, layers, dtype=torch.float64, device=device, seed=14,
                       dense_scale=3.0)
    state = random_state(layers, batch, hidden, dtype=torch.float64, device=device, seed=14)
    context = random_state(1, batch, hidden, dtype=torch.float64, device=device, seed=15)[0]
    eos = pick_eos(free_run(dec, state, bos, num_steps, context), vocab, num_steps)
    ref_tokens, ref_lengths = reference_greedy(dec, state, bos, eos, num_steps, context)
    assert len(set(ref_lengths)) >= 2
    emb_proj, _, weights, dw, db = fused_decoder_args(dec)
    ctx_proj = ctx_projection(dec, context)
    tokens, lengths = GREEDY(state, emb_proj, ctx_proj, weights, dw, db, bos, eos, num_steps)
    assert tokens.tolist() == ref_tokens and lengths.tolist() == ref_lengths
    # the same from non-contiguous state and ctx_proj
    state_t = state.transpose(0, 1).contiguous().transpose(0, 1)
    ctx_t = ctx_proj.t().contiguous().t()
    assert not state_t.is_contiguous() and not ctx_t.is_contiguous()
    tokens_t, lengths_t = GREEDY(state_t, emb_proj, ctx_t, weights, dw, db, bos, eos, num_steps)
    assert torch.equal(tokens_t, tokens) and torch.equal(lengths_t, lengths)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_steps", [0, 1, 2])
@pytest.mark.parametrize("batch", [1, 5])
def test_greedy_few_steps_and_small_batches(device, num_steps, batch):
    dec, ref, state = decoder_setup((14, 4, 6, 2, batch, torch.float64), device, seed=16)
    for eos in (free_run(ref, state, 3, 1)[0][0], 0):
        tokens, lengths = GREEDY(state, *fused_decoder_args(dec), 3, eos, num_steps)
        ref_tokens, ref_lengths = reference_greedy(ref, state, 3, eos, num_steps)
        assert tokens.shape == (batch, num_steps)
        assert tokens.tolist() == ref_tokens and lengths.tolist() == ref_lengths
    if num_steps == 0:
        assert lengths.tolist() == [0] * batch


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_empty_batch(device):
    dec = make_decoder(9, 3, 5, 1, device=device, seed=17)
    state = torch.zeros(1, 0, 5, device=device)
    tokens, lengths = GREEDY(state, *fused_decoder_args(dec), 1, 2, 4)
    assert tokens.shape == (0, 4) and lengths.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_first_token_is_the_step_argmax(device):
    dec, ref, state = decoder_setup((25, 7, 13, 3, 6, torch.float32), device, seed=18)
    bos = 4
    logits, _ = STEP(torch.full((6,), bos, device=device), state, *fused_decoder_args(dec))
    eos = min(set(range(25)) - set(logits.argmax(dim=1).tolist()))
    tokens, lengths = GREEDY(state, *fused_decoder_args(dec), bos, eos, 1)
    assert torch.equal(tokens[:, 0], logits.argmax(dim=1))
    assert lengths.tolist() == [1] * 6


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_deterministic(device):
    dec, ref, state = decoder_setup((40, 8, 16, 2, 24, torch.float32), device, seed=19)
    args = fused_decoder_args(dec)
    first = GREEDY(state, *args, 1, 2, 15)
    for _ in range(2):
        again = GREEDY(state, *args, 1, 2, 15)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


# ----------------------------------------------------------------------------------------------
# opcheck
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_greedy_decode(device):
    for i, (dec, state, context, token) in enumerate(decode_samples(device)):
        emb_proj, _, weights, dw, db = fused_decoder_args(dec)
        ctx = None if context is None else ctx_projection(dec, context)
        if i != 0:
            weights, dw, db = [w.detach() for w in weights], dw.detach(), db.detach()
        torch.library.opcheck(GREEDY, (state, emb_proj, ctx, list(weights), dw, db, 1, 2,
                                       [5, 0, 1, 7][i]))


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_greedy_bad_input_names_argument(device):
    a = decode_base_args(device)
    del a["token"]
    a.update(bos=1, eos=2, num_steps=4)
    cases = decode_bad_cases(a, device) + [
        ("bos", dict(bos=15)),
        ("bos", dict(bos=-1)),
        ("num_steps", dict(num_steps=-1)),
        # more outputs than rows of emb_proj: a prediction could not be fed back
        ("dense_weight", dict(dense_weight=torch.randn(16, 8, device=device),
                              dense_bias=torch.randn(16, device=device))),
    ]
    for name, change in cases:
        args = {**a, **change}
        snap = snapshot(args)
        with pytest.raises(RuntimeError, match=rf"^{re.escape(name)}\b"):
            GREEDY(**args)
        assert_unchanged(args, snap)
    # the public wrapper raises the same errors
    with pytest.raises(RuntimeError, match=r"^num_steps\b"):
        ops.greedy_decode(a["state"], a["emb_proj"], None, a["weights"], a["dense_weight"],
                          a["dense_bias"], 1, 2, -3)


def test_opcheck_of_an_empty_batch():
    a = decode_base_args("cpu")
    del a["token"]
    torch.library.opcheck(GREEDY, (a["state"][:, :0], a["emb_proj"], a["ctx_proj"][:0],
                                   a["weights"], a["dense_weight"], a["dense_bias"], 1, 2, 4))


def test_greedy_huge_num_steps_names_it():
    a = decode_base_args("cpu")
    del a["token"]
    for num_steps in (2 ** 62, 2 ** 40):
        with pytest.raises(RuntimeError, match=r"^num_steps: the result's tokens"):
            ops.greedy_decode(**a, bos=1, eos=2, num_steps=num_steps)


@pytest.mark.parametrize("name, value", [("bos", 1.9), ("eos", 2.5), ("num_steps", 2.5),
                                         ("num_steps", "3")])
def test_greedy_wrapper_refuses_what_is_not_an_integer(name, value):
    """``ops.greedy_decode`` passes the op integers as they are, rounding nothing."""
    a = decode_base_args("cpu")
    del a["token"]
    kwargs = {"bos": 1, "eos": 2, "num_steps": 3, name: value}
    with pytest.raises(TypeError, match=rf"^{name}: expected an integer"):
        ops.greedy_decode(**a, **kwargs)
    assert ops.greedy_decode(**a, **{**kwargs, name: torch.tensor(1)})[0].shape[0] == 3
