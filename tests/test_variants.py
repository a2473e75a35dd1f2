"""Decoder variants: LSTM cells (``cell="lstm"``) and the fixed-context decoder
(``fixed_context=True``). (The fused ``lstm_decode_step`` op itself:
tests/ops/test_lstm_decode_step.py.)

* the options' validation, state formats and ``state_dict`` compatibility;
* the LSTM encoder/decoder against a plain PyTorch transcription of the seeds' LSTM models;
* the decoder's fused one-step path for each variant;
* greedy decoding of an LSTM model under the extension backend equal to the reference's;
* the fixed context: teacher-forced and step-by-step decoding see the same context (and do not
  with the chapter's rule); extension equal to reference in training and in greedy decoding.
"""
import random
import re

import pytest
import torch
from torch import nn

import seq2seq_ext
from seq2seq_ext import ops, reference
from seq2seq_ext.models import context_projection

from helpers import (SRC_WORDS, GreedySpy, Spy, decode_tol, devices, seeded_rand, seeded_randint,
                     toy_vocabs as _vocabs)

DEVICES = devices()
VARIANTS = [("gru", True), ("lstm", False), ("lstm", True)]
VARIANT_IDS = [f"{c}-{'fixed' if f else 'chapter'}" for c, f in VARIANTS]


pytestmark = pytest.mark.usefixtures("one_thread")


