"""``predict_seq2seq`` and ``predict_seq2seq_batch`` against the chapter's
``reference.predict_seq2seq``: equal translations, through the fused greedy loop (the
``greedy_decode`` op, or the bound stepper on the CPU) and, under the reference backend,
without it."""
import contextlib
import random

import pytest
import torch

import seq2seq_ext
from seq2seq_ext import ops, reference

from helpers import SRC_WORDS, GreedySpy, Spy, devices, reference_copy, toy_vocabs as _vocabs

DEVICES = devices()


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
    spy = Spy(ops.greedy_decode)
    monkeypatch.setattr(ops, "greedy_decode", spy)
    with seq2seq_ext.use_backend("reference"):
        got = [seq2seq_ext.predict_seq2seq(net, s, src_vocab, tgt_vocab, 6, "cpu")
               for s in ("go .", "i lost .")]
    assert spy.calls == 0
    assert got == [reference.predict_seq2seq(ref, s, src_vocab, tgt_vocab, 6, "cpu")
                   for s in ("go .", "i lost .")]


@pytest.mark.parametrize("call, name, exc", [
    (lambda n, s, t: seq2seq_ext.predict_seq2seq(n, "one two", s, t, 2.5, "cpu"),
     "num_steps", TypeError),
    (lambda n, s, t: seq2seq_ext.predict_seq2seq(n, "one two", s, t, -1, "cpu"),
     "num_steps", ValueError),
    (lambda n, s, t: seq2seq_ext.predict_seq2seq(n, ["one"], s, t, 5, "cpu"),
     "src_sentence", TypeError),
    (lambda n, s, t: seq2seq_ext.predict_seq2seq_batch(n, ["one"], s, t, 2.5, "cpu"),
     "num_steps", TypeError),
    (lambda n, s, t: seq2seq_ext.predict_seq2seq_batch(n, ["one"], s, t, 5, "cpu",
                                                       batch_size="8"),
     "batch_size", TypeError),
    (lambda n, s, t: seq2seq_ext.predict_seq2seq_batch(n, ["one"], s, t, 5, "cpu",
                                                       batch_size=0),
     "batch_size", ValueError),
    (lambda n, s, t: seq2seq_ext.predict_seq2seq_batch(n, ["one", 3], s, t, 5, "cpu"),
     r"src_sentences\[1\]", TypeError),
])
def test_bad_arguments_name_the_argument(call, name, exc):
    src_vocab, tgt_vocab = _vocabs()
    net, _ = _nets(src_vocab, tgt_vocab, torch.float32, seed=5)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(exc, match=f"^{name}"):
        call(net, src_vocab, tgt_vocab)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


