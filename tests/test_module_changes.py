"""The package's models after a user changes their submodules: hooks on the recurrent layer,
the embedding or the output layer (registered before or after the weights were bound for
decoding), pruning and parametrizations, an embedding's ``max_norm``, a state of another
number of layers, and inter-layer dropout of 1. Every fast path defers to calling the module
where it could not honour the change, so the results (and the errors) are the reference's."""
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import seq2seq_ext
from seq2seq_ext import reference
from seq2seq_ext.training import fit

from helpers import seeded_randint, torch_lstm_runs_under_cpu_bf16_autocast, toy_vocabs

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, EMBED, HIDDEN, LAYERS = 13, 5, 8, 2


def _pair(cell="gru", bound=False):
    """(package decoder, reference decoder) with the same weights, in evaluation mode; with
    ``bound`` the package's has decoded once (its weights bound for the per-token shortcut)."""
    torch.manual_seed(0)
    dec = seq2seq_ext.Seq2SeqDecoder(VOCAB, EMBED, HIDDEN, LAYERS, cell=cell).eval()
    ref = reference.VariantSeq2SeqDecoder(VOCAB, EMBED, HIDDEN, LAYERS, cell=cell).eval()
    ref.load_state_dict(dec.state_dict())
    if bound:
        _bind(dec, cell)
    return dec, ref


def _state(cell, batch=3, layers=LAYERS):
    g = torch.Generator().manual_seed(1)
    h = torch.rand((layers, batch, HIDDEN), generator=g) - 0.5
    return (h, torch.rand((layers, batch, HIDDEN), generator=g) - 0.5) if cell == "lstm" else h


def _tokens(steps, batch=3):
    return seeded_randint(VOCAB, (batch, steps), 2)


def _bind(dec, cell):
    """A no-grad one-step call: binds the decoder's weights for the per-token shortcut."""
    with torch.no_grad():
        dec(_tokens(1), _state(cell))


def _doubling_hook(module, args, output):
    if isinstance(output, tuple):
        return (output[0] * 2,) + tuple(output[1:])
    return output * 2


class TestHooks:
    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @pytest.mark.parametrize("where", ["rnn", "dense", "embedding"])
    @pytest.mark.parametrize("steps, grad", [(4, True), (1, False)])
    def test_hook_registered_after_binding_runs(self, cell, where, steps, grad):
        dec, ref = _pair(cell)
        _bind(dec, cell)
        for m in (dec, ref):
            getattr(m, where).register_forward_hook(_doubling_hook)
        X, state = _tokens(steps), _state(cell)
        with torch.set_grad_enabled(grad):
            got, want = dec(X, state)[0], ref(X, state)[0]
        torch.testing.assert_close(got, want)

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_encoder_rnn_hook_runs(self, cell):
        torch.manual_seed(0)
        enc = seq2seq_ext.Seq2SeqEncoder(VOCAB, EMBED, HIDDEN, LAYERS, cell=cell)
        calls = []
        enc.rnn.register_forward_hook(lambda m, a, o: calls.append(1))
        X = _tokens(4)
        enc(X)
        with torch.no_grad():
            enc.eval()(X)  # inference (the encoder's table path)
        assert len(calls) == 2


