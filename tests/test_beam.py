"""Beam search (``seq2seq_ext.beam``): the batched search against the plain one-sentence oracle,
against brute force on a tiny vocabulary, against greedy decoding, with tuple decoder states,
across batch sizes and backends, on a trained model, and its argument checks."""
import collections
import decimal
import itertools
import math
import random

import pytest
import torch
from torch import nn

import seq2seq_ext
from seq2seq_ext import beam, reference
from seq2seq_ext.beam import (_search_chunk, _top_k, beam_search, reference_beam_search,
                              select_rows)
from seq2seq_ext.data import Vocab
from seq2seq_ext.training import fit

from helpers import devices

BACKENDS = ["ext", "reference"]
RESERVED = ["<pad>", "<bos>", "<eos>"]
SRC_WORDS = ["go", ".", "i", "lost", "he's", "calm", "i'm", "home", "run", "!", "who", "?",
             "wow", "fire", "help", "stop", "wait"]
TGT_WORDS = ["va", "!", "j'ai", "perdu", ".", "il", "est", "riche", "je", "suis", "en",
             "retard", "?", "cours", "qui"]


def _vocabs(tgt_words=TGT_WORDS):
    return Vocab([SRC_WORDS], reserved_tokens=RESERVED), Vocab([tgt_words],
                                                              reserved_tokens=RESERVED)


