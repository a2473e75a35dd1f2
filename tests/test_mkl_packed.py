"""float32 products over a matrix that MKL lays out once per layer call (csrc/cpu/mkl_packed.h,
``ops.set_mkl_packed_products``): the product itself against float64, the rule for which calls
take it, and the layer ops' results and gradients with it on and off against ``torch.nn.GRU``.
"""
import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import seq2seq_ext
from seq2seq_ext import _C, ops

from helpers import generator

needs_mkl = pytest.mark.skipif(not _C.mkl_packed_usable(),
                               reason="needs PyTorch built with MKL (cblas_sgemm_pack)")


def randn(*shape, seed):
    return torch.randn(shape, generator=generator(seed))


@pytest.fixture
def packed_products():
    """Restores the process-wide switch after a test that sets it."""
    was = ops.mkl_packed_products()
    yield
    ops.set_mkl_packed_products(was)


def assert_float32_sums(got, x, w_kn):
    """Within the worst case of K float32 additions of the products' magnitudes."""
    want = x.double() @ w_kn.double()
    mag = x.double().abs() @ w_kn.double().abs()
    K = x.shape[1]
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert ((got.double() - want).abs() <= (K + 2) * 2.0 ** -24 * mag + 1e-30).all()


@needs_mkl
class TestMklPackedMm:
    @pytest.mark.parametrize("K,N", [(1, 5), (33, 97), (128, 384), (512, 1536), (1536, 512)])
    def test_matches_float64(self, K, N):
        w = randn(N, K, seed=K * N)  # a weight, used transposed (the forward's W_hh^T)
        # fewer rows than the matrix was laid out for, as a packed sequence's later steps have
        for pack_rows, rows in [(1, 1), (4, 4), (16, 5), (128, 128), (128, 1), (200, 77)]:
            x = randn(rows, K, seed=rows + K)
            assert_float32_sums(_C.mkl_packed_mm(x, w, True, pack_rows), x, w.t())

    def test_a_weight_with_a_row_stride(self):
        w = randn(48, 80, seed=6)[:, :64]
        x = randn(7, 64, seed=7)
        assert_float32_sums(_C.mkl_packed_mm(x, w, True, 7), x, w.t())

    def test_rows_with_a_stride(self):
        x = randn(9, 70, seed=1)[:, 3:67]  # row stride 70, 64 columns
        w = randn(48, 64, seed=2)
        assert_float32_sums(_C.mkl_packed_mm(x, w, True, 9), x, w.t())

    def test_bad_input_names_the_argument(self):
        x, w = randn(5, 8, seed=3), randn(6, 8, seed=4)
        with pytest.raises(RuntimeError, match="rows: expected at least x's 5 rows"):
            _C.mkl_packed_mm(x, w, True, 4)
        with pytest.raises(RuntimeError, match="w: expected a row-major float32"):
            _C.mkl_packed_mm(x, w.double(), True, 5)
        with pytest.raises(RuntimeError, match="K = 8"):
            _C.mkl_packed_mm(x, randn(6, 7, seed=8), True, 5)
        with pytest.raises(RuntimeError, match="transposed: 0"):  # a (K, N) matrix: not packed
            _C.mkl_packed_mm(x, randn(8, 6, seed=9), False, 5)
        with pytest.raises(RuntimeError, match="x: expected a 2-D float32"):
            _C.mkl_packed_mm(x.double(), w, True, 5)


# 8 rows a step and hidden 128: the per-step products go to BLAS in both layer ops
# (linear_nt_blas, RowProduct's kBlas), and six steps make the layout pay (mkl_packed_pays)
STEPS, BATCH, INPUT, HIDDEN = 6, 8, 40, 128


def gru_layer_run(seed, steps=STEPS, batch=BATCH):
    x = randn(steps, batch, INPUT, seed=seed).requires_grad_()
    h0 = (0.5 * randn(batch, HIDDEN, seed=seed + 1)).requires_grad_()
    params = [(0.1 * randn(*s, seed=seed + 2 + i)).requires_grad_() for i, s in enumerate(
        [(3 * HIDDEN, INPUT), (3 * HIDDEN, HIDDEN), (3 * HIDDEN,), (3 * HIDDEN,)])]
    out, h_n = ops.gru_layer(x, h0, *params, None)
    g_out = randn(*out.shape, seed=seed + 9)
    grads = torch.autograd.grad((out * g_out).sum() + h_n.square().sum(), [x, h0, *params])
    return [out.detach(), h_n.detach(), *grads], (x, h0, params, g_out)


def nn_gru_grads(x, h0, params, g_out):
    rnn = torch.nn.GRU(INPUT, HIDDEN)
    with torch.no_grad():
        for p, v in zip(rnn._flat_weights, params):
            p.copy_(v)
    xl, hl = x.detach().requires_grad_(), h0.detach().unsqueeze(0).requires_grad_()
    out, h_n = rnn(xl, hl)
    grads = torch.autograd.grad((out * g_out).sum() + h_n.square().sum(),
                                [xl, hl, *rnn._flat_weights])
    return [out.detach(), h_n[0].detach(), grads[0], grads[1][0], *grads[2:]]