def _build(src_vocab, tgt_vocab, embed, hidden, layers, *, cell="gru", fixed_context=False,
           dropout=0, seed=0, scale=None):
    """An EncoderDecoder of the package's classes with seeded weights (uniform in (-scale,
    scale) for the RNNs when ``scale`` is given), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = seq2seq_ext.Seq2SeqEncoder(src_vocab, embed, hidden, layers, dropout, cell=cell)
        dec = seq2seq_ext.Seq2SeqDecoder(tgt_vocab, embed, hidden, layers, dropout, cell=cell,
                                         fixed_context=fixed_context)
        if scale is not None:
            with torch.no_grad():
                for p in list(enc.rnn.parameters()) + list(dec.rnn.parameters()):
                    p.uniform_(-scale, scale)
    return seq2seq_ext.EncoderDecoder(enc, dec).eval()


# ----------------------------------------------------------------------------------------------
# options, state formats, state_dict
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["rnn", "LSTM", "", None, 3])
def test_bad_cell_is_a_value_error_naming_cell(bad):
    with pytest.raises(ValueError, match=r"^cell\b"):
        seq2seq_ext.Seq2SeqEncoder(5, 4, 6, 1, cell=bad)
    with pytest.raises(ValueError, match=r"^cell\b"):
        seq2seq_ext.Seq2SeqDecoder(5, 4, 6, 1, cell=bad)


def test_fixed_context_must_be_a_bool():
    with pytest.raises(TypeError, match=r"^fixed_context\b"):
        seq2seq_ext.Seq2SeqDecoder(5, 4, 6, 1, fixed_context="yes")


def test_options_are_keyword_only_and_default_to_the_chapter():
    with pytest.raises(TypeError):
        seq2seq_ext.Seq2SeqEncoder(5, 4, 6, 1, 0, "lstm")
    with pytest.raises(TypeError):
        seq2seq_ext.Seq2SeqDecoder(5, 4, 6, 1, 0, "lstm")
    dec = seq2seq_ext.Seq2SeqDecoder(5, 4, 6, 1)
    assert dec.cell == "gru" and dec.fixed_context is False and type(dec.rnn) is nn.GRU
    assert type(seq2seq_ext.Seq2SeqEncoder(5, 4, 6, 1, cell="lstm").rnn) is nn.LSTM
    assert type(seq2seq_ext.Seq2SeqDecoder(5, 4, 6, 1, cell="lstm").rnn) is nn.LSTM


def test_gru_default_state_dict_unchanged():
    """The default model's parameters: the reference's names, shapes and (same seed) values."""
    for ours_cls, ref_cls, args in (
            (seq2seq_ext.Seq2SeqEncoder, reference.Seq2SeqEncoder, (11, 8, 16, 2)),
            (seq2seq_ext.Seq2SeqDecoder, reference.Seq2SeqDecoder, (13, 8, 16, 2))):
        torch.manual_seed(3)
        ours = ours_cls(*args)
        torch.manual_seed(3)
        ref = ref_cls(*args)
        a, b = ours.state_dict(), ref.state_dict()
        assert list(a) == list(b)
        for k in a:
            assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
        assert "cell" not in a and "fixed_context" not in a


@pytest.mark.parametrize("cell,fixed", VARIANTS, ids=VARIANT_IDS)
def test_variant_state_dict_equals_the_reference_variant(cell, fixed):
    torch.manual_seed(4)
    ours = seq2seq_ext.Seq2SeqDecoder(13, 8, 16, 2, cell=cell, fixed_context=fixed)
    torch.manual_seed(4)
    ref = reference.VariantSeq2SeqDecoder(13, 8, 16, 2, cell=cell, fixed_context=fixed)
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the parameter names of the chapter's decoder, with the LSTM's 4 gates
    assert list(a)[:2] == ["embedding.weight", "rnn.weight_ih_l0"]
    gates = 4 if cell == "lstm" else 3
    assert a["rnn.weight_ih_l0"].shape == (gates * 16, 8 + 16)
    assert list(a)[-2:] == ["dense.weight", "dense.bias"]


@pytest.mark.parametrize("backend", ops.BACKENDS)
@pytest.mark.parametrize("cell,fixed", VARIANTS, ids=VARIANT_IDS)
def test_state_formats(backend, cell, fixed):
    net = _build(9, 10, 4, 6, 2, cell=cell, fixed_context=fixed, seed=5)
    X, Y = seeded_randint(9, (3, 5), 1), seeded_randint(10, (3, 4), 2)
    with seq2seq_ext.use_backend(backend):
        enc_out = net.encoder(X)
        state = net.decoder.init_state(enc_out)
        out, new_state = net.decoder(Y, state)
        with torch.no_grad():
            out1, state1 = net.decoder(Y[:, :1], state)
    assert out.shape == (3, 4, 10) and out1.shape == (3, 1, 10)
    enc_state = enc_out[1]
    if cell == "lstm":
        assert isinstance(enc_state, tuple) and len(enc_state) == 2
        assert all(t.shape == (2, 3, 6) for t in enc_state)
    for s in (new_state, state1):
        rnn_state = s[0] if fixed else s
        if cell == "lstm":
            assert isinstance(rnn_state, tuple) and len(rnn_state) == 2
            assert all(t.shape == (2, 3, 6) for t in rnn_state)
        else:
            assert isinstance(rnn_state, torch.Tensor) and rnn_state.shape == (2, 3, 6)
        if fixed:
            assert isinstance(s, tuple) and len(s) == 2
            assert s[1] is state[1]  # the same context is passed along
    if fixed:
        top = enc_state[0][-1] if cell == "lstm" else enc_state[-1]
        assert torch.equal(state[1], top) and state[1].shape == (3, 6)


def test_lstm_decoder_rejects_a_gru_state():
    enc = seq2seq_ext.Seq2SeqEncoder(9, 4, 6, 2)
    dec = seq2seq_ext.Seq2SeqDecoder(10, 4, 6, 2, cell="lstm")
    with pytest.raises(TypeError, match=r"^enc_outputs\b.*\(h, c\)"):
        dec.init_state(enc(seeded_randint(9, (2, 3), 0)))
    with pytest.raises(TypeError, match=r"^state\b"):
        dec(seeded_randint(10, (2, 3), 0), torch.zeros(2, 2, 6))


# ----------------------------------------------------------------------------------------------
# the LSTM model against a plain PyTorch transcription of the seeds' LSTM models
# ----------------------------------------------------------------------------------------------

def _transcription(net, X, Y, fixed):
    """Embedding + nn.LSTM encoder; the decoder concatenates the context (h[-1] of the state it
    receives, or the encoder's final h[-1] when fixed) to every embedded input; dense."""
    enc, dec = net.encoder, net.decoder
    lstm_e = nn.LSTM(enc.rnn.input_size, enc.rnn.hidden_size, enc.rnn.num_layers)
    lstm_d = nn.LSTM(dec.rnn.input_size, dec.rnn.hidden_size, dec.rnn.num_layers)
    lstm_e.load_state_dict(enc.rnn.state_dict())
    lstm_d.load_state_dict(dec.rnn.state_dict())
    lstm_e, lstm_d = lstm_e.to(enc.embedding.weight.dtype), lstm_d.to(enc.embedding.weight.dtype)
    emb_x = nn.functional.embedding(X, enc.embedding.weight).transpose(0, 1)
    _, (h, c) = lstm_e(emb_x)
    emb_y = nn.functional.embedding(Y, dec.embedding.weight).transpose(0, 1)
    context = h[-1].unsqueeze(0).expand(emb_y.shape[0], -1, -1)
    out, (h2, c2) = lstm_d(torch.cat([emb_y, context], dim=2), (h, c))
    logits = (out @ dec.dense.weight.t() + dec.dense.bias).transpose(0, 1)
    return logits, (h, c), (h2, c2)


@pytest.mark.parametrize("backend", ops.BACKENDS)
@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lstm_model_matches_transcription(backend, fixed, dtype):
    net = _build(11, 13, 5, 7, 2, cell="lstm", fixed_context=fixed, seed=6).to(dtype)
    X, Y = seeded_randint(11, (4, 6), 3), seeded_randint(13, (4, 5), 4)
    with seq2seq_ext.use_backend(backend):
        output, (h, c) = net.encoder(X)
        state = net.decoder.init_state((output, (h, c)))
        logits, new_state = net.decoder(Y, state)
    want_logits, (we_h, we_c), (wh, wc) = _transcription(net, X, Y, fixed)
    torch.testing.assert_close(h, we_h)
    torch.testing.assert_close(c, we_c)
    # one multi-step call: the context h[-1] of the incoming state is the encoder's either way
    torch.testing.assert_close(logits, want_logits)
    got_h, got_c = new_state[0] if fixed else new_state
    torch.testing.assert_close(got_h, wh)
    torch.testing.assert_close(got_c, wc)


@pytest.mark.parametrize("fixed", [False, True])
def test_lstm_training_gradients_ext_equal_reference(fixed):
    """The LSTM model trained under the extension backend (nn.LSTM + the fused loss) gets the
    reference's loss and gradients."""
    X, Y = seeded_randint(11, (5, 7), 5), seeded_randint(13, (5, 6), 6)
    valid_len = torch.tensor([6, 0, 3, 8, 1])
    grads, losses = [], []
    for backend in ops.BACKENDS:
        net = _build(11, 13, 5, 7, 2, cell="lstm", fixed_context=fixed, seed=7).train()
        with seq2seq_ext.use_backend(backend):
            y_hat, _ = net(X, Y, valid_len)
            loss = seq2seq_ext.MaskedSoftmaxCELoss()(y_hat, Y, valid_len)
            loss.sum().backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in net.named_parameters()})
    tol = dict(rtol=1e-5, atol=1e-6)  # the fused loss sums in another order
    torch.testing.assert_close(losses[0], losses[1], **tol)
    assert set(grads[0]) == set(grads[1])
    for n in grads[0]:
        assert grads[0][n] is not None, n
        torch.testing.assert_close(grads[0][n], grads[1][n], **tol, msg=lambda m, n=n: f"{n}: {m}")