def _net(src_vocab, tgt_vocab, seed, embed=5, hidden=7, layers=2, eos_bias=0.0, spread=2.0,
         dtype=torch.float32, device="cpu"):
    """The chapter's model with seeded random weights wide enough to give varied beams:
    ``spread`` scales the output projection, ``eos_bias`` is added to ``<eos>``'s logit."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = seq2seq_ext.Seq2SeqEncoder(len(src_vocab), embed, hidden, layers)
        decoder = seq2seq_ext.Seq2SeqDecoder(len(tgt_vocab), embed, hidden, layers)
        net = seq2seq_ext.EncoderDecoder(encoder, decoder)
        with torch.no_grad():
            for p in itertools.chain(encoder.rnn.parameters(), decoder.rnn.parameters()):
                p.uniform_(-0.8, 0.8)
            decoder.dense.weight.mul_(spread)
            decoder.dense.bias.mul_(spread)
            decoder.dense.bias[tgt_vocab["<eos>"]] += eos_bias
    return net.to(device=device, dtype=dtype).eval()


def _sentences(n, seed):
    rng = random.Random(seed)
    words = SRC_WORDS + ["unknown"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 9))) for _ in range(n)]


def _assert_same(got, expected, rtol=1e-6):
    """``got`` and ``expected`` are lists of (translation, score): same translations, scores
    within float tolerance (the decoder runs with other batch sizes in the two searches)."""
    assert [g[0] for g in got] == [e[0] for e in expected]
    for (_, g), (_, e) in zip(got, expected):
        assert math.isclose(g, e, rel_tol=rtol, abs_tol=1e-6), (g, e)


# ----------------------------------------------------------------------------------------------
# the batched search against the oracle
# ----------------------------------------------------------------------------------------------

# (embed, hidden, layers, beam_size, alpha, num_steps, eos_bias, spread, dtype, seed)
CONFIGS = [
    (5, 7, 2, 4, 0.75, 8, 0.0, 2.0, torch.float32, 11),
    (3, 9, 1, 3, 0.0, 6, 1.0, 2.0, torch.float32, 12),
    (6, 13, 3, 5, 1.3, 10, 1.0, 1.0, torch.float64, 13),
    (4, 5, 2, 2, 0.75, 1, 0.0, 1.0, torch.float32, 14),
    (8, 16, 2, 7, 0.5, 12, 0.5, 2.0, torch.float32, 15),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS, ids=[f"cfg{i}" for i in range(len(CONFIGS))])
def test_beam_search_matches_reference(device, backend, config):
    embed, hidden, layers, k, alpha, num_steps, eos_bias, spread, dtype, seed = config
    src_vocab, tgt_vocab = _vocabs()
    net = _net(src_vocab, tgt_vocab, seed, embed, hidden, layers, eos_bias, spread, dtype=dtype,
               device=device)
    sentences = _sentences(13, seed) + ["go .", "i lost ."]
    with seq2seq_ext.use_backend(backend):
        got = beam_search(net, sentences, src_vocab, tgt_vocab, num_steps, device, beam_size=k,
                          alpha=alpha, batch_size=6, return_scores=True)
        expected = [reference_beam_search(net, s, src_vocab, tgt_vocab, num_steps, device,
                                          beam_size=k, alpha=alpha) for s in sentences]
        greedy = seq2seq_ext.predict_seq2seq_batch(net, sentences, src_vocab, tgt_vocab,
                                                   num_steps, device)
    _assert_same(got, expected)
    assert all(isinstance(t, str) and isinstance(s, float) and s <= 0 for t, s in got)
    if num_steps > 1:
        # the comparison covers translations of several lengths, and beams that do not simply
        # follow the greedy path
        assert len({len(t.split()) for t, _ in got}) >= 2
        assert any(t != g for (t, _), g in zip(got, greedy))


def test_each_step_is_one_fused_decoder_call(monkeypatch):
    """Under the extension backend every step is one decoder call over all the live beams of
    all the sentences, and it runs as the fused decode step (the chapter's multi-op forward is
    never called); under the reference backend that forward does the work."""
    src_vocab, tgt_vocab = _vocabs()
    net = _net(src_vocab, tgt_vocab, 21, eos_bias=0.5)
    sentences = _sentences(9, 21)
    unfused = []
    original = reference.Seq2SeqDecoder.forward

    def spy(self, X, state):
        unfused.append(X.shape)
        return original(self, X, state)

    monkeypatch.setattr(reference.Seq2SeqDecoder, "forward", spy)
    rows = []
    handle = net.decoder.register_forward_hook(lambda m, args, out: rows.append(args[0].shape))
    try:
        got = beam_search(net, sentences, src_vocab, tgt_vocab, 7, "cpu", beam_size=3)
        assert unfused == []
        assert 1 <= len(rows) <= 7
        assert rows[0] == (9 * 3, 1)  # all the sentences' beams in the first call
        assert all(r[1] == 1 and r[0] % 3 == 0 for r in rows)
        with seq2seq_ext.use_backend("reference"):
            assert beam_search(net, sentences, src_vocab, tgt_vocab, 7, "cpu",
                               beam_size=3) == got
        assert len(unfused) >= 1
    finally:
        handle.remove()


@pytest.mark.parametrize("seed, eos_bias", [(31, 2.0), (32, 1.0)])
def test_early_stopping_changes_nothing(seed, eos_bias):
    """The stopping bound is sound: running every sentence to num_steps gives the same
    translations and scores, and early stopping does save work (decoder rows)."""
    src_vocab, tgt_vocab = _vocabs()
    net = _net(src_vocab, tgt_vocab, seed, eos_bias=eos_bias, spread=1.0)
    sentences = _sentences(10, seed)
    rows = []
    handle = net.decoder.register_forward_hook(lambda m, args, out: rows.append(len(args[0])))
    try:
        with torch.no_grad():
            early = _search_chunk(net, sentences, src_vocab, tgt_vocab, 20, "cpu", 3, 0.75)
            n_early = sum(rows)
            full = _search_chunk(net, sentences, src_vocab, tgt_vocab, 20, "cpu", 3, 0.75,
                                 early_stopping=False)
            n_full = sum(rows) - n_early
    finally:
        handle.remove()
    assert early == full
    assert n_full == 20 * 10 * 3
    assert n_early < 0.7 * n_full
    oracle_full = [reference_beam_search(net, s, src_vocab, tgt_vocab, 20, "cpu", beam_size=3,
                                         early_stopping=False) for s in sentences]
    _assert_same(early, oracle_full)


def test_top_k_breaks_ties_by_index():
    """The selection equals a stable descending sort's first k, on rows full of ties (also of
    -inf, as dead beams give)."""
    g = torch.Generator().manual_seed(5)
    for n, k in [(12, 3), (7, 7), (30, 5), (9, 1)]:
        cand = torch.randint(0, 4, (40, n), generator=g).double()
        cand[torch.rand(40, n, generator=g) < 0.3] = -math.inf
        idx, val = _top_k(cand, k)
        for row, i_row, v_row in zip(cand.tolist(), idx.tolist(), val.tolist()):
            expected = sorted(range(n), key=lambda j: (-row[j], j))[:k]
            assert i_row == expected
            assert v_row == [row[j] for j in expected]
    with pytest.raises(RuntimeError, match="NaN"):
        _top_k(torch.tensor([[0.0, float("nan"), -1.0]]), 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_are_broken_like_the_reference(backend):
    """A decoder whose logits do not depend on its state (zero output weights, a bias with
    repeated values) makes running scores tie exactly, within and across beams: the batched
    search breaks the ties as the oracle does."""
    src_vocab, tgt_vocab = _vocabs()
    net = _net(src_vocab, tgt_vocab, 7)
    eos = tgt_vocab["<eos>"]
    with torch.no_grad():
        net.decoder.dense.weight.zero_()
        bias = torch.zeros(len(tgt_vocab))
        bias[[4, 6, 9, 12]] = 2.0
        bias[[5, 7]] = 1.0
        bias[eos] = 0.5
        net.decoder.dense.bias.copy_(bias)
    sentences = _sentences(5, 7)
    for k, alpha in [(3, 0.75), (5, 0.0), (2, 2.0)]:
        with seq2seq_ext.use_backend(backend):
            got = beam_search(net, sentences, src_vocab, tgt_vocab, 4, "cpu", beam_size=k,
                              alpha=alpha, return_scores=True)
            expected = [reference_beam_search(net, s, src_vocab, tgt_vocab, 4, "cpu",
                                              beam_size=k, alpha=alpha) for s in sentences]
        assert got == expected
        # every sentence gets the same translation: the most likely tokens (4, 6, 9, 12) tie,
        # and the lowest index wins every tie, for the full length (<eos> is less likely)
        assert {t for t, _ in got} == {" ".join([tgt_vocab.to_tokens(4)] * 4)}


# ----------------------------------------------------------------------------------------------
# brute force on a tiny vocabulary
# ----------------------------------------------------------------------------------------------

def _all_sequences(vocab_size, eos, num_steps):
    """Every target sequence the search can return: ``m < num_steps`` non-<eos> tokens then
    <eos>, or ``num_steps`` non-<eos> tokens."""
    words = [i for i in range(vocab_size) if i != eos]
    out = []
    for m in range(num_steps):
        out += [list(p) + [eos] for p in itertools.product(words, repeat=m)]
    out += [list(p) for p in itertools.product(words, repeat=num_steps)]
    return out


def _brute_force(net, sentence, src_vocab, tgt_vocab, num_steps, alpha):
    """Every sequence scored exactly as inference runs the decoder: fed one token at a time
    (all sequences of one length as one batch, no selection), ``sum(log p) / L**alpha``.
    Returns {tokens: score}. (A teacher-forced multi-step call would score something else: the
    chapter's decoder takes its context from the state it is given, which changes from step to
    step during prediction.)"""
    sums = _brute_force_sums(net, sentence, src_vocab, tgt_vocab, num_steps)
    return {seq: value / len(seq) ** alpha for seq, value in sums.items()}


def _brute_force_sums(net, sentence, src_vocab, tgt_vocab, num_steps):
    """{tokens: sum(log p)} of every sequence, as :func:`_brute_force` scores them."""
    bos, eos = tgt_vocab["<bos>"], tgt_vocab["<eos>"]
    by_len = collections.defaultdict(list)
    for s in _all_sequences(len(tgt_vocab), eos, num_steps):
        by_len[len(s)].append(s)
    scores = {}
    with torch.no_grad():
        src = src_vocab[sentence.lower().split(" ")] + [src_vocab["<eos>"]]
        valid_len = torch.tensor([len(src)])
        src = seq2seq_ext.truncate_pad(src, num_steps, src_vocab["<pad>"])
        enc_outputs = net.encoder(torch.tensor([src]), valid_len)
        state0 = net.decoder.init_state(enc_outputs, valid_len)
        for length, group in by_len.items():
            Y_true = torch.tensor(group)
            state = state0.repeat(1, len(group), 1)
            X = torch.full((len(group), 1), bos)
            total = torch.zeros(len(group), dtype=torch.float64)
            for t in range(length):
                Y, state = net.decoder(X, state)
                logp = torch.log_softmax(Y[:, 0], dim=-1).double()
                total += logp.gather(1, Y_true[:, t:t + 1])[:, 0]
                X = Y_true[:, t:t + 1]
            for seq, value in zip(group, total.tolist()):
                scores[tuple(seq)] = value
    return scores


def _words(tokens, tgt_vocab):
    tokens = list(tokens)
    if tokens and tokens[-1] == tgt_vocab["<eos>"]:
        tokens = tokens[:-1]
    return " ".join(tgt_vocab.to_tokens(tokens))


# (target words, num_steps, alpha, seed)
BRUTE = [
    (["a", "b", "c", "d"], 3, 0.75, 41),
    (["a", "b", "c"], 4, 0.75, 42),
    (["a", "b", "c", "d"], 3, 0.0, 43),
    (["a", "b", "c"], 4, 1.5, 44),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BRUTE, ids=[f"brute{i}" for i in range(len(BRUTE))])
def test_exhaustive_beam_finds_the_brute_force_best(backend, case):
    words, num_steps, alpha, seed = case
    src_vocab, tgt_vocab = _vocabs(words)
    V = len(tgt_vocab)
    net = _net(src_vocab, tgt_vocab, seed, embed=4, hidden=6, layers=2, spread=3.0)
    sentences = _sentences(6, seed)
    wide = (V - 1) ** (num_steps - 1) * V  # at least every step's number of extensions
    with seq2seq_ext.use_backend(backend):
        exhaustive = beam_search(net, sentences, src_vocab, tgt_vocab, num_steps, "cpu",
                                 beam_size=wide, alpha=alpha, return_scores=True)
        narrow = beam_search(net, sentences, src_vocab, tgt_vocab, num_steps, "cpu",
                             beam_size=2, alpha=alpha, return_scores=True)
        greedy = seq2seq_ext.predict_seq2seq_batch(net, sentences, src_vocab, tgt_vocab,
                                                   num_steps, "cpu")
        oracle = [reference_beam_search(net, s, src_vocab, tgt_vocab, num_steps, "cpu",
                                        beam_size=wide, alpha=alpha) for s in sentences[:2]]
        brute = [_brute_force(net, s, src_vocab, tgt_vocab, num_steps, alpha)
                 for s in sentences]
    _assert_same(exhaustive[:2], oracle)
    n_seqs = sum(1 for _ in _all_sequences(V, tgt_vocab["<eos>"], num_steps))
    beats_greedy = 0
    for (got, got_score), (nar, nar_score), gr, scores in zip(exhaustive, narrow, greedy, brute):
        assert len(scores) == n_seqs
        ranked = sorted(scores.items(), key=lambda kv: -kv[1])
        (best_seq, best_score), (_, second) = ranked[0], ranked[1]
        assert best_score - second > 1e-6  # a clear winner, so that the check below is exact
        assert got == _words(best_seq, tgt_vocab)
        assert math.isclose(got_score, best_score, rel_tol=1e-5, abs_tol=1e-6)
        # a narrow beam finds a candidate no better than the best, scored by the same rule
        nar_scores = [v for s, v in scores.items() if _words(s, tgt_vocab) == nar]
        assert any(math.isclose(nar_score, v, rel_tol=1e-5, abs_tol=1e-6) for v in nar_scores)
        assert nar_score <= best_score + 1e-6
        beats_greedy += got != gr
    assert beats_greedy >= 1  # the exhaustive search is not just the greedy path


# ----------------------------------------------------------------------------------------------
# a large alpha: L**alpha beyond the float range
# ----------------------------------------------------------------------------------------------

def _exact_score(total, length, alpha):
    """``total / length ** alpha`` in 60-digit decimal arithmetic, which has no float range."""
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        return decimal.Decimal(total) / decimal.Decimal(length) ** decimal.Decimal(alpha)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [1000.0, 2500.0])
def test_large_alpha_finds_the_exact_best(backend, alpha):
    """3**1000 and 2**2500 overflow a float: the exhaustive search still returns the sequence
    with the highest score computed exactly, and the batched search equals the oracle."""
    words, num_steps, seed = ["a", "b", "c"], 3, 42
    src_vocab, tgt_vocab = _vocabs(words)
    V = len(tgt_vocab)
    net = _net(src_vocab, tgt_vocab, seed, embed=4, hidden=6, layers=2, spread=3.0)
    sentences = _sentences(6, seed)
    wide = (V - 1) ** (num_steps - 1) * V
    with seq2seq_ext.use_backend(backend):
        exhaustive = beam_search(net, sentences, src_vocab, tgt_vocab, num_steps, "cpu",
                                 beam_size=wide, alpha=alpha, return_scores=True)
        narrow = beam_search(net, sentences, src_vocab, tgt_vocab, num_steps, "cpu",
                             beam_size=2, alpha=alpha, return_scores=True)
        oracle = [reference_beam_search(net, s, src_vocab, tgt_vocab, num_steps, "cpu",
                                        beam_size=2, alpha=alpha) for s in sentences]
        sums = [_brute_force_sums(net, s, src_vocab, tgt_vocab, num_steps) for s in sentences]
    _assert_same(narrow, oracle)
    for (got, got_score), by_seq in zip(exhaustive, sums):
        exact = sorted(((_exact_score(v, len(seq), alpha), seq) for seq, v in by_seq.items()),
                       reverse=True)
        (best, best_seq), (second, _) = exact[0], exact[1]
        assert best - second > abs(best) * decimal.Decimal("1e-9")  # a clear winner
        assert got == _words(best_seq, tgt_vocab)
        assert math.isclose(got_score, float(best), rel_tol=1e-9, abs_tol=1e-320)


def test_large_alpha_ranks_in_the_log_domain():
    """With 400 as alpha, L**alpha overflows a float from L = 6 and the scores of longer
    candidates underflow to 0: the search compares them in the log domain, where the longest
    candidates win (their scores are exactly the highest), instead of tying them all at 0; early
    stopping changes nothing, and the batched search equals the oracle."""
    src_vocab, tgt_vocab = _vocabs()
    net = _net(src_vocab, tgt_vocab, 32, eos_bias=1.0, spread=1.0)
    sentences = _sentences(10, 32)
    with torch.no_grad():
        early = _search_chunk(net, sentences, src_vocab, tgt_vocab, 10, "cpu", 3, 400.0)
        full = _search_chunk(net, sentences, src_vocab, tgt_vocab, 10, "cpu", 3, 400.0,
                             early_stopping=False)
    assert early == full
    oracle = [reference_beam_search(net, s, src_vocab, tgt_vocab, 10, "cpu", beam_size=3,
                                    alpha=400.0) for s in sentences]
    _assert_same(early, oracle)
    # every translation has 10 tokens (10 words, or 9 and <eos>)
    assert all(len(t.split()) >= 9 for t, _ in early)
    assert all(score <= 0 for _, score in early)
    # which is not what this model gives with the usual alpha
    usual = beam_search(net, sentences, src_vocab, tgt_vocab, 10, "cpu", beam_size=3)
    assert any(len(t.split()) < 9 for t in usual)


def test_log_domain_orders_scores_as_the_exact_quotient():
    """The comparison used where num_steps**alpha overflows orders (sum, length) pairs as their
    exact quotients do, across lengths too, and its scores are the quotients; below that, the
    comparison is the float quotient itself."""
    rng = random.Random(7)
    for alpha in (400.0, 1000.0, 2500.5):
        assert beam._log_domain(20, alpha)
        pairs = [(0.0, rng.randint(1, 20))]
        pairs += [(-10.0 ** rng.uniform(-300, 300), rng.randint(1, 20)) for _ in range(300)]
        keys = [beam._key(t, n, alpha, True) for t, n in pairs]
        exact = [_exact_score(t, n, alpha) for t, n in pairs]
        for (t, n), k, e in zip(pairs, keys, exact):
            assert math.isclose(beam._score(t, n, alpha), float(e), rel_tol=1e-9,
                                abs_tol=1e-320)
        compared = 0
        for i, j in itertools.combinations(range(len(pairs)), 2):
            a, b = exact[i], exact[j]
            if abs(a - b) > max(abs(a), abs(b)) * decimal.Decimal("1e-9"):
                assert (keys[i] > keys[j]) == (a > b), (pairs[i], pairs[j])
                compared += pairs[i][1] != pairs[j][1]
        assert compared > 10000  # pairs of different lengths
    for alpha in (0.0, 0.75, 1.5):
        assert not beam._log_domain(20, alpha)
        for t, n in [(-3.25, 7), (-1e-7, 20), (0.0, 3)]:
            assert beam._key(t, n, alpha, False) == beam._score(t, n, alpha) == t / n ** alpha


# ----------------------------------------------------------------------------------------------
# greedy, batching, decoder states
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [51, 52])
def test_beam_size_one_is_greedy(backend, seed):
    src_vocab, tgt_vocab = _vocabs()
    net = _net(src_vocab, tgt_vocab, seed, embed=6, hidden=11, layers=2, eos_bias=1.0)
    sentences = _sentences(25, seed)
    with seq2seq_ext.use_backend(backend):
        got = beam_search(net, sentences, src_vocab, tgt_vocab, 9, "cpu", beam_size=1,
                          alpha=0.75, batch_size=7)
        greedy = seq2seq_ext.predict_seq2seq_batch(net, sentences, src_vocab, tgt_vocab, 9,
                                                   "cpu")
    assert got == greedy
    assert len(set(greedy)) >= 5


def test_batch_size_does_not_change_results():
    src_vocab, tgt_vocab = _vocabs()
    net = _net(src_vocab, tgt_vocab, 61, embed=7, hidden=12, layers=2, eos_bias=1.0)
    sentences = _sentences(17, 61)
    runs = [beam_search(net, sentences, src_vocab, tgt_vocab, 8, "cpu", beam_size=4,
                        batch_size=b, return_scores=True) for b in (1, 5, 1000)]
    for other in runs[1:]:
        _assert_same(other, runs[0])
    assert beam_search(net, sentences[:1], src_vocab, tgt_vocab, 8, "cpu",
                       beam_size=4) == [runs[0][0][0]]
    assert beam_search(net, [], src_vocab, tgt_vocab, 8, "cpu") == []


class _LSTMContextDecoder(seq2seq_ext.Decoder):
    """A decoder whose state is nested: ``((h, c), context)`` (or the same with lists), h and c
    of shape (layers, batch, hidden), context (batch, hidden) the encoder's final top-layer
    state, concatenated to every input (the fixed-context rule)."""

    def __init__(self, vocab_size, embed_size, num_hiddens, num_layers, as_list=False):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.rnn = nn.LSTM(embed_size + num_hiddens, num_hiddens, num_layers)
        self.dense = nn.Linear(num_hiddens, vocab_size)
        self.as_list = as_list

    def _pack(self, h, c, context):
        return [[h, c], context] if self.as_list else ((h, c), context)

    def init_state(self, enc_outputs, *args):
        h = enc_outputs[1]
        return self._pack(h, torch.zeros_like(h), h[-1])

    def forward(self, X, state):
        (h, c), context = state
        X = self.embedding(X).permute(1, 0, 2)
        X = torch.cat((X, context.repeat(X.shape[0], 1, 1)), 2)
        output, (h, c) = self.rnn(X, (h, c))
        return self.dense(output).permute(1, 0, 2), self._pack(h, c, context)


@pytest.mark.parametrize("as_list", [False, True])
def test_nested_tuple_state_decoder(as_list):
    src_vocab, tgt_vocab = _vocabs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(71)
        encoder = seq2seq_ext.Seq2SeqEncoder(len(src_vocab), 5, 8, 2)
        decoder = _LSTMContextDecoder(len(tgt_vocab), 5, 8, 2, as_list=as_list)
        with torch.no_grad():
            for p in itertools.chain(encoder.rnn.parameters(), decoder.rnn.parameters()):
                p.uniform_(-0.9, 0.9)
            decoder.dense.weight.mul_(3)
    net = seq2seq_ext.EncoderDecoder(encoder, decoder).eval()
    sentences = _sentences(8, 71)
    got = beam_search(net, sentences, src_vocab, tgt_vocab, 7, "cpu", beam_size=3,
                      batch_size=4, return_scores=True)
    expected = [reference_beam_search(net, s, src_vocab, tgt_vocab, 7, "cpu", beam_size=3)
                for s in sentences]
    _assert_same(got, expected)
    greedy = [reference.predict_seq2seq(net, s, src_vocab, tgt_vocab, 7, "cpu")[0]
              for s in sentences]
    assert beam_search(net, sentences, src_vocab, tgt_vocab, 7, "cpu", beam_size=1) == greedy
    assert any(t != g for (t, _), g in zip(got, greedy))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell, fixed_context", [("gru", True), ("lstm", False), ("lstm", True)])
def test_package_decoder_variants(backend, cell, fixed_context):
    """The package's other decoders (LSTM state (h, c); fixed context (rnn_state, context))."""
    src_vocab, tgt_vocab = _vocabs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        encoder = seq2seq_ext.Seq2SeqEncoder(len(src_vocab), 5, 8, 2, cell=cell)
        decoder = seq2seq_ext.Seq2SeqDecoder(len(tgt_vocab), 5, 8, 2, cell=cell,
                                             fixed_context=fixed_context)
        with torch.no_grad():
            for p in itertools.chain(encoder.rnn.parameters(), decoder.rnn.parameters()):
                p.uniform_(-0.9, 0.9)
            decoder.dense.weight.mul_(3)
    net = seq2seq_ext.EncoderDecoder(encoder, decoder).eval()
    sentences = _sentences(8, 3)
    with seq2seq_ext.use_backend(backend):
        got = beam_search(net, sentences, src_vocab, tgt_vocab, 7, "cpu", beam_size=3,
                          batch_size=5, return_scores=True)
        expected = [reference_beam_search(net, s, src_vocab, tgt_vocab, 7, "cpu", beam_size=3)
                    for s in sentences]
        greedy = seq2seq_ext.predict_seq2seq_batch(net, sentences, src_vocab, tgt_vocab, 7,
                                                   "cpu")
        assert beam_search(net, sentences, src_vocab, tgt_vocab, 7, "cpu",
                           beam_size=1) == greedy
    _assert_same(got, expected)
    assert any(t != g for (t, _), g in zip(got, greedy))


