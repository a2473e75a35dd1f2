"""The one way into decoding: ``models.decode_path`` chooses the path of a decode step
("stepper", "op" or "torch"), the decoder's ``step`` and ``greedy`` take the path it chooses and
equal the reference, for every variant, dtype, grad mode, training with dropout and backend;
the per-token call's shortcut never takes a call the chooser would not send to the stepper; and
predict_seq2seq / predict_seq2seq_batch / beam_search equal the reference for the reference
model, a user's subclass of the decoder with its own forward and the package's decoders."""
import contextlib
import itertools

import pytest
import torch
from torch import nn

import seq2seq_ext
from seq2seq_ext import _fastcall, models, ops, reference
from seq2seq_ext.beam import beam_search, reference_beam_search, select_rows

from helpers import decode_tol, seeded_randint, toy_vocabs

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = list(itertools.product(["gru", "lstm"], [False, True]))
VARIANT_IDS = [f"{c}-{'fixed' if f else 'chapter'}" for c, f in VARIANTS]


class _FunctionMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _decoder(cell, fixed, dtype=torch.float32, dropout=0.0, seed=0, vocab=13):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dec = seq2seq_ext.Seq2SeqDecoder(vocab, 5, 8, 2, dropout, cell=cell, fixed_context=fixed)
        with torch.no_grad():
            for p in dec.rnn.parameters():
                p.uniform_(-0.8, 0.8)
            dec.dense.weight.mul_(3.0)
    return dec.to(dtype).eval()


def _reference(dec):
    """The same weights in reference.py's plain PyTorch variant decoder."""
    ref = reference.VariantSeq2SeqDecoder(dec.embedding.num_embeddings,
                                          dec.embedding.embedding_dim, dec.rnn.hidden_size,
                                          dec.rnn.num_layers, dec.rnn.dropout, cell=dec.cell,
                                          fixed_context=dec.fixed_context)
    ref.load_state_dict(dec.state_dict())
    return ref.to(next(dec.parameters()).dtype).train(dec.training)


def _state(dec, batch, seed, dtype):
    """An init_state result from a random encoder state."""
    g = torch.Generator().manual_seed(seed)
    shape = (dec.rnn.num_layers, batch, dec.rnn.hidden_size)
    h = (torch.rand(shape, generator=g, dtype=torch.float64) * 1.6 - 0.8).to(dtype)
    c = (torch.rand(shape, generator=g, dtype=torch.float64) * 1.6 - 0.8).to(dtype)
    return dec.init_state((None, (h, c) if dec.cell == "lstm" else h))


class _PathSpy:
    """Which path the decoder took: calls of the bound stepper (from Python, or from
    predict_seq2seq's direct path in one call: ``_fastcall.translate_ids``) and of the decode
    ops."""

    def __init__(self, monkeypatch):
        self.taken = []
        bind = models.decoder_stepper
        for name in ("gru_decode_step", "lstm_decode_step", "greedy_decode"):
            monkeypatch.setattr(ops, name, self._wrap(getattr(ops, name), "op"))
        monkeypatch.setattr(models, "decoder_stepper", lambda d: _Recorder(bind(d), self))
        monkeypatch.setattr(_fastcall, "translate_ids",
                            self._wrap(_fastcall.translate_ids, "stepper"))

    def _wrap(self, fn, path):
        def spy(*args, **kwargs):
            self.taken.append(path)
            return fn(*args, **kwargs)
        return spy

    def paths(self):
        out = set(self.taken)
        self.taken.clear()
        return out or {"torch"}


class _Recorder:
    def __init__(self, stepper, spy):
        self._stepper, self._spy = stepper, spy

    def __getattr__(self, name):
        attr = getattr(self._stepper, name)
        if name in ("step", "step_with_context", "lstm_step", "greedy"):
            return self._spy._wrap(attr, "stepper")
        return attr


