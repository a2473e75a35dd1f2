"""The bound decoder stepper (``ops.decoder_stepper``), which runs the decode step on a
decoder's bound weights on the CPU: its step, its greedy loop and its ``try_step`` against the
chapter's reference decoder, packed and unpacked weights, weights changed behind it."""
import pytest
import torch

from seq2seq_ext import ops

from helpers import (ctx_projection, decode_tol, decoder_setup, fixed_context_step, free_run,
                     make_decoder, pick_eos, random_state, random_tokens, reference_decoder,
                     reference_greedy, reference_step)


# the bound stepper (ops.decoder_stepper) packs its weights transposed for up to 32 rows when
# they take at most 4 MiB, and calls the op's kernel otherwise: both sides of each limit
STEPPER_CONFIGS = [
    (201, 32, 32, 2, 1, torch.float32),    # the chapter's sizes, one sentence
    (7, 3, 5, 1, 3, torch.float64),        # sizes that are no multiple of the vector width
    (41, 16, 17, 3, 32, torch.float32),    # the most rows packed
    (41, 16, 17, 3, 33, torch.float32),    # one row more: the op's kernel
    (2000, 16, 300, 2, 2, torch.float32),  # weights too large to pack: the op's kernel
]


@pytest.mark.parametrize("config", STEPPER_CONFIGS,
                         ids=[f"V{v}-E{e}-H{h}-L{l}-B{b}-{str(d)[6:]}"
                              for v, e, h, l, b, d in STEPPER_CONFIGS])
def test_bound_stepper_matches_reference(config):
    dec, ref, state = decoder_setup(config, "cpu", seed=51)
    vocab, hidden, batch, dtype = config[0], config[2], config[4], config[5]
    stepper = ops.decoder_stepper(dec.embedding.weight, dec.rnn._flat_weights, dec.dense.weight,
                                  dec.dense.bias)
    token = random_tokens(batch, vocab, seed=51)
    context = random_state(1, batch, hidden, dtype=dtype, seed=52)[0]
    state_before = state.clone()
    with torch.no_grad():
        for tok in (token, token[:, None].int()):
            logits, new_state = stepper.step(tok, state)
            ref_logits, ref_state = reference_step(ref, tok, state)
            torch.testing.assert_close(logits.reshape(batch, vocab), ref_logits,
                                       **decode_tol(dtype))
            torch.testing.assert_close(new_state, ref_state, **decode_tol(dtype))
        # a non-contiguous state, and a fixed context
        t_state = torch.zeros(*state.shape[:2], 2 * hidden, dtype=dtype)[..., ::2]
        t_state.copy_(state)
        logits, new_state = stepper.step_with_context(token, t_state,
                                                      ctx_projection(dec, context))
        ref_logits, ref_state = fixed_context_step(dec, token, state, context)
        torch.testing.assert_close(logits, ref_logits, **decode_tol(dtype))
        torch.testing.assert_close(new_state, ref_state, **decode_tol(dtype))
        # bad input raises and writes nothing, as the op does
        with pytest.raises(RuntimeError, match=r"^token\b"):
            stepper.step(torch.full((batch,), vocab), state)
    assert torch.equal(state, state_before)


def test_bound_stepper_follows_data_swap_and_resize():
    """A parameter's storage replaced through ``.data`` (no version change) or a parameter of
    another shape: the stepper's packed weights are rebuilt, never used stale."""
    dec, _, state = decoder_setup((23, 7, 12, 2, 3, torch.float32), "cpu", seed=53)
    stepper = ops.decoder_stepper(dec.embedding.weight, dec.rnn._flat_weights, dec.dense.weight,
                                  dec.dense.bias)
    token = random_tokens(3, 23, seed=53)
    with torch.no_grad():
        stepper.step(token, state)
        dec.rnn.weight_hh_l1.data = torch.randn_like(dec.rnn.weight_hh_l1)
        dec.dense.weight.data = torch.randn_like(dec.dense.weight)
        logits, new_state = stepper.step(token, state)
        ref_logits, ref_state = reference_step(reference_decoder(dec), token, state)
        torch.testing.assert_close(logits, ref_logits, **decode_tol(torch.float32))
        torch.testing.assert_close(new_state, ref_state, **decode_tol(torch.float32))
        # fewer output rows in the same storage: the logits follow the new shape
        dec.dense.weight.data = dec.dense.weight.data[:20]
        dec.dense.bias.data = dec.dense.bias.data[:20]
        logits, _ = stepper.step(token, state)
        assert logits.shape == (3, 20)
        # (the chapter's rule is the fixed-context step with the context state[-1])
        ref_logits, _ = fixed_context_step(dec, token, state, state[-1])
        torch.testing.assert_close(logits, ref_logits, **decode_tol(torch.float32))