# ----------------------------------------------------------------------------------------------
# the decoder's fused one-step path
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell,fixed", VARIANTS, ids=VARIANT_IDS)
def test_one_step_inference_is_fused_and_equals_reference(device, cell, fixed, monkeypatch):
    net = _build(9, 12, 5, 8, 2, cell=cell, fixed_context=fixed, seed=60, scale=0.5).to(device)
    X = seeded_randint(9, (4, 6), 61).to(device)
    tokens = seeded_randint(12, (4, 3), 62).to(device)
    op_name = "lstm_decode_step" if cell == "lstm" else "gru_decode_step"
    spy = Spy(getattr(ops, op_name))
    monkeypatch.setattr(ops, op_name, spy)
    # plain CPU inference normally calls the kernel through the decoder's bound stepper; send it
    # through the op here so that the spy sees it
    monkeypatch.setattr(ops, "direct_cpu_call_ok", lambda state: False)
    monkeypatch.setattr(ops, "ext_shortcut_ok", lambda: False)
    results = {}
    for backend in ops.BACKENDS:
        with seq2seq_ext.use_backend(backend), torch.no_grad():
            state = net.decoder.init_state(net.encoder(X))
            outs = []
            for t in range(tokens.shape[1]):
                out, state = net.decoder(tokens[:, t:t + 1], state)
                outs.append(out)
            results[backend] = torch.cat(outs, dim=1)
    assert spy.calls == tokens.shape[1]  # every ext step went through the fused op
    torch.testing.assert_close(results["ext"], results["reference"], **decode_tol(torch.float32, device))
    monkeypatch.undo()
    # the direct CPU call gives the op's numbers (to rounding: the bound stepper sums its
    # products in another order, see DecoderStepper)
    with torch.no_grad():
        state = net.decoder.init_state(net.encoder(X))
        out, _ = net.decoder(tokens[:, :1], state)
    torch.testing.assert_close(out, results["ext"][:, :1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell,fixed", VARIANTS, ids=VARIANT_IDS)
def test_one_step_with_grad_is_not_fused_and_differentiable(cell, fixed):
    net = _build(9, 12, 5, 8, 2, cell=cell, fixed_context=fixed, seed=63)
    X, tok = seeded_randint(9, (3, 4), 64), seeded_randint(12, (3, 1), 65)
    state = net.decoder.init_state(net.encoder(X))
    out, _ = net.decoder(tok, state)
    assert out.requires_grad
    out.sum().backward()
    assert net.decoder.dense.weight.grad is not None
    assert net.decoder.rnn.weight_ih_l0.grad.abs().sum() > 0


def test_context_projection_follows_weight_updates():
    dec = seq2seq_ext.Seq2SeqDecoder(9, 4, 6, 1, fixed_context=True)
    context = seeded_rand((2, 6), 66, torch.float32)
    first = context_projection(dec, context)
    assert context_projection(dec, context) is first  # cached for the same context
    with torch.no_grad():
        dec.rnn.weight_ih_l0.mul_(2.0)
    again = context_projection(dec, context)
    torch.testing.assert_close(again, 2 * first)
    with torch.no_grad():
        context.add_(1.0)
    torch.testing.assert_close(context_projection(dec, context),
                               context @ dec.rnn.weight_ih_l0[:, 4:].detach().t())


# ----------------------------------------------------------------------------------------------
# the fixed context: training and inference see the same context
# ----------------------------------------------------------------------------------------------

def _teacher_forced_and_stepwise(net, X, Y):
    with torch.no_grad():
        state = net.decoder.init_state(net.encoder(X))
        forced, _ = net.decoder(Y, state)
        outs = []
        for t in range(Y.shape[1]):
            out, state = net.decoder(Y[:, t:t + 1], state)
            outs.append(out)
    return forced, torch.cat(outs, dim=1)


@pytest.mark.parametrize("backend", ops.BACKENDS)
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_fixed_context_makes_training_and_inference_agree(backend, cell):
    X, Y = seeded_randint(9, (4, 6), 70), seeded_randint(12, (4, 5), 71)
    diffs = {}
    for fixed in (True, False):
        net = _build(9, 12, 5, 8, 2, cell=cell, fixed_context=fixed, seed=72, scale=0.5)
        with seq2seq_ext.use_backend(backend):
            forced, stepwise = _teacher_forced_and_stepwise(net, X, Y)
        # the first step sees the encoder's context either way
        torch.testing.assert_close(forced[:, 0], stepwise[:, 0], **decode_tol(torch.float32))
        diffs[fixed] = (forced - stepwise).abs().max().item()
        if fixed:
            torch.testing.assert_close(forced, stepwise, **decode_tol(torch.float32))
    # the chapter's rule: from the second step on, prediction concatenates the decoder's own
    # state instead of the encoder's, so the logits differ from the teacher-forced ones
    assert diffs[False] > 1e-3, diffs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layers", [1, 2])
def test_fixed_context_gru_training_ext_equals_reference(dtype, layers, monkeypatch):
    X, Y = seeded_randint(11, (5, 7), 80), seeded_randint(13, (5, 6), 81)
    valid_len = torch.tensor([6, 0, 3, 8, 1])
    spy = Spy(ops.gru)
    monkeypatch.setattr(ops, "gru", spy)
    losses, grads = [], []
    for backend in ops.BACKENDS:
        net = _build(11, 13, 6, 9, layers, fixed_context=True, seed=82).to(dtype).train()
        with seq2seq_ext.use_backend(backend):
            y_hat, (state, context) = net(X, Y, valid_len)
            loss = seq2seq_ext.MaskedSoftmaxCELoss()(y_hat, Y, valid_len)
            (loss.sum() + state.sum() + context.sum()).backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in net.named_parameters()})
    assert spy.calls == 2  # the encoder's and the decoder's fused GRU under ext
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
    torch.testing.assert_close(losses[0], losses[1], **tol)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], **tol, msg=lambda m, n=n: f"{n}: {m}")


