"""The stack op: ``ops.rnn_stack`` / ``torch.ops.seq2seq_ext.rnn_stack`` and
``rnn_stack_backward``, a multi-layer GRU or LSTM over a sequence (or one step), against
``reference.rnn_stack`` (the equations written out) and ``nn.GRU`` / ``nn.LSTM``.

float64 is compared tightly; float32 with ``gru_tol`` (the op's GEMM blocking, bias order and
tanh formula round differently from PyTorch's).
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seq2seq_ext import ops, reference

from helpers import NOT_DIFFERENTIATED, assert_bf16_close, devices, generator, gru_tol

OP = torch.ops.seq2seq_ext.rnn_stack.default
BACKWARD = torch.ops.seq2seq_ext.rnn_stack_backward.default
DEVICES = devices()
GATES = {"gru": 3, "lstm": 4}


def make_args(cell, layers, steps, batch, in_size, hidden, *, bias=True, mask=False,
              dtype=torch.float64, device="cpu", seed=0, requires_grad=False):
    """Random (input, h0, c0, weights, dropout_mask) for rnn_stack."""
    g = generator(seed)

    def rand(*shape, scale=0.6):
        t = ((torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * scale)
        return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    G = GATES[cell] * hidden
    weights = []
    for layer in range(layers):
        weights += [rand(G, in_size if layer == 0 else hidden), rand(G, hidden)]
        if bias:
            weights += [rand(G), rand(G)]
    x = rand(steps, batch, in_size, scale=1.0)
    h0 = rand(layers, batch, hidden, scale=1.0)
    c0 = rand(layers, batch, hidden, scale=1.0) if cell == "lstm" else None
    dropout_mask = None
    if mask and layers > 1:
        keep = torch.rand((layers - 1, steps, batch, hidden), generator=g) > 0.3
        dropout_mask = (keep.to(torch.float64) / 0.7).to(device=device, dtype=dtype)
    return x, h0, c0, weights, dropout_mask


def grads_of(outputs, inputs, seed=5):
    """Gradients of a random linear function of the outputs (None outputs skipped)."""
    g = generator(seed)
    outs = [o for o in outputs if o is not None]
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o)).sum()
               for o in outs)
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def differentiable(x, h0, c0, weights):
    return [x, h0] + ([c0] if c0 is not None else []) + list(weights)


def assert_outputs_and_grads(got, want, inputs, tol):
    """(output, h_n, c_n) and the gradients of grads_of close to the reference's; a gradient
    the reference leaves unused (no rows to run) must be absent or zero."""
    for g, w, name in zip(got, want, ("output", "h_n", "c_n")):
        if w is None:
            assert g is None
            continue
        torch.testing.assert_close(g, w, **tol, msg=lambda m: f"{name}: {m}")
    for k, (g, w) in enumerate(zip(grads_of(got, inputs), grads_of(want, inputs))):
        if w is None:
            assert g is None or not g.any()
            continue
        torch.testing.assert_close(g, w, **tol, msg=lambda m: f"gradient {k}: {m}")


def sum_tol(dtype, in_size, hidden, device="cpu"):
    """gru_tol (on ``device``), or for float32 products whose inner size (the input's or the
    hidden state's width) reaches 128, where the gradients also sum over every gate's rows, a
    tolerance for their other order of additions than the reference's (BLAS's blocking differs
    between CPUs: AVX2 and AVX-512 builds round such sums differently)."""
    if dtype == torch.float32 and max(in_size, hidden) >= 128:
        return dict(rtol=1e-3, atol=2e-4)
    return gru_tol(dtype, device)


def _stack_of_leaves(cell, has_c0, mask):
    """rnn_stack as a function of differentiable(x, h0, c0, weights), for gradcheck."""
    n_c = 1 if has_c0 else 0

    def f(x, h0, *rest):
        c = rest[0] if n_c else None
        out, h_n, c_n = ops.rnn_stack(cell, x, h0, c, list(rest[n_c:]), mask)
        return (out, h_n) + ((c_n,) if n_c else ())
    return f


class TestRnnStack:
    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @pytest.mark.parametrize("layers,steps,batch,in_size,hidden,bias,mask", [
        (1, 1, 1, 3, 5, True, False),     # one step of one layer, batch 1
        (2, 1, 7, 13, 17, True, True),    # the decoder's one-step call, dropout between layers
        (3, 6, 5, 9, 33, False, True),    # no biases, hidden past a vector width
        (2, 11, 3, 40, 20, True, False),
        # the per-step products' four ways (cpu/rnn_stack.h, RowProduct):
        (2, 1, 1, 41, 9, True, False),    # one row, wide input: dot products over the weight
        (2, 3, 4, 16, 32, True, True),    # hidden a whole number of vectors: the weight in place
        (2, 2, 9, 7, 11, False, False),   # many rows, odd hidden: the weight laid out padded
        (2, 2, 3, 150, 130, True, False),  # beyond L2: BLAS
        (1, 12, 8, 48, 24, True, True),   # many rows in one call (the input projection): BLAS
        # hidden sizes of real models: whole numbers of cache lines a row, BLAS products
        (2, 3, 5, 20, 64, True, True),
        (2, 3, 5, 20, 256, False, True),
    ])
    def test_matches_reference(self, cell, layers, steps, batch, in_size, hidden, bias, mask,
                               dtype, device):
        args = make_args(cell, layers, steps, batch, in_size, hidden, bias=bias, mask=mask,
                         dtype=dtype, device=device, seed=layers * 100 + steps,
                         requires_grad=True)
        x, h0, c0, weights, dropout_mask = args
        got = ops.rnn_stack(cell, *args)
        want = reference.rnn_stack(cell, *args)
        assert_outputs_and_grads(got, want, differentiable(x, h0, c0, weights),
                                 sum_tol(dtype, in_size, hidden, device))

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_matches_torch_nn(self, cell):
        """The layers of nn.GRU / nn.LSTM themselves, no dropout."""
        torch.manual_seed(3)
        rnn = getattr(torch.nn, cell.upper())(6, 10, 3).double()
        x = torch.randn(4, 5, 6, dtype=torch.float64)
        h0 = torch.randn(3, 5, 10, dtype=torch.float64)
        c0 = torch.randn(3, 5, 10, dtype=torch.float64) if cell == "lstm" else None
        out, h_n, c_n = ops.rnn_stack(cell, x, h0, c0, rnn._flat_weights)
        want_out, want_state = rnn(x, (h0, c0) if cell == "lstm" else h0)
        torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
        if cell == "lstm":
            torch.testing.assert_close(h_n, want_state[0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(c_n, want_state[1], rtol=1e-12, atol=1e-12)
        else:
            torch.testing.assert_close(h_n, want_state, rtol=1e-12, atol=1e-12)

    @settings(max_examples=12, deadline=None)
    @given(cell=st.sampled_from(["gru", "lstm"]), layers=st.integers(1, 3),
           steps=st.integers(0, 5), batch=st.integers(0, 4), in_size=st.integers(1, 19),
           hidden=st.integers(1, 21), bias=st.booleans(), mask=st.booleans(),
           seed=st.integers(0, 2 ** 16))
    def test_fuzz_against_reference(self, cell, layers, steps, batch, in_size, hidden, bias,
                                    mask, seed):
        args = make_args(cell, layers, steps, batch, in_size, hidden, bias=bias, mask=mask,
                         seed=seed, requires_grad=True)
        x, h0, c0, weights, _ = args
        got = ops.rnn_stack(cell, *args)
        want = reference.rnn_stack(cell, *args)
        for g, w in zip(got, want):
            if w is not None:
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
        inputs = differentiable(x, h0, c0, weights)
        for g, w in zip(grads_of(got, inputs), grads_of(want, inputs)):
            if w is None:  # no step: the weights take no part
                assert g is None or not g.any()
            else:
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @pytest.mark.parametrize("bias", [True, False])
    def test_gradcheck(self, cell, bias, device):
        x, h0, c0, weights, mask = make_args(cell, 2, 3, 2, 3, 4, bias=bias, mask=True,
                                             device=device, seed=7, requires_grad=True)
        f = _stack_of_leaves(cell, c0 is not None, mask)
        assert torch.autograd.gradcheck(f, differentiable(x, h0, c0, weights))

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @pytest.mark.parametrize("bias", [True, False])
    def test_gradgradcheck(self, cell, bias):
        # create_graph=True: the backward recomputes the call differentiably (ops._graph_grads)
        x, h0, c0, weights, mask = make_args(cell, 2, 3, 2, 3, 4, bias=bias, mask=True,
                                             seed=8, requires_grad=True)
        f = _stack_of_leaves(cell, c0 is not None, mask)
        assert torch.autograd.gradgradcheck(f, differentiable(x, h0, c0, weights))

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @pytest.mark.parametrize("mask", [False, True])
    def test_opcheck(self, cell, mask, device):
        args = make_args(cell, 2, 3, 4, 5, 6, mask=mask, dtype=torch.float32, device=device,
                         seed=11, requires_grad=True)
        torch.library.opcheck(OP, (cell,) + args)

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @pytest.mark.parametrize("steps, batch, bias", [(1, 4, True), (3, 1, True), (0, 2, True),
                                                    (2, 0, True), (2, 3, False)])
    def test_opcheck_at_the_edges(self, cell, steps, batch, bias):
        """A decoder's one-step call, batch 1, no steps, an empty batch, no biases."""
        args = make_args(cell, 2, steps, batch, 3, 4, bias=bias, mask=True, seed=16,
                         requires_grad=True)
        torch.library.opcheck(OP, (cell,) + args)

    @pytest.mark.parametrize("deferred", ["always"], indirect=True)
    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_opcheck_of_a_deferring_call(self, deferred, cell):
        args = make_args(cell, 2, 1, 3, 4, 5, seed=17, requires_grad=True)
        torch.library.opcheck(OP, (cell,) + args)

    def test_backward_op_has_no_derivative_of_its_own(self):
        """The backward op on inputs that require grad runs (opcheck's checks but the one that
        differentiates it), and differentiating its outputs names it (where the deprecated
        fallback gave None gradients and a warning)."""
        x, h0, c0, weights, _ = make_args("lstm", 2, 3, 4, 5, 6, seed=15)
        out, h_n, c_n, saved = OP("lstm", x, h0, c0, weights, None)
        grad_out = torch.randn(out.shape, generator=generator(3), dtype=out.dtype,
                               requires_grad=True)
        call = ("lstm", grad_out, None, None, x, h0, c0, weights, None, saved)
        torch.library.opcheck(BACKWARD, call, test_utils=NOT_DIFFERENTIATED)
        grad_x = BACKWARD(*call)[0]
        with pytest.raises(RuntimeError, match="derivative for .*rnn_stack_backward"):
            torch.autograd.grad(grad_x.sum(), grad_out)

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_opcheck_backward(self, cell):
        x, h0, c0, weights, mask = make_args(cell, 2, 3, 4, 5, 6, mask=True, seed=12)
        out, h_n, c_n, saved = OP(cell, x, h0, c0, weights, mask)
        g = generator(1)
        grad_out = torch.randn(out.shape, generator=g, dtype=out.dtype)
        grad_c = torch.randn(h_n.shape, generator=g, dtype=out.dtype) if cell == "lstm" else None
        torch.library.opcheck(BACKWARD, (cell, grad_out, None, grad_c, x, h0, c0, weights, mask,
                                         saved))

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_no_gradient_for_unused_outputs(self, cell):
        """Only h_n used: the output's gradient is absent, the op still differentiates."""
        x, h0, c0, weights, _ = make_args(cell, 2, 4, 3, 5, 6, requires_grad=True, seed=2)
        got = ops.rnn_stack(cell, x, h0, c0, weights)
        want = reference.rnn_stack(cell, x, h0, c0, weights)
        inputs = differentiable(x, h0, c0, weights)
        for g, w in zip(torch.autograd.grad(got[1].sum(), inputs),
                        torch.autograd.grad(want[1].sum(), inputs)):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)

    def test_float32_tanh_within_3_ulp(self):
        """The CPU cells' float32 tanh (one exp and a series near 0, csrc/cpu/cells.h) over
        [-12, 12] and tiny inputs: within 3 ulp of tanh in float64, exactly +-1 far out. A GRU
        of hidden 16 (two AVX2 vectors, one AVX-512 vector) whose n gate sees x and whose r, z
        gates sit at 1/2 outputs tanh(x) / 2."""
        g = generator(11)
        x = torch.cat([torch.linspace(-12, 12, 240000, dtype=torch.float64),
                       torch.randn(40000, generator=g, dtype=torch.float64) * 1e-3,
                       torch.randn(40000, generator=g, dtype=torch.float64) * 0.5,
                       torch.tensor([0.0, 1e-30, -1e-30, 0.5, -0.5, 1.0, -1.0, 2.0] * 2)]).float()
        H = 16
        w_ih = torch.cat([torch.zeros(2 * H, H), torch.eye(H)])
        zero = torch.zeros(3 * H)
        rows = x.view(1, -1, H)
        out = OP("gru", rows, torch.zeros(1, rows.shape[1], H), None,
                 [w_ih, torch.zeros(3 * H, H), zero, zero], None)[0]
        got = 2 * out.flatten().double()
        want = torch.tanh(x.double()).float()
        ulp = (torch.nextafter(want.abs(), torch.tensor(2.0)) - want.abs()).double()
        assert ((got - want.double()).abs() / ulp).max() <= 3
        assert (got[x > 9.5] == 1).all() and (got[x < -9.5] == -1).all()

    def test_deterministic(self):
        args = make_args("lstm", 2, 5, 4, 7, 9, dtype=torch.float32, mask=True, seed=4)
        a = ops.rnn_stack("lstm", *args)
        b = ops.rnn_stack("lstm", *args)
        for s, t in zip(a, b):
            assert torch.equal(s, t)

    @pytest.mark.parametrize("mutate,match", [
        (lambda a: a.update(cell="rnn"), "cell: expected 'gru' or 'lstm'"),
        (lambda a: a.update(x=a["x"][0]), "input: expected a 3-D tensor"),
        (lambda a: a.update(x=a["x"].int()), "input: expected float32 or float64"),
        (lambda a: a.update(h0=a["h0"][:, :1]), "h0: expected size 3 at dimension 1"),
        (lambda a: a.update(h0=a["h0"].float()), "h0: expected dtype Double"),
        (lambda a: a.update(c0=None), "c0: expected the initial cell state"),
        (lambda a: a.update(c0=a["c0"][:1]), "c0: expected the shape of h0"),
        (lambda a: a.update(weights=a["weights"][:3]), "weights: expected 4 tensors per layer"),
        (lambda a: a["weights"].__setitem__(0, a["weights"][0][:, :2]),
         "weights \\(w_ih\\): expected 5 columns at layer 0"),
        (lambda a: a["weights"].__setitem__(5, a["weights"][5][:-1]),
         "weights \\(w_hh\\): expected 24 rows"),
        (lambda a: a.update(mask=torch.ones(1, 2, 3, 6, dtype=torch.float64)),
         "dropout_mask: expected shape \\[1, 4, 3, 6\\]"),
    ])
    def test_bad_arguments_name_the_argument(self, mutate, match):
        x, h0, c0, weights, _ = make_args("lstm", 2, 4, 3, 5, 6, seed=9)
        a = dict(cell="lstm", x=x, h0=h0, c0=c0, weights=list(weights), mask=None)
        before = [t.clone() for t in [x, h0, c0] + weights]
        mutate(a)
        with pytest.raises(RuntimeError, match=match):
            OP(a["cell"], a["x"], a["h0"], a["c0"], a["weights"], a["mask"])
        for t, b in zip([x, h0, c0] + weights, before):
            assert torch.equal(t, b)

    def test_gru_refuses_a_cell_state(self):
        x, h0, _, weights, _ = make_args("gru", 1, 2, 2, 3, 4)
        with pytest.raises(RuntimeError, match="c0: a GRU has no cell state"):
            OP("gru", x, h0, h0, weights, None)

    def test_gru_backward_refuses_a_cell_state_gradient(self):
        x, h0, _, weights, _ = make_args("gru", 1, 2, 2, 3, 4)
        out, h_n, _, saved = OP("gru", x, h0, None, weights, None)
        with pytest.raises(RuntimeError, match="^grad_cn: a GRU has no cell state"):
            BACKWARD("gru", out, None, h_n, x, h0, None, weights, None, saved)

    def test_backward_checks_saved(self):
        x, h0, c0, weights, _ = make_args("gru", 1, 2, 2, 3, 4)
        with pytest.raises(RuntimeError, match="saved: expected shape"):
            BACKWARD("gru", None, None, None, x, h0, None, weights, None,
                     torch.zeros(1, 2, 2, 4, dtype=torch.float64))

    def test_backward_refuses_complex_gradients(self):
        x, h0, c0, weights, _ = make_args("lstm", 2, 3, 2, 4, 5, seed=14)
        out, h_n, c_n, saved = OP("lstm", x, h0, c0, weights, None)
        for name, grads in [("grad_output", (out.to(torch.complex128), None, None)),
                            ("grad_hn", (None, h_n.to(torch.complex128), None)),
                            ("grad_cn", (None, None, c_n.to(torch.complex128)))]:
            with pytest.raises(RuntimeError, match=f"^{name}: expected a floating-point tensor"):
                BACKWARD("lstm", *grads, x, h0, c0, weights, None, saved)

    def test_reference_backend(self):
        args = make_args("gru", 2, 3, 2, 4, 5, seed=13)
        with ops.use_backend("reference"):
            got = ops.rnn_stack("gru", *args)
        want = reference.rnn_stack("gru", *args)
        for g, w in zip(got[:2], want[:2]):
            assert torch.equal(g, w)


