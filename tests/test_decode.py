"""The inference decode ops (``gru_decode_step``, ``greedy_decode``) and the model paths built
on them (``Seq2SeqDecoder.forward``'s fused step, ``predict_seq2seq``,
``predict_seq2seq_batch``), against the chapter's reference decoder."""
import random
import re

import pytest
import torch
from torch import nn

import seq2seq_ext
from seq2seq_ext import ops, reference
from seq2seq_ext.data import Vocab
from seq2seq_ext.models import fused_decoder_args

from helpers import (GreedySpy, devices, make_decoder, random_state, random_tokens,
                     reference_copy, reference_decoder)

STEP = torch.ops.seq2seq_ext.gru_decode_step
GREEDY = torch.ops.seq2seq_ext.greedy_decode
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


def _tol(dtype):
    # the op's products (dot products or one GEMM) sum in another order than nn.GRU's and
    # nn.Linear's GEMMs: rtol 1e-5, atol 1e-5 in float32
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}


def _reference_step(ref, token, state):
    """One step of the chapter's decoder: logits (B, V) and the new state. The state goes to
    nn.GRU contiguous (cuDNN refuses another layout); the op under test takes it as it is."""
    with torch.no_grad():
        Y, new_state = ref(token.reshape(-1, 1).long(), state.contiguous())
    return Y[:, 0], new_state


def _fixed_context_step(decoder, token, state, context):
    """One decoder step whose concatenated context is ``context`` (B, H) instead of
    state[-1]: embedding, cat, one nn.GRU step, dense."""
    with torch.no_grad():
        emb = decoder.embedding(token.reshape(-1).long())
        x = torch.cat((emb, context), dim=1)[None]
        out, new_state = decoder.rnn(x, state.contiguous())
        return decoder.dense(out[0]), new_state


def _ctx_proj(decoder, context):
    w_ih0 = decoder.rnn.weight_ih_l0
    return (context @ w_ih0[:, decoder.embedding.embedding_dim:].t()).detach()


def _setup(config, device, seed):
    vocab, embed, hidden, layers, batch, dtype = config
    dec = make_decoder(vocab, embed, hidden, layers, dtype=dtype, device=device, seed=seed)
    state = random_state(layers, batch, hidden, dtype=dtype, device=device, seed=seed)
    return dec, reference_decoder(dec), state


# ----------------------------------------------------------------------------------------------
# (a) one step against the reference decoder
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_step_matches_reference(device, config):
    dec, ref, state = _setup(config, device, seed=1)
    vocab, batch, dtype = config[0], config[4], config[5]
    token = random_tokens(batch, vocab, device=device, seed=1)
    state_before = state.clone()
    ref_logits, ref_state = _reference_step(ref, token, state)
    args = fused_decoder_args(dec)
    # token (B,) -> logits (B, V)
    logits, new_state = STEP(token, state, *args)
    assert logits.shape == (batch, vocab) and logits.dtype == dtype
    assert new_state.shape == state.shape and new_state.dtype == dtype
    torch.testing.assert_close(logits, ref_logits, **_tol(dtype))
    torch.testing.assert_close(new_state, ref_state, **_tol(dtype))
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
    dec, ref, state = _setup((17, 6, 11, 2, 5, torch.float64), device, seed=2)
    token = random_tokens(5, 17, device=device, seed=2)
    s_ext, s_ref, tok = state, state, token
    for _ in range(6):
        logits, s_ext = ops.gru_decode_step(tok, s_ext, *fused_decoder_args(dec))
        ref_logits, s_ref = _reference_step(ref, tok, s_ref)
        torch.testing.assert_close(logits, ref_logits)
        torch.testing.assert_close(s_ext, s_ref)
        tok = ref_logits.argmax(dim=1)


@pytest.mark.parametrize("device", DEVICES)
def test_step_non_contiguous_state_and_token(device):
    dec, ref, _ = _setup((19, 4, 10, 2, 6, torch.float64), device, seed=3)
    state = random_state(6, 2, 10, dtype=torch.float64, device=device, seed=3).transpose(0, 1)
    assert not state.is_contiguous()
    token = random_tokens(12, 19, device=device, seed=3)[::2]
    logits, new_state = STEP(token, state, *fused_decoder_args(dec))
    ref_logits, ref_state = _reference_step(ref, token, state)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(new_state, ref_state)