class TestChangedWeights:
    @pytest.mark.parametrize("change", ["prune", "weight_norm", "max_norm"])
    def test_predict_after_the_change(self, change):
        src_vocab, tgt_vocab = toy_vocabs()
        torch.manual_seed(0)
        enc = seq2seq_ext.Seq2SeqEncoder(len(src_vocab), EMBED, HIDDEN, LAYERS)
        dec = seq2seq_ext.Seq2SeqDecoder(len(tgt_vocab), EMBED, HIDDEN, LAYERS)
        net = seq2seq_ext.EncoderDecoder(enc, dec).eval()
        ref = reference.EncoderDecoder(
            reference.Seq2SeqEncoder(len(src_vocab), EMBED, HIDDEN, LAYERS),
            reference.Seq2SeqDecoder(len(tgt_vocab), EMBED, HIDDEN, LAYERS)).eval()
        ref.load_state_dict(net.state_dict())
        sentence = src_vocab.idx_to_token[5] + " " + src_vocab.idx_to_token[6]
        seq2seq_ext.predict_seq2seq(net, sentence, src_vocab, tgt_vocab, 6, "cpu")  # binds
        for m in (net, ref):
            if change == "prune":
                prune.l1_unstructured(m.decoder.dense, "weight", amount=0.5)
            elif change == "weight_norm":
                nn.utils.parametrizations.weight_norm(m.decoder.dense, "weight")
                with torch.no_grad():
                    m.decoder.dense.parametrizations.weight.original0.mul_(3)
            else:
                m.decoder.embedding.max_norm = 0.5
        got = seq2seq_ext.predict_seq2seq(net, sentence, src_vocab, tgt_vocab, 6, "cpu")[0]
        want = reference.predict_seq2seq(ref, sentence, src_vocab, tgt_vocab, 6, "cpu")[0]
        assert got == want
        if change == "max_norm":  # the lookups renormalised the same rows in both
            torch.testing.assert_close(net.decoder.embedding.weight, ref.decoder.embedding.weight)


# (steps, grad mode, weights bound first): the sequence path, a one-step call's path, and the
# per-token shortcut of a decoder that has decoded
ERROR_PATHS = pytest.mark.parametrize("steps, grad, bound", [(4, True, False), (1, False, False),
                                                             (1, False, True)])


def _assert_reference_error(dec, ref, X, state, grad):
    """The package's decoder raises the reference's error, word for word."""
    with torch.set_grad_enabled(grad):
        with pytest.raises(RuntimeError) as want:
            ref(X, state)
        with pytest.raises(RuntimeError) as got:
            dec(X, state)
    assert str(got.value) == str(want.value)


class TestStateOfAnotherSize:
    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @ERROR_PATHS
    def test_torch_error(self, cell, steps, grad, bound):
        dec, ref = _pair(cell, bound)
        _assert_reference_error(dec, ref, _tokens(steps), _state(cell, layers=LAYERS + 1), grad)


def _variant_pair(cell, fixed):
    torch.manual_seed(0)
    dec = seq2seq_ext.Seq2SeqDecoder(VOCAB, EMBED, HIDDEN, LAYERS, cell=cell,
                                     fixed_context=fixed).eval()
    ref = reference.VariantSeq2SeqDecoder(VOCAB, EMBED, HIDDEN, LAYERS, cell=cell,
                                          fixed_context=fixed).eval()
    ref.load_state_dict(dec.state_dict())
    state = _state(cell)
    return dec, ref, ((state, _state("gru")[-1]) if fixed else state)


class TestSwappedInWeights:
    """``torch.func.functional_call`` swaps tensors into the parameter dicts without any
    registration hook: a one-step call takes the substitutes, and the next ordinary call the
    module's own weights again, whichever came first."""

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @pytest.mark.parametrize("fixed", [False, True])
    def test_functional_call_in_one_step_calls(self, cell, fixed):
        dec, ref, state = _variant_pair(cell, fixed)
        X = _tokens(1)
        sub = {n: p.detach() * 1.3 for n, p in dec.named_parameters()}
        with torch.no_grad():
            for first_bind in (True, False):
                if first_bind:
                    dec(X, state)
                got = torch.func.functional_call(dec, sub, (X, state))[0]
                want = torch.func.functional_call(ref, sub, (X, state))[0]
                torch.testing.assert_close(got, want)
                torch.testing.assert_close(dec(X, state)[0], ref(X, state)[0])
                dec, ref, state = _variant_pair(cell, fixed)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_torch_func_grad_of_a_model_equals_the_reference(cell):
    """A torch.func transform in progress runs the package's model as the reference (the fused
    ops have no functorch rules): the same gradients."""
    torch.manual_seed(0)
    net = seq2seq_ext.EncoderDecoder(
        seq2seq_ext.Seq2SeqEncoder(VOCAB, EMBED, HIDDEN, LAYERS, cell=cell),
        seq2seq_ext.Seq2SeqDecoder(VOCAB, EMBED, HIDDEN, LAYERS, cell=cell))
    ref = reference.EncoderDecoder(
        reference.VariantSeq2SeqEncoder(VOCAB, EMBED, HIDDEN, LAYERS, cell=cell),
        reference.VariantSeq2SeqDecoder(VOCAB, EMBED, HIDDEN, LAYERS, cell=cell))
    ref.load_state_dict(net.state_dict())
    X, Y = _tokens(5), _tokens(4)
    params = {n: p.detach() for n, p in net.named_parameters()}

    def loss(m):
        return lambda p: torch.func.functional_call(m, p, (X, Y))[0].square().sum()
    want = torch.func.grad(loss(ref))(params)
    got = torch.func.grad(loss(net))(params)
    for name in want:
        torch.testing.assert_close(got[name], want[name])