Pair = collections.namedtuple("Pair", "rnn context")


def test_select_rows():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 4, 5, generator=g)
    c = torch.randn(3, 4, 5, generator=g)
    ctx = torch.randn(4, 5, generator=g)
    lens = torch.tensor([3, 1, 4, 2])
    index = torch.tensor([2, 2, 0, 3, 1])
    assert torch.equal(select_rows(h, index), h[:, index])
    out = select_rows(((h, c), [ctx, lens], None), index)
    assert type(out) is tuple and type(out[0]) is tuple and type(out[1]) is list
    assert torch.equal(out[0][0], h[:, index]) and torch.equal(out[0][1], c[:, index])
    assert torch.equal(out[1][0], ctx[index]) and torch.equal(out[1][1], lens[index])
    assert out[2] is None
    named = select_rows(Pair(h, ctx), [1, 0])
    assert type(named) is Pair
    assert torch.equal(named.rnn, h[:, [1, 0]]) and torch.equal(named.context, ctx[[1, 0]])
    with pytest.raises(ValueError, match="state"):
        select_rows(torch.zeros(1, 2, 3, 4), index)
    with pytest.raises(TypeError, match="state"):
        select_rows({"h": h}, index)
    with pytest.raises(ValueError, match="index"):
        select_rows(h, torch.tensor([[0, 1]]))