# ----------------------------------------------------------------------------------------------
# greedy decoding of the variants
# ----------------------------------------------------------------------------------------------


def _sentences(n, seed):
    rng = random.Random(seed)
    words = SRC_WORDS + ["unknown", "zzz"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(n)]


# (seed, eos bias) per variant: random weights for which the translations differ and end at
# various lengths (some at <eos> before num_steps, some at num_steps)
GREEDY_NETS = {("gru", False): (94, 0.3), ("gru", True): (92, 0.0), ("lstm", False): (91, 0.45),
               ("lstm", True): (93, 0.45)}


def _greedy_net(src_vocab, tgt_vocab, cell, fixed):
    seed, eos_bias = GREEDY_NETS[cell, fixed]
    net = _build(len(src_vocab), len(tgt_vocab), 8, 16, 2, cell=cell, fixed_context=fixed,
                 seed=seed, scale=0.5)
    with torch.no_grad():  # spread the logits (no near-ties) and tune how soon sentences end
        net.decoder.dense.weight.mul_(3.0)
        net.decoder.dense.bias[tgt_vocab["<eos>"]] += eos_bias
    return net


def _reference_variant_net(net):
    """The same weights in the plain PyTorch variant classes of reference.py."""
    enc, dec = net.encoder, net.decoder
    r_enc = reference.VariantSeq2SeqEncoder(enc.embedding.num_embeddings,
                                            enc.embedding.embedding_dim, enc.rnn.hidden_size,
                                            enc.rnn.num_layers, cell=enc.cell)
    r_dec = reference.VariantSeq2SeqDecoder(dec.embedding.num_embeddings,
                                            dec.embedding.embedding_dim, dec.rnn.hidden_size,
                                            dec.rnn.num_layers, cell=dec.cell,
                                            fixed_context=dec.fixed_context)
    ref = reference.EncoderDecoder(r_enc, r_dec)
    ref.load_state_dict(net.state_dict())
    return ref.to(next(net.parameters()).device).eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell,fixed", VARIANTS, ids=VARIANT_IDS)