class TestAutocast:
    """A no-grad step or greedy decoding under CPU bf16 autocast runs the modules' calls under
    autocast's casts, as the reference does (bf16 logits), and leaves nothing behind that a
    float32 call afterwards would read."""

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @pytest.mark.parametrize("fixed", [False, True])
    @pytest.mark.parametrize("bound", [False, True])
    def test_no_grad_step(self, cell, fixed, bound):
        dec, ref, state = _variant_pair(cell, fixed)
        X = _tokens(1)
        with torch.no_grad():
            if bound:
                dec(X, state)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = dec(X, state)[0]
                # where PyTorch's nn.LSTM cannot run under CPU bf16 autocast, the reference's
                # float32 step stands in: the same tolerance covers bf16's rounding
                ref_runs = cell == "gru" or torch_lstm_runs_under_cpu_bf16_autocast()
                want = ref(X, state)[0] if ref_runs else None
            if want is None:
                want = ref(X, state)[0]
            assert got.dtype == torch.bfloat16
            assert want.dtype == (torch.bfloat16 if ref_runs else torch.float32)
            torch.testing.assert_close(got.float(), want.float(), rtol=0.05, atol=0.02)
            torch.testing.assert_close(dec(X, state)[0], ref(X, state)[0])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                tokens, _ = dec.greedy(state, 1, 2, 4)
            assert tokens.shape == (3, 4)


class TestEmbeddingOfAnotherWidth:
    """An embedding swapped for one of another width: layer 0's input [embedding, context] no
    longer fits its weights, and every path raises instead of reading the wrong columns."""

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @ERROR_PATHS
    def test_error(self, cell, steps, grad, bound):
        dec, ref = _pair(cell, bound)
        for m in (dec, ref):
            m.embedding = nn.Embedding(VOCAB, EMBED + 1)
        _assert_reference_error(dec, ref, _tokens(steps), _state(cell), grad)

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_error_after_a_data_swap_on_a_bound_decoder(self, cell):
        dec, ref = _pair(cell, bound=True)
        for m in (dec, ref):
            m.embedding.weight.data = torch.randn(VOCAB, EMBED + 2)
        _assert_reference_error(dec, ref, _tokens(1), _state(cell), False)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_training_with_dropout_one(cell):
    """Inter-layer dropout p=1 zeroes every unit (no 0/0): the loss equals the reference
    backend's, whose masks are all zeros too."""
    losses = []
    for backend in ("ext", "reference"):
        with seq2seq_ext.use_backend(backend):
            torch.manual_seed(0)
            train_iter, src_vocab, tgt_vocab = seq2seq_ext.load_data_numbers(16, 6)[:3]
            net = seq2seq_ext.EncoderDecoder(
                seq2seq_ext.Seq2SeqEncoder(len(src_vocab), EMBED, HIDDEN, LAYERS, 1.0, cell=cell),
                seq2seq_ext.Seq2SeqDecoder(len(tgt_vocab), EMBED, HIDDEN, LAYERS, 1.0, cell=cell))
            losses.append(fit(net, train_iter, 0.005, 1, tgt_vocab, "cpu", plot=False)[0])
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_greedy_with_a_wrapped_recurrent_layer():
    """An ``rnn`` replaced by a module wrapping the GRU (no ``_flat_weights`` of its own): the
    decoder calls it, and greedy decoding gives the unwrapped decoder's tokens."""
    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(*args)

    dec, _ = _pair("gru")
    state = _state("gru")
    want = dec.greedy(state, 1, 2, 6)[0]
    dec.rnn = Wrapped(dec.rnn)
    got = dec.greedy(state, 1, 2, 6)[0]
    assert torch.equal(got, want)


