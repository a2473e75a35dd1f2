"""fit's options: exact resume, scheduled teacher forcing, bf16 autocast, argument checks."""
import copy
import math
import random

import pytest
import torch
from torch import nn

import seq2seq_ext as d2l
from seq2seq_ext import data, reference
from seq2seq_ext import nn as seq2seq_nn
from seq2seq_ext.training import (decode_teacher_forced, enable_autocast_rules, fit,
                                  make_adam)

from helpers import assert_bf16_close

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _corpus(batch_size=32, num_steps=10, stop=300):
    return data.load_data_numbers(batch_size, num_steps, num_held_out=10, seed=0, stop=stop)


def _model(src_vocab, tgt_vocab, dropout=0.1, embed=16, hidden=32, seed=0):
    torch.manual_seed(seed)
    return d2l.EncoderDecoder(
        d2l.Seq2SeqEncoder(len(src_vocab), embed, hidden, 2, dropout),
        d2l.Seq2SeqDecoder(len(tgt_vocab), embed, hidden, 2, dropout))


def _params(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------------
# resume
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_resume_is_bitwise_identical(ratio):
    """4 epochs straight == 2 epochs, a checkpoint, fresh objects, 2 more epochs: the loader's
    shuffle, the dropout masks and (ratio 0.5) the teacher-forcing coins continue exactly."""
    train_iter, src_vocab, tgt_vocab, _ = _corpus(stop=160)
    lr, epochs, cut = 0.01, 4, 2
    random.seed(1)
    net = _model(src_vocab, tgt_vocab)
    straight, checkpoint = [], {}

    def on_epoch(epoch, loss, speed):
        straight.append(loss)
        if epoch == cut:
            checkpoint.update(torch_rng=torch.get_rng_state(), py_rng=random.getstate(),
                              weights=_params(net), optim=opt_state())

    optimizer = make_adam(net.parameters(), lr)

    def opt_state():
        return copy.deepcopy(optimizer.state_dict())

    fit(net, train_iter, lr, epochs, tgt_vocab, CPU, on_epoch=on_epoch, plot=False,
        optimizer=optimizer, teacher_forcing_ratio=ratio)
    final = _params(net)

    # fresh objects (their construction draws random numbers: the states are restored after)
    net2 = _model(src_vocab, tgt_vocab, seed=123)
    net2.load_state_dict(checkpoint["weights"])
    optimizer2 = make_adam(net2.parameters(), lr)
    optimizer2.load_state_dict(checkpoint["optim"])
    random.setstate(checkpoint["py_rng"])
    torch.set_rng_state(checkpoint["torch_rng"])
    resumed_epochs, resumed = [], []
    fit(net2, train_iter, lr, epochs, tgt_vocab, CPU, plot=False, optimizer=optimizer2,
        start_epoch=cut, init_weights=False, teacher_forcing_ratio=ratio,
        on_epoch=lambda e, l, s: (resumed_epochs.append(e), resumed.append(l)))
    assert resumed_epochs == [3, 4]
    assert resumed == straight[cut:]
    _assert_same_params(_params(net2), final)


def test_resume_needs_the_rng_state():
    """Without restoring the RNG state the continuation differs: the bitwise test above is
    sensitive to the random streams."""
    train_iter, src_vocab, tgt_vocab, _ = _corpus(stop=160)
    net = _model(src_vocab, tgt_vocab)
    torch.manual_seed(5)
    fit(net, train_iter, 0.01, 1, tgt_vocab, CPU, plot=False)
    weights = _params(net)
    results = []
    for seed in (6, 7):
        net2 = _model(src_vocab, tgt_vocab)
        net2.load_state_dict(weights)
        torch.manual_seed(seed)
        fit(net2, train_iter, 0.01, 2, tgt_vocab, CPU, plot=False, start_epoch=1,
            init_weights=False)
        results.append(_params(net2))
    assert any(not torch.equal(results[0][k], results[1][k]) for k in weights)


def test_start_epoch_equal_to_num_epochs_trains_nothing():
    train_iter, src_vocab, tgt_vocab, _ = _corpus(stop=100)
    net = _model(src_vocab, tgt_vocab)
    before = _params(net)
    calls = []
    loss, speed = fit(net, train_iter, 0.01, 3, tgt_vocab, CPU, plot=False, start_epoch=3,
                      init_weights=False, on_epoch=lambda *a: calls.append(a))
    assert calls == [] and loss != loss and speed == 0.0
    _assert_same_params(_params(net), before)


def test_given_optimizer_is_used_and_init_weights_false_keeps_weights():
    train_iter, src_vocab, tgt_vocab, _ = _corpus(stop=100)
    net = _model(src_vocab, tgt_vocab)
    before = _params(net)
    # lr 0: the weights stay as they are, so no Xavier initialisation and no other optimizer
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    fit(net, train_iter, 0.5, 1, tgt_vocab, CPU, plot=False, optimizer=optimizer,
        init_weights=False)
    _assert_same_params(_params(net), before)
    fit(net, train_iter, 0.5, 1, tgt_vocab, CPU, plot=False, optimizer=optimizer)
    assert not torch.equal(net.decoder.dense.weight, before["decoder.dense.weight"])


# ----------------------------------------------------------------------------------------------
# teacher forcing
# ----------------------------------------------------------------------------------------------

class FixedContextDecoder(reference.Seq2SeqDecoder):
    """The chapter's decoder with its context fixed to the encoder's final top-layer state (the
    d2l fix of the prediction-context defect); its state is a tuple (GRU state, context)."""

    def init_state(self, enc_outputs, *args):
        return enc_outputs[1], enc_outputs[1][-1]

    def forward(self, X, state):
        rnn_state, context = state
        X = self.embedding(X).permute(1, 0, 2)
        context = context.repeat(X.shape[0], 1, 1)
        output, rnn_state = self.rnn(torch.cat((X, context), 2), rnn_state)
        return self.dense(output).permute(1, 0, 2), (rnn_state, state[1])


def _batch(train_iter, tgt_vocab):
    X, X_valid_len, Y, Y_valid_len = next(iter(train_iter))
    bos = torch.full((Y.shape[0], 1), tgt_vocab['<bos>'], dtype=Y.dtype)
    return X, X_valid_len, Y, Y_valid_len, torch.cat([bos, Y[:, :-1]], 1)


def _fixed_context_decoders(vocab):
    out = [FixedContextDecoder(vocab, 8, 16, 2)]
    try:
        out.append(d2l.Seq2SeqDecoder(vocab, 8, 16, 2, fixed_context=True))
    except TypeError:  # the package's decoder has no fixed_context option in this version
        pass
    return out


def test_step_path_at_ratio_one_equals_parallel_path():
    """A fixed-context decoder (tuple state): logits and gradients of the step-by-step path at
    ratio 1 equal the teacher-forced parallel forward."""
    train_iter, src_vocab, tgt_vocab, _ = _corpus(batch_size=8, num_steps=7, stop=100)
    X, X_valid_len, Y, Y_valid_len, dec_input = _batch(train_iter, tgt_vocab)
    for decoder in _fixed_context_decoders(len(tgt_vocab)):
        torch.manual_seed(1)
        net = d2l.EncoderDecoder(d2l.Seq2SeqEncoder(len(src_vocab), 8, 16, 2), decoder)
        loss = d2l.MaskedSoftmaxCELoss()
        grads = []
        for step_path in (False, True):
            net.zero_grad()
            if step_path:
                Y_hat = decode_teacher_forced(net, X, dec_input, X_valid_len, 1.0)
            else:
                Y_hat, _ = net(X, dec_input, X_valid_len)
            loss(Y_hat, Y, Y_valid_len).sum().backward()
            grads.append((Y_hat.detach(), [p.grad.clone() for p in net.parameters()]))
        (par, par_grads), (step, step_grads) = grads
        assert step.shape == (X.shape[0], dec_input.shape[1], len(tgt_vocab))
        torch.testing.assert_close(step, par)
        for g_step, g_par in zip(step_grads, par_grads):
            # the gradients are sums over steps accumulated in another order
            torch.testing.assert_close(g_step, g_par, rtol=1e-5, atol=1e-6)


def test_chapter_decoder_step_path_is_the_reference_step_loop():
    """The chapter's decoder, stepped: the same logits as the reference decoder called one
    step at a time (the context it sees at prediction)."""
    train_iter, src_vocab, tgt_vocab, _ = _corpus(batch_size=8, num_steps=7, stop=100)
    X, X_valid_len, _, _, dec_input = _batch(train_iter, tgt_vocab)
    net = _model(src_vocab, tgt_vocab, dropout=0.0, embed=8, hidden=16)
    ref = reference.EncoderDecoder(
        reference.Seq2SeqEncoder(len(src_vocab), 8, 16, 2),
        reference.Seq2SeqDecoder(len(tgt_vocab), 8, 16, 2))
    ref.load_state_dict(net.state_dict())
    out = decode_teacher_forced(net, X, dec_input, X_valid_len, 1.0)
    state = ref.decoder.init_state(ref.encoder(X, X_valid_len))
    expected = []
    for t in range(dec_input.shape[1]):
        Y_t, state = ref.decoder(dec_input[:, t:t + 1], state)
        expected.append(Y_t)
    torch.testing.assert_close(out, torch.cat(expected, 1))


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0])
def test_coins_choose_ground_truth_or_own_prediction(ratio):
    """Step t >= 1 reads dec_input[:, t] when its coin (Python's random) is below the ratio,
    else the argmax of step t - 1's logits."""
    train_iter, src_vocab, tgt_vocab, _ = _corpus(batch_size=16, num_steps=9, stop=100)
    X, X_valid_len, _, _, dec_input = _batch(train_iter, tgt_vocab)
    net = _model(src_vocab, tgt_vocab, dropout=0.0, embed=8, hidden=16)
    fed = []
    net.decoder.register_forward_pre_hook(lambda mod, args: fed.append(args[0].clone()))
    random.seed(11)
    coins = [random.random() < ratio for _ in range(1, dec_input.shape[1])]
    random.seed(11)
    out = decode_teacher_forced(net, X, dec_input, X_valid_len, ratio)
    after = random.random()
    random.seed(11)
    for _ in coins:
        random.random()
    assert after == random.random()  # exactly one coin per step t >= 1
    assert len(fed) == dec_input.shape[1] and all(f.shape == (16, 1) for f in fed)
    assert torch.equal(fed[0], dec_input[:, :1])
    predictions = out.argmax(-1)
    for t, teacher in enumerate(coins, start=1):
        expected = dec_input[:, t:t + 1] if teacher else predictions[:, t - 1:t]
        assert torch.equal(fed[t], expected), t
    if ratio == 0.5:
        assert True in coins and False in coins
        assert not torch.equal(predictions[:, :-1], dec_input[:, 1:])


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_scheduled_teacher_forcing_trains(ratio):
    train_iter, src_vocab, tgt_vocab, _ = _corpus()
    random.seed(0)
    net = _model(src_vocab, tgt_vocab)
    losses = []
    fit(net, train_iter, 0.02, 6, tgt_vocab, CPU, plot=False, teacher_forcing_ratio=ratio,
        on_epoch=lambda e, l, s: losses.append(l))
    assert losses[-1] < 0.75 * losses[0], losses