@pytest.mark.parametrize("backend", ["ext", "reference"])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("num_steps", [0, -1, 2 ** 62, 2 ** 64])
def test_num_steps_is_refused_on_every_path(cell, backend, num_steps):
    """A num_steps below 1, or one whose padded source cannot be built, gets a ValueError naming
    it on every path (the GRU model's shortcut and greedy loop, with bfloat16 weights too, the
    LSTM model's steps, the chapter's loop of the reference backend), as beam_search does; the
    weights are unchanged."""
    src_vocab, tgt_vocab = _vocabs()
    torch.manual_seed(6)
    net = seq2seq_ext.EncoderDecoder(
        seq2seq_ext.Seq2SeqEncoder(len(src_vocab), 8, 16, 2, cell=cell),
        seq2seq_ext.Seq2SeqDecoder(len(tgt_vocab), 8, 16, 2, cell=cell)).eval()
    before = [p.detach().clone() for p in net.parameters()]
    calls = [
        lambda: seq2seq_ext.predict_seq2seq(net, "go .", src_vocab, tgt_vocab, num_steps, "cpu"),
        lambda: seq2seq_ext.predict_seq2seq_batch(net, ["go .", "i lost ."], src_vocab,
                                                  tgt_vocab, num_steps, "cpu"),
        lambda: seq2seq_ext.beam_search(net, ["go ."], src_vocab, tgt_vocab, num_steps, "cpu"),
    ]
    if cell == "gru" and backend == "ext":
        calls.append(lambda: seq2seq_ext.predict_seq2seq(
            net, "go .", src_vocab, tgt_vocab, num_steps, "cpu", weight_dtype=torch.bfloat16))
    with seq2seq_ext.use_backend(backend):
        for call in calls:
            with pytest.raises(ValueError, match="^num_steps"):
                call()
        # and 1 is a valid number of steps on each of them
        assert seq2seq_ext.predict_seq2seq_batch(net, ["go ."], src_vocab, tgt_vocab, 1,
                                                 "cpu")[0] == seq2seq_ext.predict_seq2seq(
            net, "go .", src_vocab, tgt_vocab, 1, "cpu")[0]
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_hooks_on_the_decoder_run_at_every_step_of_prediction(kind, monkeypatch):
    """A hook on the decoder changes what it predicts; the fused greedy loop does not call the
    module, so a hooked decoder is decoded by one-step module calls, as the reference's loop."""
    src_vocab, tgt_vocab = _vocabs()
    net, ref = _nets(src_vocab, tgt_vocab, torch.float32, seed=22, eos_bias=0.4)
    favour = tgt_vocab["<unk>"]

    def forward_hook(mod, args, out):
        Y, state = out
        return Y + 3.0 * torch.nn.functional.one_hot(Y.argsort(-1)[..., -2], Y.shape[-1]), state

    def pre_hook(mod, args):
        X, state = args
        return torch.full_like(X, favour), state
    for model in (net, ref):
        if kind == "forward":
            model.decoder.register_forward_hook(forward_hook)
        else:
            model.decoder.register_forward_pre_hook(pre_hook)
    spy = GreedySpy(monkeypatch)
    for sentence in ["go .", "i lost .", "he's calm ."] + _sentences(5, seed=3):
        expected = reference.predict_seq2seq(ref, sentence, src_vocab, tgt_vocab, 10, "cpu")
        assert seq2seq_ext.predict_seq2seq(net, sentence, src_vocab, tgt_vocab, 10,
                                           "cpu") == expected, sentence
    assert seq2seq_ext.predict_seq2seq_batch(net, ["go .", "i lost ."], src_vocab, tgt_vocab,
                                             10, "cpu") == [
        reference.predict_seq2seq(ref, s, src_vocab, tgt_vocab, 10, "cpu")[0]
        for s in ["go .", "i lost ."]]
    assert spy.stepper_calls == 0


def test_prediction_puts_every_submodule_in_evaluation_mode():
    """The chapter's ``net.eval()`` reaches every submodule: a decoder left in training mode
    (its dropout active) inside an evaluated model is switched too, as the reference does."""
    src_vocab, tgt_vocab = _vocabs()
    torch.manual_seed(5)
    net = seq2seq_ext.EncoderDecoder(seq2seq_ext.Seq2SeqEncoder(len(src_vocab), 8, 16, 2, 0.5),
                                     seq2seq_ext.Seq2SeqDecoder(len(tgt_vocab), 8, 16, 2, 0.5))
    net.eval()
    net.decoder.rnn.train()
    seq2seq_ext.predict_seq2seq(net, "go .", src_vocab, tgt_vocab, 10, "cpu")
    assert not any(m.training for m in net.modules())
    net.eval()
    net.encoder.embedding.train()
    seq2seq_ext.predict_seq2seq_batch(net, ["go ."], src_vocab, tgt_vocab, 10, "cpu")
    assert not any(m.training for m in net.modules())


# ----------------------------------------------------------------------------------------------
# predict_seq2seq's shortcut for the chapter's GRU model (decoding._translate_directly)
# ----------------------------------------------------------------------------------------------

