"""Greedy decoding with the weight matrices rounded to bfloat16 (``weight_dtype`` of
``Seq2SeqDecoder.greedy``, ``models.encode``, ``predict_seq2seq``, ``predict_seq2seq_batch``;
``translate --dtype bf16``): the result is the rounded model's, computed in float32 from half
the bytes."""
import copy

import pytest
import torch

import seq2seq_ext
from seq2seq_ext import ops
from seq2seq_ext.bench import common

from helpers import (ctx_projection, free_run, make_decoder, pick_eos, random_state,
                     reference_decoder, reference_greedy)

BF16 = torch.bfloat16


def rounded(module):
    """A copy of ``module`` (a decoder, an encoder or a model) whose matrices (embeddings, every
    W_ih and W_hh, the output layer's weight) are rounded to bfloat16; biases kept."""
    out = copy.deepcopy(module)
    with torch.no_grad():
        for p in out.parameters():
            if p.dim() == 2:
                p.copy_(p.to(BF16).to(p.dtype))
    return out


# (vocab, embed, hidden, layers, batch): sizes that are no multiple of the vector width, one
# sentence and a batch beyond the 32 rows the float32 stepper packs
CONFIGS = [(41, 7, 13, 1, 1), (23, 6, 12, 3, 5), (301, 16, 40, 2, 40)]


@pytest.mark.parametrize("config", CONFIGS, ids=[f"V{v}-E{e}-H{h}-L{l}-B{b}"
                                                 for v, e, h, l, b in CONFIGS])
def test_bf16_greedy_equals_the_rounded_decoder(config):
    vocab, embed, hidden, layers, batch = config
    num_steps, bos = 9, 1
    dec = make_decoder(vocab, embed, hidden, layers, seed=hidden, dense_scale=3.0)
    low = rounded(dec)
    state = random_state(layers, batch, hidden, seed=hidden)
    context = random_state(1, batch, hidden, seed=hidden + 1)[0]
    stepper = ops.decoder_stepper(dec.embedding.weight, dec.rnn._flat_weights, dec.dense.weight,
                                  dec.dense.bias)
    for ctx in (None, context):
        eos = pick_eos(free_run(low, state, bos, num_steps, ctx), vocab, num_steps)
        want = reference_greedy(reference_decoder(low) if ctx is None else low, state, bos, eos,
                                num_steps, ctx)
        ctx_proj = None if ctx is None else ctx_projection(low, ctx)
        tokens, lengths = stepper.greedy(state, ctx_proj, bos, eos, num_steps, True)
        assert (tokens.tolist(), lengths.tolist()) == want


def _close_call_decoder():
    """A decoder whose hidden state goes to about +1 whatever the input, and whose output layer
    lets two tokens compete: token 2 scores h_0 and token 6 scores (1 + 2^-9) h_0. In float32
    token 6 wins; rounded to bfloat16 the two weights are equal, and argmax takes the first
    maximum, token 2."""
    dec = make_decoder(9, 4, 8, 2, seed=3)
    H = 8
    with torch.no_grad():
        for name, p in dec.rnn.named_parameters():
            p.zero_()
            if name.startswith("bias_ih"):
                p[:H] = -20.0        # reset gate r ~ 0
                p[H:2 * H] = -20.0   # update gate z ~ 0: h' = n
                p[2 * H:] = 20.0     # n = tanh(20) ~ 1
        dec.dense.weight.zero_()
        dec.dense.bias.fill_(-1e4)
        dec.dense.bias[[2, 6]] = 0.0
        dec.dense.weight[2, 0] = 1.0
        dec.dense.weight[6, 0] = 1.0 + 2.0 ** -9
    return dec


def test_bf16_weights_decide_a_close_call():
    dec = _close_call_decoder()
    state = random_state(2, 3, 8, seed=5)
    tokens32, _ = dec.greedy(state, 1, 0, 4)
    tokens16, _ = dec.greedy(state, 1, 0, 4, weight_dtype=BF16)
    assert tokens32.unique().tolist() == [6]   # 1 + 2^-9 > 1 in float32
    assert tokens16.unique().tolist() == [2]   # equal in bfloat16: the first maximum
    assert dec.greedy(state, 1, 0, 4, weight_dtype=torch.float32)[0].equal(tokens32)


def test_fixed_context_decoder_with_bf16_weights_is_the_rounded_decoders():
    dec = make_decoder(41, 7, 13, 2, seed=9, dense_scale=3.0,
                       cls=lambda *a: seq2seq_ext.Seq2SeqDecoder(*a, fixed_context=True))
    low = rounded(dec)
    state = (random_state(2, 6, 13, seed=9), random_state(1, 6, 13, seed=10)[0])
    got = dec.greedy(state, 1, 0, 8, weight_dtype=BF16)
    want = low.greedy(state, 1, 0, 8)
    assert got[0].equal(want[0]) and got[1].equal(want[1])