def test_ratio_below_one_uses_the_step_path():
    train_iter, src_vocab, tgt_vocab, _ = _corpus(stop=100)
    net = _model(src_vocab, tgt_vocab)
    calls = []
    hook = net.decoder.register_forward_pre_hook(
        lambda mod, args: calls.append(args[0].shape[1]))
    fit(net, train_iter, 0.01, 1, tgt_vocab, CPU, plot=False, teacher_forcing_ratio=0.99)
    assert calls and set(calls) == {1}
    hook.remove()  # (a hooked decoder is called as a module: the hook runs on either path)
    calls.clear()
    seen = []
    features = net.decoder.forward_features
    net.decoder.forward_features = lambda X, state, **kw: (seen.append(X.shape[1]),
                                                           features(X, state, **kw))[1]
    fit(net, train_iter, 0.01, 1, tgt_vocab, CPU, plot=False)
    assert not calls and seen and set(seen) == {10}


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("variant", [{}, {"fixed_context": True}, {"cell": "lstm"},
                                     {"cell": "lstm", "fixed_context": True}],
                         ids=["chapter", "fixed", "lstm", "lstm-fixed"])
def test_projecting_only_kept_positions_gives_the_full_loss_and_gradients(variant, packed):
    """fit projects and scores only the positions the mask keeps (and, packed, runs the
    decoder's recurrent layers on those only, the batch sorted by length); with the same seed
    (the same dropout masks) the per-sequence loss, in the batch's order, and every gradient
    equal those of the full forward + MaskedSoftmaxCELoss."""
    from seq2seq_ext import training
    train_iter, src_vocab, tgt_vocab, _ = _corpus(stop=200)
    torch.manual_seed(1)
    net = d2l.EncoderDecoder(
        d2l.Seq2SeqEncoder(len(src_vocab), 8, 16, 2, 0.3, cell=variant.get("cell", "gru")),
        d2l.Seq2SeqDecoder(len(tgt_vocab), 8, 16, 2, 0.3, **variant)).train()
    assert training._projects_kept_rows(net)
    X, X_valid_len, Y, Y_valid_len = next(iter(train_iter))
    Y_valid_len = Y_valid_len.clone()
    Y_valid_len[0], Y_valid_len[1] = 0, Y.shape[1] + 3  # nothing kept / all kept
    dec_input = torch.cat([torch.full((Y.shape[0], 1), tgt_vocab['<bos>']), Y[:, :-1]], 1)
    model = training._TrainForward(net, 1.0, d2l.MaskedSoftmaxCELoss())
    kept = training._kept_positions(Y_valid_len, *Y.shape, packed=packed)
    assert kept.rows.numel() == int(Y_valid_len.clamp(max=Y.shape[1]).sum()) < Y.numel()
    if packed:
        assert len(kept.batch_sizes) == Y.shape[1]
        assert kept.batch_sizes[0] == Y.shape[0] - 1 and sum(kept.batch_sizes) == kept.rows.numel()
        assert not torch.equal(kept.order, torch.arange(Y.shape[0]))  # the batch was reordered
        assert torch.equal(kept.rows.sort().values, training._kept_rows(Y_valid_len, *Y.shape))
    results = []
    for k in (kept, None):
        net.zero_grad()
        torch.manual_seed(2)  # the same dropout masks: packing keeps them
        loss = model(X, dec_input, X_valid_len, Y, Y_valid_len, k)
        loss.sum().backward()
        results.append((loss.detach(), [p.grad.clone() for p in net.parameters()]))
    (kept_loss, kept_grads), (full_loss, full_grads) = results
    assert kept_loss[0] == 0
    torch.testing.assert_close(kept_loss, full_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(kept_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_fit_on_the_cpu_runs_the_decoder_packed(cell):
    """fit on the CPU hands the decoder's recurrent layers the packed layout: the layers run
    only the positions the loss reads."""
    train_iter, src_vocab, tgt_vocab, _ = _corpus(stop=100)
    torch.manual_seed(0)
    net = d2l.EncoderDecoder(d2l.Seq2SeqEncoder(len(src_vocab), 16, 32, 2, 0.1, cell=cell),
                             d2l.Seq2SeqDecoder(len(tgt_vocab), 16, 32, 2, 0.1, cell=cell))
    seen = []
    features = net.decoder.forward_features
    net.decoder.forward_features = lambda X, state, **kw: (seen.append(kw.get("batch_sizes")),
                                                           features(X, state, **kw))[1]
    fit(net, train_iter, 0.01, 1, tgt_vocab, CPU, plot=False)
    assert seen and all(b is not None and b == sorted(b, reverse=True) for b in seen)
    assert sum(sum(b) for b in seen) < sum(len(b) * b[0] for b in seen)  # padding skipped


# ----------------------------------------------------------------------------------------------
# bf16 autocast
# ----------------------------------------------------------------------------------------------

def test_bf16_training_converges_and_runs_the_projection_in_bf16():
    train_iter, src_vocab, tgt_vocab, _ = _corpus()
    net = _model(src_vocab, tgt_vocab)
    dtypes = set()
    net.decoder.dense.register_forward_hook(lambda mod, args, out: dtypes.add(out.dtype))
    losses = []
    fit(net, train_iter, 0.02, 8, tgt_vocab, CPU, plot=False, amp="bf16",
        on_epoch=lambda e, l, s: losses.append(l))
    assert dtypes == {torch.bfloat16}
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(p.dtype == torch.float32 for p in net.parameters())


@pytest.mark.usefixtures("rounded_bf16_gemm")
def test_what_runs_in_bf16_under_autocast():
    """Under CPU autocast: the output projection and the loss input in bf16; the GRU layers
    (fused op) with bf16 products and float32 states and outputs; the parameters' gradients
    float32."""
    enable_autocast_rules("cpu")
    enable_autocast_rules("cpu")  # idempotent
    train_iter, src_vocab, tgt_vocab, _ = _corpus(batch_size=8, num_steps=7, stop=100)
    X, X_valid_len, Y, Y_valid_len, dec_input = _batch(train_iter, tgt_vocab)
    net = _model(src_vocab, tgt_vocab, dropout=0.0, embed=8, hidden=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        enc_out, enc_state = net.encoder(X, X_valid_len)
        Y_hat, state = net(X, dec_input, X_valid_len)
        l = d2l.MaskedSoftmaxCELoss()(Y_hat, Y, Y_valid_len)
    assert enc_out.dtype == torch.float32 and state.dtype == torch.float32
    assert Y_hat.dtype == torch.bfloat16
    emb = net.encoder.embedding(X).permute(1, 0, 2)
    want, _, _ = reference.rnn_stack("gru", emb, emb.new_zeros(2, X.shape[0], 16), None,
                                     net.encoder.rnn._flat_weights, product_dtype=torch.bfloat16)
    assert_bf16_close(enc_out, want)
    l.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in net.parameters())
    ref, _ = net(X, dec_input, X_valid_len)
    # bf16 has 8 significant bits: the logits agree with float32 to about 1e-2
    torch.testing.assert_close(Y_hat.float(), ref.detach(), rtol=2e-2, atol=2e-2)


def test_bf16_lstm_model_runs_its_layers_with_bf16_products(monkeypatch):
    """cell="lstm": the LSTM layers run the fused op under autocast (bf16 products; PyTorch's
    own bf16 LSTM needs a CPU with bf16 instructions), float32 out, the loss falls."""
    calls = []
    real = seq2seq_nn._C.rnn_forward

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((args[0], torch.is_autocast_enabled("cpu"), out is not None))
        return out
    monkeypatch.setattr(seq2seq_nn._C, "rnn_forward", spy)
    train_iter, src_vocab, tgt_vocab, _ = _corpus(stop=200)
    torch.manual_seed(0)
    net = d2l.EncoderDecoder(d2l.Seq2SeqEncoder(len(src_vocab), 16, 16, 2, cell="lstm"),
                             d2l.Seq2SeqDecoder(len(tgt_vocab), 16, 16, 2, cell="lstm"))
    losses = []
    fit(net, train_iter, 0.02, 4, tgt_vocab, CPU, plot=False, amp="bf16",
        on_epoch=lambda e, l, s: losses.append(l))
    assert calls and all(c == ("lstm", True, True) for c in calls)
    assert losses[-1] < 0.8 * losses[0], losses


def test_bf16_convergence_benchmark_compares_both_runs(capsys):
    """benchmarks/bf16_convergence.py: float32 and bf16 runs of one seed, one row per epoch."""
    from seq2seq_ext.bench import bf16_convergence
    assert bf16_convergence.main(["--cells", "lstm", "--seeds", "0", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "| epoch | float32 seed 0 | bf16 seed 0 |" in out
    rows = [line for line in out.splitlines() if line.startswith("| 2 |")]
    f32, bf16 = (float(v) for v in rows[0].strip("| ").split(" | ")[1:])
    assert abs(f32 - bf16) < 0.05 * f32


def test_padding_skip_benchmark_times_the_bf16_step(capsys, monkeypatch, fra_eng_path):
    """benchmarks/padding_skip.py --amp: the packed step under bf16 autocast beside float32."""
    from seq2seq_ext.bench import common, padding_skip
    monkeypatch.setattr(common, "FRA_ENG", fra_eng_path)
    assert padding_skip.main(["--amp", "--config", "chapter", "--batches", "1",
                              "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert f"bf16 products: {d2l.ops.bf16_gemm()}" in out
    cells = next(line for line in out.splitlines() if line.startswith("| chapter |")).split("|")
    ms = [float(v) for v in cells[2:5]]  # reference, packed float32, packed bf16
    assert all(v > 0 for v in ms)


class _GemmLog(torch.overrides.TorchFunctionMode):
    """Every matrix product called, with whether CPU autocast was on and its operands' dtypes."""
    PRODUCTS = {torch.nn.functional.linear, torch.mm, torch.matmul, torch.addmm, torch.bmm,
                torch.Tensor.mm, torch.Tensor.matmul, torch.Tensor.__matmul__}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.PRODUCTS:
            dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
            self.calls.append((func.__name__, torch.is_autocast_enabled("cpu"), dtypes))
        return func(*args, **(kwargs or {}))


class TestAutocastLinear:
    """ops.autocast_linear: F.linear whose bf16 products under CPU autocast follow
    ops.set_bf16_gemm ("rounded": float32 GEMMs on bf16-rounded operands)."""

    @staticmethod
    def _run(fn, shape, seed, bias=True):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(*shape, generator=g, requires_grad=True)
        w = torch.randn(11, shape[-1], generator=g, requires_grad=True)
        b = torch.randn(11, generator=g, requires_grad=True) if bias else None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x, w, b)
        y.backward(torch.randn(y.shape, generator=g).to(y.dtype))
        return [y] + [t.grad for t in (x, w, b) if t is not None]

    @pytest.mark.parametrize("shape, bias", [((7, 13), True), ((5, 3, 13), False),
                                             ((1, 13), True)])
    def test_matches_autocasts_linear(self, bf16_gemm, shape, bias):
        seed = random.randrange(2 ** 31)
        got = self._run(d2l.ops.autocast_linear, shape, seed, bias)
        want = self._run(torch.nn.functional.linear, shape, seed, bias)
        assert got[0].dtype == torch.bfloat16
        for a, b in zip(got, want):
            assert a.dtype == b.dtype
            if bf16_gemm == "native":  # autocast's own linear
                assert torch.equal(a, b)
            else:  # the same bf16 products; a sum's last bit may move one rounding
                assert_bf16_close(a, b.float())

    def test_rounded_runs_float32_products_outside_autocast(self, bf16_gemm):
        with _GemmLog() as log:
            self._run(d2l.ops.autocast_linear, (4, 6), 0)
        # forward only: backward's products are not torch functions
        if bf16_gemm == "rounded":
            assert log.calls == [("linear", False, (torch.float32,) * 3)]
        else:
            assert log.calls == [("linear", True, (torch.float32,) * 3)]

    def test_is_linear_without_autocast_float64_or_the_reference_backend(self, bf16_gemm):
        x, w, b = torch.randn(3, 5), torch.randn(4, 5), torch.randn(4)
        assert torch.equal(d2l.ops.autocast_linear(x, w, b), torch.nn.functional.linear(x, w, b))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x64, w64 = x.double(), w.double()
            out = d2l.ops.autocast_linear(x64, w64)
            assert out.dtype == torch.float64 and torch.equal(out, x64 @ w64.t())
            with d2l.ops.use_backend("reference"):
                assert torch.equal(d2l.ops.autocast_linear(x, w, b),
                                   torch.nn.functional.linear(x, w, b))


    def test_traces_as_linear_under_torch_compile(self):
        """Compiled (one graph, no break), it is autocast's linear, whatever the mode."""
        x, w, b = torch.randn(3, 5), torch.randn(4, 5), torch.randn(4)
        compiled = torch.compile(d2l.ops.autocast_linear, fullgraph=True, backend="eager")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = compiled(x, w, b), torch.nn.functional.linear(x, w, b)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_rounded_bf16_training_step_runs_no_emulated_bf16_gemm(bf16_gemm, cell):
    """Under "rounded" the whole forward of the chapter model's fit step (the kept rows'
    projection, the context's projection, the layers) calls no matrix product that autocast
    would run as a bf16 GEMM; under "native" the projections are autocast's bf16 GEMMs."""
    train_iter, src_vocab, tgt_vocab, _ = _corpus(batch_size=8, num_steps=7, stop=100)
    torch.manual_seed(0)
    net = d2l.EncoderDecoder(d2l.Seq2SeqEncoder(len(src_vocab), 8, 16, 2, cell=cell),
                             d2l.Seq2SeqDecoder(len(tgt_vocab), 8, 16, 2, cell=cell))
    with _GemmLog() as log:
        fit(net, [next(iter(train_iter))], 0.01, 1, tgt_vocab, CPU, plot=False, amp="bf16")
    autocast_products = [c for c in log.calls if c[1]]
    if bf16_gemm == "rounded":
        assert log.calls and not autocast_products, log.calls
    else:
        assert autocast_products


def test_bf16_with_scheduled_teacher_forcing_runs():
    train_iter, src_vocab, tgt_vocab, _ = _corpus(stop=100)
    net = _model(src_vocab, tgt_vocab)
    loss, _ = fit(net, train_iter, 0.01, 1, tgt_vocab, CPU, plot=False, amp="bf16",
                  teacher_forcing_ratio=0.5)
    assert 0 < loss < 10


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(teacher_forcing_ratio=-0.1), ValueError, "teacher_forcing_ratio"),
    (dict(teacher_forcing_ratio=1.5), ValueError, "teacher_forcing_ratio"),
    (dict(teacher_forcing_ratio=float("nan")), ValueError, "teacher_forcing_ratio"),
    (dict(teacher_forcing_ratio="0.5"), TypeError, "teacher_forcing_ratio"),
    (dict(amp="fp16"), ValueError, "amp"),
    (dict(start_epoch=4), ValueError, "start_epoch"),
    (dict(start_epoch=-1), ValueError, "start_epoch"),
    (dict(start_epoch=1.0), TypeError, "start_epoch"),
    (dict(optimizer="adam"), TypeError, "optimizer"),
    (dict(lr=-1.0), ValueError, "lr"),
    (dict(lr=float("nan")), ValueError, "lr"),
    (dict(lr="0.01"), TypeError, "lr"),
    (dict(lr=torch.tensor([0.1, 0.2])), TypeError, "lr"),
    (dict(device="cuda:64"), ValueError, "device"),
    (dict(device="no-such-device"), ValueError, "device"),
    (dict(tgt_vocab=None), TypeError, "tgt_vocab"),
    (dict(data_iter=None), TypeError, "data_iter"),
])
def test_bad_arguments_raise_and_change_nothing(kwargs, exc, name):
    """Checked before the weights are initialised or a random number is drawn."""
    train_iter, src_vocab, tgt_vocab, _ = _corpus(stop=100)
    net = _model(src_vocab, tgt_vocab)
    before = _params(net)
    args = dict(data_iter=train_iter, lr=0.01, num_epochs=3, tgt_vocab=tgt_vocab, device=CPU)
    args.update(kwargs)
    rng = torch.get_rng_state()
    with pytest.raises(exc, match=f"^{name}"):
        fit(net, plot=False, **args)
    _assert_same_params(_params(net), before)
    assert torch.equal(torch.get_rng_state(), rng)


def test_decode_teacher_forced_bad_arguments():
    train_iter, src_vocab, tgt_vocab, _ = _corpus(batch_size=4, num_steps=5, stop=100)
    X, X_valid_len, _, _, dec_input = _batch(train_iter, tgt_vocab)
    net = _model(src_vocab, tgt_vocab)
    with pytest.raises(ValueError, match="teacher_forcing_ratio"):
        decode_teacher_forced(net, X, dec_input, X_valid_len, 2.0)
    with pytest.raises(ValueError, match="dec_input"):
        decode_teacher_forced(net, X, dec_input[:, :0], X_valid_len, 0.5)
    with pytest.raises(ValueError, match="dec_input"):
        decode_teacher_forced(net, X, dec_input[0], X_valid_len, 0.5)


def test_default_fit_matches_train_seq2seq_printout(capsys):
    """train_seq2seq still prints the chapter's line from fit's defaults."""
    train_iter, src_vocab, tgt_vocab, _ = _corpus(stop=100)
    net = _model(src_vocab, tgt_vocab)
    torch.manual_seed(0)
    d2l.train_seq2seq(net, train_iter, 0.01, 2, tgt_vocab, CPU)
    out = capsys.readouterr().out
    assert out.startswith("loss ") and out.rstrip().endswith("tokens/sec on cpu")
    assert isinstance(net.decoder.dense, nn.Linear)


# ----------------------------------------------------------------------------------------------
# what a user's own code attaches to the model
# ----------------------------------------------------------------------------------------------

def test_xavier_init_treats_the_drop_in_gru_as_the_chapters_gru():
    def model():
        torch.manual_seed(3)
        return nn.Sequential(nn.Embedding(5, 4), nn.GRU(4, 6, 2), nn.Linear(6, 5))
    plain, accelerated = model(), d2l.accelerate(model())
    assert type(accelerated[1]) is seq2seq_nn.GRU
    for m in (plain, accelerated):
        torch.manual_seed(4)
        m.apply(d2l.xavier_init_weights)
    for (name, p), q in zip(plain.named_parameters(), accelerated.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(plain[1].weight_hh_l1, model()[1].weight_hh_l1)  # it did initialise


@pytest.mark.parametrize("on", ["decoder", "net"])
def test_forward_hooks_on_the_model_or_its_decoder_run_in_training(on):
    """A hook that zeroes the decoder's (or the model's) output makes every logit 0: the loss per
    token is then log(vocab) / num_steps (the chapter's loss is a mean over the steps, padding
    included, summed over sequences and divided by their tokens), which the kept-positions path
    (it calls neither module) would not give."""
    train_iter, src_vocab, tgt_vocab, _ = _corpus(stop=40)
    net = _model(src_vocab, tgt_vocab)
    module = net.decoder if on == "decoder" else net
    calls = []

    def zero_output(mod, args, out):
        calls.append(1)
        return (out[0] * 0, *out[1:])
    module.register_forward_hook(zero_output)
    losses = []
    fit(net, train_iter, 0.01, 1, tgt_vocab, CPU, plot=False,
        on_epoch=lambda epoch, loss, speed: losses.append(loss))
    assert calls and losses[0] == pytest.approx(math.log(len(tgt_vocab)) / 10, rel=1e-6)


@pytest.mark.parametrize("on", ["decoder", "net"])
def test_a_call_of_the_model_or_decoder_class_runs_in_training(on):
    """As a hook does (above): a class of the model or of its decoder with its own ``__call__``
    that zeroes the logits makes every logit 0; the kept-positions path would skip it."""
    train_iter, src_vocab, tgt_vocab, _ = _corpus(stop=40)
    net = _model(src_vocab, tgt_vocab)
    module = net.decoder if on == "decoder" else net
    calls = []

    class ZeroOutput(type(module)):
        def __call__(self, *args, **kwargs):
            calls.append(1)
            out = super().__call__(*args, **kwargs)
            return (out[0] * 0, *out[1:])
    module.__class__ = ZeroOutput
    losses = []
    fit(net, train_iter, 0.01, 1, tgt_vocab, CPU, plot=False,
        on_epoch=lambda epoch, loss, speed: losses.append(loss))
    assert calls and losses[0] == pytest.approx(math.log(len(tgt_vocab)) / 10, rel=1e-6)


def test_a_batch_whose_lengths_do_not_match_its_rows_is_refused_naming_them():
    train_iter, src_vocab, tgt_vocab, _ = _corpus(stop=40)
    X, X_valid_len, Y, Y_valid_len = next(iter(train_iter))
    net = _model(src_vocab, tgt_vocab)
    with pytest.raises(ValueError, match=r"Y_valid_len: expected one length per sequence"):
        fit(net, [(X, X_valid_len, Y, Y_valid_len[:3])], 0.01, 1, tgt_vocab, CPU, plot=False)


def test_fit_sets_the_samplers_epoch_before_each_epoch():
    """A distributed sampler reshuffles by ``set_epoch``: fit calls it with each epoch's index
    (0-based, as ``DistributedSampler`` expects), from ``start_epoch`` on."""
    train_iter, src_vocab, tgt_vocab, _ = _corpus(stop=40)
    seen = []

    class Sampler:
        def set_epoch(self, epoch):
            seen.append(epoch)

    class Loader:
        sampler = Sampler()

        def __iter__(self):
            return iter(train_iter)

    net = _model(src_vocab, tgt_vocab)
    fit(net, Loader(), 0.01, 3, tgt_vocab, CPU, plot=False)
    fit(net, Loader(), 0.01, 5, tgt_vocab, CPU, plot=False, start_epoch=3, init_weights=False)
    assert seen == [0, 1, 2, 3, 4]


def test_fit_clips_the_global_gradient_norm_at_one():
    """The chapter's step clips the gradients' global norm at 1 (``grad_clipping(net, 1)``)."""
    train_iter, src_vocab, tgt_vocab, _ = _corpus(stop=60)
    net = _model(src_vocab, tgt_vocab, dropout=0.0)
    norms = []

    class Recorder(torch.optim.SGD):
        def step(self, closure=None):
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads]))))
            return super().step(closure)

    fit(net, train_iter, 0.0, 2, tgt_vocab, CPU, plot=False,
        optimizer=Recorder(net.parameters(), lr=0.0))
    assert norms and max(norms) <= 1.0 + 1e-5
    assert max(norms) > 0.999  # the loss's gradients exceed the bound: clipping was at work