class _DirectSpy:
    """Counts predict_seq2seq's translations by the shortcut (``taken``) and the calls that it
    declined (``declined``: the usual path then ran); ``usual()`` runs predict_seq2seq with the
    shortcut off (counted in neither)."""

    def __init__(self, monkeypatch):
        from seq2seq_ext import decoding
        self.taken = self.declined = 0
        self._real, self._on = decoding._translate_directly, True

        def spy(*args):
            if not self._on:
                return None
            out = self._real(*args)
            if out is None:
                self.declined += 1
            else:
                self.taken += 1
            return out
        monkeypatch.setattr(decoding, "_translate_directly", spy)

    def usual(self, *args, **kwargs):
        """predict_seq2seq on its usual path."""
        self._on = False
        try:
            return seq2seq_ext.predict_seq2seq(*args, **kwargs)
        finally:
            self._on = True


def _direct_model(seed=21, **decoder_kwargs):
    src_vocab, tgt_vocab = _vocabs()
    torch.manual_seed(seed)
    net = seq2seq_ext.EncoderDecoder(
        seq2seq_ext.Seq2SeqEncoder(len(src_vocab), 8, 16, 2, 0.2),
        seq2seq_ext.Seq2SeqDecoder(len(tgt_vocab), 8, 16, 2, 0.2, **decoder_kwargs))
    net.apply(seq2seq_ext.xavier_init_weights)
    with torch.no_grad():
        net.decoder.dense.bias[tgt_vocab["<eos>"]] += 0.4
    return net.eval(), src_vocab, tgt_vocab


def _same_as_usual(spy, net, src_vocab, tgt_vocab, sentences, steps=(1, 4, 10), **kwargs):
    for sentence in sentences:
        for num_steps in steps:
            got = seq2seq_ext.predict_seq2seq(net, sentence, src_vocab, tgt_vocab, num_steps,
                                              "cpu", **kwargs)
            want = spy.usual(net, sentence, src_vocab, tgt_vocab, num_steps, "cpu", **kwargs)
            assert got == want, (sentence, num_steps)


@pytest.mark.parametrize("weight_dtype", [None, torch.float32, torch.bfloat16])
def test_direct_translation_is_the_usual_one(weight_dtype, monkeypatch):
    net, src_vocab, tgt_vocab = _direct_model()
    spy = _DirectSpy(monkeypatch)
    sentences = ["go .", "i lost .", "Wow !", "unknown zzz ."] + _sentences(8, seed=4)
    _same_as_usual(spy, net, src_vocab, tgt_vocab, sentences, weight_dtype=weight_dtype)
    assert spy.taken == 3 * len(sentences) and spy.declined == 0
    # and the reference's own loop agrees
    ref = reference_copy(net, reference.EncoderDecoder,
                         reference.Seq2SeqEncoder(len(src_vocab), 8, 16, 2),
                         reference.Seq2SeqDecoder(len(tgt_vocab), 8, 16, 2))
    if weight_dtype != torch.bfloat16:
        for sentence in sentences:
            assert seq2seq_ext.predict_seq2seq(net, sentence, src_vocab, tgt_vocab, 10, "cpu") \
                == reference.predict_seq2seq(ref.eval(), sentence, src_vocab, tgt_vocab, 10,
                                             "cpu")


def _hook(net):
    net.decoder.dense.register_forward_hook(lambda m, a, out: out + 1.0)


def _global_hook(net):
    return torch.nn.modules.module.register_module_forward_hook(lambda m, a, out: out)


@pytest.mark.parametrize("change", [
    "train", "train_submodule", "encoder_hook", "decoder_hook", "dense_hook", "global_hook",
    "encoder_forward", "max_norm", "double", "reference_backend", "autocast", "grad_mode",
    "attention", "device", "dispatch_mode"])