def test_greedy_predictions_equal_reference(device, cell, fixed, monkeypatch):
    src_vocab, tgt_vocab = _vocabs()
    net = _greedy_net(src_vocab, tgt_vocab, cell, fixed).to(device)
    ref = _reference_variant_net(net)
    sentences = ["go .", "i lost .", "he's calm .", "i'm home ."] + _sentences(8, seed=91)
    want = [reference.predict_seq2seq(ref, s, src_vocab, tgt_vocab, 10, device)[0]
            for s in sentences]
    lengths = [len(w.split()) for w in want]
    assert len(set(want)) >= 4 and sum(0 < n < 10 for n in lengths) >= 4, want
    if cell == "gru":  # the fixed-context GRU decodes in the fused greedy op
        spy = GreedySpy(monkeypatch)
    single = [seq2seq_ext.predict_seq2seq(net, s, src_vocab, tgt_vocab, 10, device)
              for s in sentences]
    assert [s[0] for s in single] == want
    assert all(s[1] == [] for s in single)
    batch = seq2seq_ext.predict_seq2seq_batch(net, sentences, src_vocab, tgt_vocab, 10, device,
                                              batch_size=5)
    assert batch == want
    if cell == "gru":
        assert spy.calls == len(sentences) + 3  # one per sentence, then 3 batches of <= 5
        assert spy.stepper_calls == (spy.calls if device == "cpu" else 0)
    with seq2seq_ext.use_backend("reference"):
        assert seq2seq_ext.predict_seq2seq_batch(net, sentences, src_vocab, tgt_vocab, 10,
                                                 device) == want
        assert seq2seq_ext.predict_seq2seq(net, sentences[0], src_vocab, tgt_vocab, 10,
                                           device)[0] == want[0]


