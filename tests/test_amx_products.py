"""bf16 products on AMX tiles over a matrix laid out once (csrc/cpu/amx_gemm.h,
``ops.set_amx_products``): the kernel itself against float64 products of the same bf16 values,
its cache of laid-out matrices, and the recurrent ops with it on and off.

An ATen bf16 GEMM rounds its result to bf16; these products return float32 sums, so with them a
one-step call of the ops computes what ``reference``'s ``product_dtype=torch.bfloat16`` writes
out to float32's precision, where the ATen GEMMs are only within bf16's.
"""
import pytest
import torch

from seq2seq_ext import _C, ops, reference

from helpers import assert_bf16_close, generator

needs_amx = pytest.mark.skipif(not _C.amx_usable(),
                               reason="needs a CPU and OS that run AMX-BF16")


def bf16_randn(*shape, seed):
    return torch.randn(shape, generator=generator(seed)).bfloat16()


def exact(a, w_kn, bias=None):
    """The float64 product of the bf16 values (exact up to float64's rounding) and, for the
    error bound, the product of their magnitudes."""
    out = a.double() @ w_kn.double()
    mag = a.double().abs() @ w_kn.double().abs()
    if bias is not None:
        out = out + bias.double()
        mag = mag + bias.double().abs()
    return out, mag


def assert_float32_sums(got, a, w_kn, bias=None):
    """Within the worst case of K float32 additions (K * 2^-24 of the magnitudes' product): far
    below a result rounded to bf16 (2^-9 relative)."""
    want, mag = exact(a, w_kn, bias)
    K = a.shape[1]
    assert got.dtype == torch.float32
    assert ((got.double() - want).abs() <= (K + 2) * 2.0 ** -24 * mag + 1e-30).all()


@needs_amx
class TestAmxMm:
    @pytest.mark.parametrize("rows", [1, 7, 16, 31, 32, 33, 100, 128, 256])
    @pytest.mark.parametrize("transposed", [True, False])
    def test_matches_the_exact_products(self, rows, transposed):
        K, N = 96, 160
        a = bf16_randn(rows, K, seed=rows)
        w = bf16_randn(*((N, K) if transposed else (K, N)), seed=rows + 1)
        bias = torch.randn(N, generator=generator(rows + 2))
        w_kn = w.t() if transposed else w
        assert_float32_sums(_C.amx_mm(a, w, transposed, bias), a, w_kn, bias)
        assert_float32_sums(_C.amx_mm(a, w, transposed), a, w_kn)

    @pytest.mark.parametrize("K,N", [(32, 32), (512, 2048), (2048, 512), (256, 1536)])
    def test_layer_sizes(self, K, N):
        a = bf16_randn(128, K, seed=K)
        w = bf16_randn(N, K, seed=N)  # a weight (gates, inputs), used transposed (forward)
        assert_float32_sums(_C.amx_mm(a, w, True), a, w.t())
        w = bf16_randn(K, N, seed=N + 1)  # used as it is (the backward's gradient products)
        assert_float32_sums(_C.amx_mm(a, w, False), a, w)

    def test_not_rounded_to_bf16(self):
        """What tells these sums from an ATen bf16 GEMM's: its result is rounded to bf16."""
        a, w = bf16_randn(64, 256, seed=1), bf16_randn(256, 128, seed=2)
        with pytest.raises(AssertionError):
            assert_float32_sums(torch.mm(a, w).float(), a, w)
        assert_float32_sums(_C.amx_mm(a, w, False), a, w)

    @pytest.mark.parametrize("layout", ["odd_row_stride", "column_view", "rows_of_a"])
    def test_any_strides(self, layout):
        """Each way of laying out a matrix (a weight's transpose: its rows hold the pairs; a
        row-major matrix: two rows interleaved; other strides: one value at a time), and rows of
        A with a row stride of their own."""
        big = bf16_randn(300, 700, seed=3)
        a = bf16_randn(45, 64, seed=4)
        if layout == "odd_row_stride":  # (N, K) with row stride 700, then an odd one
            w, transposed = big[:96, 1:65], True
            odd = bf16_randn(96, 67, seed=5)[:, 3:]
            assert_float32_sums(_C.amx_mm(a, odd, True), a, odd.t())
        elif layout == "column_view":  # (K, N) as a transposed view: unit row stride
            w, transposed = big[:96, 5:69].t(), False
        else:
            w, transposed = big[:64, :128], False
            a = bf16_randn(45, 100, seed=6)[:, 7:71]
        w_kn = w.t() if transposed else w
        assert_float32_sums(_C.amx_mm(a, w, transposed), a, w_kn)

    def test_a_changed_matrix_is_laid_out_anew(self):
        """The laid-out copy is found by the matrix's memory and version: an in-place change is
        seen, and another view of the same memory gets its own copy."""
        a = bf16_randn(16, 64, seed=7)
        w = bf16_randn(64, 96, seed=8)
        first = _C.amx_mm(a, w, False)
        assert torch.equal(_C.amx_mm(a, w, False), first)
        w.mul_(2)
        assert torch.equal(_C.amx_mm(a, w, False), 2 * first)
        part = w[:, 32:64]
        assert_float32_sums(_C.amx_mm(a, part, False), a, part)
        w.copy_(bf16_randn(64, 96, seed=9))
        assert_float32_sums(_C.amx_mm(a, w, False), a, w)

    def test_bad_shapes(self):
        with pytest.raises(RuntimeError, match="multiples of 32"):
            _C.amx_mm(bf16_randn(4, 48, seed=0), bf16_randn(48, 64, seed=0), False)
        with pytest.raises(RuntimeError, match="multiples of 32"):
            _C.amx_mm(bf16_randn(4, 64, seed=0), bf16_randn(32, 64, seed=0), False)
        with pytest.raises(RuntimeError, match="bfloat16"):
            _C.amx_mm(torch.randn(4, 64), bf16_randn(64, 64, seed=0), False)


