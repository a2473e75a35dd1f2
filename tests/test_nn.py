"""The drop-in layers ``seq2seq_ext.nn.GRU`` / ``LSTM`` and ``seq2seq_ext.accelerate`` against
``torch.nn.GRU`` / ``LSTM``: outputs, states, every gradient, the fallbacks, and whole programs
(the seeds' per-step teacher-forcing model, the chapter's decoder written by a user) run through
``accelerate``."""
import copy
import random
import re

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import seq2seq_ext
from seq2seq_ext import nn as snn
from seq2seq_ext import ops, reference
from seq2seq_ext.bench import seed_models

from helpers import assert_bf16_close, generator, gru_tol

CLASSES = {"gru": (nn.GRU, snn.GRU), "lstm": (nn.LSTM, snn.LSTM)}


@pytest.fixture
def op_calls(monkeypatch):
    """The cells of the fused calls behind the drop-in layers: eager calls through
    ``_C.rnn_forward``, traced ones through ``ops.rnn_stack``."""
    calls = []
    real_op, real_forward = ops.rnn_stack, snn._C.rnn_forward

    def op_spy(*args, **kwargs):
        calls.append(args[0])
        return real_op(*args, **kwargs)

    def forward_spy(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        if out is not None:
            calls.append(args[0])
        return out

    monkeypatch.setattr(ops, "rnn_stack", op_spy)
    monkeypatch.setattr(snn._C, "rnn_forward", forward_spy)
    return calls


def pair(cell, *args, dtype=torch.float64, seed=0, **kwargs):
    """(torch.nn layer, drop-in layer) with the same weights."""
    torch.manual_seed(seed)
    ref_cls, new_cls = CLASSES[cell]
    ref = ref_cls(*args, **kwargs).to(dtype)
    new = new_cls(*args, **kwargs).to(dtype)
    new.load_state_dict(ref.state_dict())
    return ref, new


def state_tensors(state):
    return list(state) if isinstance(state, tuple) else [state]


def run_and_grad(module, x, hx, seed=1):
    out, state = module(x, hx)
    outs = [out] + state_tensors(state)
    g = generator(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)).sum()
               for o in outs)
    inputs = [x] + [t for t in state_tensors(hx) if t is not None] + list(module.parameters())
    return outs, torch.autograd.grad(loss, inputs)


def make_hx(cell, layers, batch, hidden, dtype, batched=True, seed=2):
    if batch is None:
        return None
    g = generator(seed)
    shape = (layers, batch, hidden) if batched else (layers, hidden)
    h = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    if cell == "lstm":
        return h, torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return h


class TestDropInParity:
    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @pytest.mark.parametrize("layers,in_size,hidden,batch,steps,batch_first,bias,give_hx", [
        (1, 3, 5, 1, 1, False, True, True),
        (2, 16, 32, 7, 1, True, True, True),      # the seeds' decoder step
        (3, 9, 17, 5, 6, True, False, False),
        (2, 13, 33, 3, 9, False, True, False),
    ])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_outputs_states_and_gradients(self, cell, layers, in_size, hidden, batch, steps,
                                          batch_first, bias, give_hx, dtype, op_calls):
        ref, new = pair(cell, in_size, hidden, layers, bias=bias, batch_first=batch_first,
                        dtype=dtype, seed=layers + steps)
        shape = (batch, steps, in_size) if batch_first else (steps, batch, in_size)
        x = torch.randn(shape, generator=generator(3), dtype=torch.float64).to(dtype)
        x.requires_grad_()
        hx = make_hx(cell, layers, batch, hidden, dtype) if give_hx else None
        want, want_grads = run_and_grad(ref, x, hx)
        got, got_grads = run_and_grad(new, x, hx)
        assert op_calls == [cell]
        tol = gru_tol(dtype)
        for g, w in zip(got + list(got_grads), want + list(want_grads)):
            torch.testing.assert_close(g, w, **tol)

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_unbatched_input(self, cell, op_calls):
        ref, new = pair(cell, 4, 6, 2)
        x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        for hx in (None, make_hx(cell, 2, 1, 6, torch.float64, batched=False)):
            want, want_grads = run_and_grad(ref, x, hx)
            got, got_grads = run_and_grad(new, x, hx)
            for g, w in zip(got + list(got_grads), want + list(want_grads)):
                assert g.shape == w.shape
                torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
        assert op_calls == [cell, cell]

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_eval_mode_dropout_is_off(self, cell):
        ref, new = pair(cell, 4, 6, 3, dropout=0.5)
        ref.eval(), new.eval()
        x = torch.randn(3, 2, 4, dtype=torch.float64)
        torch.testing.assert_close(new(x)[0], ref(x)[0], rtol=1e-12, atol=1e-12)

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_training_dropout_masks_between_layers(self, cell, op_calls):
        """Dropout in training: a fresh mask per call (two calls differ), the top layer's state
        depends on it, the mean over many draws is the no-dropout result's neighbourhood, and
        p = 1 feeds zeros to the layers above the first."""
        _, new = pair(cell, 4, 8, 2, dropout=0.5)
        x = torch.randn(3, 2, 4, dtype=torch.float64)
        torch.manual_seed(0)
        a, b = new(x)[0], new(x)[0]
        assert not torch.equal(a, b)
        torch.manual_seed(0)
        torch.testing.assert_close(new(x)[0], a, rtol=0, atol=0)  # the default generator's stream
        new.dropout = 1.0
        zero_fed = new(x)[0]
        ref_top = copy.deepcopy(new)
        with torch.no_grad():  # a stack whose layer 1 reads zeros: only its biases matter
            out, _, _ = reference.rnn_stack(cell, torch.zeros(3, 2, 8, dtype=torch.float64),
                                            torch.zeros(1, 2, 8, dtype=torch.float64),
                                            torch.zeros(1, 2, 8, dtype=torch.float64)
                                            if cell == "lstm" else None,
                                            ref_top._flat_weights[4:])
        torch.testing.assert_close(zero_fed, out, rtol=1e-12, atol=1e-12)
        assert len(op_calls) == 4

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_torch_masks_are_torch_nn_masks(self, cell, op_calls):
        """fused_forward(..., torch_masks=True) in training draws nn.GRU / nn.LSTM's own
        dropout masks: the same seed gives their outputs and gradients."""
        ref, new = pair(cell, 4, 8, 3, dropout=0.4)
        x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
        torch.manual_seed(11)
        want = ref(x)
        torch.manual_seed(11)
        got = snn.fused_forward(new, x, torch_masks=True)
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
        gw = torch.autograd.grad(want[0].sum(), [x] + list(ref.parameters()))
        gg = torch.autograd.grad(got[0].sum(), [x] + list(new.parameters()))
        for a, b in zip(gg, gw):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert op_calls == [cell]

    def test_package_lstm_model_runs_the_stack_op(self, op_calls):
        """The package's own cell="lstm" encoder and decoder run their LSTM layers fused in
        training (the chapter's sequence calls)."""
        net = seq2seq_ext.EncoderDecoder(seq2seq_ext.Seq2SeqEncoder(10, 4, 6, 2, cell="lstm"),
                                         seq2seq_ext.Seq2SeqDecoder(10, 4, 6, 2, cell="lstm"))
        X = torch.randint(0, 10, (3, 5))
        Y_hat, _ = net(X, X, torch.tensor([5, 2, 3]))
        Y_hat.sum().backward()
        assert op_calls == ["lstm", "lstm"]

    def test_double_and_inference_mode(self, op_calls):
        ref, new = pair("lstm", 5, 7, 2, dtype=torch.float32)
        ref.double(), new.double()
        x = torch.randn(4, 3, 5, dtype=torch.float64)
        with torch.inference_mode():
            got = new(x)[0]
            want = ref(x)[0]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert op_calls == ["lstm"]