@pytest.mark.parametrize("batch", [4, 20], ids=["bf16-matrices", "float32-copies"])
def test_bf16_copies_follow_weight_updates(batch):
    # up to 16 rows the bf16 copies are read as they are; beyond, float32 copies of them
    dec = make_decoder(41, 7, 13, 2, seed=7, dense_scale=3.0)
    state = random_state(2, batch, 13, seed=7)
    first = dec.greedy(state, 1, 0, 6, weight_dtype=BF16)
    with torch.no_grad():
        dec.dense.weight.mul_(-1.0)          # an optimizer's in-place step, say
    second = dec.greedy(state, 1, 0, 6, weight_dtype=BF16)
    want = rounded(dec).greedy(state, 1, 0, 6)
    assert second[0].equal(want[0]) and second[1].equal(want[1])
    assert not second[0].equal(first[0])


def test_predict_with_bf16_weights_is_the_rounded_models():
    src_vocab, tgt_vocab = common.toy_vocabs()
    net, _ = common.chapter_models(len(src_vocab), len(tgt_vocab), embed=24, hidden=40)
    sentences = common.sentences(12, src_vocab, seed=4)
    low = rounded(net)
    want = seq2seq_ext.predict_seq2seq_batch(low, sentences, src_vocab, tgt_vocab, 10, "cpu")
    assert seq2seq_ext.predict_seq2seq_batch(net, sentences, src_vocab, tgt_vocab, 10, "cpu",
                                             weight_dtype=BF16) == want
    assert [seq2seq_ext.predict_seq2seq(net, s, src_vocab, tgt_vocab, 10, "cpu",
                                        weight_dtype=BF16)[0] for s in sentences[:3]] == want[:3]