class TestFusedOptimizerSteps:
    """Fused optimizers update the weights in their own kernels without bumping version
    counters; the package bumps them after each step (seq2seq_ext._optim_versions), so the
    cached inference paths (decoder stepper, encoder table, fixed context) see every step."""

    def test_every_fused_group_is_bumped(self):
        groups = [[torch.nn.Parameter(torch.ones(3))], [torch.nn.Parameter(torch.ones(2)),
                                                       torch.nn.Parameter(torch.ones(4))]]
        opt = torch.optim.Adam([{"params": g} for g in groups], lr=0.1, fused=True)
        params = [p for g in groups for p in g]
        for p in params:
            p.grad = torch.ones_like(p)
        versions = [p._version for p in params]
        opt.step()
        assert all(p._version > v for p, v in zip(params, versions))

    @pytest.mark.parametrize("make", [
        lambda ps: seq2seq_ext.training.make_adam(ps, 0.05),
        lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True),
        lambda ps: torch.optim.SGD(ps, lr=0.5, fused=True)], ids=["make_adam", "adamw", "sgd"])
    @pytest.mark.parametrize("fixed", [False, True])
    def test_cached_paths_see_the_step(self, make, fixed):
        import copy
        torch.manual_seed(0)
        net = seq2seq_ext.EncoderDecoder(
            seq2seq_ext.Seq2SeqEncoder(VOCAB, EMBED, HIDDEN, LAYERS),
            seq2seq_ext.Seq2SeqDecoder(VOCAB, EMBED, HIDDEN, LAYERS, fixed_context=fixed))
        opt = make(net.parameters())
        X, Y = _tokens(4), _tokens(3)
        valid_len = torch.tensor([3, 2, 1])
        for _ in range(2):
            net.eval()
            with torch.no_grad():  # builds (then uses) the caches
                enc_out, state = net.encoder(X)
                net.decoder(Y[:, :1], net.decoder.init_state((enc_out, state)))
            versions = [p._version for p in net.parameters()]
            net.train()
            Y_hat, _ = net(X, Y)
            opt.zero_grad()
            seq2seq_ext.MaskedSoftmaxCELoss()(Y_hat, Y, valid_len).sum().backward()
            opt.step()
            assert all(p._version > v for p, v in zip(net.parameters(), versions))
        fresh = copy.deepcopy(net).eval()  # the same weights, nothing cached
        net.eval()
        with torch.no_grad():
            got_enc, want_enc = net.encoder(X), fresh.encoder(X)
            torch.testing.assert_close(got_enc[1], want_enc[1], rtol=0, atol=1e-6)
            got = net.decoder(Y[:, :1], net.decoder.init_state(got_enc))[0]
            want = fresh.decoder(Y[:, :1], fresh.decoder.init_state(want_enc))[0]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def _net_pair(cell, dropout=0.0, fixed=False):
    """(package model, reference model) with the same weights."""
    torch.manual_seed(0)
    net = seq2seq_ext.EncoderDecoder(
        seq2seq_ext.Seq2SeqEncoder(VOCAB, EMBED, HIDDEN, LAYERS, dropout, cell=cell),
        seq2seq_ext.Seq2SeqDecoder(VOCAB, EMBED, HIDDEN, LAYERS, dropout, cell=cell,
                                   fixed_context=fixed))
    ref = reference.EncoderDecoder(
        reference.VariantSeq2SeqEncoder(VOCAB, EMBED, HIDDEN, LAYERS, dropout, cell=cell),
        reference.VariantSeq2SeqDecoder(VOCAB, EMBED, HIDDEN, LAYERS, dropout, cell=cell,
                                        fixed_context=fixed))
    ref.load_state_dict(net.state_dict())
    return net, ref