class TestDropoutKeepMask:
    """_C.dropout_keep_mask, the drop-in layers' masks on the CPU (csrc/dropout_mask.cpp)."""

    @pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_values_and_keep_rate(self, p, dtype):
        torch.manual_seed(random.randrange(2 ** 31))
        m = snn._C.dropout_keep_mask([3, 401, 333], p, torch.empty(0, dtype=dtype))
        assert m.shape == (3, 401, 333) and m.dtype == dtype
        scale = torch.tensor(1, dtype=dtype) / torch.tensor(1 - p, dtype=dtype)
        kept = m != 0
        assert torch.equal(m[kept], scale.expand(int(kept.sum())))
        n, rate = m.numel(), kept.double().mean().item()
        assert abs(rate - (1 - p)) < 5 * ((p * (1 - p) / n) ** 0.5), rate
        # neighbours (the two halves of one draw) and rows are independent
        pairs = (kept.reshape(-1)[:-1:2] & kept.reshape(-1)[1::2]).double().mean().item()
        assert abs(pairs - (1 - p) ** 2) < 5 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / (n / 2)) ** 0.5
        rows = kept[:, :-1] & kept[:, 1:]
        assert abs(rows.double().mean().item() - (1 - p) ** 2) < 0.01

    def test_seeded_by_the_default_generator(self):
        like = torch.empty(0)
        torch.manual_seed(5)
        a = snn._C.dropout_keep_mask([7, 9], 0.5, like)
        b = snn._C.dropout_keep_mask([7, 9], 0.5, like)
        assert not torch.equal(a, b)  # each call advances the generator
        torch.manual_seed(5)
        assert torch.equal(snn._C.dropout_keep_mask([7, 9], 0.5, like), a)
        torch.manual_seed(5)
        assert not torch.equal(snn._C.dropout_keep_mask([7, 9], 0.5, like),
                               snn._C.dropout_keep_mask([7, 9], 0.5, like))

    @pytest.mark.parametrize("p", [0.25, 0.5])  # 1 - p exact in float and double
    def test_counter_based_stream(self, p):
        # element i depends on the seed and i alone: the float32 mask (drawn 16 at a time on
        # AVX-512) keeps the same elements as the float64 one (drawn one pair at a time), and a
        # shorter mask is a prefix of a longer one, whatever their vector tails
        seed = random.randrange(2 ** 31)
        masks = {}
        for n, dtype in [(1003, torch.float32), (1003, torch.float64), (37, torch.float32),
                         (5, torch.float32)]:
            torch.manual_seed(seed)
            masks[n, dtype] = snn._C.dropout_keep_mask([n], p, torch.empty(0, dtype=dtype)) != 0
        assert torch.equal(masks[1003, torch.float32], masks[1003, torch.float64])
        assert torch.equal(masks[37, torch.float32], masks[1003, torch.float64][:37])
        assert torch.equal(masks[5, torch.float32], masks[1003, torch.float64][:5])

    @pytest.mark.parametrize("shape", [[1], [3], [0, 4], [2, 1, 5]])
    def test_odd_and_empty_shapes(self, shape):
        m = snn._C.dropout_keep_mask(shape, 0.5, torch.empty(0))
        assert list(m.shape) == shape and bool(((m == 0) | (m == 2)).all())

    @pytest.mark.parametrize("p", [0.0, 1.0, -0.5, float("nan")])
    def test_p_outside_the_open_interval_is_refused(self, p):
        with pytest.raises(RuntimeError, match="p must be in"):
            snn._C.dropout_keep_mask([4], p, torch.empty(0))