@pytest.mark.parametrize("name", ["dense.weight", "rnn.weight_ih_l0"])
def test_bound_stepper_follows_a_transposed_view_of_the_same_storage(name):
    """``.data = w.data.t()`` on a square matrix (the output layer at vocabulary = hidden; W_ih0
    at 3 * hidden = embedding + hidden) keeps its storage, shape and version: the stepper
    follows the strides too."""
    dec, _, state = decoder_setup((4, 8, 4, 2, 3, torch.float32), "cpu", seed=54)
    stepper = ops.decoder_stepper(dec.embedding.weight, dec.rnn._flat_weights, dec.dense.weight,
                                  dec.dense.bias)
    token = random_tokens(3, 4, seed=54)
    weight = dec.get_parameter(name)
    assert weight.shape[0] == weight.shape[1]
    with torch.no_grad():
        stepper.step(token, state)
        weight.data = weight.data.t()
        logits, new_state = stepper.step(token, state)
        ref_logits, ref_state = reference_step(reference_decoder(dec), token, state)
    torch.testing.assert_close(logits, ref_logits, **decode_tol(torch.float32))
    torch.testing.assert_close(new_state, ref_state, **decode_tol(torch.float32))


def test_bound_stepper_follows_data_swaps_at_reused_addresses():
    """Storage swapped in through ``.data`` keeps the version counter; the stepper holds the
    storages it was built from, so a new storage never lands at a bound one's address and
    passes for it. Many rounds of one to three swaps (the allocator hands back freed blocks),
    also through a submodule's ``.bfloat16().float()``, which swaps storage the same way."""
    dec, _, state = decoder_setup((23, 7, 12, 2, 3, torch.float32), "cpu", seed=59)
    stepper = ops.decoder_stepper(dec.embedding.weight, dec.rnn._flat_weights, dec.dense.weight,
                                  dec.dense.bias)
    token = random_tokens(3, 23, seed=59)
    torch.manual_seed(60)
    with torch.no_grad():
        for round in range(90):
            logits, new_state = stepper.step(token, state)
            ref_logits, ref_state = reference_step(reference_decoder(dec), token, state)
            torch.testing.assert_close(logits, ref_logits, **decode_tol(torch.float32))
            torch.testing.assert_close(new_state, ref_state, **decode_tol(torch.float32))
            if round % 3 == 2:
                dec.dense.bfloat16().float()
            for _ in range(1 + round % 3):
                dec.dense.weight.data = torch.randn_like(dec.dense.weight)


def test_bound_stepper_refuses_an_embedding_of_another_width():
    """Layer 0 reads [embedding, context]: an embedding narrower or wider than W_ih0's columns
    less the hidden size is refused (naming it) when bound, and when swapped in through
    ``.data``, instead of reading the wrong columns. The model falls back to its modules and
    gets nn.GRU's own error."""
    dec, _, state = decoder_setup((23, 7, 12, 2, 3, torch.float32), "cpu", seed=57)
    w = dec.rnn._flat_weights
    for width in (6, 8):
        with pytest.raises(RuntimeError, match=r"^embedding: expected 7 columns .* got " + str(width)):
            ops.decoder_stepper(torch.randn(23, width), w, dec.dense.weight, dec.dense.bias)
    stepper = ops.decoder_stepper(dec.embedding.weight, w, dec.dense.weight, dec.dense.bias)
    token = random_tokens(3, 23, seed=57)
    with torch.no_grad():
        stepper.step(token, state)
        dec.embedding.weight.data = torch.randn(23, 9)
        for _ in range(2):  # refused at every call, not only the first
            with pytest.raises(RuntimeError, match=r"^embedding: expected 7 columns"):
                stepper.step(token, state)
        dec.embedding.weight.data = torch.randn(23, 7)  # a width that fits again: its values
        logits, _ = stepper.step(token, state)
        ref_logits, _ = reference_step(reference_decoder(dec), token, state)
        torch.testing.assert_close(logits, ref_logits, **decode_tol(torch.float32))