@pytest.mark.filterwarnings("ignore:Attempting to set identical low and high xlims")
@pytest.mark.parametrize("cell,fixed", VARIANTS, ids=VARIANT_IDS)
def test_train_seq2seq_runs_the_variants(cell, fixed, capsys):
    """A short training run of each variant under both backends reaches the same weights."""
    from seq2seq_ext import data
    train_iter, src_vocab, tgt_vocab = data.load_data_pairs(data.number_pairs(0, 60), 16, 8)
    nets = []
    for backend in ops.BACKENDS:
        net = _build(len(src_vocab), len(tgt_vocab), 8, 16, 2, cell=cell, fixed_context=fixed,
                     seed=95)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        torch.manual_seed(96)
        with seq2seq_ext.use_backend(backend):
            seq2seq_ext.train_seq2seq(net, train_iter, 0.005, 2, tgt_vocab, "cpu")
        assert re.match(r"^loss \d+\.\d{3}, ", capsys.readouterr().out)
        assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())
        nets.append(net.state_dict())
    for k in nets[0]:
        torch.testing.assert_close(nets[0][k], nets[1][k], rtol=1e-5, atol=1e-5,
                                   msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("cell,fixed", [("gru", False)] + VARIANTS,
                         ids=["gru-chapter"] + VARIANT_IDS)
def test_model_made_in_inference_mode(cell, fixed):
    """A model created and used under ``torch.inference_mode`` (its parameters have no version
    counters): every inference path works, and an in-place change of a weight made in that mode
    is seen at the next call (nothing derived from the weights is reused)."""
    src_vocab, tgt_vocab = _vocabs()
    net = _greedy_net(src_vocab, tgt_vocab, cell, fixed)
    sentences = ["go .", "i lost .", "he's calm .", "i'm home ."] + _sentences(4, seed=92)
    X = torch.tensor([[src_vocab["go"], src_vocab["."], src_vocab["<eos>"]]])
    token = torch.tensor([[tgt_vocab["<bos>"]]])

    def run(model):
        out = [seq2seq_ext.predict_seq2seq(model, s, src_vocab, tgt_vocab, 10, "cpu")[0]
               for s in sentences]
        out += seq2seq_ext.predict_seq2seq_batch(model, sentences, src_vocab, tgt_vocab, 10,
                                                 "cpu")
        out += seq2seq_ext.beam_search(model, sentences, src_vocab, tgt_vocab, 10, "cpu",
                                       beam_size=3)
        state = model.decoder.init_state(model.encoder(X))
        return out, model.decoder(token, state)[0]

    with torch.inference_mode():
        inf = _build(len(src_vocab), len(tgt_vocab), 8, 16, 2, cell=cell, fixed_context=fixed)
        inf.load_state_dict(net.state_dict())
        assert inf.decoder.dense.bias.is_inference()
    for change in (None, lambda m: m.decoder.dense.bias.add_(0.5),
                   lambda m: m.decoder.rnn.weight_hh_l0.mul_(0.5),
                   lambda m: m.decoder.embedding.weight.mul_(2.0)):
        with torch.no_grad():
            if change is not None:
                change(net)
            want, want_logits = run(net)
        with torch.inference_mode():
            if change is not None:
                change(inf)
            got, got_logits = run(inf)
        assert got == want
        torch.testing.assert_close(got_logits, want_logits, **decode_tol(torch.float32))
