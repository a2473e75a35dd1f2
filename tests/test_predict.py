"""``predict_seq2seq`` and ``predict_seq2seq_batch`` against the chapter's
``reference.predict_seq2seq``: equal translations, through the fused greedy loop (the
``greedy_decode`` op, or the bound stepper on the CPU) and, under the reference backend,
without it."""
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