@pytest.mark.parametrize("device", DEVICES)
def test_step_inputs_requiring_grad(device):
    # the decoder's own parameters require grad: the op runs below autograd and its outputs
    # carry no graph
    dec, ref, state = _setup((15, 5, 8, 2, 3, torch.float32), device, seed=4)
    token = random_tokens(3, 15, device=device, seed=4)
    emb_proj, ctx, weights, dw, db = fused_decoder_args(dec)
    assert weights[0].requires_grad and dw.requires_grad
    logits, new_state = ops.gru_decode_step(token, state.requires_grad_(), emb_proj, ctx,
                                            weights, dw, db)
    assert not logits.requires_grad and not new_state.requires_grad
    ref_logits, ref_state = _reference_step(ref, token, state.detach())
    torch.testing.assert_close(logits, ref_logits, **_tol(torch.float32))


# ----------------------------------------------------------------------------------------------
# (b) the fixed-context rule
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS[:5], ids=CONFIG_IDS[:5])
def test_step_with_fixed_context(device, config):
    dec, _, state = _setup(config, device, seed=5)
    vocab, hidden, batch, dtype = config[0], config[2], config[4], config[5]
    token = random_tokens(batch, vocab, device=device, seed=5)
    context = random_state(1, batch, hidden, dtype=dtype, device=device, seed=55)[0]
    emb_proj, _, weights, dw, db = fused_decoder_args(dec)
    logits, new_state = STEP(token, state, emb_proj, _ctx_proj(dec, context), weights, dw, db)
    ref_logits, ref_state = _fixed_context_step(dec, token, state, context)
    torch.testing.assert_close(logits, ref_logits, **_tol(dtype))
    torch.testing.assert_close(new_state, ref_state, **_tol(dtype))
    # a context equal to state[-1] is the reference decoder's rule
    same, _ = STEP(token, state, emb_proj, _ctx_proj(dec, state[-1]), weights, dw, db)
    free, _ = STEP(token, state, emb_proj, None, weights, dw, db)
    torch.testing.assert_close(same, free, **_tol(dtype))


# ----------------------------------------------------------------------------------------------
# (c) greedy decoding against the chapter's loop
# ----------------------------------------------------------------------------------------------

def _reference_greedy(ref, state, bos, eos, num_steps, context=None):
    """predict_seq2seq's loop, one sentence at a time (batch 1, one .item() per token)."""
    tokens, lengths = [], []
    for b in range(state.shape[1]):
        s = state[:, b:b + 1]
        x = torch.tensor([[bos]], device=state.device)
        out = []
        for _ in range(num_steps):
            if context is None:
                Y, s = _reference_step(ref, x, s)
            else:
                Y, s = _fixed_context_step(ref, x, s, context[b:b + 1])
            x = Y.argmax(dim=1, keepdim=True)
            pred = x.squeeze().type(torch.int32).item()
            if pred == eos:
                break
            out.append(pred)
        lengths.append(len(out))
        tokens.append(out + [eos] * (num_steps - len(out)))
    return tokens, lengths


def _free_run(ref, state, bos, num_steps, context=None):
    """The greedy tokens (B, num_steps) without stopping, the whole batch at once."""
    x = torch.full((state.shape[1],), bos, device=state.device)
    s, out = state, []
    for _ in range(num_steps):
        if context is None:
            Y, s = _reference_step(ref, x, s)
        else:
            Y, s = _fixed_context_step(ref, x, s, context)
        x = Y.argmax(dim=1)
        out.append(x)
    return torch.stack(out, dim=1).tolist()