def _token_steps(net, X, valid_len, steps=4):
    """The encoder's output, then ``steps`` one-step decoder calls fed their own argmax."""
    with torch.no_grad():
        enc = net.encoder(X, valid_len)
        state = net.decoder.init_state(enc, valid_len)
        tok, outs = X[:, :1], []
        for _ in range(steps):
            Y, state = net.decoder(tok, state)
            tok = Y.argmax(-1)
            outs.append(Y)
    return enc[0], torch.cat(outs, 1)


class TestRecurrentLayerMode:
    """Inter-layer dropout follows the recurrent layer's own mode, as in ``nn.GRU`` /
    ``nn.LSTM``, not the encoder's or decoder's: a model in evaluation mode whose layers were
    put back in training mode drops out (p=1: every unit, deterministic), and a model in
    training mode whose layers are in evaluation mode does not."""

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @pytest.mark.parametrize("bound", [False, True])
    def test_layers_in_training_mode_in_an_evaluated_model(self, cell, bound):
        net, ref = _net_pair(cell, dropout=1.0)
        X, valid_len = _tokens(5), torch.tensor([5, 3, 1])
        results = []
        for m in (net, ref):
            m.eval()
            if bound:  # the tables and the per-token shortcut made in evaluation mode first
                _token_steps(m, X, valid_len)
            m.encoder.rnn.train()
            m.decoder.rnn.train()
            results.append(_token_steps(m, X, valid_len))
        for got, want in zip(*results):
            torch.testing.assert_close(got, want)

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_layers_in_evaluation_mode_in_a_training_model(self, cell):
        net, ref = _net_pair(cell, dropout=1.0)
        X, Y, valid_len = _tokens(5), _tokens(4), torch.tensor([5, 3, 1])
        outs, grads = [], []
        for m in (net, ref):
            m.train()
            m.encoder.rnn.eval()
            m.decoder.rnn.eval()
            out, _ = m(X, Y, valid_len)
            out.square().sum().backward()
            outs.append(out)
            grads.append(m.decoder.rnn.weight_hh_l1.grad)
        torch.testing.assert_close(outs[0], outs[1])
        torch.testing.assert_close(grads[0], grads[1])

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_greedy_of_layers_in_training_mode(self, cell):
        net, ref = _net_pair(cell, dropout=1.0)
        X, valid_len = _tokens(5), torch.tensor([5, 3, 1])
        for m in (net, ref):
            m.eval()
        with torch.no_grad():
            state = net.decoder.init_state(net.encoder(X, valid_len), valid_len)
            net.decoder.greedy(state, 1, -1, 4)  # bound in evaluation mode
            net.decoder.rnn.train()
            ref.decoder.rnn.train()
            got = net.decoder.greedy(state, 1, -1, 4)[0]
        assert torch.equal(got, _reference_greedy(ref, X, valid_len, 4))


def _reference_greedy(ref, X, valid_len, steps):
    """The reference model's greedy tokens from ``<bos>`` = 1, one module call a step."""
    with torch.no_grad():
        state = ref.decoder.init_state(ref.encoder(X, valid_len), valid_len)
        tok, tokens = torch.ones((X.shape[0], 1), dtype=torch.long), []
        for _ in range(steps):
            Y, state = ref.decoder(tok, state)
            tok = Y.argmax(-1)
            tokens.append(tok[:, 0])
    return torch.stack(tokens, 1)


def test_a_layer_made_batch_first_after_binding_gets_torch_error():
    """The per-token shortcut re-reads the GRU's ``batch_first``: flipped after the weights
    were bound, the call is the module's, with ``nn.GRU``'s error for the state."""
    dec, ref = _pair("gru", bound=True)
    state = _state("gru")
    dec.rnn.batch_first = ref.rnn.batch_first = True
    for m in (dec, ref):
        with torch.no_grad(), pytest.raises(RuntimeError, match="Expected hidden size"):
            m(_tokens(1), state)