@pytest.mark.parametrize("max_batch", [0, 100], ids=["float32-copies", "bf16-matrices"])
@pytest.mark.parametrize("layers,batch", [(1, 1), (2, 3), (3, 1)])
def test_encoder_with_bf16_weights_is_the_rounded_encoders(layers, batch, max_batch,
                                                           monkeypatch):
    # both ways of computing it: the bf16 matrices read as they are, or float32 copies
    monkeypatch.setattr(seq2seq_ext.models, "_BF16_ENCODER_MAX_BATCH", max_batch)
    src_vocab, tgt_vocab = common.toy_vocabs()
    net, _ = common.chapter_models(len(src_vocab), len(tgt_vocab), embed=24, hidden=40,
                                   layers=layers)
    enc = net.encoder.eval()
    low = rounded(enc)
    X = torch.randint(0, len(src_vocab), (batch, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = seq2seq_ext.models.encode(enc, X, None, weight_dtype=BF16)
        want = low(X)
        as_is = seq2seq_ext.models.encode(enc, X, None)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[1], as_is[1], rtol=1e-5, atol=1e-6)  # the rounding shows
    assert all(p.dtype == torch.float32 for p in enc.parameters())  # the module is unchanged


def test_encoder_bf16_copies_follow_weight_updates():
    src_vocab, tgt_vocab = common.toy_vocabs()
    net, _ = common.chapter_models(len(src_vocab), len(tgt_vocab), embed=24, hidden=40)
    enc = net.encoder.eval()
    X = torch.randint(0, len(src_vocab), (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        seq2seq_ext.models.encode(enc, X, None, weight_dtype=BF16)
        enc.rnn.weight_hh_l1.mul_(-1.0)
        got = seq2seq_ext.models.encode(enc, X, None, weight_dtype=BF16)
        want = rounded(enc)(X)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


def test_other_encoders_run_as_they_are_under_bf16_weights():
    src_vocab, tgt_vocab = common.toy_vocabs()
    net, ref = common.chapter_models(len(src_vocab), len(tgt_vocab), embed=24, hidden=40)
    X = torch.randint(0, len(src_vocab), (2, 7), generator=torch.Generator().manual_seed(3))
    calls = []
    handle = net.encoder.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        for enc in (ref.encoder, net.encoder):  # the reference's; one with a hook
            got = seq2seq_ext.models.encode(enc, X, None, weight_dtype=BF16)
            want = enc(X)
            assert got[1].equal(want[1])
    handle.remove()
    assert calls == [1, 1]


def test_bad_weight_dtype_names_the_argument_and_changes_nothing():
    dec = make_decoder(41, 7, 13, 2, seed=7)
    state = random_state(2, 4, 13, seed=7)
    before = [p.detach().clone() for p in dec.parameters()]
    for bad in (torch.float16, "bf16"):
        with pytest.raises(ValueError, match=r"^weight_dtype\b"):
            dec.greedy(state, 1, 0, 6, weight_dtype=bad)
    lstm = make_decoder(41, 7, 13, 2, seed=7, cls=lambda *a: seq2seq_ext.Seq2SeqDecoder(
        *a, cell="lstm"))
    with pytest.raises(ValueError, match=r"^weight_dtype\b.*lstm"):
        lstm.greedy(lstm.init_state((None, (state, state.clone())), None), 1, 0, 6,
                    weight_dtype=BF16)
    with pytest.raises(ValueError, match=r"^weight_dtype\b.*not float32"):
        make_decoder(41, 7, 13, 2, seed=7, dtype=torch.float64).greedy(
            state.double(), 1, 0, 6, weight_dtype=BF16)
    src_vocab, tgt_vocab = common.toy_vocabs()
    net, _ = common.chapter_models(len(src_vocab), len(tgt_vocab))
    with ops.use_backend("reference"), pytest.raises(ValueError, match=r"^weight_dtype\b"):
        seq2seq_ext.predict_seq2seq(net, "one two", src_vocab, tgt_vocab, 10, "cpu",
                                    weight_dtype=BF16)
    assert all(torch.equal(p, b) for p, b in zip(dec.parameters(), before))


def test_a_decoder_that_has_decoded_can_be_copied_and_pickled():
    """The bound weights cached on the decoder are left out of copies and pickles."""
    import io
    dec = make_decoder(41, 7, 13, 2, seed=7)
    state = random_state(2, 4, 13, seed=7)
    want = dec.greedy(state, 1, 0, 6, weight_dtype=BF16)
    twin = copy.deepcopy(dec)
    buf = io.BytesIO()
    torch.save(dec, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (twin, loaded):
        got = other.greedy(state, 1, 0, 6, weight_dtype=BF16)
        assert got[0].equal(want[0]) and got[1].equal(want[1])


def test_translation_benchmark_runs_and_counts_the_bytes():
    from seq2seq_ext.bench import translate_large as tl
    result = tl.run(sentences=3, rounds=1, embed=6, hidden=5, layers=2, src_size=20,
                    tgt_size=30, num_steps=4)
    names = {"reference", "package float32", "package bf16 weights"}
    if ops.argmax_screen_usable():  # also without the int8 screen of the argmax
        names |= {"package float32, no screen", "package bf16 weights, no screen"}
    assert set(result["per_1000"]) == names and set(result["floors"]) == names - {"reference"}
    assert all(t > 0 for t in result["per_1000"].values()) and result["bandwidth"] > 0
    assert "| reference |" in tl.format_table(result)
    net, _ = common.chapter_models(25, 30, embed=6, hidden=5)
    vocab = net.decoder.dense.weight.shape[0]
    per_token = vocab * 5 + 15 * 5 + 15 * 5 + (15 * 5 + 15 * 5)  # dense, ctx, hh0, ih1 + hh1
    assert tl.token_bytes(net, 2) == 2 * per_token
    # layer 0: a float32 table row and W_hh at each of 3 steps; layer 1: W_ih once, W_hh at
    # 3 steps, both at the decoder's bytes an entry
    for elem in (4, 2):
        encoder = 4 * 3 * 15 + elem * (3 * 15 * 5 + 15 * 5 + 3 * 15 * 5)
        assert tl.sentence_bytes(net, 3, 2, elem) == encoder + 2 * elem * per_token
    # the screen reads the output layer as int8
    assert tl.token_bytes(net, 2, dense_elem=1) == 2 * per_token - vocab * 5
    # the floor: the encoder's W_hh reads at one W_hh's rate, the rest at a token's
    assert tl.encoder_recurrent_bytes(net, 3, 2) == (2 * 3 * 2 * 15 * 5, 2 * 15 * 5)
    rates = {2 * 15 * 5: 1000.0, tl.token_bytes(net, 2): 10.0}
    floor = tl.sentence_floor(net, 3, 2, 2, rate=rates.__getitem__)
    rest = tl.sentence_bytes(net, 3, 2, 2) - 2 * 3 * 2 * 15 * 5
    assert floor == pytest.approx(2 * 3 * 2 * 15 * 5 / 1000.0 + rest / 10.0)
    assert len(result["rates"]) >= 3 and all(r > 0 for r in result["rates"].values())