def _pick_eos(free, vocab, num_steps):
    """The token whose first occurrences spread the sentences' stopping points the most."""
    def score(v):
        stops = [row.index(v) if v in row else num_steps for row in free]
        return (len(set(stops)), sum(s < num_steps for s in stops))
    return max(range(vocab), key=score)


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
    eos = _pick_eos(_free_run(ref, state, bos, num_steps), vocab, num_steps)
    ref_tokens, ref_lengths = _reference_greedy(ref, state, bos, eos, num_steps)
    # the test is meaningful: sentences stop at different points, some before num_steps
    assert len(set(ref_lengths)) >= 2 and min(ref_lengths) < num_steps
    tokens, lengths = ops.greedy_decode(state, *fused_decoder_args(dec), bos, eos, num_steps)
    assert tokens.dtype == torch.int64 and lengths.dtype == torch.int64
    assert tokens.shape == (batch, num_steps) and lengths.shape == (batch,)
    assert tokens.tolist() == ref_tokens
    assert lengths.tolist() == ref_lengths
    for row, n in zip(tokens.tolist(), lengths.tolist()):
        assert eos not in row[:n] and all(t == eos for t in row[n:])


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
        eos = _pick_eos(_free_run(dec, state, bos, num_steps, ctx), vocab, num_steps)
        ref_tokens, ref_lengths = _reference_greedy(ref if ctx is None else dec, state, bos, eos,
                                                    num_steps, ctx)
        assert min(ref_lengths) < num_steps  # some sentences stop early
        ctx_proj = None if ctx is None else _ctx_proj(dec, ctx)
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


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_with_fixed_context(device):
    vocab, hidden, layers, batch, num_steps, bos = 21, 10, 2, 8, 9, 2
    dec = make_decoder(vocab, 5, hidden, layers, dtype=torch.float64, device=device, seed=14,
                       dense_scale=3.0)
    state = random_state(layers, batch, hidden, dtype=torch.float64, device=device, seed=14)
    context = random_state(1, batch, hidden, dtype=torch.float64, device=device, seed=15)[0]
    eos = _pick_eos(_free_run(dec, state, bos, num_steps, context), vocab, num_steps)
    ref_tokens, ref_lengths = _reference_greedy(dec, state, bos, eos, num_steps, context)
    assert len(set(ref_lengths)) >= 2
    emb_proj, _, weights, dw, db = fused_decoder_args(dec)
    ctx_proj = _ctx_proj(dec, context)
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
    dec, ref, state = _setup((14, 4, 6, 2, batch, torch.float64), device, seed=16)
    for eos in (_free_run(ref, state, 3, 1)[0][0], 0):
        tokens, lengths = GREEDY(state, *fused_decoder_args(dec), 3, eos, num_steps)
        ref_tokens, ref_lengths = _reference_greedy(ref, state, 3, eos, num_steps)
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
    dec, ref, state = _setup((25, 7, 13, 3, 6, torch.float32), device, seed=18)
    bos = 4
    logits, _ = STEP(torch.full((6,), bos, device=device), state, *fused_decoder_args(dec))
    eos = min(set(range(25)) - set(logits.argmax(dim=1).tolist()))
    tokens, lengths = GREEDY(state, *fused_decoder_args(dec), bos, eos, 1)
    assert torch.equal(tokens[:, 0], logits.argmax(dim=1))
    assert lengths.tolist() == [1] * 6


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_deterministic(device):
    dec, ref, state = _setup((40, 8, 16, 2, 24, torch.float32), device, seed=19)
    args = fused_decoder_args(dec)
    first = GREEDY(state, *args, 1, 2, 15)
    for _ in range(2):
        again = GREEDY(state, *args, 1, 2, 15)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


# ----------------------------------------------------------------------------------------------
# (d) predict_seq2seq and predict_seq2seq_batch
# ----------------------------------------------------------------------------------------------

SRC_WORDS = ["go", ".", "i", "lost", "he's", "calm", "i'm", "home", "run", "!", "who", "?",
             "wow", "fire", "help", "stop", "wait", "hello", "hi", "we", "try"]
TGT_WORDS = ["va", "!", "j'ai", "perdu", ".", "il", "est", "riche", "je", "suis", "en",
             "retard", "?", "cours", "qui", "ça", "alors", "au", "feu", "aide", "arrête"]