def assert_all_close(got, want, tol):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


@needs_mkl
class TestGruLayerTakesIt:
    def test_same_results_and_gradients_on_and_off(self, packed_products):
        ops.set_mkl_packed_products(True)
        made = _C.mkl_packs_made()
        on, inputs = gru_layer_run(seed=11)
        assert _C.mkl_packs_made() == made + 1  # W_hh^T for the forward's steps
        ops.set_mkl_packed_products(False)
        off, _ = gru_layer_run(seed=11)
        assert _C.mkl_packs_made() == made + 1
        assert_all_close(on, off, dict(rtol=1e-5, atol=1e-5))
        assert_all_close(on, nn_gru_grads(*inputs), dict(rtol=1e-4, atol=1e-4))

    def test_bf16_matrices_rounded(self, packed_products, rounded_bf16_gemm):
        """Under CPU autocast with "rounded" bf16 products (CPUs without bf16 instructions) the
        steps run the float32 kernel on a float32 copy of the bf16 W_hh: that copy is the one
        laid out, and the results are those of the unpacked path."""
        results = {}
        for on in (True, False):
            ops.set_mkl_packed_products(on)
            made = _C.mkl_packs_made()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                results[on], _ = gru_layer_run(seed=13)
            assert _C.mkl_packs_made() == made + on
        assert all(r.dtype == torch.float32 for r in results[True])
        assert_all_close(results[True], results[False], dict(rtol=1e-5, atol=1e-5))

    @pytest.mark.parametrize("steps,batch", [(3, BATCH), (STEPS, 1)])
    def test_not_where_it_does_not_pay(self, packed_products, steps, batch):
        ops.set_mkl_packed_products(True)
        made = _C.mkl_packs_made()
        got, inputs = gru_layer_run(seed=12, steps=steps, batch=batch)
        assert _C.mkl_packs_made() == made
        assert_all_close(got, nn_gru_grads(*inputs), dict(rtol=1e-4, atol=1e-4))


def layer_run(layer, x, lengths=None):
    """Output, final state and every gradient of `layer` over x (packed when `lengths`)."""
    xl = x.detach().requires_grad_()
    inp = pack_padded_sequence(xl, lengths, enforce_sorted=False) if lengths is not None else xl
    out, h_n = layer(inp)
    if lengths is not None:
        out = pad_packed_sequence(out)[0]
    loss = (out * randn(*out.shape, seed=5)).sum() + h_n.square().sum()
    grads = torch.autograd.grad(loss, [xl, *layer.parameters()])
    return [out.detach(), h_n.detach(), *grads]


def dropin_run(plain, x, lengths=None):
    """layer_run of an accelerated copy of `plain` (a fresh copy each call)."""
    return layer_run(seq2seq_ext.accelerate(copy.deepcopy(plain)), x, lengths)


@needs_mkl
class TestRnnStackTakesIt:
    @pytest.mark.parametrize("lengths", [None, [6, 6, 5, 5, 4, 3, 3, 2]])
    def test_drop_in_gru_on_and_off(self, packed_products, lengths):
        torch.manual_seed(7)
        plain = torch.nn.GRU(INPUT, HIDDEN, 2)
        x = randn(STEPS, BATCH, INPUT, seed=13)
        lens = None if lengths is None else torch.tensor(lengths)
        ops.set_mkl_packed_products(True)
        made = _C.mkl_packs_made()
        on = dropin_run(plain, x, lens)
        assert _C.mkl_packs_made() == made + 2  # each layer's W_hh^T for the forward's steps
        ops.set_mkl_packed_products(False)
        off = dropin_run(plain, x, lens)
        assert _C.mkl_packs_made() == made + 2
        assert_all_close(on, off, dict(rtol=1e-5, atol=1e-5))
        assert_all_close(on, layer_run(plain, x, lens), dict(rtol=1e-4, atol=1e-4))


def test_switch(packed_products):
    assert ops.mkl_packed_products() == ops.mkl_packed_default()  # set at import
    with pytest.raises(TypeError, match="enabled: expected a bool"):
        ops.set_mkl_packed_products(1)
    if _C.mkl_packed_usable():
        ops.set_mkl_packed_products(False)
        assert not ops.mkl_packed_products()
        ops.set_mkl_packed_products(True)
        assert ops.mkl_packed_products()
    else:
        with pytest.raises(RuntimeError, match="not built with MKL"):
            ops.set_mkl_packed_products(True)
        assert not ops.mkl_packed_products()


@pytest.mark.parametrize("vendor", ["GenuineIntel", "AuthenticAMD", ""])
def test_default_on_intel_cpus_only(monkeypatch, vendor):
    monkeypatch.setattr(ops, "cpu_vendor", lambda: vendor)
    assert ops.mkl_packed_default() is (vendor == "GenuineIntel" and _C.mkl_packed_usable())


def test_cpu_vendor_reads_cpuinfo():
    vendor = ops.cpu_vendor()
    assert isinstance(vendor, str)
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        pytest.skip("no /proc/cpuinfo on this system")
    if vendor:
        assert "vendor_id\t: " + vendor + "\n" in text
    else:
        assert "vendor_id" not in text