def one_step_args(cell, batch, in_size, hidden, seed):
    g = generator(seed)
    G = {"gru": 3, "lstm": 4}[cell] * hidden

    def rand(*shape, scale=0.5):
        return ((torch.rand(shape, generator=g) * 2 - 1) * scale).requires_grad_()

    weights = []
    for layer in range(2):
        weights += [rand(G, in_size if layer == 0 else hidden).detach().bfloat16()
                    .requires_grad_(), rand(G, hidden).detach().bfloat16().requires_grad_(),
                    rand(G), rand(G)]
    x = rand(1, batch, in_size, scale=1.0)
    h0 = rand(2, batch, hidden, scale=1.0)
    c0 = rand(2, batch, hidden, scale=1.0) if cell == "lstm" else None
    return x, h0, c0, weights


def relative_errors(cell, sizes, amx):
    """rnn_stack with bf16 matrices (the op under CPU autocast), two layers of hidden 128, with
    ops.set_amx_products(amx): the relative errors (in norm) of the output, then of every
    gradient, against the bf16 products reference. sizes: a packed sequence's batch sizes, or
    None for a one-step call of 96 rows."""
    x, h0, c0, weights = one_step_args(cell, 96, 128, 128, seed=21)
    if sizes is not None:
        x = torch.randn(sum(sizes), 128, generator=generator(22)).requires_grad_()
    ref_w = [w.detach().float().requires_grad_() for w in weights]
    leaves = [x, h0] + ([c0] if c0 is not None else [])
    before = ops.amx_products()
    ops.set_amx_products(amx)
    try:
        got = ops.rnn_stack(cell, x, h0, c0, weights, None, sizes)[0]
        got_g = torch.autograd.grad(got.sum(), leaves + weights)
    finally:
        ops.set_amx_products(before)
    want = reference.rnn_stack(cell, x, h0, c0, ref_w, None, sizes,
                               product_dtype=torch.bfloat16)[0]
    want_g = torch.autograd.grad(want.sum(), leaves + ref_w)
    return [((a.float() - b).norm() / b.norm()).item()
            for a, b in [(got, want)] + list(zip(got_g, want_g))]