def test_direct_translation_declines_what_changes_the_usual_path(change, monkeypatch):
    """Each of these makes the usual path do something else than the shortcut would (call a
    module, its hooks, the chapter's loop, another dtype), or would skip a side effect: the
    shortcut declines, and the translation is the usual path's."""
    net, src_vocab, tgt_vocab = _direct_model(seed=23)
    spy = _DirectSpy(monkeypatch)
    sentence, kwargs, ctx, undo = "i lost .", {}, None, None
    assert seq2seq_ext.predict_seq2seq(net, sentence, src_vocab, tgt_vocab, 6, "cpu")
    assert spy.taken == 1
    if change == "train":
        net.train()
    elif change == "train_submodule":
        net.encoder.rnn.train()
    elif change == "encoder_hook":
        net.encoder.register_forward_hook(lambda m, a, out: (out[0], out[1] * 0.5))
    elif change == "decoder_hook":
        net.decoder.register_forward_pre_hook(lambda m, a: None)
    elif change == "dense_hook":
        _hook(net)
    elif change == "global_hook":
        undo = _global_hook(net)
    elif change == "encoder_forward":
        net.encoder.forward = lambda X, *a: seq2seq_ext.Seq2SeqEncoder.forward(net.encoder, X)
    elif change == "max_norm":
        net.encoder.embedding.max_norm = 0.5
    elif change == "double":
        net.double()
    elif change == "reference_backend":
        ctx = seq2seq_ext.use_backend("reference")
    elif change == "autocast":
        ctx = torch.autocast("cpu", dtype=torch.bfloat16)
    elif change == "grad_mode":
        ctx = torch.enable_grad()  # predict_seq2seq turns it off itself: taken
    elif change == "attention":
        kwargs = {"save_attention_weights": True}
    elif change == "device":
        kwargs = {"device": torch.device("meta")}
    elif change == "dispatch_mode":
        from torch.utils._python_dispatch import TorchDispatchMode

        class Passthrough(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))
        ctx = Passthrough()
    device = kwargs.pop("device", "cpu")
    taken = spy.taken
    try:
        with (ctx if ctx is not None else contextlib.nullcontext()):
            try:
                got = seq2seq_ext.predict_seq2seq(net, sentence, src_vocab, tgt_vocab, 6,
                                                  device, **kwargs)
            except Exception as exc:  # the usual path's own error (another device, no
                got = type(exc)          # attention weights in the chapter's decoder)
            if change == "device":
                assert spy.taken == taken and spy.declined >= 1
                return
            try:
                want = spy.usual(net, sentence, src_vocab, tgt_vocab, 6, device, **kwargs)
            except Exception as exc:
                want = type(exc)
    finally:
        if undo is not None:
            undo.remove()
    assert got == want
    if change == "grad_mode":
        assert spy.taken == taken + 1
    else:
        assert spy.taken == taken, change
    if change in ("train", "train_submodule"):  # the usual path's net.eval(): taken again
        assert not any(m.training for m in net.modules())
        seq2seq_ext.predict_seq2seq(net, sentence, src_vocab, tgt_vocab, 6, "cpu")
        assert spy.taken == taken + 1