@pytest.mark.parametrize("kind", ["backward", "backward_pre"])
@pytest.mark.parametrize("where", ["encoder", "decoder"])
def test_backward_hooks_on_the_recurrent_layers_run(kind, where):
    """A module backward hook on a model's GRU makes the model call that module (the fused
    paths read its weights without calling it), so the hook sees the gradients, as with the
    reference."""
    train_iter, src_vocab, tgt_vocab, _ = _corpus(stop=40)
    net = _model(src_vocab, tgt_vocab, dropout=0.0)
    rnn = getattr(net, where).rnn
    seen = []

    def record(grads):  # the encoder's outputs are not used, its final state is
        seen.append(next(g.shape for g in grads if g is not None))
    if kind == "backward":
        rnn.register_full_backward_hook(lambda mod, gin, gout: record(gout))
    else:
        rnn.register_full_backward_pre_hook(lambda mod, gout: record(gout))
    X, X_valid_len, Y, Y_valid_len = next(iter(train_iter))
    Y_hat, _ = net(X, Y, X_valid_len)
    d2l.MaskedSoftmaxCELoss()(Y_hat, Y, Y_valid_len).sum().backward()
    assert seen and seen[0][-1] == rnn.hidden_size


class TestClipAndStep:
    """training._clip_and_step, fit's update: the gradients clipped to a global norm, then the
    optimizer's step; a fused Adam over the model's float32 parameters takes the clipping
    factor as its kernel's gradient divisor (seq2seq_ext/_clip_divisor.py)."""

    @staticmethod
    def _pair(seed):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5))
        return net, copy.deepcopy(net)

    @staticmethod
    def _grads(net, x, scale):
        net.zero_grad()
        (net(x).sum() * scale).backward()

    @pytest.mark.parametrize("scale", [50.0, 1e-3])  # clipped, and a norm below theta
    @pytest.mark.parametrize("adamw", [False, True])
    def test_the_divisor_gives_the_clipped_update(self, scale, adamw, monkeypatch):
        from seq2seq_ext import _clip_divisor, training
        a, b = self._pair(random.randrange(2 ** 31))
        make = ((lambda p: torch.optim.AdamW(p, lr=0.01, fused=True)) if adamw
                else (lambda p: training.make_adam(p, 0.01)))
        opt_a, opt_b = make(a.parameters()), make(b.parameters())
        assert _clip_divisor.takes_divisor(opt_a, list(a.parameters()))
        mul_calls = []
        real_mul = torch._foreach_mul_
        monkeypatch.setattr(torch, "_foreach_mul_",
                            lambda *args: mul_calls.append(1) or real_mul(*args))
        for _ in range(3):
            x = torch.randn(6, 7)
            self._grads(a, x, scale)
            self._grads(b, x, scale)
            mul_calls.clear()
            training._clip_and_step(a, 1, opt_a)  # the divisor
            assert not mul_calls  # no pass of its own over the gradients
            training._clip_global_norm(b, 1)  # the clipping's own pass, then the step
            assert mul_calls
            opt_b.step()
            for p, q in zip(a.parameters(), b.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)  # clipped back
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        if scale > 1:  # the clipping really happened
            assert math.isclose(torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in a.parameters()])).item(), 1, rel_tol=1e-5)
        assert not hasattr(opt_a, "grad_scale")

    def test_other_optimizers_clip_then_step(self):
        from seq2seq_ext import _clip_divisor, training
        net, _ = self._pair(0)
        params = list(net.parameters())
        refused = [torch.optim.Adam(params, lr=0.01, foreach=True),
                   torch.optim.SGD(params, lr=0.01),
                   torch.optim.Adam(params[:2], lr=0.01, fused=True)]  # not all the model's
        scaled = training.make_adam(params, 0.01)
        scaled.grad_scale = torch.tensor(2.0)  # a scaler's attribute present
        refused.append(scaled)
        frozen = copy.deepcopy(net)
        frozen[0].bias.requires_grad_(False)
        for opt in refused:
            assert not _clip_divisor.takes_divisor(opt, params)
        assert not _clip_divisor.takes_divisor(training.make_adam(frozen.parameters(), 0.01),
                                               list(frozen.parameters()))
        double = copy.deepcopy(net).double()
        assert not _clip_divisor.takes_divisor(
            training.make_adam(double.parameters(), 0.01), list(double.parameters()))
        # the fallback still clips
        opt = torch.optim.SGD(params, lr=0.0)
        self._grads(net, torch.randn(6, 7), 50.0)
        training._clip_and_step(net, 1, opt)
        total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        assert math.isclose(total.item(), 1, rel_tol=1e-5)

    def test_the_attribute_goes_when_the_step_raises(self):
        from seq2seq_ext import _clip_divisor, training
        net, _ = self._pair(1)
        opt = training.make_adam(net.parameters(), 0.01)
        self._grads(net, torch.randn(6, 7), 50.0)

        def failing(*args, **kwargs):
            raise RuntimeError("step failed")

        opt.step = failing
        with pytest.raises(RuntimeError, match="step failed"):
            _clip_divisor.step_with_divisor(opt, torch.tensor(2.0))
        assert not hasattr(opt, "grad_scale")