@needs_amx
class TestAmxProductsInTheOps:
    """rnn_stack with bf16 matrices, products large enough for bf16 GEMMs: through ATen's GEMMs
    (results rounded to bf16) within bf16's precision of the bf16 products reference; on AMX
    tiles (float32 sums) the output within float32's, and every gradient several times closer
    (they keep the bf16 roundings of the gate gradients that the reference makes too, which a
    last-bit difference upstream can move by one bf16 step)."""

    @pytest.mark.parametrize("cell", ["gru", "lstm"])
    @pytest.mark.parametrize("sizes", [None, [96, 70, 33, 5]], ids=["one-step", "packed"])
    def test_closer_than_bf16_gemms(self, cell, sizes):
        """One-step: 96 rows; packed: steps of 96, 70, 33 and 5 rows (every row block and tail
        of the kernel; 204 rows in all, so the input projection is on AMX tiles too)."""
        if ops.bf16_gemm() != "native":
            pytest.skip("bf16 GEMMs run only where the CPU has bf16 instructions")
        on, off = relative_errors(cell, sizes, True), relative_errors(cell, sizes, False)
        assert max(off) < 2e-2 and max(on) < 2e-3
        assert on[0] < 1e-4 < off[0]
        for a, b in zip(on[1:], off[1:]):
            assert a < b / 3


def gru_layer_errors(steps, amx):
    """gru_layer with bf16 matrices, batch 96, input and hidden 128, an `extra` term, with
    ops.set_amx_products(amx): the relative errors of the output, the state and every gradient
    against the bf16 products reference (as relative_errors)."""
    g = generator(31)

    def rand(*shape, scale=0.5):
        return ((torch.rand(shape, generator=g) * 2 - 1) * scale)

    x, h0 = rand(steps, 96, 128, scale=1.0), rand(96, 128, scale=1.0)
    w_ih, w_hh = rand(384, 128).bfloat16(), rand(384, 128).bfloat16()
    b_ih, b_hh, extra = rand(384), rand(384), rand(96, 384, scale=0.3)
    leaves = [t.requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih, b_hh, extra)]
    ref = [t.detach().float().requires_grad_() for t in leaves]
    before = ops.amx_products()
    ops.set_amx_products(amx)
    try:
        got = ops.gru_layer(*leaves)
        got_g = torch.autograd.grad(got[0].sum() + got[1].sum(), leaves)
    finally:
        ops.set_amx_products(before)
    want = reference.gru_layer(*ref, product_dtype=torch.bfloat16)
    want_g = torch.autograd.grad(want[0].sum() + want[1].sum(), ref)
    return [((a.float() - b).norm() / b.norm()).item()
            for a, b in [(got[0], want[0]), (got[1], want[1])] + list(zip(got_g, want_g))]


@needs_amx
class TestAmxProductsInTheGruLayer:
    """gru_layer (the package's chapter models under CPU autocast): its per-step products, and
    at one step its input projection (96 rows), on AMX tiles with float32 results; the input
    projection of 3 steps (288 rows, more than AMX takes) stays an ATen GEMM."""

    @pytest.mark.parametrize("steps", [1, 3])
    def test_closer_than_bf16_gemms(self, steps):
        if ops.bf16_gemm() != "native":
            pytest.skip("bf16 GEMMs run only where the CPU has bf16 instructions")
        on, off = gru_layer_errors(steps, True), gru_layer_errors(steps, False)
        assert max(off) < 2e-2 and max(on) < 1e-2
        if steps == 1:  # every product float32 sums
            assert max(on[:2]) < 1e-4 < min(off[:2])
        for a, b in zip(on, off):
            assert a < b


class TestSetAmxProducts:
    def test_on_where_the_cpu_runs_amx(self):
        assert ops.amx_products() == _C.amx_usable()

    def test_checked(self, amx_products):
        assert ops.amx_products() is amx_products
        with pytest.raises(TypeError, match="enabled: expected a bool"):
            ops.set_amx_products(1)
        assert ops.amx_products() is amx_products

    @pytest.mark.skipif(_C.amx_usable(), reason="needs a CPU or OS without AMX-BF16")
    def test_refused_without_amx(self):
        with pytest.raises(RuntimeError, match="does not run AMX-BF16"):
            ops.set_amx_products(True)
        assert not ops.amx_products()