class TestForwardSetOnTheInstance:
    """A ``forward`` set on the decoder instance (what module-wrapping libraries do) runs on
    every call, as ``nn.Module.__call__`` runs it: the per-token shortcut, ``greedy`` and the
    training step's kept-positions path do not skip it."""

    @staticmethod
    def _wrap(net, calls):
        inner = net.decoder.forward

        def forward(X, state):
            calls.append(X.shape[1])
            Y, state = inner(X, state)
            return Y.flip(-1), state  # a change the results show

        net.decoder.forward = forward

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @pytest.mark.parametrize("fixed", [False, True])
    def test_per_token_calls_and_greedy(self, cell, fixed):
        net, ref = _net_pair(cell, fixed=fixed)
        X, valid_len = _tokens(5), torch.tensor([5, 3, 1])
        calls, steps = {}, []
        for name, m in (("package", net), ("reference", ref)):
            m.eval()
            _token_steps(m, X, valid_len)  # bound before the wrapper is set
            calls[name] = []
            self._wrap(m, calls[name])
            steps.append(_token_steps(m, X, valid_len)[1])
        assert calls["package"] == calls["reference"] == [1, 1, 1, 1]
        torch.testing.assert_close(steps[0], steps[1])
        with torch.no_grad():
            state = net.decoder.init_state(net.encoder(X, valid_len), valid_len)
            got = net.decoder.greedy(state, 1, -1, 4)[0]
        assert torch.equal(got, _reference_greedy(ref, X, valid_len, 4))

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @pytest.mark.parametrize("where", ["decoder.dense", "decoder.rnn", "decoder.embedding",
                                       "encoder.rnn", "encoder.embedding"])
    def test_on_a_submodule(self, cell, where):
        """A ``forward`` set on the recurrent layer, the embedding or the output layer runs
        too: the fused paths that read their weights step aside for it."""
        net, ref = _net_pair(cell)
        X, valid_len = _tokens(5), torch.tensor([5, 3, 1])
        results = []
        for m in (net, ref):
            m.eval()
            _token_steps(m, X, valid_len)  # bound before the wrapper is set
            sub = m.get_submodule(where)
            inner = sub.forward
            if where.endswith("rnn"):
                sub.forward = lambda *a, inner=inner: (lambda o: (-o[0], o[1]))(inner(*a))
            else:
                sub.forward = lambda *a, inner=inner: -inner(*a)
            results.append(_token_steps(m, X, valid_len))
            out, _ = m(X, X, valid_len)  # teacher-forced
            results[-1] += (out,)
        for got, want in zip(*results):
            torch.testing.assert_close(got, want)

    @staticmethod
    def _numbers_net():
        """(a model for the numbers corpus, its batches, its target vocabulary)."""
        torch.manual_seed(0)
        train_iter, src_vocab, tgt_vocab = seq2seq_ext.load_data_numbers(8, 6)[:3]
        net = seq2seq_ext.EncoderDecoder(
            seq2seq_ext.Seq2SeqEncoder(len(src_vocab), EMBED, HIDDEN, LAYERS),
            seq2seq_ext.Seq2SeqDecoder(len(tgt_vocab), EMBED, HIDDEN, LAYERS))
        return net, train_iter, tgt_vocab

    def test_fit_calls_the_wrapped_forward(self):
        net, train_iter, tgt_vocab = self._numbers_net()
        calls = []
        self._wrap(net, calls)
        fit(net, train_iter, 0.005, 1, tgt_vocab, "cpu", plot=False)
        assert calls and all(steps > 1 for steps in calls)  # the whole target, every batch

    def test_fit_calls_a_forward_set_on_the_model(self):
        net, train_iter, tgt_vocab = self._numbers_net()
        inner, calls = net.forward, []

        def forward(*args):
            calls.append(len(args))
            return inner(*args)

        net.forward = forward
        fit(net, train_iter, 0.005, 1, tgt_vocab, "cpu", plot=False)
        assert calls