def _vocabs():
    src = Vocab([SRC_WORDS], reserved_tokens=["<pad>", "<bos>", "<eos>"])
    tgt = Vocab([TGT_WORDS], reserved_tokens=["<pad>", "<bos>", "<eos>"])
    return src, tgt


def _nets(src_vocab, tgt_vocab, dtype, seed, layers=2, eos_bias=0.0):
    torch.manual_seed(seed)
    encoder = seq2seq_ext.Seq2SeqEncoder(len(src_vocab), 8, 16, layers)
    decoder = seq2seq_ext.Seq2SeqDecoder(len(tgt_vocab), 8, 16, layers)
    net = seq2seq_ext.EncoderDecoder(encoder, decoder)
    net.apply(seq2seq_ext.xavier_init_weights)
    with torch.no_grad():  # tunes how soon translations end
        decoder.dense.bias[tgt_vocab["<eos>"]] += eos_bias
    net = net.to(dtype)
    ref = reference_copy(net, reference.EncoderDecoder,
                         reference.Seq2SeqEncoder(len(src_vocab), 8, 16, layers),
                         reference.Seq2SeqDecoder(len(tgt_vocab), 8, 16, layers))
    return net, ref


def _sentences(n, seed):
    rng = random.Random(seed)
    words = SRC_WORDS + ["unknown", "zzz"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(n)]


class _Spy:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layers", [1, 2])
def test_predict_seq2seq_matches_reference(device, layers, monkeypatch):
    src_vocab, tgt_vocab = _vocabs()
    net, ref = _nets(src_vocab, tgt_vocab, torch.float32, seed={1: 22, 2: 21}[layers],
                     layers=layers, eos_bias=0.4)
    net, ref = net.to(device), ref.to(device)
    spy = GreedySpy(monkeypatch)
    sentences = ["go .", "i lost .", "he's calm .", "i'm home .", "Wow !", "who ? who ?"]
    sentences += _sentences(6, seed=layers)
    outputs = []
    for sentence in sentences:
        for num_steps in (1, 4, 10):
            got = seq2seq_ext.predict_seq2seq(net, sentence, src_vocab, tgt_vocab, num_steps,
                                              device)
            expected = reference.predict_seq2seq(ref, sentence, src_vocab, tgt_vocab, num_steps,
                                                 device)
            assert got == expected, (sentence, num_steps)
            outputs.append(got[0])
    assert spy.calls == 3 * len(sentences)  # the fused greedy loop did the work
    # on the CPU, through the decoder's bound stepper
    assert spy.stepper_calls == (spy.calls if device == "cpu" else 0)
    # the comparison covers translations of several lengths
    assert len({len(o.split()) for o in outputs}) >= 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_predict_seq2seq_batch_matches_reference(device, dtype):
    src_vocab, tgt_vocab = _vocabs()
    net, ref = _nets(src_vocab, tgt_vocab, dtype, seed=30)
    net, ref = net.to(device), ref.to(device)
    sentences = _sentences(50, seed=31)
    num_steps = 9
    expected = [reference.predict_seq2seq(ref, s, src_vocab, tgt_vocab, num_steps, device)[0]
                for s in sentences]
    assert len(set(expected)) >= 5
    got = seq2seq_ext.predict_seq2seq_batch(net, sentences, src_vocab, tgt_vocab, num_steps,
                                            device, batch_size=16)
    assert got == expected
    assert seq2seq_ext.predict_seq2seq_batch(net, sentences[:7], src_vocab, tgt_vocab,
                                             num_steps, device) == expected[:7]


def test_predict_under_reference_backend_is_the_reference(monkeypatch):
    src_vocab, tgt_vocab = _vocabs()
    net, ref = _nets(src_vocab, tgt_vocab, torch.float32, seed=32)
    spy = _Spy(ops.greedy_decode)
    monkeypatch.setattr(ops, "greedy_decode", spy)
    with seq2seq_ext.use_backend("reference"):
        got = [seq2seq_ext.predict_seq2seq(net, s, src_vocab, tgt_vocab, 6, "cpu")
               for s in ("go .", "i lost .")]
    assert spy.calls == 0
    assert got == [reference.predict_seq2seq(ref, s, src_vocab, tgt_vocab, 6, "cpu")
                   for s in ("go .", "i lost .")]