def _reference_greedy(ref, state, bos, eos, num_steps):
    """The chapter's loop, one row at a time (batch 1, one .item() per token)."""
    tokens, lengths = [], []
    rows = next(t for t in models._nested_tensors(state))
    for b in range((rows.shape[1] if rows.dim() == 3 else rows.shape[0])):
        s, x, out = select_rows(state, [b]), torch.tensor([[bos]]), []
        with torch.no_grad():
            for _ in range(num_steps):
                Y, s = ref(x, s)
                x = Y.argmax(dim=2)
                if x.item() == eos:
                    break
                out.append(x.item())
        lengths.append(len(out))
        tokens.append(out + [eos] * (num_steps - len(out)))
    return tokens, lengths


def _assert_state_close(got, want, tol):
    got, want = list(models._nested_tensors(got)), list(models._nested_tensors(want))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


# each mode: (expected path, decoder in training with dropout, backend, context)
MODES = {
    "inference": ("stepper", False, "ext", contextlib.nullcontext),
    "grad": ("torch", False, "ext", contextlib.nullcontext),
    "training-dropout": ("torch", True, "ext", contextlib.nullcontext),
    "reference-backend": ("torch", False, "reference", contextlib.nullcontext),
    "function-mode": ("op", False, "ext", _FunctionMode),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cell,fixed", VARIANTS, ids=VARIANT_IDS)
def test_decode_path_and_step_equal_reference(cell, fixed, dtype, mode, monkeypatch):
    expected, dropout_training, backend, ctx = MODES[mode]
    dec = _decoder(cell, fixed, dtype, dropout=0.3 if dropout_training else 0.0, seed=1)
    if dropout_training:
        dec.train()
    ref = _reference(dec)
    state = _state(dec, 4, seed=2, dtype=dtype)
    token = seeded_randint(13, (4, 1), 3)
    spy = _PathSpy(monkeypatch)
    tol = decode_tol(dtype)
    with seq2seq_ext.use_backend(backend), ctx():
        grad = mode == "grad"
        with torch.set_grad_enabled(grad):
            assert models.decode_path(dec, state) == expected
            assert models.decode_path(dec) == expected  # the parameters stand for the state
        # forward on one step takes the chosen path
        with torch.random.fork_rng(devices=[]), torch.set_grad_enabled(grad):
            torch.manual_seed(4)
            Y, new_state = dec(token, state)
        assert spy.paths() == {expected}
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(4)
            Y_ref, state_ref = ref(token, state)
        torch.testing.assert_close(Y, Y_ref, **tol)
        _assert_state_close(new_state, state_ref, tol)
        assert Y.requires_grad == grad
        # step: no gradient, so the chooser's rule without grad mode
        with torch.no_grad():
            step_path = models.decode_path(dec, state)
        assert step_path == ("stepper" if mode == "grad" else expected)
        for tok in (token, token[:, 0]):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(4)
                logits, new_state = dec.step(tok, state)
            assert spy.paths() == {step_path}
            assert not logits.requires_grad
            torch.testing.assert_close(logits, Y_ref if tok.dim() == 2 else Y_ref[:, 0], **tol)
            _assert_state_close(new_state, state_ref, tol)
        # greedy: the chapter's loop row by row (with dropout, the model in evaluation mode)
        if dropout_training:
            dec.eval()
            ref.eval()
        with torch.no_grad():
            greedy_path = models.decode_path(dec, state)
        eos, num_steps = 2, 7
        tokens, lengths = dec.greedy(state, 1, eos, num_steps)
        # the GRU decoder's loop is one call; the LSTM decoder's, one step per token
        assert spy.paths() == {greedy_path}
        want_tokens, want_lengths = _reference_greedy(ref, state, 1, eos, num_steps)
        assert tokens.tolist() == want_tokens and lengths.tolist() == want_lengths
        assert tokens.dtype == lengths.dtype == torch.int64


def test_greedy_ends_rows_at_eos_and_keeps_the_op_format():
    """greedy's step loop (the LSTM decoder) gives the fused loop's format: eos at and after a
    row's end, lengths before the first eos, num_steps columns even when it stops early."""
    dec = _decoder("lstm", False, seed=5)
    state = _state(dec, 6, seed=6, dtype=torch.float32)
    free = dec.greedy(state, 1, -1, 9)[0]  # no eos: every row runs to the end
    assert free.shape == (6, 9)
    eos = free[0, 3].item()
    tokens, lengths = dec.greedy(state, 1, eos, 9)
    for row, n, f in zip(tokens.tolist(), lengths.tolist(), free.tolist()):
        n_want = f.index(eos) if eos in f else 9
        assert n == n_want and row[:n] == f[:n] and row[n:] == [eos] * (9 - n)
    tokens, lengths = dec.greedy(state, 1, eos, 0)
    assert tokens.shape == (6, 0) and lengths.tolist() == [0] * 6


# ----------------------------------------------------------------------------------------------
# the chooser's other rules
# ----------------------------------------------------------------------------------------------

class _OwnForward(seq2seq_ext.Seq2SeqDecoder):
    """A user's decoder: the package's, with a forward of its own (a bias on one token)."""

    calls = 0

    def forward(self, X, state):
        type(self).calls += 1
        Y, state = super().forward(X, state)
        return Y + self.bonus, state

    bonus = 0.0


class _Inherits(seq2seq_ext.Seq2SeqDecoder):
    """A subclass that keeps the package's forward."""


def test_decode_path_rules():
    state = _state(_decoder("gru", False), 3, seed=7, dtype=torch.float32)
    with torch.no_grad():
        dec = _decoder("gru", False)
        assert models.decode_path(dec, state) == "stepper"
        # not this package's decoder, or a forward of its own
        assert models.decode_path(reference.Seq2SeqDecoder(13, 5, 8, 2), state) == "torch"
        assert models.decode_path(None, state) == "torch"
        own = _OwnForward(13, 5, 8, 2).eval()
        assert models.decode_path(own, state) == "torch"
        assert type(own).__call__ is nn.Module.__call__  # no shortcut past its forward
        assert models.decode_path(_Inherits(13, 5, 8, 2).eval(), state) == "stepper"
        # the cell's module is not a plain nn.GRU
        odd = _decoder("gru", False)
        odd.rnn = nn.GRU(13, 8, 2, batch_first=True)
        assert models.decode_path(odd, state) == "torch"
        # the state: another format, dtype or device, mixed dtypes
        assert models.decode_path(dec, (state, state[-1])) == "torch"
        assert models.decode_path(dec, state.half()) == "torch"
        assert models.decode_path(dec, state.to("meta")) == "torch"  # no kernel there
        fixed = _decoder("gru", True)
        rnn_state, context = _state(fixed, 3, seed=7, dtype=torch.float32)
        assert models.decode_path(fixed, (rnn_state, context)) == "stepper"
        assert models.decode_path(fixed, (rnn_state, context.double())) == "torch"
        assert models.decode_path(fixed, rnn_state) == "torch"
        lstm = _decoder("lstm", False)
        h, c = _state(lstm, 3, seed=7, dtype=torch.float32)
        assert models.decode_path(lstm, (h, c)) == "stepper"
        assert models.decode_path(lstm, h) == "torch"
        # training without dropout is no reason to leave the fused path
        assert models.decode_path(_decoder("gru", False).train(), state) == "stepper"
        # an output layer without bias: the modules (the step ops take a bias)
        assert models.supports_fused_decoding(_decoder("gru", False))
        assert models.supports_fused_decoding(reference.Seq2SeqDecoder(13, 5, 8, 2))
        assert not models.supports_fused_decoding(lstm)
        for cell, s in (("gru", state), ("lstm", (h, c))):
            unbiased = _decoder(cell, False)
            unbiased.dense = nn.Linear(8, 13, bias=False)
            assert models.decode_path(unbiased, s) == "torch"
            assert not models.supports_fused_decoding(unbiased)
            tokens = torch.tensor([[3], [4], [5]])
            with seq2seq_ext.use_backend("reference"):
                want = unbiased(tokens, s)[0]
            torch.testing.assert_close(unbiased(tokens, s)[0], want)
    # grad mode: nothing requires grad (the registered op, which autograd sees), then the state
    dec.requires_grad_(False)
    assert models.decode_path(dec, state) == "op"
    assert models.decode_path(dec, state.requires_grad_()) == "torch"
    with _FunctionMode():
        assert models.decode_path(dec, state.detach()) == "op"


def test_shortcut_takes_only_what_decode_path_sends_to_the_stepper(monkeypatch):
    """Seq2SeqDecoder.__call__'s shortcut (seq2seq_ext._fastcall) against the chooser: for calls
    under each condition, whenever the shortcut stepped, decode_path said "stepper"."""
    dec = _decoder("gru", False, dropout=0.2)
    state = _state(dec, 2, seed=8, dtype=torch.float32)
    token = seeded_randint(13, (2, 1), 8)
    with torch.no_grad():
        Y_ref, _ = _reference(dec)(token, state)
        dec(token, state)  # binds the weights (any module made later would rebind them)
    gen, stepper, *rest = dec.__dict__[_fastcall.STEPPER_ATTR]
    stepped = []

    class Watch:
        def try_step(self, *args):
            out = stepper.try_step(*args)
            stepped.append(out is not None)
            return out

        def __getattr__(self, name):
            return getattr(stepper, name)

    dec.__dict__[_fastcall.STEPPER_ATTR] = (gen, Watch(), *rest)
    conditions = {
        "inference": (contextlib.nullcontext, True),
        "grad": (torch.enable_grad, False),
        "reference": (lambda: seq2seq_ext.use_backend("reference"), False),
        "function-mode": (_FunctionMode, False),
        "training-dropout": (lambda: _Train(dec), False),
        "hook": (lambda: _Hook(dec), False),
        "hook-on-rnn": (lambda: _Hook(dec.rnn), False),
        "hook-on-dense": (lambda: _Hook(dec.dense), False),
        "hook-on-embedding": (lambda: _Hook(dec.embedding), False),
    }
    for name, (ctx, shortcut) in conditions.items():
        stepped.clear()
        with torch.no_grad(), ctx():
            out = dec(token, state)
            path = models.decode_path(dec, state)
        assert any(stepped) == shortcut, name
        if any(stepped):
            assert path == "stepper", name
        if name != "training-dropout":
            torch.testing.assert_close(out[0].detach(), Y_ref, **decode_tol(torch.float32))


class _Train(contextlib.AbstractContextManager):
    def __init__(self, dec):
        self.dec = dec.train()

    def __exit__(self, *exc):
        self.dec.eval()


class _Hook(contextlib.AbstractContextManager):
    def __init__(self, module):
        self.handle = module.register_forward_pre_hook(lambda mod, args: None)

    def __exit__(self, *exc):
        self.handle.remove()


# ----------------------------------------------------------------------------------------------
# decoding.py and beam.py: the reference model, a user's decoder, the package's decoders
# ----------------------------------------------------------------------------------------------

def _net(decoder_cls, cell="gru", fixed=False, seed=11, **dec_kwargs):
    src_vocab, tgt_vocab = toy_vocabs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if decoder_cls is reference.Seq2SeqDecoder:
            enc = reference.Seq2SeqEncoder(len(src_vocab), 8, 16, 2)
            dec = decoder_cls(len(tgt_vocab), 8, 16, 2)
        else:
            enc = seq2seq_ext.Seq2SeqEncoder(len(src_vocab), 8, 16, 2, cell=cell)
            dec = decoder_cls(len(tgt_vocab), 8, 16, 2, cell=cell, fixed_context=fixed,
                              **dec_kwargs)
        with torch.no_grad():
            for p in list(enc.rnn.parameters()) + list(dec.rnn.parameters()):
                p.uniform_(-0.5, 0.5)
            dec.dense.weight.mul_(3.0)
            dec.dense.bias[tgt_vocab["<eos>"]] += 0.5
    return reference.EncoderDecoder(enc, dec).eval(), src_vocab, tgt_vocab


def _oracle(net):
    """The same weights in reference.py's classes (its variant classes for the variants)."""
    dec = net.decoder
    src, tgt = net.encoder.embedding.num_embeddings, dec.embedding.num_embeddings
    if dec.cell == "gru" and not dec.fixed_context:
        r_enc, r_dec = reference.Seq2SeqEncoder(src, 8, 16, 2), reference.Seq2SeqDecoder(
            tgt, 8, 16, 2)
    else:
        r_enc = reference.VariantSeq2SeqEncoder(src, 8, 16, 2, cell=dec.cell)
        r_dec = reference.VariantSeq2SeqDecoder(tgt, 8, 16, 2, cell=dec.cell,
                                                fixed_context=dec.fixed_context)
    ref = reference.EncoderDecoder(r_enc, r_dec)
    ref.load_state_dict(net.state_dict())
    return ref.eval()


SENTENCES = ["go .", "i lost .", "he's calm .", "i'm home .", "who ? who ?", "wow ! help",
             "we try", "stop . wait ."]


@pytest.mark.parametrize("kind", ["reference", "own-forward", "gru", "gru-fixed", "lstm",
                                  "lstm-fixed"])
def test_decoding_and_beam_equal_the_reference(kind, monkeypatch):
    if kind == "reference":
        net, src_vocab, tgt_vocab = _net(reference.Seq2SeqDecoder)
    elif kind == "own-forward":
        net, src_vocab, tgt_vocab = _net(_OwnForward)
        net.decoder.bonus = torch.zeros(25)
        net.decoder.bonus[tgt_vocab["<eos>"]] = -0.3  # its forward changes the translations
    else:
        cell, _, fixed = kind.partition("-")
        net, src_vocab, tgt_vocab = _net(seq2seq_ext.Seq2SeqDecoder, cell, bool(fixed))
    # the oracle: the chapter's loop on the same model, or on reference.py's classes
    oracle = net if kind in ("reference", "own-forward") else _oracle(net)
    want = [reference.predict_seq2seq(oracle, s, src_vocab, tgt_vocab, 8, "cpu")
            for s in SENTENCES]
    assert len({w for w, _ in want}) >= 4
    if kind == "own-forward":
        with torch.no_grad():  # the bonus matters: without it other translations
            saved, net.decoder.bonus = net.decoder.bonus, 0.0
            plain = [reference.predict_seq2seq(net, s, src_vocab, tgt_vocab, 8, "cpu")[0]
                     for s in SENTENCES]
            net.decoder.bonus = saved
        assert plain != [w for w, _ in want]
    spy = _PathSpy(monkeypatch)
    _OwnForward.calls = 0
    got = [seq2seq_ext.predict_seq2seq(net, s, src_vocab, tgt_vocab, 8, "cpu") for s in SENTENCES]
    assert got == want
    fused = kind not in ("reference", "own-forward")
    assert spy.paths() == ({"stepper"} if fused else {"torch"})
    assert (_OwnForward.calls > 0) == (kind == "own-forward")
    batch = seq2seq_ext.predict_seq2seq_batch(net, SENTENCES, src_vocab, tgt_vocab, 8, "cpu",
                                              batch_size=3)
    assert batch == [w for w, _ in want]
    # beam search: the batched search against the plain one, and greedy at beam size 1
    beams = beam_search(net, SENTENCES, src_vocab, tgt_vocab, 8, "cpu", beam_size=3,
                        return_scores=True)
    for (text, score), s in zip(beams, SENTENCES):
        r_text, r_score = reference_beam_search(oracle, s, src_vocab, tgt_vocab, 8, "cpu",
                                                beam_size=3)
        assert text == r_text
        assert score == pytest.approx(r_score, rel=1e-5, abs=1e-6)
    assert beam_search(net, SENTENCES, src_vocab, tgt_vocab, 8, "cpu",
                       beam_size=1) == [w for w, _ in want]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_greedy_arguments_are_checked_by_name(cell):
    dec = _decoder(cell, False)
    state = _state(dec, 1, seed=3, dtype=torch.float32)
    for args, error, name in [((1.7, 2, 5), TypeError, "bos"), ((1, 2.0, 5), TypeError, "eos"),
                              ((1, 2, -2), ValueError, "num_steps"),
                              ((1, 2, torch.tensor([2, 3])), TypeError, "num_steps")]:
        with pytest.raises(error, match=name):
            dec.greedy(state, *args)
    tokens, _ = dec.greedy(state, 1, 2, torch.tensor(3))
    assert tokens.shape == (1, 3)