def test_direct_translation_follows_the_weights(monkeypatch):
    """In-place updates, a `.data` swap, a replaced submodule, a copy of the model changed on
    its own: every translation is the usual path's for the weights of the moment."""
    import copy
    net, src_vocab, tgt_vocab = _direct_model(seed=24)
    spy = _DirectSpy(monkeypatch)
    sentences = ["go .", "he's calm ."] + _sentences(4, seed=5)

    def check(model=net, **kwargs):
        _same_as_usual(spy, model, src_vocab, tgt_vocab, sentences, steps=(10,), **kwargs)
    for weight_dtype in (None, torch.bfloat16):
        check(weight_dtype=weight_dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    check()
    check(weight_dtype=torch.bfloat16)
    w = net.encoder.rnn.weight_hh_l0
    w.data = torch.randn(w.shape, generator=g)
    check()
    check(weight_dtype=torch.bfloat16)
    net.decoder.dense = torch.nn.Linear(16, len(tgt_vocab))
    check()
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin.decoder.dense.weight.mul_(-1.0)
    check(model=twin)
    check()
    # declined once: the new output layer was in training mode (the usual path's net.eval())
    assert spy.declined == 1 and spy.taken == 9 * len(sentences) - 1


@pytest.mark.parametrize("variant", ["fixed_context", "lstm"])
def test_direct_translation_only_for_the_chapter_model(variant, monkeypatch):
    kwargs = {"fixed_context": True} if variant == "fixed_context" else {"cell": "lstm"}
    src_vocab, tgt_vocab = _vocabs()
    torch.manual_seed(3)
    net = seq2seq_ext.EncoderDecoder(
        seq2seq_ext.Seq2SeqEncoder(len(src_vocab), 8, 16, 2, cell=kwargs.get("cell", "gru")),
        seq2seq_ext.Seq2SeqDecoder(len(tgt_vocab), 8, 16, 2, **kwargs)).eval()
    spy = _DirectSpy(monkeypatch)
    seq2seq_ext.predict_seq2seq(net, "go .", src_vocab, tgt_vocab, 5, "cpu")
    assert spy.taken == 0 and spy.declined == 1


class _EqualByName(seq2seq_ext.EncoderDecoder):
    """A model class that compares models by a name (and hashes by it), as dataclass-like
    wrappers do: two such models must not share what the shortcut keeps for each."""
    name = "gru-8-16-2"

    def __eq__(self, other):
        return isinstance(other, _EqualByName)

    def __hash__(self):
        return hash(self.name)


class _EncoderWithItsOwnCall(seq2seq_ext.Seq2SeqEncoder):
    def __call__(self, *args, **kwargs):
        out, state = super().__call__(*args, **kwargs)
        return out, state * 0.5


def _change(kind, net):
    """Apply one change of test_direct_translation_declines_more to net (or return a context
    to run the translation in)."""
    from unittest import mock

    from seq2seq_ext import models
    if kind == "prune":
        from torch.nn.utils import prune
        prune.l1_unstructured(net.encoder.rnn, "weight_hh_l0", 0.3)
    elif kind == "class_patch":
        forward = models.Seq2SeqEncoder.forward
        return mock.patch.object(models.Seq2SeqEncoder, "forward",
                                 lambda self, X, *a: (forward(self, X)[0],
                                                      forward(self, X)[1] * 0.0))
    elif kind == "hook_dict_replaced":
        import collections
        net.encoder._forward_hooks = collections.OrderedDict()
        net.encoder.register_forward_hook(lambda m, a, out: (out[0], out[1] * 0.0))
    elif kind == "container_insert":
        net.extras.insert(0, torch.nn.Dropout(0.5))  # training mode, no registration hook
    elif kind == "class_swapped":
        class Logits(torch.nn.Linear):
            def forward(self, x):
                return super().forward(x) * -1.0
        net.decoder.dense.__class__ = Logits
    elif kind == "embedding_width":
        g = torch.Generator().manual_seed(0)
        net.decoder.embedding.weight.data = torch.randn(net.decoder.embedding.weight.shape[0],
                                                        12, generator=g)
        net.decoder.rnn.weight_ih_l0.data = torch.randn(48, 12 + 16, generator=g)
    elif kind == "compiled_encoder":
        net.encoder.compile(backend="eager")
    return None


@pytest.mark.parametrize("kind", ["prune", "class_patch", "hook_dict_replaced",
                                  "container_insert", "class_swapped", "embedding_width",
                                  "compiled_encoder", "encoder_call"])
def test_direct_translation_declines_more(kind, monkeypatch):
    """Changes no generation counter sees (pruning moves a weight out of the parameters, a
    method patched on the class, a hook dict replaced, a container's insert, a module's class
    swapped, `.data` of another width, a compiled encoder, an encoder class with its own
    __call__): the shortcut declines and the translation is the usual path's."""
    src_vocab, tgt_vocab = _vocabs()
    torch.manual_seed(25)
    enc_cls = _EncoderWithItsOwnCall if kind == "encoder_call" else seq2seq_ext.Seq2SeqEncoder
    net = seq2seq_ext.EncoderDecoder(enc_cls(len(src_vocab), 8, 16, 2),
                                     seq2seq_ext.Seq2SeqDecoder(len(tgt_vocab), 8, 16, 2))
    net.extras = torch.nn.ModuleList([torch.nn.Identity()])
    net.eval()
    spy = _DirectSpy(monkeypatch)
    seq2seq_ext.predict_seq2seq(net, "go .", src_vocab, tgt_vocab, 6, "cpu")
    assert spy.taken == (0 if kind == "encoder_call" else 1)
    ctx = _change(kind, net) or contextlib.nullcontext()
    for weight_dtype in (None, torch.bfloat16):
        with ctx if weight_dtype is None else contextlib.nullcontext():
            results = []
            for run in (seq2seq_ext.predict_seq2seq, spy.usual):
                try:
                    results.append(run(net, "go .", src_vocab, tgt_vocab, 6, "cpu",
                                       weight_dtype=weight_dtype))
                except ValueError as exc:  # bf16 where the usual path has no such mode
                    results.append(type(exc))
        assert results[0] == results[1], (kind, weight_dtype)
        if kind == "container_insert":
            assert not any(m.training for m in net.modules())
            break
        if kind == "class_patch":  # the patch undone (after the float32 run): taken again
            assert spy.taken == 1
            seq2seq_ext.predict_seq2seq(net, "go .", src_vocab, tgt_vocab, 6, "cpu")
            assert spy.taken == 2
            return
    assert spy.taken == (0 if kind == "encoder_call" else 1)


def test_direct_translation_keeps_models_apart(monkeypatch):
    """Models that compare equal (and hash alike) each get their own translation, and the
    shortcut keeps nothing that outlives a model."""
    import gc
    import weakref
    src_vocab, tgt_vocab = _vocabs()
    spy = _DirectSpy(monkeypatch)
    nets = []
    for seed in (21, 99):
        torch.manual_seed(seed)
        net = _EqualByName(seq2seq_ext.Seq2SeqEncoder(len(src_vocab), 8, 16, 2),
                           seq2seq_ext.Seq2SeqDecoder(len(tgt_vocab), 8, 16, 2))
        net.apply(seq2seq_ext.xavier_init_weights)
        nets.append(net.eval())
    for sentence in ["go .", "i lost .", "he's calm ."] + _sentences(5, seed=9):
        for net in nets:
            assert seq2seq_ext.predict_seq2seq(net, sentence, src_vocab, tgt_vocab, 8, "cpu") \
                == spy.usual(net, sentence, src_vocab, tgt_vocab, 8, "cpu")
    assert spy.taken == 16 and spy.declined == 0
    ref = weakref.ref(nets[0])
    del nets[:], net
    gc.collect()
    assert ref() is None


class _VocabOf:
    """A source vocabulary whose ids are ``kind``: numpy integers, or ints past the encoder's
    embedding (a vocabulary larger than the model's)."""

    def __init__(self, vocab, kind):
        self._vocab, self._kind = vocab, kind

    def __getitem__(self, tokens):
        ids = self._vocab[tokens]
        if self._kind == "numpy":
            import numpy
            return [numpy.int64(i) for i in ids] if isinstance(ids, list) else numpy.int64(ids)
        return [i + len(self._vocab) for i in ids] if isinstance(ids, list) else ids


def _narrow_encoder_weights(rnn, hidden):
    """Every weight of the GRU ``rnn`` swapped by ``.data`` for one of width ``hidden`` (its
    modules' attributes unchanged)."""
    g = torch.Generator().manual_seed(5)
    for name in rnn._flat_weights_names:
        p = getattr(rnn, name)
        shape = ((3 * hidden,) if p.dim() == 1 else
                 (3 * hidden, p.shape[1] if name == "weight_ih_l0" else hidden))
        p.data = torch.randn(*shape, generator=g) * 0.3


@pytest.mark.parametrize("weight_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("kind", ["numpy", "past_the_embedding", "state_width",
                                  "weights_of_another_width"])