class TestTorchDropoutMask:
    """ops.torch_dropout_mask / _C.torch_dropout_mask: PyTorch's own dropout masks
    (``bernoulli_(1 - p).div_(1 - p)``), bit for bit, with the default generator left where
    bernoulli_ leaves it (csrc/torch_dropout_mask.cpp)."""

    def test_the_copy_matches_this_pytorch(self):
        # checked once per process against bernoulli_; False would silently fall back to it
        assert snn._C.torch_dropout_mask_exact()

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_same_values_and_generator_state(self, dtype):
        seed = random.randrange(2 ** 31)
        rng = random.Random(seed)
        # shapes around the twister's block of 624 outputs (312 elements) and empty ones; p
        # whose 1 - p is not a multiple of 2^-53; generator positions odd and even in a block
        shapes = [[12, 128, 51], [311], [312], [313], [625], [1], [0], [3, 0, 5],
                  [rng.randrange(1, 2000)], [2, rng.randrange(1, 700), 3]]
        for p in [0.1, 0.2, 0.5, 0.9, 1e-9, 1 - 1e-9, rng.random() or 0.5]:
            for shape in shapes:
                skip = rng.randrange(0, 1300)
                torch.manual_seed(seed)
                torch.empty(skip).uniform_()  # a float uniform_ takes one output an element
                want = torch.empty(shape, dtype=dtype).bernoulli_(1 - p).div_(1 - p)
                want_next = torch.randint(0, 2 ** 62, (4,))
                torch.manual_seed(seed)
                torch.empty(skip).uniform_()
                got = snn._C.torch_dropout_mask(shape, p, torch.empty(0, dtype=dtype))
                assert got.dtype == dtype and list(got.shape) == shape
                assert torch.equal(got, want), (seed, p, shape, skip)
                assert torch.equal(torch.randint(0, 2 ** 62, (4,)), want_next), (seed, p, shape,
                                                                                 skip)

    def test_the_generators_cached_normal_samples_stay(self):
        # a one-element randn leaves the second Box-Muller sample cached in the generator: the
        # next randn after the mask reads it, as after bernoulli_
        def after(draw):
            torch.manual_seed(6)
            torch.randn(1, dtype=torch.float64), torch.randn(1)
            draw()
            return torch.randn(1, dtype=torch.float64), torch.randn(1), torch.rand(5)

        want = after(lambda: torch.empty(99).bernoulli_(0.8))
        got = after(lambda: snn._C.torch_dropout_mask([99], 0.2, torch.empty(0)))
        assert all(torch.equal(a, b) for a, b in zip(got, want))

    def test_a_private_generator_is_untouched(self):
        g = torch.Generator().manual_seed(3)
        before = g.get_state()
        snn._C.torch_dropout_mask([100], 0.3, torch.empty(0))
        assert torch.equal(g.get_state(), before)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_other_dtypes_run_bernoulli(self, dtype):
        torch.manual_seed(9)
        want = torch.empty(5, 77, dtype=dtype).bernoulli_(0.75).div_(0.75)
        torch.manual_seed(9)
        got = ops.torch_dropout_mask(torch.empty(0, dtype=dtype), (5, 77), 0.25)
        assert got.dtype == dtype and torch.equal(got, want)

    def test_jit_trace_records_the_draw(self):
        # torch.jit.trace records bernoulli_, not the direct call's empty buffer
        def f(x):
            return x * ops.torch_dropout_mask(x, x.shape, 0.5)

        traced = torch.jit.trace(f, torch.ones(4, 50), check_trace=False)
        assert "bernoulli" in str(traced.graph)
        outs = [traced(torch.ones(4, 50)) for _ in range(2)]
        assert not torch.equal(outs[0], outs[1])  # a fresh mask a call
        assert set(outs[0].unique().tolist()) <= {0.0, 2.0}

    def test_dispatch_modes_see_bernoulli(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Seen(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.ops = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.ops.append(str(func))
                return func(*args, **(kwargs or {}))

        torch.manual_seed(2)
        want = snn._C.torch_dropout_mask([3, 40], 0.3, torch.empty(0))
        torch.manual_seed(2)
        with Seen() as mode:  # the C++ entry itself falls back under a mode
            got = snn._C.torch_dropout_mask([3, 40], 0.3, torch.empty(0))
        assert torch.equal(got, want)
        assert any("bernoulli" in op for op in mode.ops)

    def test_traced_calls_draw_the_same(self):
        # under a dispatch mode (as under torch.compile's tracing) the helper runs the
        # expression itself; the values are the same
        from torch.utils._python_dispatch import TorchDispatchMode

        class Seen(TorchDispatchMode):
            ops = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                Seen.ops.append(str(func))
                return func(*args, **(kwargs or {}))

        torch.manual_seed(4)
        eager = ops.torch_dropout_mask(torch.empty(0), (6, 70), 0.4)
        torch.manual_seed(4)
        with Seen():
            traced = ops.torch_dropout_mask(torch.empty(0), (6, 70), 0.4)
        assert torch.equal(eager, traced)
        assert any("bernoulli" in op for op in Seen.ops)

    @pytest.mark.parametrize("p", [0.0, 1.0, -0.1, float("nan")])
    def test_p_out_of_range(self, p):
        state = torch.get_rng_state()
        with pytest.raises(RuntimeError, match="p must be in"):
            snn._C.torch_dropout_mask([3], p, torch.empty(0))
        assert torch.equal(torch.get_rng_state(), state)  # nothing drawn

    def test_the_chapter_gru_draws_f_dropouts_masks(self):
        # ops.gru's dropout between layers: the same output and gradients as F.dropout's
        torch.manual_seed(0)
        rnn = nn.GRU(5, 7, 3, dropout=0.3).double()
        x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
        h0 = torch.zeros(3, 3, 7, dtype=torch.float64)
        torch.manual_seed(21)
        want = rnn(x, h0)[0]
        torch.manual_seed(21)
        with ops.use_backend("ext"):
            got = ops.gru(x, h0, rnn._flat_weights, dropout=0.3, training=True)[0]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        gw = torch.autograd.grad(want.sum(), [x] + list(rnn.parameters()))
        gg = torch.autograd.grad(got.sum(), [x] + list(rnn.parameters()))
        for a, b in zip(gg, gw):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


class TestFallbacks:
    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_bidirectional_runs_torch(self, cell, op_calls):
        ref, new = pair(cell, 4, 6, bidirectional=True)
        x = torch.randn(5, 3, 4, dtype=torch.float64)
        packed = pack_padded_sequence(x, torch.tensor([5, 3, 2]))
        for inp in (packed, x):
            got, want = new(inp), ref(inp)
            g0 = got[0].data if hasattr(got[0], "data") else got[0]
            w0 = want[0].data if hasattr(want[0], "data") else want[0]
            torch.testing.assert_close(g0, w0, rtol=0, atol=0)
        assert op_calls == []

    def test_proj_size_runs_torch(self, op_calls):
        ref, new = pair("lstm", 4, 6, 2, proj_size=3)
        x = torch.randn(5, 3, 4, dtype=torch.float64)
        torch.testing.assert_close(new(x)[0], ref(x)[0], rtol=0, atol=0)
        assert op_calls == []

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @pytest.mark.parametrize("p", [1.5, -0.5, float("nan")])
    def test_dropout_out_of_range_gets_torch_error(self, cell, p, op_calls):
        """``module.dropout`` set after construction (torch.nn allows it) to a value outside
        [0, 1]: torch.nn's forward raises, and so does the drop-in one, padded or packed."""
        ref, new = pair(cell, 4, 6, 2, dropout=0.3)
        x = torch.randn(5, 3, 4, dtype=torch.float64)
        packed = pack_padded_sequence(x, torch.tensor([5, 3, 2]))
        for m in (ref, new):
            m.dropout = p
        for inp in (x, packed):
            with pytest.raises(RuntimeError) as want:
                ref(inp)
            with pytest.raises(RuntimeError) as got:
                new(inp)
            assert str(got.value) == str(want.value)
        assert op_calls == []

    def test_reference_backend_runs_torch(self, op_calls):
        ref, new = pair("gru", 4, 6, 2)
        x = torch.randn(5, 3, 4, dtype=torch.float64)
        with ops.use_backend("reference"):
            torch.testing.assert_close(new(x)[0], ref(x)[0], rtol=0, atol=0)
        assert op_calls == []

    def test_float16_autocast_runs_torch(self, op_calls):
        """The fused op takes CPU autocast to bfloat16 only (TestBf16Autocast); under float16
        the drop-in layer is nn.GRU: the same result, or the same error."""
        ref, new = pair("gru", 8, 16, 2, dtype=torch.float32)
        x = torch.randn(5, 3, 8)
        with torch.autocast("cpu", dtype=torch.float16):
            try:
                want = ref(x)[0]
            except RuntimeError as e:
                with pytest.raises(RuntimeError, match=re.escape(str(e)[:60])):
                    new(x)
                assert op_calls == []
                return
            got = new(x)[0]
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert op_calls == []

    @pytest.mark.parametrize("fused_float32", [False, True], ids=["amd", "intel"])
    @pytest.mark.parametrize("cell,dtype,steps,batch_first,fused", [
        ("lstm", torch.float32, 3, False, False),  # a sequence: PyTorch's oneDNN LSTM (AMD)
        ("lstm", torch.float32, 3, True, False),
        ("lstm", torch.float32, 1, True, True),    # a decoder's one-step call stays fused
        ("lstm", torch.float64, 3, False, True),   # no oneDNN path in float64
        ("gru", torch.float32, 3, False, True),    # nn.GRU has no oneDNN path
    ])
    def test_large_lstm_sequence_runs_onednn(self, cell, dtype, steps, batch_first, fused,
                                             fused_float32, op_calls, monkeypatch):
        """The rule of each CPU kind (_FUSED_FLOAT32_LSTM: on Intel CPUs a float32 sequence
        runs fused too), whichever this one is."""
        monkeypatch.setattr(snn, "_FUSED_FLOAT32_LSTM", fused_float32)
        hidden = snn._ONEDNN_LSTM_HIDDEN
        ref, new = pair(cell, 8, hidden, 2, batch_first=batch_first, dtype=dtype)
        shape = (2, steps, 8) if batch_first else (steps, 2, 8)
        x = torch.randn(shape, dtype=dtype)
        got, want = new(x)[0], ref(x)[0]
        torch.testing.assert_close(got, want, **gru_tol(dtype))
        assert op_calls == ([cell] if fused or fused_float32 or not snn._ONEDNN else [])
        # a hidden size below the threshold runs fused whatever the length
        ref, new = pair(cell, 8, hidden - 1, 2, batch_first=batch_first, dtype=dtype)
        new(x)
        assert op_calls[-1] == cell

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @pytest.mark.parametrize("bad", ["input_size", "hx_shape", "hx_dtype", "input_dim",
                                     "no_step"])
    def test_bad_input_raises_torch_error(self, cell, bad):
        ref, new = pair(cell, 4, 6, 2, dtype=torch.float32)
        x = torch.randn(5, 3, 4)
        hx = make_hx(cell, 2, 3, 6, torch.float32)
        if bad == "input_size":
            x = torch.randn(5, 3, 5)
        elif bad == "hx_shape":
            hx = make_hx(cell, 2, 2, 6, torch.float32)
        elif bad == "hx_dtype":
            hx = make_hx(cell, 2, 3, 6, torch.float64)
        elif bad == "input_dim":
            x = torch.randn(2, 5, 3, 4)
        else:  # no time step
            x = torch.randn(0, 3, 4)
        with pytest.raises((RuntimeError, ValueError)) as want:
            ref(x, hx)
        with pytest.raises(type(want.value)) as got:
            new(x, hx)
        assert str(got.value) == str(want.value)

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @pytest.mark.parametrize("mode", ["eager", "device-context", "default-device"])
    def test_meta_tensors_give_torch_shapes(self, cell, mode):
        # shape inference on the meta device; a device context and set_default_device install a
        # torch function mode, which sends the call through the Python path
        def run(cls):
            torch.manual_seed(0)
            if mode == "eager":
                m = cls(5, 8, 2, batch_first=True, device="meta")
                return m(torch.randn(4, 3, 5, device="meta"))
            if mode == "device-context":
                with torch.device("meta"):
                    return cls(5, 8, 2, batch_first=True)(torch.randn(4, 3, 5))
            torch.set_default_device("meta")
            try:
                return cls(5, 8, 2, batch_first=True)(torch.randn(4, 3, 5))
            finally:
                torch.set_default_device(None)

        ref_cls, new_cls = CLASSES[cell]
        want, got = run(ref_cls), run(new_cls)
        assert got[0].device.type == "meta" and got[0].shape == want[0].shape == (4, 3, 8)
        assert ([t.shape for t in state_tensors(got[1])]
                == [t.shape for t in state_tensors(want[1])])


class TestModuleSemantics:
    """What nn.GRU / nn.LSTM do with their weights beyond a plain call: functional_call's and
    a parametrization's substitutes, `.data` assigned while a graph is alive, a double backward
    (create_graph=True), torch.jit.trace."""

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_functional_call_uses_the_substitutes(self, cell, op_calls):
        ref, new = pair(cell, 3, 5, 2)
        x = torch.randn(4, 2, 3, dtype=torch.float64, generator=generator(3))
        g = generator(4)
        sub = {k: torch.randn(v.shape, generator=g, dtype=v.dtype).requires_grad_()
               for k, v in ref.named_parameters()}
        want = torch.func.functional_call(ref, sub, (x,))[0]
        got = torch.func.functional_call(new, sub, (x,))[0]
        assert op_calls == [cell]
        torch.testing.assert_close(got, want)
        names = sorted(sub)
        gw = torch.autograd.grad(want.sum(), [sub[k] for k in names])
        gg = torch.autograd.grad(got.sum(), [sub[k] for k in names])
        torch.testing.assert_close(gg, gw)
        # and back to its own parameters afterwards
        torch.testing.assert_close(new(x)[0], ref(x)[0])

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_parametrized_weight(self, cell):
        ref, new = pair(cell, 3, 5, 2)
        for m in (ref, new):
            nn.utils.parametrizations.weight_norm(m, "weight_hh_l0")
            with torch.no_grad():
                m.parametrizations.weight_hh_l0.original0.mul_(2)
        x = torch.randn(4, 2, 3, dtype=torch.float64, generator=generator(3))
        want, got = ref(x)[0], new(x)[0]
        torch.testing.assert_close(got, want)
        want.sum().backward()
        got.sum().backward()
        for a, b in zip(ref.parameters(), new.parameters()):
            torch.testing.assert_close(b.grad, a.grad)

    @pytest.mark.parametrize("deferred", ["auto", "always"], indirect=True)
    def test_data_assigned_while_a_graph_is_alive(self, deferred):
        # a one-step call's large matrices run through aliases cached while a graph holds them
        # (deferred_weight_grads.h); `.data =` changes neither the tensor nor its version
        ref, new = pair("gru", 160, 160)
        x = torch.randn(1, 2, 160, dtype=torch.float64, generator=generator(5))
        keep = [m(x)[0] for m in (ref, new)]
        w = torch.randn(480, 160, dtype=torch.float64, generator=generator(6))
        for m in (ref, new):
            m.weight_hh_l0.data = w.clone()
            m.weight_ih_l0.data = w.clone()
        torch.testing.assert_close(new(x)[0], ref(x)[0])
        for m in (ref, new):  # another dtype the same way (Module.double())
            m.double().float()
        torch.testing.assert_close(new(x.float())[0], ref(x.float())[0])
        del keep

    @pytest.mark.parametrize("deferred", ["always", "off"], indirect=True)
    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @pytest.mark.parametrize("one_step_calls", [False, True])
    def test_backward_of_a_graph_made_before_data_was_assigned(self, cell, one_step_calls,
                                                               deferred):
        """A weight given new storage (`p.data = ...`) between calls and their backward (over a
        sequence, or a decoder's loop of one-step calls): the calls' backward reads the values
        they ran with, as nn.GRU's / nn.LSTM's does (it read the new ones before, a wrong
        gradient without an error)."""
        ref, new = pair(cell, 5, 7, 2)
        x = torch.randn(3, 2, 5, dtype=torch.float64, generator=generator(8))

        def run(m):
            if not one_step_calls:
                return m(x)[0].sum()
            state, loss = None, 0
            for t in range(3):
                out, state = m(x[t:t + 1], state)
                loss = loss + out.sum()
            return loss

        grads = []
        for m in (ref, new):
            first = run(m)
            m.weight_hh_l0.data = m.weight_hh_l0.data * 2
            second = run(m)
            grads.append(torch.autograd.grad(first + second, list(m.parameters())))
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-10)

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @pytest.mark.parametrize("hidden, steps, batch", [(4, 3, 2), (40, 5, 3), (160, 1, 2)])
    def test_double_backward(self, cell, hidden, steps, batch, op_calls):
        ref, new = pair(cell, hidden, hidden, 2)
        g = generator(7)
        x = torch.randn(steps, batch, hidden, dtype=torch.float64, generator=g)
        h = make_hx(cell, 2, batch, hidden, torch.float64)
        results = []
        for m in (ref, new):
            xx = x.clone().requires_grad_()
            out, state = m(xx, h)
            loss = out.pow(2).sum() + sum(t.pow(2).sum() for t in state_tensors(state))
            first = torch.autograd.grad(loss, [xx, *m.parameters()], create_graph=True)
            penalty = sum(f.pow(2).sum() for f in first)
            second = torch.autograd.grad(penalty, [xx, *state_tensors(h), *m.parameters()])
            results.append((first, second))
        assert op_calls == [cell]
        torch.testing.assert_close(results[1], results[0])

    @pytest.mark.parametrize("deferred", ["always"], indirect=True)
    def test_double_backward_of_one_step_calls_with_deferred_grads(self, deferred, op_calls):
        # a decoder's loop of one-step calls: the matrices' aliases pass the create_graph
        # gradient on
        ref, new = pair("lstm", 6, 8, 2)
        x = torch.randn(3, 1, 4, 6, dtype=torch.float64, generator=generator(8))
        results = []
        for m in (ref, new):
            state, loss = None, 0
            for t in range(3):
                out, state = m(x[t], state)
                loss = loss + out.pow(2).sum()
            first = torch.autograd.grad(loss, list(m.parameters()), create_graph=True)
            second = torch.autograd.grad(sum(f.pow(2).sum() for f in first),
                                         list(m.parameters()))
            results.append((first, second))
        assert op_calls == ["lstm"] * 3
        torch.testing.assert_close(results[1], results[0])

    @pytest.mark.parametrize("deferred", ["always"], indirect=True)
    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @pytest.mark.parametrize("reentrant", [False, True])
    def test_activation_checkpointing(self, cell, reentrant, deferred, op_calls):
        # torch.utils.checkpoint recomputes the calls in the backward (the non-reentrant kind
        # stops recomputing by raising from its pack hook): one-step calls with deferred weight
        # gradients, and a call over the sequence
        ref, new = pair(cell, 5, 7, 2)
        x = torch.randn(4, 3, 5, dtype=torch.float64, generator=generator(9))
        results = []
        for m in (ref, new):
            xx = x.clone().requires_grad_()

            def loop(xx):
                state, outs = None, []
                for t in range(xx.shape[0]):
                    out, state = m(xx[t:t + 1], state)
                    outs.append(out)
                return torch.cat(outs) * m(xx)[0]

            y = torch.utils.checkpoint.checkpoint(loop, xx, use_reentrant=reentrant)
            y.pow(2).sum().backward()  # (the reentrant kind takes no autograd.grad)
            results.append([xx.grad, *(p.grad for p in m.parameters())])
        assert op_calls.count(cell) == 2 * 5  # forward and recomputation: 4 steps and 1
        torch.testing.assert_close(results[1], results[0])

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_traced_module_takes_any_batch(self, cell):
        ref, new = pair(cell, 3, 4, 2, dtype=torch.float32)
        traced = torch.jit.trace(new, torch.randn(5, 2, 3))
        x = torch.randn(5, 3, 3)
        torch.testing.assert_close(traced(x)[0], ref(x)[0])


class TestAccelerate:
    def test_swaps_in_place_and_keeps_parameters(self):
        torch.manual_seed(0)
        model = seed_models.Seq2Seq(11, 13, 8, 16, 2, 0.0, cell="lstm")
        params = {n: p for n, p in model.named_parameters()}
        keys = list(model.state_dict())
        opt = torch.optim.Adam(model.parameters(), lr=0.1)
        assert seq2seq_ext.accelerate(model) is model
        assert type(model.encoder.rnn) is snn.LSTM and type(model.decoder.rnn) is snn.LSTM
        assert list(model.state_dict()) == keys
        for n, p in model.named_parameters():
            assert p is params[n]
        # the optimizer built before updates what the accelerated layers read
        src, trg = seed_models.batch(4, 5, 11, 13)
        before = model.decoder.rnn.weight_hh_l1.detach().clone()
        seed_models.train_step(model, opt, src, trg, random.Random(0))
        assert not torch.equal(before, model.decoder.rnn.weight_hh_l1)

    def test_module_itself_and_subclasses(self):
        layer = nn.GRU(3, 4)
        assert type(seq2seq_ext.accelerate(layer)) is snn.GRU

        class MyLSTM(nn.LSTM):
            def forward(self, x, hx=None):
                return super().forward(x * 2, hx)

        holder = nn.Sequential(MyLSTM(3, 4))
        seq2seq_ext.accelerate(holder)
        assert type(holder[0]) is MyLSTM
        with pytest.raises(TypeError, match="module: expected a torch.nn.Module"):
            seq2seq_ext.accelerate("model")

    def test_package_models_are_left_alone(self):
        net = seq2seq_ext.EncoderDecoder(seq2seq_ext.Seq2SeqEncoder(10, 4, 6, 2),
                                         seq2seq_ext.Seq2SeqDecoder(10, 4, 6, 2))
        seq2seq_ext.accelerate(net)
        assert type(net.encoder.rnn) is nn.GRU and type(net.decoder.rnn) is nn.GRU


class TestWholePrograms:
    @pytest.mark.parametrize("deferred", ["auto", "always"], indirect=True)
    @pytest.mark.parametrize("cell", ["lstm", "gru"])
    def test_seed_training_loop_matches_plain_pytorch(self, cell, op_calls, deferred):
        """The seeds' loop (teacher forcing 0.5, clipping, Adam) with dropout 0 and the same
        coins: the accelerated model's losses equal plain PyTorch's (its decoder's weight
        gradients per call at these sizes, or, "always", one per matrix and step)."""
        torch.manual_seed(0)
        plain = seed_models.Seq2Seq(10, 12, 16, 32, 2, 0.0, cell=cell)
        fast = seq2seq_ext.accelerate(copy.deepcopy(plain))
        opt_plain = torch.optim.Adam(plain.parameters(), lr=0.01)
        opt_fast = torch.optim.Adam(fast.parameters(), lr=0.01)
        coins_plain, coins_fast = random.Random(7), random.Random(7)
        for step in range(6):
            src, trg = seed_models.batch(32, 5, 10, 12, seed=step)
            want = seed_models.train_step(plain, opt_plain, src, trg, coins_plain)
            got = seed_models.train_step(fast, opt_fast, src, trg, coins_fast)
            assert got == pytest.approx(want, rel=1e-5)
        assert op_calls and set(op_calls) == {cell}

    def test_dropout_convergence_runs_compare_like_with_like(self, op_calls):
        """benchmarks/dropout_convergence.py: without dropout, the plain and the accelerated
        run of a seed follow the same curve (same weights, data and coins), so the gap it
        reports with dropout comes from the masks alone."""
        from seq2seq_ext.bench import dropout_convergence
        curves = dropout_convergence.run(cells=("lstm",), seeds=(3,), epochs=2, dropout=0.0,
                                         threads=torch.get_num_threads())
        plain, fast = curves["lstm", "plain", 3], curves["lstm", "accelerated", 3]
        assert "lstm" in op_calls and len(plain) == 2
        torch.testing.assert_close(torch.tensor(fast), torch.tensor(plain), rtol=1e-4, atol=0)
        assert plain[1] < plain[0]  # it trains
        assert "| lstm |" in dropout_convergence.table(curves)

    def test_chapter_decoder_of_a_user(self, op_calls):
        """The chapter's encoder-decoder as a notebook defines it (the reference classes, plain
        nn.GRU): accelerated, the same training losses and translations."""
        torch.manual_seed(1)
        enc = reference.Seq2SeqEncoder(12, 8, 16, 2)
        dec = reference.Seq2SeqDecoder(14, 8, 16, 2)
        plain = reference.EncoderDecoder(enc, dec)
        fast = seq2seq_ext.accelerate(copy.deepcopy(plain))
        loss = reference.MaskedSoftmaxCELoss()
        X = torch.randint(0, 12, (6, 7), generator=generator(0))
        Y = torch.randint(0, 14, (6, 7), generator=generator(1))
        valid = torch.tensor([7, 3, 5, 1, 6, 2])
        for net in (plain, fast):
            net.train()
        opts = [torch.optim.Adam(m.parameters(), lr=0.01) for m in (plain, fast)]
        for _ in range(3):
            losses = []
            for net, opt in zip((plain, fast), opts):
                opt.zero_grad()
                Y_hat, _ = net(X, Y, valid)
                ls = loss(Y_hat, Y, valid).sum()
                ls.backward()
                opt.step()
                losses.append(ls.item())
            assert losses[1] == pytest.approx(losses[0], rel=1e-5)
        assert op_calls
        src_vocab = reference_vocab(12)
        tgt_vocab = reference_vocab(14)
        for s in ["a b", "c d e", "b"]:
            want = reference.predict_seq2seq(plain, s, src_vocab, tgt_vocab, 6, "cpu")[0]
            got = reference.predict_seq2seq(fast, s, src_vocab, tgt_vocab, 6, "cpu")[0]
            assert got == want

    def test_under_torch_compile(self, op_calls):
        """torch.compile of a model holding the drop-in layers: Dynamo does not trace into
        recurrent modules (nn.GRU / nn.LSTM and their subclasses alike), so the layer runs
        eagerly between compiled graphs, fused, with the eager results."""
        torch.manual_seed(0)
        model = seq2seq_ext.accelerate(seed_models.Seq2Seq(10, 12, 8, 16, 2, 0.0, cell="lstm"))
        src, trg = seed_models.batch(4, 5, 10, 12)
        want = model(src, trg, teacher_forcing_ratio=1.0)
        got = torch.compile(model, backend="aot_eager")(src, trg, teacher_forcing_ratio=1.0)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert op_calls

    @pytest.mark.parametrize("amp", [False, True], ids=["float32", "bf16-autocast"])
    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_full_graph_with_allow_rnn(self, cell, amp):
        """With allow_rnn, Dynamo traces the drop-in forward into one graph holding the
        registered op (no graph break), forward and backward equal to eager; under CPU bf16
        autocast too (the op's autocast rule runs as the graph is traced: bf16 products)."""
        torch.manual_seed(1)
        layer = CLASSES[cell][1](5, 7, 2, batch_first=True)
        x = torch.randn(3, 4, 5, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            want = layer(x)[0]
        (gx_want,) = torch.autograd.grad(want.sum(), x)
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        with torch._dynamo.config.patch(allow_rnn=True):
            torch._dynamo.reset()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                got = torch.compile(layer, backend=backend, fullgraph=True)(x)[0]
        (gx_got,) = torch.autograd.grad(got.sum(), x)
        assert len(graphs) == 1
        assert "rnn_stack" in graphs[0].code
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gx_got, gx_want, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not (torch.distributed.is_available()
                         and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with the gloo backend is not available")
@pytest.mark.parametrize("deferred", ["auto", "always"], indirect=True)
def test_distributed_data_parallel(tmp_path, deferred):
    """An accelerated model inside DistributedDataParallel (one gloo process): DDP's gradient
    hooks see the fused op's gradients (the decoder's summed once per matrix, "always"), and
    the update equals the unwrapped model's."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from seq2seq_ext import distributed
    torch.manual_seed(0)
    base = seq2seq_ext.accelerate(seed_models.Seq2Seq(10, 12, 8, 16, 2, 0.0, cell="gru"))
    alone = copy.deepcopy(base)
    initial = base.decoder.rnn.weight_hh_l0.detach().clone()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        wrapped = DistributedDataParallel(base)
        src, trg = seed_models.batch(6, 5, 10, 12)
        for model in (wrapped, alone):
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            seed_models.train_step(model, opt, src, trg, random.Random(3))
        # DDP's reducer goes first, while the group is alive: released after the group's
        # destruction, its last reference would tear gloo down from a destructor holding the
        # GIL (a gloo worker thread waiting for the GIL then deadlocks it)
        del wrapped, model, opt
    finally:
        distributed.cleanup()
    for p, q in zip(base.parameters(), alone.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not torch.equal(base.decoder.rnn.weight_hh_l0, initial)


def reference_vocab(size):
    """A Vocab whose tokens are 'a', 'b', ... plus the reserved ones, ``size`` entries in all."""
    letters = [chr(ord("a") + k) for k in range(size - 4)]
    vocab = seq2seq_ext.Vocab([letters], reserved_tokens=["<pad>", "<bos>", "<eos>"])
    assert len(vocab) == size
    return vocab


class TestPackedSequence:
    """A PackedSequence on the CPU runs the fused op in its packed layout (padding skipped)."""

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @pytest.mark.parametrize("layers", [1, 3])
    @pytest.mark.parametrize("enforce_sorted", [True, False])
    @pytest.mark.parametrize("with_hx", [False, True])
    def test_matches_torch_nn(self, cell, layers, enforce_sorted, with_hx, op_calls):
        ref, new = pair(cell, 5, 7, layers, seed=layers)
        lengths = [6, 4, 4, 2, 1] if enforce_sorted else [2, 6, 1, 4, 4]
        x = torch.randn(6, 5, 5, dtype=torch.float64)
        packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=enforce_sorted)
        hx = None
        if with_hx:
            h = torch.randn(layers, 5, 7, dtype=torch.float64)
            hx = (h, torch.randn_like(h)) if cell == "lstm" else h
        (got_out, got_state), (want_out, want_state) = new(packed, hx), ref(packed, hx)
        assert isinstance(got_out, type(want_out))
        assert torch.equal(got_out.batch_sizes, want_out.batch_sizes)
        torch.testing.assert_close(got_out.data, want_out.data, rtol=1e-12, atol=1e-12)
        for g, w in zip(state_tensors(got_state), state_tensors(want_state)):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
        assert op_calls == [cell]
        params = list(new.parameters())
        grads = torch.autograd.grad(got_out.data.sum() + state_tensors(got_state)[0].sum(),
                                    params)
        want_grads = torch.autograd.grad(
            want_out.data.sum() + state_tensors(want_state)[0].sum(), list(ref.parameters()))
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)

    def test_dropout_in_training_keeps_the_distribution(self):
        _, new = pair("gru", 4, 50, 2, dropout=0.5, seed=3)
        x = torch.randn(8, 6, 4, dtype=torch.float64)
        packed = pack_padded_sequence(x, torch.tensor([8, 7, 5, 5, 2, 1]))
        torch.manual_seed(0)
        a = new(packed)[0].data
        b = new(packed)[0].data
        assert not torch.equal(a, b)  # masks drawn each call
        new.eval()
        assert torch.equal(new(packed)[0].data, new(packed)[0].data)

    def test_large_float32_lstm_runs_onednn(self, op_calls, monkeypatch):
        """Packed, as padded: PyTorch's oneDNN LSTM by AMD's rule, fused by Intel's."""
        ref, new = pair("lstm", 8, snn._ONEDNN_LSTM_HIDDEN, 1, dtype=torch.float32)
        packed = pack_padded_sequence(torch.randn(3, 2, 8), torch.tensor([3, 2]))
        monkeypatch.setattr(snn, "_FUSED_FLOAT32_LSTM", False)
        torch.testing.assert_close(new(packed)[0].data, ref(packed)[0].data, rtol=0, atol=0)
        assert op_calls == ([] if snn._ONEDNN else ["lstm"])
        monkeypatch.setattr(snn, "_FUSED_FLOAT32_LSTM", True)
        torch.testing.assert_close(new(packed)[0].data, ref(packed)[0].data,
                                   **gru_tol(torch.float32))
        assert op_calls[-1:] == ["lstm"]


def bf16_reference(module, x, hx=None):
    """The drop-in layer under CPU autocast to bfloat16, written out: reference.rnn_stack with
    bf16 products on the module's own (float32) parameters; time-first input, no packing."""
    cell = "lstm" if isinstance(module, nn.LSTM) else "gru"
    layers, batch, hidden = module.num_layers, x.shape[1], module.hidden_size
    h0 = x.new_zeros(layers, batch, hidden) if hx is None else state_tensors(hx)[0]
    c0 = None if cell == "gru" else (h0 if hx is None else hx[1])
    return reference.rnn_stack(cell, x, h0, c0, module._flat_weights,
                               product_dtype=torch.bfloat16)


class TestBf16Autocast:
    """Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` the drop-in layers run the fused op
    with bf16 products (float32 sums) while input, states, outputs, biases and the parameters'
    gradients stay float32; the weight matrices are cast once per autocast region."""

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @pytest.mark.parametrize("steps", [1, 4])
    def test_runs_the_op_with_bf16_products(self, cell, steps, op_calls):
        _, new = pair(cell, 7, 9, 2, dtype=torch.float32)
        x = torch.randn(steps, 3, 7, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, state = new(x)
        assert op_calls == [cell]
        assert out.dtype == torch.float32
        assert all(t.dtype == torch.float32 for t in state_tensors(state))
        x_ref = x.detach().clone().requires_grad_()
        ref_w = [w.detach().clone().requires_grad_() for w in new._flat_weights]
        want = reference.rnn_stack(cell, x_ref, x.new_zeros(2, 3, 9),
                                   x.new_zeros(2, 3, 9) if cell == "lstm" else None, ref_w,
                                   product_dtype=torch.bfloat16)
        assert_bf16_close(out, want[0])
        g = torch.randn(out.shape, generator=generator(3))
        (out * g).sum().backward()
        (want[0] * g).sum().backward()
        for p, w in zip([x] + list(new._flat_weights), [x_ref] + ref_w):
            assert p.grad.dtype == torch.float32
            assert_bf16_close(p.grad, w.grad)

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_packed_sequence(self, cell, op_calls):
        _, new = pair(cell, 5, 6, 2, dtype=torch.float32)
        x = torch.randn(4, 3, 5)
        packed = pack_padded_sequence(x, torch.tensor([4, 2, 1]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = new(packed)[0].data
        assert op_calls == [cell]
        lengths = [4, 2, 1]
        sizes = [sum(1 for n in lengths if n > t) for t in range(4)]
        want = reference.rnn_stack(cell, packed.data, x.new_zeros(2, 3, 6),
                                   x.new_zeros(2, 3, 6) if cell == "lstm" else None,
                                   new._flat_weights, batch_sizes=sizes,
                                   product_dtype=torch.bfloat16)[0]
        assert_bf16_close(out, want)

    def test_weights_are_cast_once_per_autocast_region(self, op_calls):
        """A decoder's one-step calls in a loop (the seeds' teacher forcing): every call uses
        the same bf16 copy of each weight matrix, whose gradient reaches the float32 weight
        once."""
        _, new = pair("lstm", 4, 6, 2, dtype=torch.float32)
        state = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = []
            for _ in range(5):
                out, state = new(torch.randn(1, 2, 4), state)
                outs.append(out)
        assert op_calls == ["lstm"] * 5
        casts, seen, todo = set(), set(), [torch.cat(outs).sum().grad_fn]
        while todo:
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if type(node).__name__ == "ToCopyBackward0":
                casts.add(node)
            todo.extend(n for n, _ in node.next_functions)
        assert len(casts) == 4  # w_ih and w_hh of two layers

    def test_large_lstm_sequence(self, op_calls, amx_products):
        """An LSTM sequence at hidden >= 128 goes to PyTorch's oneDNN LSTM where oneDNN has bf16
        products and the fused op's per-step products are not on AMX tiles; elsewhere the fused
        op runs (without oneDNN's bf16 products PyTorch's bf16 LSTM cannot run)."""
        _, new = pair("lstm", 8, snn._ONEDNN_LSTM_HIDDEN, 1, dtype=torch.float32)
        x = torch.randn(3, 2, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = new(x)[0]
        amx = amx_products and ops.bf16_gemm() == "native"
        if snn._ONEDNN and ops.cpu_has_bf16_gemm() and not amx:
            assert op_calls == []
        else:
            assert op_calls == ["lstm"]
            assert_bf16_close(out, bf16_reference(new, x)[0])

    @pytest.mark.parametrize("path", ["eager", "traced"])
    def test_takes_a_bf16_state(self, op_calls, path, monkeypatch):
        """A decoder's one-step call given the bfloat16 (h, c) that PyTorch's own oneDNN LSTM
        returns under autocast (an encoder at hidden >= 128 on a CPU with bf16 products) still
        runs fused: the op's autocast rule casts the state to float32, the gradient reaches the
        bf16 state through that cast."""
        if path == "traced":  # the Python path that torch.compile and torch function modes take
            monkeypatch.setattr(snn.torch.compiler, "is_compiling", lambda: True)
        _, new = pair("lstm", 5, 6, 2, dtype=torch.float32)
        x = torch.randn(1, 3, 5)
        h = torch.randn(2, 3, 6).bfloat16().requires_grad_()
        c = torch.randn(2, 3, 6).bfloat16().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, (h_n, c_n) = new(x, (h, c))
        assert op_calls == ["lstm"]
        assert out.dtype == h_n.dtype == c_n.dtype == torch.float32
        want = reference.rnn_stack("lstm", x, h.detach().float(), c.detach().float(),
                                   new._flat_weights, product_dtype=torch.bfloat16)
        assert_bf16_close(out, want[0])
        out.sum().backward()
        assert h.grad is not None and h.grad.dtype == torch.bfloat16
        # outside autocast a bf16 state beside a float32 input is torch.nn's to reject
        with pytest.raises(RuntimeError):
            new(x, (h.detach(), c.detach()))

    def test_seed_training_step(self, op_calls):
        """Seed 004's step through accelerate under autocast: every recurrent call fused, the
        parameters' gradients float32 and close to the float32 step's."""
        torch.manual_seed(0)
        plain = seed_models.Seq2Seq(12, 12, 8, 16, 2, 0.0)
        fast = seq2seq_ext.accelerate(copy.deepcopy(plain))
        src, trg = seed_models.batch(4, 6, 12, 12)
        losses = []
        for model, amp in ((plain, False), (fast, True)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = model(src, trg, 1.0)
                losses.append(nn.functional.cross_entropy(out.reshape(-1, 12).float(),
                                                          trg[:, 1:].reshape(-1)))
            losses[-1].backward()
        assert op_calls == ["lstm"] * 6  # the encoder, then five decoder steps
        assert abs(losses[0].item() - losses[1].item()) < 2e-2 * losses[0].item()
        for p, q in zip(plain.parameters(), fast.parameters()):
            assert q.grad.dtype == torch.float32
            assert (p.grad - q.grad).norm() <= 0.05 * p.grad.norm() + 1e-6

    def test_float64_is_left_as_it_is(self, op_calls):
        """Autocast does not touch float64: the fused op runs in float64, as without it."""
        _, new = pair("gru", 4, 6, 2, dtype=torch.float64)
        x = torch.randn(3, 2, 4, dtype=torch.float64)
        want = new(x)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = new(x)[0]
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert op_calls == ["gru", "gru"]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_torch_func_grad_equals_torch_nn(cell, op_calls):
    """Under a torch.func transform the drop-in layer computes as torch.nn does (the fused ops
    have no functorch rules): torch.func.grad gives torch.nn's gradients."""
    ref, new = pair(cell, 4, 6, 2)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    params = {n: p.detach() for n, p in ref.named_parameters()}

    def loss(m):
        return lambda p: torch.func.functional_call(m, p, (x,))[0].square().sum()
    want = torch.func.grad(loss(ref))(params)
    got = torch.func.grad(loss(new))(params)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert op_calls == []


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("frozen", [True, False])
def test_forward_mode_ad_equals_torch_nn(cell, frozen, op_calls):
    """Forward-mode AD (a dual input inside ``forward_ad.dual_level``): the fused ops have no
    forward-mode formula, so the drop-in layer computes as torch.nn does and carries the
    tangent (the op dropped it when nothing required grad, and raised otherwise); where
    torch.nn itself has no formula (its oneDNN LSTM on the CPU) the same error."""
    import torch.autograd.forward_ad as fwAD
    ref, new = pair(cell, 4, 6, 2)
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    tangent = torch.randn_like(x)
    results = []
    for m in (ref, new):
        m.requires_grad_(not frozen)
        with fwAD.dual_level():
            try:
                out = m(fwAD.make_dual(x, tangent))[0]
            except (RuntimeError, NotImplementedError) as e:
                results.append(type(e))
                continue
            results.append(fwAD.unpack_dual(out))
    if isinstance(results[0], type):
        assert results[1] is results[0]
    else:
        assert results[1].tangent is not None
        torch.testing.assert_close(results[1].primal, results[0].primal)
        torch.testing.assert_close(results[1].tangent, results[0].tangent)
    assert op_calls == []
    with torch.no_grad():  # outside the dual level: the fused op again
        new(x)
    assert op_calls == [cell]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("hidden, steps", [(7, 3), (160, 1)])  # 160, one step: deferred rows
def test_batched_gradients_equal_torch_nn(cell, hidden, steps):
    """``autograd.grad(..., is_grads_batched=True)`` (what ``jacobian(vectorize=True)`` uses)
    runs the backward under vmap: the stack op's backward then recomputes in PyTorch ops
    instead of reading the batched gradients with its kernel. A plain backward afterwards is
    unaffected."""
    ref, new = pair(cell, 5, hidden, dtype=torch.float32)
    x = torch.randn(steps, 2, 5)
    v = torch.randn(3, steps, 2, hidden)
    got, want = [torch.autograd.grad(m(x)[0], list(m.parameters()), v, is_grads_batched=True)
                 for m in (new, ref)]
    for g, w in zip(got, want):
        assert g.shape == (3, *w.shape[1:])
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    for m in (new, ref):
        m(x)[0].square().sum().backward()
    for p, q in zip(new.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)


class _OneLayerNet(torch.nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = CLASSES[cell][0](5, 7, 2)

    def forward(self, x):
        return self.rnn(x)[0].relu()


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_fx_symbolic_trace_records_the_layer_as_a_leaf(cell, op_calls):
    """torch.fx treats only torch.nn's own classes as leaves: the drop-in layer records itself
    as one call_module node, as nn.GRU / nn.LSTM do, and the traced module runs it fused."""
    torch.manual_seed(0)
    net = _OneLayerNet(cell)
    x = torch.randn(6, 3, 5)
    want = net(x)
    traced = torch.fx.symbolic_trace(seq2seq_ext.accelerate(net))
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["rnn"]
    assert type(traced.rnn) is CLASSES[cell][1]
    op_calls.clear()
    torch.testing.assert_close(traced(x), want)
    assert op_calls == [cell]
    # a layer traced as the root: PyTorch's forward is traced, and fails as nn.GRU's does
    errors = []
    for layer in (CLASSES[cell][0](5, 7), CLASSES[cell][1](5, 7)):
        with pytest.raises(torch.fx.proxy.TraceError) as info:
            torch.fx.symbolic_trace(layer)
        errors.append(str(info.value))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_jit_script_compiles_pytorchs_layer(cell, monkeypatch):
    """torch.jit.script compiles PyTorch's own layer in the drop-in's place (its forward is
    not scriptable), sharing the parameters; as for any ``__prepare_scriptable__``, the eager
    model's entry becomes that layer too, and ``accelerate`` makes it fused again."""
    for cls in (nn.GRU, nn.LSTM):  # PyTorch's own forward (conftest wraps it with a check)
        monkeypatch.setattr(cls, "forward", getattr(cls.forward, "__wrapped__", cls.forward))
    torch.manual_seed(0)
    net = _OneLayerNet(cell)
    x = torch.randn(6, 3, 5)
    want = net(x)
    params = list(net.parameters())
    scripted = torch.jit.script(seq2seq_ext.accelerate(net))
    torch.testing.assert_close(scripted(x), want)
    assert type(net.rnn) is CLASSES[cell][0]
    assert all(p is q for p, q in zip(net.parameters(), params))
    assert type(seq2seq_ext.accelerate(net).rnn) is CLASSES[cell][1]
    torch.testing.assert_close(net(x), want)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_flop_counter_counts_the_fused_products(cell):
    """FlopCounterMode counts the fused op's GEMM FLOPs (a formula registered for the op): a
    forward counts what nn.GRU's products count, 2 x rows x each matrix's size, and a
    backward at least twice that again."""
    from torch.utils.flop_counter import FlopCounterMode
    _, new = pair(cell, 5, 7, 2, dtype=torch.float32)
    x = torch.randn(4, 3, 5)
    gates = 3 if cell == "gru" else 4
    expected = 2 * 4 * 3 * (gates * 7 * 5 + gates * 7 * 7 + 2 * gates * 7 * 7)
    with torch.no_grad(), FlopCounterMode(display=False) as forward:
        new(x)
    assert forward.get_total_flops() == expected
    if cell == "gru":
        ref = nn.GRU(5, 7, 2)
        with torch.no_grad(), FlopCounterMode(display=False) as torch_forward:
            ref(x)
        assert torch_forward.get_total_flops() == expected
    with FlopCounterMode(display=False) as both:
        new(x)[0].sum().backward()
    counts = {str(op): n for op, n in both.get_flop_counts()["Global"].items()}
    # the backward op itself, not a recompute of the stack in ATen products
    assert counts == {"seq2seq_ext.rnn_stack": expected,
                      "seq2seq_ext.rnn_stack_backward": 2 * expected}


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_compiled_backward_keeps_the_fused_backward_op(cell):
    """Under torch.compile (AOTAutograd traces the backward with FunctionalTensor gradients)
    the backward graph holds the fused backward op, not the composite recompute that vmap's
    batched gradients need."""
    from torch._dynamo.backends.common import aot_autograd
    graphs = {}

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
            return gm.forward
        return compiler

    layer = CLASSES[cell][1](5, 7, 2)
    x = torch.randn(4, 3, 5, requires_grad=True)
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(layer, backend=aot_autograd(fw_compiler=keep("fw"),
                                                             bw_compiler=keep("bw")))
        compiled(x)[0].sum().backward()
    torch._dynamo.reset()
    assert "seq2seq_ext.rnn_stack.default" in graphs["fw"]
    assert "seq2seq_ext.rnn_stack_backward.default" in graphs["bw"]
    assert not any("mm" in t for t in graphs["bw"])