# ----------------------------------------------------------------------------------------------
# (e) Seq2SeqDecoder.forward's fused path and the emb_proj cache
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decoder_forward_one_step_is_fused_without_grad(device, dtype, monkeypatch):
    dec, ref, state = _setup((19, 6, 10, 2, 5, dtype), device, seed=40)
    X = random_tokens(5, 19, device=device, seed=40)[:, None]
    spy = _Spy(ops.gru_decode_step)
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
    torch.testing.assert_close(Y, Y_ref, **_tol(dtype))
    torch.testing.assert_close(new_state, state_ref, **_tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_decoder_forward_with_grad_is_differentiable(device, monkeypatch):
    dec, ref, state = _setup((19, 6, 10, 2, 5, torch.float32), device, seed=41)
    X = random_tokens(5, 19, device=device, seed=41)[:, None]
    spy = _Spy(ops.gru_decode_step)
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
    torch.testing.assert_close(Y, Y_ref, **_tol(torch.float32))
    torch.testing.assert_close(new_state, state_ref, **_tol(torch.float32))
    # a multi-step input takes the layer op (not the decode step) even without gradients
    with torch.no_grad():
        X3 = random_tokens(15, 19, device=device, seed=42).reshape(5, 3)
        Y3, s3 = dec(X3, state)
        Y3_ref, s3_ref = ref(X3, state)
    assert spy.calls == 0
    torch.testing.assert_close(Y3, Y3_ref, **_tol(torch.float32))
    torch.testing.assert_close(s3, s3_ref, **_tol(torch.float32))


def test_decoder_forward_not_fused_with_dropout_in_training_or_reference_backend(monkeypatch):
    spy = _Spy(ops.gru_decode_step)
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


def _step_output(dec, X, state):
    with torch.no_grad():
        return dec(X, state)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_emb_proj_cache_follows_optimizer_steps(device, optimizer):
    dec, _, state = _setup((23, 7, 12, 2, 4, torch.float32), device, seed=44)
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
        ref_out, ref_state = _reference_step(reference_decoder(dec), X, state)
        torch.testing.assert_close(after[:, 0], ref_out, **_tol(torch.float32))
        torch.testing.assert_close(after_state, ref_state, **_tol(torch.float32))
    assert not torch.allclose(after, before)
    assert fused_decoder_args(dec)[0] is not table


@pytest.mark.parametrize("device", DEVICES)
def test_emb_proj_cache_follows_in_place_changes(device):
    dec, _, state = _setup((23, 7, 12, 2, 4, torch.float32), device, seed=46)
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
        ref_out, ref_state = _reference_step(reference_decoder(dec), X, state)
        torch.testing.assert_close(out[:, 0], ref_out, **_tol(torch.float32), msg=str(i))
        torch.testing.assert_close(new_state, ref_state, **_tol(torch.float32), msg=str(i))


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
    dec, ref, state = _setup(config, "cpu", seed=51)
    vocab, hidden, batch, dtype = config[0], config[2], config[4], config[5]
    stepper = ops.decoder_stepper(dec.embedding.weight, dec.rnn._flat_weights, dec.dense.weight,
                                  dec.dense.bias)
    token = random_tokens(batch, vocab, seed=51)
    context = random_state(1, batch, hidden, dtype=dtype, seed=52)[0]
    state_before = state.clone()
    with torch.no_grad():
        for tok in (token, token[:, None].int()):
            logits, new_state = stepper.step(tok, state)
            ref_logits, ref_state = _reference_step(ref, tok, state)
            torch.testing.assert_close(logits.reshape(batch, vocab), ref_logits, **_tol(dtype))
            torch.testing.assert_close(new_state, ref_state, **_tol(dtype))
        # a non-contiguous state, and a fixed context
        t_state = torch.zeros(*state.shape[:2], 2 * hidden, dtype=dtype)[..., ::2]
        t_state.copy_(state)
        logits, new_state = stepper.step_with_context(token, t_state, _ctx_proj(dec, context))
        ref_logits, ref_state = _fixed_context_step(dec, token, state, context)
        torch.testing.assert_close(logits, ref_logits, **_tol(dtype))
        torch.testing.assert_close(new_state, ref_state, **_tol(dtype))
        # bad input raises and writes nothing, as the op does
        with pytest.raises(RuntimeError, match=r"^token\b"):
            stepper.step(torch.full((batch,), vocab), state)
    assert torch.equal(state, state_before)


def test_bound_stepper_follows_data_swap_and_resize():
    """A parameter's storage replaced through ``.data`` (no version change) or a parameter of
    another shape: the stepper's packed weights are rebuilt, never used stale."""
    dec, _, state = _setup((23, 7, 12, 2, 3, torch.float32), "cpu", seed=53)
    stepper = ops.decoder_stepper(dec.embedding.weight, dec.rnn._flat_weights, dec.dense.weight,
                                  dec.dense.bias)
    token = random_tokens(3, 23, seed=53)
    with torch.no_grad():
        stepper.step(token, state)
        dec.rnn.weight_hh_l1.data = torch.randn_like(dec.rnn.weight_hh_l1)
        dec.dense.weight.data = torch.randn_like(dec.dense.weight)
        logits, new_state = stepper.step(token, state)
        ref_logits, ref_state = _reference_step(reference_decoder(dec), token, state)
        torch.testing.assert_close(logits, ref_logits, **_tol(torch.float32))
        torch.testing.assert_close(new_state, ref_state, **_tol(torch.float32))
        # fewer output rows in the same storage: the logits follow the new shape
        dec.dense.weight.data = dec.dense.weight.data[:20]
        dec.dense.bias.data = dec.dense.bias.data[:20]
        logits, _ = stepper.step(token, state)
        assert logits.shape == (3, 20)
        # (the chapter's rule is the fixed-context step with the context state[-1])
        ref_logits, _ = _fixed_context_step(dec, token, state, state[-1])
        torch.testing.assert_close(logits, ref_logits, **_tol(torch.float32))


def test_emb_proj_cache_follows_dtype_conversion():
    dec, _, state = _setup((23, 7, 12, 2, 4, torch.float32), "cpu", seed=48)
    X = random_tokens(4, 23, seed=48)[:, None]
    _step_output(dec, X, state)
    dec = dec.double()
    out, _ = _step_output(dec, X, state.double())
    assert out.dtype == torch.float64
    ref_out, _ = _reference_step(reference_decoder(dec), X, state.double())
    torch.testing.assert_close(out[:, 0], ref_out)


def test_emb_proj_cache_follows_replaced_output_layer():
    # replacing a submodule's parameter (or the submodule) is an ordinary way to change a
    # model's weights; the fused step must use the decoder's current output layer
    dec, _, state = _setup((23, 7, 12, 2, 4, torch.float32), "cpu", seed=49)
    X = random_tokens(4, 23, seed=49)[:, None]
    _step_output(dec, X, state)
    torch.manual_seed(50)
    dec.dense = nn.Linear(12, 23)
    out, _ = _step_output(dec, X, state)
    ref_out, _ = _reference_step(reference_decoder(dec), X, state)
    torch.testing.assert_close(out[:, 0], ref_out, **_tol(torch.float32))
    dec.dense.bias = nn.Parameter(torch.randn(23))
    out, _ = _step_output(dec, X, state)
    ref_out, _ = _reference_step(reference_decoder(dec), X, state)
    torch.testing.assert_close(out[:, 0], ref_out, **_tol(torch.float32))


# ----------------------------------------------------------------------------------------------
# (f) opcheck
# ----------------------------------------------------------------------------------------------

def _decode_samples(device):
    """(decoder, state, context or None, token) samples."""
    out = []
    for i, (config, with_ctx) in enumerate([((13, 5, 7, 1, 4, torch.float32), False),
                                            ((17, 4, 6, 2, 3, torch.float64), True),
                                            ((11, 3, 5, 3, 1, torch.float32), True),
                                            ((9, 2, 4, 2, 5, torch.float64), False)]):
        dec, _, state = _setup(config, device, seed=60 + i)
        context = (random_state(1, config[4], config[2], dtype=config[5], device=device,
                                seed=70 + i)[0] if with_ctx else None)
        token = random_tokens(config[4], config[0], device=device, seed=60 + i)
        out.append((dec, state, context, token))
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_gru_decode_step(device):
    for i, (dec, state, context, token) in enumerate(_decode_samples(device)):
        emb_proj, _, weights, dw, db = fused_decoder_args(dec)
        ctx = None if context is None else _ctx_proj(dec, context)
        if i % 2:
            token = token[:, None]
        if i == 0:  # the decoder's parameters as they come: requiring grad
            weights, dw, db = list(weights), dw, db
        else:
            weights, dw, db = [w.detach() for w in weights], dw.detach(), db.detach()
        torch.library.opcheck(STEP, (token, state, emb_proj, ctx, weights, dw, db))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_greedy_decode(device):
    for i, (dec, state, context, token) in enumerate(_decode_samples(device)):
        emb_proj, _, weights, dw, db = fused_decoder_args(dec)
        ctx = None if context is None else _ctx_proj(dec, context)
        if i != 0:
            weights, dw, db = [w.detach() for w in weights], dw.detach(), db.detach()
        torch.library.opcheck(GREEDY, (state, emb_proj, ctx, list(weights), dw, db, 1, 2,
                                       [5, 0, 1, 7][i]))


# ----------------------------------------------------------------------------------------------
# (g) bad input
# ----------------------------------------------------------------------------------------------

def _base_args(device):
    dec, _, state = _setup((15, 5, 8, 2, 3, torch.float32), device, seed=80)
    emb_proj, _, weights, dw, db = fused_decoder_args(dec)
    weights = [w.detach() for w in weights]
    token = random_tokens(3, 15, device=device, seed=80)
    ctx = _ctx_proj(dec, random_state(1, 3, 8, device=device, seed=81)[0])
    return dict(token=token, state=state, emb_proj=emb_proj, ctx_proj=ctx, weights=weights,
                dense_weight=dw.detach(), dense_bias=db.detach())


def _shared_bad_cases(a, device):
    """(argument named in the message, replacements) for both decode ops."""
    w = a["weights"]
    return [
        ("weights", dict(weights=w[:4])),
        ("weights", dict(weights=w + w[:4])),
        ("weights", dict(weights=w[:-1])),
        ("weights", dict(weights=[w[0], w[1][:, :5]] + w[2:])),
        ("weights", dict(weights=[w[0], w[1], w[2][:-1]] + w[3:])),
        ("weights", dict(weights=[w[0][:, :3]] + w[1:])),
        ("weights", dict(weights=[w[0].double()] + w[1:])),
        ("weights", dict(weights=w[:7] + [w[7][None]])),
        ("state", dict(state=a["state"][0])),
        ("state", dict(state=a["state"][None])),
        ("state", dict(state=a["state"].half())),
        ("state", dict(state=a["state"].to(torch.int64))),
        ("weights", dict(state=a["state"][:1])),  # two layers' weights for a 1-layer state
        ("emb_proj", dict(emb_proj=a["emb_proj"][:, :-1])),
        ("emb_proj", dict(emb_proj=a["emb_proj"].double())),
        ("emb_proj", dict(emb_proj=a["emb_proj"][0])),
        ("ctx_proj", dict(ctx_proj=a["ctx_proj"][:2])),
        ("ctx_proj", dict(ctx_proj=a["ctx_proj"][:, :-1])),
        ("ctx_proj", dict(ctx_proj=a["ctx_proj"][None])),
        ("ctx_proj", dict(ctx_proj=a["ctx_proj"].double())),
        ("dense_weight", dict(dense_weight=a["dense_weight"][:, :-1])),
        ("dense_weight", dict(dense_weight=a["dense_weight"].double())),
        ("dense_bias", dict(dense_bias=a["dense_bias"][:-1])),
        ("dense_bias", dict(dense_bias=a["dense_bias"][None])),
        ("dense_bias", dict(dense_bias=a["dense_bias"].double())),
    ]


def _snapshot(args):
    out = []
    for v in args.values():
        if isinstance(v, torch.Tensor):
            out.append(v.clone())
        elif isinstance(v, list):
            out.append([t.clone() for t in v])
        else:
            out.append(v)
    return out


def _assert_unchanged(args, snap):
    for v, s in zip(args.values(), snap):
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, s)
        elif isinstance(v, list):
            assert all(torch.equal(t, u) for t, u in zip(v, s))