def test_direct_translation_leaves_what_it_cannot_read_to_the_usual_path(kind, weight_dtype,
                                                                         monkeypatch):
    """Source ids that are not Python ints, ids outside the encoder's table, an encoder whose
    state the decoder cannot take (by its modules, or by weights of another width swapped in:
    its state's shape is then seen after encoding): the direct path declines, and the result (a
    translation, or the usual path's error) is the usual path's."""
    net, src_vocab, tgt_vocab = _direct_model()
    if kind == "state_width":
        torch.manual_seed(3)
        net.encoder = seq2seq_ext.Seq2SeqEncoder(len(src_vocab), 8, 12, 2).eval()
    elif kind == "weights_of_another_width":
        _narrow_encoder_weights(net.encoder.rnn, 12)
    else:
        src_vocab = _VocabOf(src_vocab, kind)
    spy = _DirectSpy(monkeypatch)
    results = []
    for run in (seq2seq_ext.predict_seq2seq, spy.usual):
        try:
            results.append(run(net, "go home .", src_vocab, tgt_vocab, 6, "cpu",
                               weight_dtype=weight_dtype))
        except (IndexError, RuntimeError, ValueError) as exc:
            results.append(type(exc))
    assert results[0] == results[1]
    assert isinstance(results[0], tuple) == (kind == "numpy")
    assert spy.taken == 0 and spy.declined == 1