# ----------------------------------------------------------------------------------------------
# a trained model
# ----------------------------------------------------------------------------------------------

def test_trained_model_matches_reference():
    """On a model trained briefly on number names the scores are peaked (a non-random
    distribution): the batched search still equals the oracle and greedy decoding."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(81)
        train_iter, src_vocab, tgt_vocab, held_out = seq2seq_ext.load_data_numbers(
            32, 8, num_held_out=20, stop=200)
        net = seq2seq_ext.EncoderDecoder(
            seq2seq_ext.Seq2SeqEncoder(len(src_vocab), 16, 24, 2),
            seq2seq_ext.Seq2SeqDecoder(len(tgt_vocab), 16, 24, 2))
        losses = []
        fit(net, train_iter, 0.01, 10, tgt_vocab, "cpu", plot=False,
            on_epoch=lambda epoch, loss, speed: losses.append(loss))
    assert losses[-1] < 0.7 * losses[0]  # it learned something
    sentences = [en for en, _ in held_out]
    got = beam_search(net, sentences, src_vocab, tgt_vocab, 8, "cpu", beam_size=4,
                      return_scores=True)
    expected = [reference_beam_search(net, s, src_vocab, tgt_vocab, 8, "cpu", beam_size=4)
                for s in sentences]
    _assert_same(got, expected, rtol=1e-5)
    assert beam_search(net, sentences, src_vocab, tgt_vocab, 8, "cpu", beam_size=1) == \
        seq2seq_ext.predict_seq2seq_batch(net, sentences, src_vocab, tgt_vocab, 8, "cpu")
    assert len({t for t, _ in got}) >= 5


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, name", [
    (dict(beam_size=0), ValueError, "beam_size"),
    (dict(beam_size=-2), ValueError, "beam_size"),
    (dict(beam_size=2.5), TypeError, "beam_size"),
    (dict(beam_size=True), TypeError, "beam_size"),
    (dict(alpha=-0.1), ValueError, "alpha"),
    (dict(alpha=float("nan")), ValueError, "alpha"),
    (dict(alpha=1.7e308), ValueError, "alpha"),  # alpha * log(L) would leave the float range
    (dict(alpha="0.75"), TypeError, "alpha"),
    (dict(num_steps=0), ValueError, "num_steps"),
    (dict(num_steps=3.0), TypeError, "num_steps"),
    (dict(num_steps=2 ** 62), ValueError, "num_steps"),
    (dict(num_steps=2 ** 64), ValueError, "num_steps"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(src_sentences="go ."), TypeError, "src_sentences"),
    (dict(src_sentences=["go .", 3]), TypeError, r"src_sentences\[1\]"),
    (dict(src_sentences={"go ."}), TypeError, "src_sentences"),
])
def test_argument_errors(kwargs, error, name):
    src_vocab, tgt_vocab = _vocabs()
    net = _net(src_vocab, tgt_vocab, 91)
    args = dict(net=net, src_sentences=["go ."], src_vocab=src_vocab, tgt_vocab=tgt_vocab,
                num_steps=5, device="cpu")
    args.update(kwargs)
    with pytest.raises(error, match=name):
        beam_search(**args)
    ref_args = {("src_sentence" if k == "src_sentences" else k): v for k, v in args.items()
                if k != "batch_size"}
    if "src_sentences" not in kwargs and "batch_size" not in kwargs:
        ref_args["src_sentence"] = "go ."
        with pytest.raises(error, match=name):
            reference_beam_search(**ref_args)
    with pytest.raises(TypeError, match="src_sentence"):
        reference_beam_search(net, ["go ."], src_vocab, tgt_vocab, 5, "cpu")