@pytest.mark.parametrize("device", DEVICES)
def test_step_bad_input_names_argument(device):
    a = _base_args(device)
    token = a["token"]
    # token values are checked on the host on the CPU only: a CUDA kernel stops with a
    # device-side assertion (test_cuda_graphs.py checks it in a process of its own)
    range_cases = [
        ("token", dict(token=torch.tensor([0, 15, 1], device=device))),
        ("token", dict(token=torch.tensor([0, 1, -1], device=device))),
        ("token", dict(token=torch.tensor([[0], [1000]], device=device).repeat(2, 1)[:3])),
    ] if device == "cpu" else []
    cases = _shared_bad_cases(a, device) + range_cases + [
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
        snap = _snapshot(args)
        with pytest.raises(RuntimeError, match=rf"^{re.escape(name)}\b"):
            STEP(**args)
        _assert_unchanged(args, snap)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_bad_input_names_argument(device):
    a = _base_args(device)
    del a["token"]
    a.update(bos=1, eos=2, num_steps=4)
    cases = _shared_bad_cases(a, device) + [
        ("bos", dict(bos=15)),
        ("bos", dict(bos=-1)),
        ("num_steps", dict(num_steps=-1)),
        # more outputs than rows of emb_proj: a prediction could not be fed back
        ("dense_weight", dict(dense_weight=torch.randn(16, 8, device=device),
                              dense_bias=torch.randn(16, device=device))),
    ]
    for name, change in cases:
        args = {**a, **change}
        snap = _snapshot(args)
        with pytest.raises(RuntimeError, match=rf"^{re.escape(name)}\b"):
            GREEDY(**args)
        _assert_unchanged(args, snap)
    # the public wrapper raises the same errors
    with pytest.raises(RuntimeError, match=r"^num_steps\b"):
        ops.greedy_decode(a["state"], a["emb_proj"], None, a["weights"], a["dense_weight"],
                          a["dense_bias"], 1, 2, -3)


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

    dec, ref, state = _setup((19, 6, 10, 2, 3, torch.float32), "cpu", seed=54)
    stepper = ops.decoder_stepper(dec.embedding.weight, dec.rnn._flat_weights, dec.dense.weight,
                                  dec.dense.bias)
    X = random_tokens(3, 19, seed=54)[:, None]
    with torch.no_grad():
        out = stepper.try_step(X, state)
        expected = ref(X, state)
        torch.testing.assert_close(out[0], expected[0], **_tol(torch.float32))
        torch.testing.assert_close(out[1], expected[1], **_tol(torch.float32))
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


def test_bound_decoder_call_honours_hooks_and_equals_forward():
    """The per-token call with a bound stepper (Seq2SeqDecoder.__call__'s shortcut) gives
    forward's result, and module hooks still run: a hook turns the shortcut off."""
    dec, ref, state = _setup((19, 6, 10, 2, 1, torch.float32), "cpu", seed=44)
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
        glob = torch.nn.modules.module.register_module_forward_hook(
            lambda mod, args, out: seen.append(type(mod).__name__))
        try:
            dec(X, state)
        finally:
            glob.remove()
        dec(X, state)  # no hooks again: nothing recorded
    assert seen == [(1, 1, 19), "pre", "Seq2SeqDecoder"]