@pytest.mark.parametrize("config,seed", [
    ((13, 5, 7, 1, 9, torch.float64), 10),
    ((23, 6, 12, 2, 1, torch.float64), 11),   # one sentence (predict_seq2seq)
    ((40, 8, 16, 2, 24, torch.float32), 13),
    ((23, 6, 12, 2, 40, torch.float64), 20),  # more rows than are packed: the op's kernel
])
def test_bound_stepper_greedy_matches_reference_loop(config, seed):
    """The bound stepper's greedy loop (predict_seq2seq's path on the CPU) against the chapter's
    loop, with both context rules."""
    vocab, layers, hidden, batch, num_steps, bos = config[0], config[3], config[2], config[4], 11, 1
    dtype = config[5]
    dec = make_decoder(*config[:4], dtype=dtype, seed=seed, dense_scale=3.0)
    ref = reference_decoder(dec)
    state = random_state(layers, batch, hidden, dtype=dtype, seed=seed)
    context = random_state(1, batch, hidden, dtype=dtype, seed=seed + 1)[0]
    stepper = ops.decoder_stepper(dec.embedding.weight, dec.rnn._flat_weights, dec.dense.weight,
                                  dec.dense.bias)
    for ctx in (None, context):
        eos = pick_eos(free_run(dec, state, bos, num_steps, ctx), vocab, num_steps)
        ref_tokens, ref_lengths = reference_greedy(ref if ctx is None else dec, state, bos, eos,
                                                    num_steps, ctx)
        assert min(ref_lengths) < num_steps  # some sentences stop early
        ctx_proj = None if ctx is None else ctx_projection(dec, ctx)
        tokens, lengths = stepper.greedy(state, ctx_proj, bos, eos, num_steps)
        assert tokens.tolist() == ref_tokens and lengths.tolist() == ref_lengths
        assert tokens.dtype == lengths.dtype == torch.int64
    # no steps, no sentences, and bad input (nothing is returned, the state is unchanged)
    tokens, lengths = stepper.greedy(state, None, bos, 2, 0)
    assert tokens.shape == (batch, 0) and lengths.tolist() == [0] * batch
    tokens, lengths = stepper.greedy(state[:, :0], None, bos, 2, 3)
    assert tokens.shape == (0, 3) and lengths.shape == (0,)
    before = state.clone()
    with pytest.raises(RuntimeError, match=r"^bos\b"):
        stepper.greedy(state, None, vocab, 2, 3)
    with pytest.raises(RuntimeError, match=r"^num_steps\b"):
        stepper.greedy(state, None, bos, 2, -1)
    with pytest.raises(RuntimeError, match=r"^state\b"):
        stepper.greedy(state[0], None, bos, 2, 3)
    assert torch.equal(state, before)


def test_try_step_declines_what_the_shortcut_must_not_take():
    """The bound stepper's try_step (the C++ half of Seq2SeqDecoder.__call__'s shortcut) steps
    plain CPU tensors in inference only, and returns None for everything else."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sub(torch.Tensor):
        pass

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class FnMode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    dec, ref, state = decoder_setup((19, 6, 10, 2, 3, torch.float32), "cpu", seed=54)
    stepper = ops.decoder_stepper(dec.embedding.weight, dec.rnn._flat_weights, dec.dense.weight,
                                  dec.dense.bias)
    X = random_tokens(3, 19, seed=54)[:, None]
    with torch.no_grad():
        out = stepper.try_step(X, state)
        expected = ref(X, state)
        torch.testing.assert_close(out[0], expected[0], **decode_tol(torch.float32))
        torch.testing.assert_close(out[1], expected[1], **decode_tol(torch.float32))
        assert stepper.try_step(X[:, 0], state) is None               # (B,) token
        assert stepper.try_step(X.expand(3, 2), state) is None        # two steps
        assert stepper.try_step(X.tolist(), state) is None            # not a tensor
        assert stepper.try_step(X.as_subclass(Sub), state) is None   # a subclass
        assert stepper.try_step(X, state.as_subclass(Sub)) is None
        assert stepper.try_step(X, state.to("meta")) is None          # not on the CPU
        with Passthrough():
            assert stepper.try_step(X, state) is None
        with FnMode():
            assert stepper.try_step(X, state) is None
    assert stepper.try_step(X, state) is None                         # grad mode
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"^token\b"):
        stepper.try_step(X.float(), state)                            # checked as by the op