def packed_args(cell, layers, lengths, in_size, hidden, *, bias=True, mask=False,
                dtype=torch.float64, seed=0, requires_grad=False):
    """make_args in PackedSequence's layout for rows of the given non-increasing lengths:
    (input (N, in), h0, c0, weights, dropout_mask (layers - 1, N, hidden)), batch_sizes."""
    steps = max(lengths, default=0)
    batch_sizes = [sum(1 for n in lengths if n > t) for t in range(steps)]
    rows = sum(batch_sizes)
    x, h0, c0, weights, _ = make_args(cell, layers, 1, len(lengths), in_size, hidden, bias=bias,
                                      dtype=dtype, seed=seed, requires_grad=requires_grad)
    g = generator(seed + 1)
    x = (torch.rand((rows, in_size), generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    x.requires_grad_(requires_grad)
    dropout_mask = None
    if mask and layers > 1:
        keep = torch.rand((layers - 1, rows, hidden), generator=g) > 0.3
        dropout_mask = (keep.to(torch.float64) / 0.7).to(dtype)
    return (x, h0, c0, weights, dropout_mask), batch_sizes


class TestRnnStackPacked:
    """batch_sizes: PackedSequence's layout, the padded positions skipped."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @pytest.mark.parametrize("layers,lengths,in_size,hidden,bias,mask", [
        (1, [3], 3, 5, True, False),
        (2, [5, 5, 3, 2, 2, 1, 0], 7, 11, True, True),   # a row in no step
        (3, [4, 4, 4], 9, 16, False, True),               # no padding at all
        (2, [6, 1], 13, 9, True, False),
        (2, [0, 0], 3, 4, True, True),                    # nothing to run
        (2, [12, 10, 9, 9, 7, 3, 3, 2, 1, 1] * 2, 48, 40, True, True),  # products through BLAS
        (2, [4, 3, 3, 1], 10, 256, True, True),           # hidden 256
    ])
    def test_matches_reference(self, cell, layers, lengths, in_size, hidden, bias, mask, dtype):
        args, batch_sizes = packed_args(cell, layers, lengths, in_size, hidden, bias=bias,
                                        mask=mask, dtype=dtype, seed=len(lengths) + hidden,
                                        requires_grad=True)
        x, h0, c0, weights, _ = args
        got = ops.rnn_stack(cell, *args, batch_sizes=batch_sizes)
        want = reference.rnn_stack(cell, *args, batch_sizes=batch_sizes)
        assert_outputs_and_grads(got, want, differentiable(x, h0, c0, weights),
                                 sum_tol(dtype, in_size, hidden))

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_matches_torch_nn_on_a_packed_sequence(self, cell):
        torch.manual_seed(5)
        rnn = getattr(torch.nn, cell.upper())(6, 10, 2).double()
        lengths = [5, 5, 3, 1]
        padded = torch.randn(5, 4, 6, dtype=torch.float64)
        packed = torch.nn.utils.rnn.pack_padded_sequence(padded, torch.tensor(lengths))
        h0 = torch.randn(2, 4, 10, dtype=torch.float64)
        c0 = torch.randn(2, 4, 10, dtype=torch.float64) if cell == "lstm" else None
        want_out, want_state = rnn(packed, (h0, c0) if cell == "lstm" else h0)
        out, h_n, c_n = ops.rnn_stack(cell, packed.data, h0, c0, rnn._flat_weights,
                                      batch_sizes=packed.batch_sizes.tolist())
        torch.testing.assert_close(out, want_out.data, rtol=1e-12, atol=1e-12)
        want_h = want_state[0] if cell == "lstm" else want_state
        torch.testing.assert_close(h_n, want_h, rtol=1e-12, atol=1e-12)
        if cell == "lstm":
            torch.testing.assert_close(c_n, want_state[1], rtol=1e-12, atol=1e-12)

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_equals_the_dense_op_at_the_kept_positions(self, cell):
        """Packing changes which positions run, not what they compute (float32)."""
        lengths = [7, 6, 6, 4, 2, 2, 1, 0]
        steps, batch = 7, len(lengths)
        x, h0, c0, weights, _ = make_args(cell, 2, steps, batch, 10, 19, dtype=torch.float32,
                                          seed=21)
        dense, _, _ = ops.rnn_stack(cell, x, h0, c0, weights)
        kept = torch.arange(steps)[:, None] < torch.tensor(lengths)[None, :]
        rows = kept.reshape(-1).nonzero().squeeze(1)
        batch_sizes = kept.sum(1).tolist()
        out, _, _ = ops.rnn_stack(cell, x.reshape(steps * batch, -1)[rows], h0, c0, weights,
                                  batch_sizes=batch_sizes)
        torch.testing.assert_close(out, dense.reshape(steps * batch, -1)[rows],
                                   rtol=1e-6, atol=1e-6)

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_gradcheck(self, cell):
        args, batch_sizes = packed_args(cell, 2, [3, 2, 2, 0], 3, 4, mask=True, seed=31,
                                        requires_grad=True)
        x, h0, c0, weights, mask = args
        leaves = differentiable(x, h0, c0, weights)

        def f(*t):
            c = t[2] if cell == "lstm" else None
            w = list(t[3:] if cell == "lstm" else t[2:])
            return ops.rnn_stack(cell, t[0], t[1], c, w, mask, batch_sizes)[:2]

        assert torch.autograd.gradcheck(f, tuple(leaves))
        assert torch.autograd.gradgradcheck(f, tuple(leaves))

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_opcheck(self, cell):
        args, batch_sizes = packed_args(cell, 2, [4, 3, 3, 1], 5, 6, mask=True,
                                        dtype=torch.float32, seed=41, requires_grad=True)
        torch.library.opcheck(OP, (cell, *args, batch_sizes))
        plain = [t.detach() if isinstance(t, torch.Tensor) else
                 ([w.detach() for w in t] if isinstance(t, list) else t) for t in args]
        out, h_n, c_n, saved = OP(cell, *plain, batch_sizes)
        g = generator(2)
        grad_out = torch.randn(out.shape, generator=g, dtype=out.dtype)
        torch.library.opcheck(BACKWARD, (cell, grad_out, h_n, None, *plain[:4], plain[4], saved,
                                         batch_sizes))

    @pytest.mark.parametrize("batch_sizes, match", [
        ([2, 3], "batch_sizes: expected non-increasing"),
        ([5, 1], "batch_sizes: expected non-increasing sizes between 0 and the batch"),
        ([3, 1], r"input: expected 4 rows \(the sum of batch_sizes\)"),
    ])
    def test_bad_batch_sizes_name_them(self, batch_sizes, match):
        args, _ = packed_args("lstm", 2, [2, 2, 1], 3, 4, seed=51)
        with pytest.raises(RuntimeError, match=match):
            OP("lstm", *args, batch_sizes)

    @pytest.mark.parametrize("op", ["rnn_stack", "gru_layer"])
    def test_the_fake_refuses_the_packed_layout_off_the_cpu(self, op):
        """As the kernels do, so that tracing refuses what a run would."""
        m = lambda *shape: torch.zeros(*shape, device="meta")  # noqa: E731
        with pytest.raises(RuntimeError, match="batch_sizes: the packed layout runs on the CPU"):
            if op == "rnn_stack":
                OP("gru", m(6, 3), m(1, 3, 4), None, [m(12, 3), m(12, 4), m(12), m(12)], None,
                   [3, 2, 1])
            else:
                torch.ops.seq2seq_ext.gru_layer(m(6, 3), m(3, 4), m(12, 3), m(12, 4), m(12),
                                                m(12), None, [3, 2, 1])

    def test_the_wrapper_refuses_batch_sizes_that_are_not_integers(self):
        args, _ = packed_args("gru", 1, [3, 2, 1], 3, 4, seed=53)
        with pytest.raises(TypeError, match="^batch_sizes: expected an integer"):
            ops.rnn_stack("gru", *args, [3.7, 2.2, 1.0])

    def test_packed_mask_shape_is_checked(self):
        args, batch_sizes = packed_args("gru", 2, [2, 1], 3, 4, seed=52)
        x, h0, c0, weights, _ = args
        with pytest.raises(RuntimeError, match=r"dropout_mask: expected shape \[1, 3, 4\]"):
            OP("gru", x, h0, c0, weights, torch.ones(1, 2, 2, 4, dtype=x.dtype), batch_sizes)


def with_bf16_matrices(weights):
    """The weights as the op gets them under CPU autocast: matrices bf16, biases as they are."""
    per = 4 if len(weights) % 4 == 0 and weights[2].dim() == 1 else 2
    return [w.detach().to(torch.bfloat16).requires_grad_(w.requires_grad) if k % per < 2 else w
            for k, w in enumerate(weights)]


class TestRnnStackBf16Matrices:
    """bfloat16 weight matrices beside a float32 input (the op under CPU autocast): every
    product takes bf16 operands and sums in float32, forward and backward, as
    ``reference.rnn_stack(..., product_dtype=torch.bfloat16)`` writes out; the matrices'
    gradients come back in bf16."""

    def run_both(self, cell, args, batch_sizes=None):
        x, h0, c0, weights, mask = args
        low = with_bf16_matrices(weights)
        # the reference on float32 copies of the same (bf16) values
        ref_w = [w.detach().float().requires_grad_() for w in low]
        got = ops.rnn_stack(cell, x, h0, c0, low, mask, batch_sizes)
        want = reference.rnn_stack(cell, x, h0, c0, ref_w, mask, batch_sizes,
                                   product_dtype=torch.bfloat16)
        state = [x, h0] + ([c0] if c0 is not None else [])
        got_g = grads_of(got, state + low)
        want_g = grads_of(want, state + ref_w)
        return got, want, got_g, want_g, len(state)

    @pytest.mark.usefixtures("rounded_bf16_gemm")
    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @pytest.mark.parametrize("layers,steps,batch,in_size,hidden,bias,mask", [
        (2, 1, 7, 13, 17, True, True),   # a decoder's one-step call
        (2, 1, 1, 41, 9, True, False),   # one row: dot products over the weight
        (2, 3, 4, 16, 32, False, True),  # the weight in place, no biases
        (2, 2, 9, 7, 11, True, False),   # the weight laid out padded
        (1, 12, 8, 48, 24, True, True),  # many rows in one call: BLAS
        (2, 3, 5, 20, 64, True, True),   # hidden 64
    ])
    def test_matches_the_bf16_products_reference(self, cell, layers, steps, batch, in_size,
                                                 hidden, bias, mask):
        args = make_args(cell, layers, steps, batch, in_size, hidden, bias=bias, mask=mask,
                         dtype=torch.float32, seed=300 + steps * 7 + batch, requires_grad=True)
        got, want, got_g, want_g, n_state = self.run_both(cell, args)
        for g, w in zip(got, want):
            if w is not None:
                assert g.dtype == torch.float32
                assert_bf16_close(g, w)
        for k, (g, w) in enumerate(zip(got_g, want_g)):
            matrix = k >= n_state and args[3][k - n_state].dim() == 2
            assert g.dtype == (torch.bfloat16 if matrix else torch.float32)
            assert_bf16_close(g, w)

    def test_float32_products_are_not_what_it_computes(self):
        """The comparisons above tell bf16 products from float32 ones."""
        args = make_args("lstm", 2, 3, 4, 16, 32, dtype=torch.float32, seed=5, requires_grad=True)
        _, want, _, want_g, _ = self.run_both("lstm", args)
        f32 = reference.rnn_stack("lstm", *args)
        with pytest.raises(AssertionError):
            assert_bf16_close(f32[0], want[0])
        x, h0, c0, weights, _ = args
        for g, w in zip(grads_of(f32, [x, h0, c0] + weights), want_g):
            with pytest.raises(AssertionError):
                assert_bf16_close(g, w)

    @pytest.mark.usefixtures("rounded_bf16_gemm")
    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_packed(self, cell):
        args, batch_sizes = packed_args(cell, 2, [5, 4, 2, 2, 1], 6, 10, mask=True,
                                        dtype=torch.float32, seed=61, requires_grad=True)
        got, want, got_g, want_g, _ = self.run_both(cell, args, batch_sizes)
        for g, w in zip(got, want):
            if w is not None:
                assert_bf16_close(g, w)
        for g, w in zip(got_g, want_g):
            assert_bf16_close(g, w)

    @pytest.mark.parametrize("layout", ["dense", "packed", "odd"])
    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_either_way_of_running_products(self, cell, layout, bf16_gemm):
        """Large enough for bf16 GEMMs (native_product), each step's product with W_hh too (96
        rows; packed, the steps' rows shrink to 70 and 0; odd: sizes off the 32 x 32 blocks of
        the gradients' transposes): "native" runs them, their results rounded to bf16 (so it
        differs from the exact products, within bf16's precision), "rounded" computes the
        reference's products."""
        if layout == "dense":
            args, batch_sizes = make_args(cell, 2, 4, 96, 128, 128, dtype=torch.float32,
                                          seed=71, requires_grad=True), None
        elif layout == "packed":
            args, batch_sizes = packed_args(cell, 2, [4] * 70 + [2] * 26, 128, 128,
                                            dtype=torch.float32, seed=71, requires_grad=True)
        else:
            args, batch_sizes = make_args(cell, 2, 3, 161, 72, 100, dtype=torch.float32,
                                          seed=72, requires_grad=True), None
        x, h0, c0, weights, mask = args
        low = with_bf16_matrices(weights)
        ref_w = [w.detach().float().requires_grad_() for w in low]
        got = OP(cell, x, h0, c0, low, mask, batch_sizes)[0]
        want = reference.rnn_stack(cell, x, h0, c0, ref_w, mask, product_dtype=torch.bfloat16,
                                   batch_sizes=batch_sizes)[0]
        # the gradients too: under "native" each matrix's is one bf16 GEMM over all rows
        state = [x, h0] + ([c0] if c0 is not None else [])
        got_g = torch.autograd.grad(got.sum(), state + low)
        want_g = torch.autograd.grad(want.sum(), state + ref_w)
        for g, w, a in zip(got_g, want_g, state + low):
            assert g.dtype == a.dtype
        # a gradient summed over hundreds of rows gathers the one-step-apart roundings of
        # assert_bf16_close from many of them (an operand one bf16 step apart, carried through
        # the steps): "rounded" matches the reference to 2e-3 in norm (1e-3 at most measured:
        # the packed LSTM's W_hh), "native" (whose results are rounded once more) to bf16's
        # precision
        if bf16_gemm == "rounded":
            assert_bf16_close(got, want)
            for g, w in zip(got_g, want_g):
                assert (g.float() - w).norm() <= 2e-3 * w.norm()
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=0.1)
            assert (got - want).norm() <= 1e-2 * want.norm()
            assert not torch.allclose(got, want, rtol=1e-4, atol=1e-5)
            for g, w in zip(got_g, want_g):
                assert (g.float() - w).norm() <= 2e-2 * w.norm()

    def test_the_mode_is_chosen_by_the_cpu_and_checked(self):
        assert ops.bf16_gemm() == ("native" if ops.cpu_has_bf16_gemm() else "rounded")
        with pytest.raises(ValueError, match="mode: expected one of"):
            ops.set_bf16_gemm("bf16")
        assert ops.bf16_gemm() == ("native" if ops.cpu_has_bf16_gemm() else "rounded")

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_opcheck(self, cell):
        x, h0, c0, weights, mask = make_args(cell, 2, 3, 4, 5, 6, mask=True, dtype=torch.float32,
                                             seed=81, requires_grad=True)
        torch.library.opcheck(OP, (cell, x, h0, c0, with_bf16_matrices(weights), mask))

    @pytest.mark.parametrize("mutate,match", [
        (lambda a: a.update(x=a["x"].double(), h0=a["h0"].double(), c0=a["c0"].double()),
         "weights \\(w_ih\\): bfloat16 weight matrices need a float32 input on the CPU"),
        (lambda a: a["weights"].__setitem__(5, a["weights"][5].float()),
         "weights \\(w_hh\\): expected bfloat16 like the other weight matrices, got Float at "
         "layer 1"),
        (lambda a: a["weights"].__setitem__(2, a["weights"][2].bfloat16()),
         "weights \\(b_ih\\): expected dtype Float"),
    ])
    def test_bad_dtypes_name_the_argument(self, mutate, match):
        x, h0, c0, weights, _ = make_args("lstm", 2, 4, 3, 5, 6, dtype=torch.float32, seed=9)
        a = dict(x=x, h0=h0, c0=c0, weights=with_bf16_matrices(weights))
        mutate(a)
        with pytest.raises(RuntimeError, match=match):
            OP("lstm", a["x"], a["h0"], a["c0"], a["weights"], None)


def step_loop(cell, args, steps, weights=None):
    """A decoder's loop: ``steps`` one-step calls of rnn_stack, each on the next row block of
    ``x`` and the state the previous call left. Returns the stacked outputs and the last state."""
    x, h0, c0, base_weights, mask = args
    weights = base_weights if weights is None else weights
    h, c, outs = h0, c0, []
    for t in range(steps):
        out, h, c_n = ops.rnn_stack(cell, x[t:t + 1], h, c, weights,
                                    None if mask is None else mask[:, t:t + 1])
        c = c_n if cell == "lstm" else None
        outs.append(out)
    return torch.cat(outs), h, c


def node_names(tensor):
    """The names of every node of ``tensor``'s autograd graph."""
    names, todo, seen = set(), [tensor.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(fn.name())
        todo.extend(f for f, _ in fn.next_functions)
    return names


SUM_NODE = "RnnStackWeightGradSum"


class TestRnnStackDeferredGrads:
    """One-step calls (a decoder's loop) hand their weight matrices' gate gradients and inputs
    to one RnnStackWeightGradSum node per matrix and graph, which gives each matrix its gradient
    as one product over the rows of all the calls (csrc/deferred_weight_grads.h); the
    gradients are those of the per-call path and of the reference."""

    @pytest.mark.parametrize("deferred", ["always"], indirect=True)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @pytest.mark.parametrize("layers,steps,batch,in_size,hidden,bias,mask", [
        (1, 1, 1, 3, 5, True, False),     # one call
        (2, 5, 7, 13, 17, True, True),    # dropout between layers
        (3, 4, 1, 41, 9, False, False),   # batch 1, no biases
        (2, 3, 6, 150, 130, True, True),  # beyond L2: BLAS products
        (2, 3, 4, 20, 256, True, True),   # hidden 256
    ])
    def test_matches_reference(self, deferred, cell, layers, steps, batch, in_size, hidden,
                               bias, mask, dtype):
        args = make_args(cell, layers, steps, batch, in_size, hidden, bias=bias, mask=mask,
                         dtype=dtype, seed=900 + layers * 10 + steps, requires_grad=True)
        x, h0, c0, weights, dropout_mask = args
        got = step_loop(cell, args, steps)
        assert SUM_NODE in node_names(got[0])
        want = reference.rnn_stack(cell, *args)
        # float32: a loop of calls sums the state's gradient in another order than one call
        tol = gru_tol(dtype) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
        assert_outputs_and_grads(got, want, differentiable(x, h0, c0, weights), tol)

    @pytest.mark.parametrize("deferred", ["always"], indirect=True)
    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_gradcheck(self, deferred, cell):
        x, h0, c0, weights, mask = make_args(cell, 2, 3, 2, 3, 4, mask=True, seed=17,
                                             requires_grad=True)
        n_c = 1 if c0 is not None else 0

        def f(x, h0, *rest):
            c = rest[0] if n_c else None
            out, h_n, c_n = step_loop(cell, (x, h0, c, list(rest[n_c:]), mask), 3)
            return (out, h_n) + ((c_n,) if n_c else ())

        assert torch.autograd.gradcheck(f, differentiable(x, h0, c0, weights))
        # create_graph: the aliases' WeightGradSum passes each call's gradient on, counted once
        assert torch.autograd.gradgradcheck(f, differentiable(x, h0, c0, weights))

    @pytest.mark.parametrize("deferred", ["always"], indirect=True)
    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_equals_the_per_call_path(self, deferred, cell):
        """float32 at the chapter's decoder sizes, with and without deferring."""
        args = make_args(cell, 2, 6, 16, 32, 32, mask=True, dtype=torch.float32, seed=23,
                         requires_grad=True)
        inputs = differentiable(*args[:4])
        got = grads_of(step_loop(cell, args, 6), inputs)
        ops.set_deferred_grads("off")
        out = step_loop(cell, args, 6)
        assert SUM_NODE not in node_names(out[0])
        want = grads_of(out, inputs)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("deferred", ["auto"], indirect=True)
    def test_auto_defers_large_matrices_only(self, deferred):
        """hidden 128: the LSTM's (512, 128) matrices (65,536 elements) defer; the GRU's
        (384, 128) do not; a sequence call never does."""
        for cell, large in (("lstm", True), ("gru", False)):
            args = make_args(cell, 1, 2, 3, 128, 128, dtype=torch.float32, seed=5,
                             requires_grad=True)
            assert (SUM_NODE in node_names(step_loop(cell, args, 2)[0])) == large
            assert SUM_NODE not in node_names(ops.rnn_stack(cell, *args)[0])

    @pytest.mark.parametrize("deferred", ["always"], indirect=True)
    def test_not_in_no_grad_or_for_frozen_weights(self, deferred):
        args = make_args("lstm", 2, 2, 3, 4, 5, requires_grad=True, seed=29)
        x, h0, c0, weights, _ = args
        with torch.no_grad():
            assert step_loop("lstm", args, 2)[0].grad_fn is None
        frozen = [w.detach() if k % 4 == 1 else w for k, w in enumerate(weights)]
        out = step_loop("lstm", args, 2, frozen)
        want = reference.rnn_stack("lstm", x, h0, c0, frozen)
        inputs = [x, h0, c0] + [w for w in frozen if w.requires_grad]
        for g, w in zip(grads_of(out, inputs), grads_of(want, inputs)):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)

    @pytest.mark.parametrize("deferred", ["always"], indirect=True)
    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_partial_backward_leaves_no_rows_behind(self, deferred, cell):
        """A torch.autograd.grad for the state alone hands no rows over (the sum node does not
        run there): a later backward through the same graph gives the weights their gradient
        once."""
        args = make_args(cell, 2, 3, 4, 5, 6, requires_grad=True, seed=31)
        x, h0, c0, weights, _ = args
        out = step_loop(cell, args, 3)
        want = reference.rnn_stack(cell, *args)
        loss, want_loss = (out[0] ** 2).sum(), (want[0] ** 2).sum()
        torch.testing.assert_close(torch.autograd.grad(loss, [h0], retain_graph=True)[0],
                                   torch.autograd.grad(want_loss, [h0], retain_graph=True)[0],
                                   rtol=1e-10, atol=1e-10)
        got_w = torch.autograd.grad(loss, weights, retain_graph=True)
        want_w = torch.autograd.grad(want_loss, weights)
        for g, w in zip(got_w, want_w):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
        # and once more through the retained graph: the same again, nothing left over
        for g, w in zip(torch.autograd.grad(loss, weights), want_w):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)

    @pytest.mark.parametrize("deferred", ["always"], indirect=True)
    def test_graphs_between_optimizer_steps(self, deferred):
        """Two graphs over the same weights (one sum node), each backward on its own, then an
        optimizer step (a new version: the next graph gets a new node): every .grad is the
        reference's."""
        torch.manual_seed(37)
        rnn = torch.nn.LSTM(5, 6, 2).double()
        ref = torch.nn.LSTM(5, 6, 2).double()
        ref.load_state_dict(rnn.state_dict())
        opt = torch.optim.SGD(rnn.parameters(), lr=0.1)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        xs = [torch.randn(3, 4, 5, dtype=torch.float64) for _ in range(4)]

        def loop(module, x, fused):
            h, outs = None, []
            for t in range(x.shape[0]):
                if fused:
                    h0, c0 = h if h is not None else (x.new_zeros(2, 4, 6),) * 2
                    out, h_n, c_n = ops.rnn_stack("lstm", x[t:t + 1], h0, c0,
                                                  module._flat_weights)
                    h = (h_n, c_n)
                else:
                    out, h = module(x[t:t + 1], h)
                outs.append(out)
            return (torch.cat(outs) ** 2).sum()

        for step in range(2):
            opt.zero_grad()
            ref_opt.zero_grad()
            losses = [loop(rnn, x, True) for x in xs[2 * step:2 * step + 2]]
            for loss in losses:
                loss.backward()
            for x in xs[2 * step:2 * step + 2]:
                loop(ref, x, False).backward()
            for p, q in zip(rnn.parameters(), ref.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-10)
            opt.step()
            ref_opt.step()

    @pytest.mark.parametrize("deferred", ["always"], indirect=True)
    def test_create_graph_takes_the_per_call_path(self, deferred):
        args = make_args("gru", 2, 3, 4, 5, 6, requires_grad=True, seed=41)
        x, h0, c0, weights, _ = args
        got = torch.autograd.grad(step_loop("gru", args, 3)[0].sum(), weights,
                                  create_graph=True)
        want = torch.autograd.grad(reference.rnn_stack("gru", *args)[0].sum(), weights)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)

    @pytest.mark.parametrize("deferred", ["always"], indirect=True)
    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_bf16_matrices(self, deferred, cell, bf16_gemm):
        """The matrices in bf16 (the op under CPU autocast), either way of running products:
        their gradients come back in bf16, as close to the exact float64 ones as the per-call
        path's (which rounds each call's gradient to bf16 before autograd sums them)."""
        args = make_args(cell, 2, 6, 40, 64, 64, dtype=torch.float32, seed=43,
                         requires_grad=True)
        x, h0, c0, weights, mask = args
        low = with_bf16_matrices(weights)
        exact_w = [w.detach().double().requires_grad_() for w in low]
        exact = reference.rnn_stack(cell, x.double(), h0.double(),
                                    None if c0 is None else c0.double(), exact_w)
        want = torch.autograd.grad(exact[0].sum(), exact_w)
        got = torch.autograd.grad(step_loop(cell, (x, h0, c0, low, None), 6)[0].sum(), low)
        ops.set_deferred_grads("off")
        per_call = torch.autograd.grad(step_loop(cell, (x, h0, c0, low, None), 6)[0].sum(), low)
        for g, p, w in zip(got, per_call, want):
            assert g.dtype == p.dtype
            err, err_per_call = (g.double() - w).norm(), (p.double() - w).norm()
            assert err <= 1e-2 * w.norm()
            assert err <= err_per_call * 1.1 + 1e-3 * w.norm()

    @pytest.mark.parametrize("deferred", ["always"], indirect=True)
    @pytest.mark.parametrize("matrices", ["float64", "bf16"])
    def test_tied_matrices_are_not_deferred(self, deferred, matrices, bf16_gemm):
        """One tensor as a GRU layer's W_ih and W_hh (and as the next layer's W_hh): each
        deferred sum holds one role's rows, so the tied matrix takes the per-call path, with
        the reference's gradient (bf16: the per-call path's, deferring switched off)."""
        hidden = 6 if matrices == "float64" else 64
        args = make_args("gru", 2, 3, 4, hidden, hidden, seed=47, requires_grad=True,
                         dtype=torch.float64 if matrices == "float64" else torch.float32)
        x, h0, _, weights, _ = args
        tied = weights[1]
        weights = [tied, tied, weights[2], weights[3], weights[4], tied, weights[6], weights[7]]
        if matrices == "bf16":
            weights = with_bf16_matrices(weights)
            weights[5] = weights[1] = weights[0]
        leaves = [weights[0], weights[4]]
        got = torch.autograd.grad(step_loop("gru", (x, h0, None, weights, None), 3)[0].sum(),
                                  leaves)
        if matrices == "float64":
            want = torch.autograd.grad(reference.rnn_stack("gru", x, h0, None, weights)[0].sum(),
                                       leaves)
        else:
            ops.set_deferred_grads("off")
            want = torch.autograd.grad(
                step_loop("gru", (x, h0, None, weights, None), 3)[0].sum(), leaves)
        tol = dict(rtol=1e-10, atol=1e-10) if matrices == "float64" else dict(rtol=2e-2, atol=2e-2)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w.double(), **tol)

    @pytest.mark.parametrize("deferred", ["always"], indirect=True)
    def test_many_weights_coming_and_going(self, deferred):
        """More matrices than the per-thread table of aliases keeps before it sweeps out the
        dead ones (64), each freed after its graph: every gradient is still the reference's."""
        for k in range(80):
            args = make_args("gru", 1, 2, 3, 4, 5, requires_grad=True, seed=1000 + k)
            x, h0, c0, weights, _ = args
            got = grads_of(step_loop("gru", args, 2), weights)
            want = grads_of(reference.rnn_stack("gru", *args), weights)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)

    @pytest.mark.parametrize("deferred", ["always"], indirect=True)
    @pytest.mark.parametrize("bf16_gemm", ["native", "rounded"], indirect=True)
    def test_a_matrix_tied_across_roles_under_bf16_autocast(self, deferred, bf16_gemm):
        """One matrix as W_hh of one stack's calls and W_ih of another's (two GRUs, one tied
        weight) under CPU bf16 autocast, where the GRU's W_hh hands over rows of its own: each
        role has its sum, and the gradients are the per-call path's. (Hidden 256: the GRU's
        W_hh hands over rows of its own where its products run as bf16 GEMMs.)"""
        hidden = 256
        a_args = make_args("gru", 1, 3, 2, hidden, hidden, seed=61, requires_grad=True,
                           dtype=torch.float32)
        b_args = make_args("gru", 1, 3, 2, hidden, hidden, seed=62, requires_grad=True,
                           dtype=torch.float32)
        a_w, b_w = a_args[3], list(b_args[3])
        b_w[0] = a_w[1]

        def grads():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ha, hb, loss = a_args[1], b_args[1], 0
                for t in range(3):
                    out_a, ha, _ = ops.rnn_stack("gru", a_args[0][t:t + 1], ha, None, a_w)
                    out_b, hb, _ = ops.rnn_stack("gru", out_a, hb, None, b_w)
                    loss = loss + out_b.float().square().sum()
            return torch.autograd.grad(loss, [a_w[0], a_w[1], b_w[1]])

        got = grads()
        ops.set_deferred_grads("off")
        for g, w in zip(got, grads()):
            torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)

    @pytest.mark.parametrize("deferred,frozen", [("auto", False), ("always", True)],
                             indirect=["deferred"])
    @pytest.mark.parametrize("bf16_gemm", ["native", "rounded"], indirect=True)
    def test_a_gru_w_hh_tied_where_w_ih_is_deferred_and_where_not(self, deferred, frozen,
                                                                   bf16_gemm):
        """One W_hh in two GRUs under CPU bf16 autocast, where one's W_ih defers its gradient
        and the other's does not (too small for "auto", or frozen): the calls hand W_hh's sum
        its n columns apart in one and whole gate gradients in the other (an internal assertion
        before); the gradients are the per-call path's."""
        hidden = 256
        a_args = make_args("gru", 1, 3, 2, 8, hidden, seed=64, requires_grad=True,
                           dtype=torch.float32)  # W_ih (768, 8): below "auto"'s threshold
        b_args = make_args("gru", 1, 3, 2, hidden, hidden, seed=65, requires_grad=True,
                           dtype=torch.float32)
        a_w, b_w = list(a_args[3]), list(b_args[3])
        b_w[1] = a_w[1]
        if frozen:
            a_w[0] = a_w[0].detach()
        wanted = [w for w in (a_w[0], a_w[1], b_w[0]) if w.requires_grad]

        def grads():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ha, hb, loss = a_args[1], b_args[1], 0
                for t in range(3):
                    out_a, ha, _ = ops.rnn_stack("gru", a_args[0][t:t + 1], ha, None, a_w)
                    out_b, hb, _ = ops.rnn_stack("gru", b_args[0][t:t + 1], hb, None, b_w)
                    loss = loss + out_a.float().square().sum() + out_b.float().square().sum()
            return torch.autograd.grad(loss, wanted)

        got = grads()
        ops.set_deferred_grads("off")
        for g, w in zip(got, grads()):
            torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)

    @pytest.mark.parametrize("deferred", ["always"], indirect=True)
    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    def test_a_call_of_no_rows_gives_zero_gradients(self, deferred, cell):
        """A one-step call over an empty batch hands over no rows: its matrices get the per-call
        path's zero gradients, as nn.GRU / nn.LSTM give (none at all before)."""
        x, h0, c0, weights, _ = make_args(cell, 2, 1, 0, 5, 7, seed=66, requires_grad=True)
        out, h_n, _ = ops.rnn_stack(cell, x, h0, c0, weights)
        got = torch.autograd.grad(out.sum() + h_n.sum(), weights)
        for g, w in zip(got, weights):
            assert torch.equal(g, torch.zeros_like(w))

    @pytest.mark.parametrize("deferred", ["always"], indirect=True)
    def test_rows_of_an_aborted_backward_are_dropped(self, deferred):
        """A backward that stops (an error further down its graph) after a call handed its rows
        to a matrix's sum but before the sum ran leaves them behind; a later backward over a
        graph that shares the sum (the same matrices, unchanged, the failed graph alive) gives
        the reference's gradient, not one with those rows added."""
        class Boom(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.clone()

            @staticmethod
            def backward(ctx, grad):
                raise RuntimeError("boom")

        args = make_args("gru", 1, 2, 2, 5, 7, seed=63, requires_grad=True)
        x, h0, _, weights, _ = args

        def loss(run, boom=False):
            _, h1, _ = run("gru", x[0:1], h0, None, weights)
            if boom:
                h1 = Boom.apply(h1)
            out, _, _ = run("gru", x[1:2], h1, None, weights)
            return out.square().sum()

        failed = loss(ops.rnn_stack, boom=True)
        with pytest.raises(RuntimeError, match="boom"):
            failed.backward()
        got = torch.autograd.grad(loss(ops.rnn_stack), weights[:2])
        want = torch.autograd.grad(loss(reference.rnn_stack), weights[:2])
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)

    @pytest.mark.parametrize("deferred", ["always"], indirect=True)
    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @pytest.mark.parametrize("nesting", ["reentrant checkpoint", "backward in a backward"])
    def test_a_nested_backward_keeps_the_outer_rows(self, deferred, cell, nesting):
        """A backward that runs inside another (a reentrant checkpoint's, or one a custom
        Function's backward starts) over calls of the same matrices shares their sums with it:
        each sum takes the rows of the backward that runs it, and leaves the others'."""
        args = make_args(cell, 2, 6, 2, 3, 4, seed=65, requires_grad=True)
        x, h0, c0, weights, _ = args

        def steps(h, c, lo, hi, run=ops.rnn_stack):
            outs = []
            for t in range(lo, hi):
                out, h, c_n = run(cell, x[t:t + 1], h, c, weights)
                c = c_n if cell == "lstm" else None
                outs.append(out)
            return torch.cat(outs), h, c

        class Inner(torch.autograd.Function):  # its backward runs a backward of its own
            @staticmethod
            def forward(ctx, h):
                return h.clone()

            @staticmethod
            def backward(ctx, grad):
                with torch.enable_grad():
                    out, _, _ = steps(h0.detach(), None if c0 is None else c0.detach(), 0, 2)
                    out.square().sum().backward()
                return grad

        out1, h, c = steps(h0, c0, 0, 2)
        if nesting == "reentrant checkpoint":
            def middle(h, *c):
                out, h, c = steps(h, c[0] if c else None, 2, 4)
                return (out, h) if c is None else (out, h, c)
            res = torch.utils.checkpoint.checkpoint(middle, h, *(() if c is None else (c,)),
                                                    use_reentrant=True)
            out2, h, c = res[0], res[1], (res[2] if c is not None else None)
        else:
            out2, h, c = steps(Inner.apply(h), c, 2, 4)
        out3, h, _ = steps(h, c, 4, 6)
        (torch.cat([out1, out2, out3]).square().sum() + h.sum()).backward()
        got = [w.grad.clone() for w in weights]
        for w in weights:
            w.grad = None
        out, h_n, _ = steps(h0, c0, 0, 6, reference.rnn_stack)
        (out.square().sum() + h_n.sum()).backward()
        if nesting == "backward in a backward":  # the inner backward's own gradient, added
            inner, _, _ = steps(h0.detach(), None if c0 is None else c0.detach(), 0, 2,
                                reference.rnn_stack)
            inner.square().sum().backward()
        for g, w in zip(got, weights):
            torch.testing.assert_close(g, w.grad, rtol=1e-10, atol=1e-10)

    @pytest.mark.parametrize("deferred", ["always"], indirect=True)
    def test_no_reference_to_the_matrix_is_kept(self, deferred):
        """Once a graph of one-step calls is gone, nothing the deferral keeps refers to the
        matrices: ``torch.utils.swap_tensors`` (what ``.to()`` does under
        ``torch.__future__.set_swap_module_params_on_conversion(True)``) accepts them."""
        args = make_args("lstm", 2, 3, 2, 5, 7, seed=64, requires_grad=True)
        step_loop("lstm", args, 3)[0].sum().backward()
        for w in args[3]:
            new = torch.nn.Parameter(w.detach().double())
            torch.utils.swap_tensors(w, new)
            assert w.dtype == torch.float64

    def test_the_mode_is_checked(self):
        assert ops.deferred_grads() == "auto"
        with pytest.raises(ValueError, match="mode: expected one of"):
            ops.set_deferred_grads("on")
        assert ops.deferred_grads() == "auto"