class _LoudDecoder(seq2seq_ext.Seq2SeqDecoder):
    """A decoder whose class has its own ``__call__``: it favours one token in every output."""

    calls = 0

    def __call__(self, X, state):
        type(self).calls += 1
        Y, state = super().__call__(X, state)
        Y = Y.clone()
        Y[..., 5] += 100
        return Y, state


def test_a_decoder_class_with_its_own_call_is_called():
    """The fused greedy loop calls no module: a decoder whose class overrides ``__call__`` (not
    ``forward``) takes the chapter's loop, as the reference's predict_seq2seq calls it."""
    src_vocab, tgt_vocab = _vocabs()
    net, _ = _nets(src_vocab, tgt_vocab, torch.float32, seed=5)
    net.decoder.__class__ = _LoudDecoder
    want = tgt_vocab.to_tokens(5)
    for batched in (False, True):
        _LoudDecoder.calls = 0
        if batched:
            got = seq2seq_ext.predict_seq2seq_batch(net, ["go .", "i lost ."], src_vocab,
                                                    tgt_vocab, 4, "cpu")
        else:
            got = [seq2seq_ext.predict_seq2seq(net, "go .", src_vocab, tgt_vocab, 4, "cpu")[0]]
        assert _LoudDecoder.calls > 0 and got == [" ".join([want] * 4)] * len(got), got
        ref = reference.predict_seq2seq(net, "go .", src_vocab, tgt_vocab, 4, "cpu")[0]
        assert got[0] == ref


@pytest.mark.parametrize("batched", [False, True])
def test_a_state_without_a_row_per_sentence_is_refused(batched):
    """A batch_first GRU swapped into the encoder gives a state of num_steps rows: refused naming
    the state, as the reference's loop fails on it, instead of translations of other rows."""
    src_vocab, tgt_vocab = _vocabs()
    net, _ = _nets(src_vocab, tgt_vocab, torch.float32, seed=5)
    net.encoder.rnn = torch.nn.GRU(8, 16, 2, batch_first=True)
    with pytest.raises(ValueError, match=r"state: .* 7 rows for (1|3) sentence"):
        if batched:
            seq2seq_ext.predict_seq2seq_batch(net, ["go .", "i lost .", "who ?"], src_vocab,
                                              tgt_vocab, 7, "cpu")
        else:
            seq2seq_ext.predict_seq2seq(net, "go .", src_vocab, tgt_vocab, 7, "cpu")
