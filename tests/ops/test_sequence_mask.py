"""The sequence mask: the in-place op (``ops.sequence_mask_`` and the chapter's
``seq2seq_ext.sequence_mask``, which writes into X and returns it) and the out-of-place op
(``ops.sequence_mask``), against ``reference.sequence_mask``."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import seq2seq_ext
from seq2seq_ext import ops, reference

from helpers import devices, generator

MASK = torch.ops.seq2seq_ext.sequence_mask
MASK_ = torch.ops.seq2seq_ext.sequence_mask_
DEVICES = devices()
DTYPES = [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float16, torch.bfloat16,
          torch.float32, torch.float64, torch.complex64]


def _random(shape, dtype, device="cpu", seed=0):
    g = generator(seed)
    if dtype == torch.bool:
        x = torch.rand(shape, generator=g) > 0.3
    elif dtype.is_floating_point or dtype.is_complex:
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 4 + 1).to(dtype)
        if dtype.is_complex:
            x = x + 1j * torch.randn(shape, generator=g).to(dtype)
    else:
        x = torch.randint(1, 100, shape, generator=g).to(dtype)
    return x.to(device)


def _expected(X, valid_len, value=0):
    """The reference's result, computed on a copy."""
    return reference.sequence_mask(X.clone(), valid_len, value)


def _value_for(dtype, value):
    if dtype == torch.bool:
        return bool(value)
    if not (dtype.is_floating_point or dtype.is_complex):
        return int(value)
    return value


# ----------------------------------------------------------------------------------------------
# the chapter's example and the two flavours
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_chapter_example(device):
    X = torch.tensor([[1, 2, 3], [4, 5, 6]], device=device)
    valid_len = torch.tensor([1, 2], device=device)
    expected = torch.tensor([[1, 0, 0], [4, 5, 0]], device=device)
    assert torch.equal(ops.sequence_mask(X, valid_len), expected)
    assert torch.equal(X, torch.tensor([[1, 2, 3], [4, 5, 6]], device=device))
    out = seq2seq_ext.sequence_mask(X, valid_len)
    assert out is X
    assert torch.equal(X, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_chapter_example_with_value(device):
    # the chapter's other call: sequence_mask(X, torch.tensor([1, 2]), value=-1)
    X = torch.ones(2, 3, 4, device=device)
    out = seq2seq_ext.sequence_mask(X, torch.tensor([1, 2], device=device), value=-1)
    assert out is X
    expected = torch.ones(2, 3, 4, device=device)
    expected[0, 1:] = -1
    expected[1, 2:] = -1
    assert torch.equal(X, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_op_returns_x_and_out_of_place_leaves_x(device):
    X = _random((4, 6, 3), torch.float32, device, seed=1)
    valid_len = torch.tensor([0, 2, 6, 9], device=device)
    original = X.clone()
    expected = _expected(X, valid_len, 7.5)
    out = ops.sequence_mask(X, valid_len, 7.5)
    assert out is not X and out.data_ptr() != X.data_ptr()
    assert torch.equal(out, expected) and torch.equal(X, original)
    ptr = X.data_ptr()
    out_ = ops.sequence_mask_(X, valid_len, 7.5)
    assert out_ is X and X.data_ptr() == ptr
    assert torch.equal(X, expected)
    Y = original.clone()
    # the registered op returns nothing (so torch.compile can functionalize it); it mutates Y
    assert MASK_(Y, valid_len, 7.5) is None
    assert torch.equal(Y, expected)


# ----------------------------------------------------------------------------------------------
# dtypes, shapes, layouts, values, lengths
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5), (3, 5, 4), (2, 4, 3, 2)])
def test_every_dtype_and_rank(device, dtype, shape):
    X = _random(shape, dtype, device, seed=2)
    valid_len = torch.tensor([1, 5, 0, 3][:shape[0]], device=device)
    for value in (0, -1, 3):
        v = _value_for(dtype, value)
        expected = _expected(X, valid_len, v)
        out = ops.sequence_mask(X, valid_len, v)
        assert out.dtype == dtype and out.shape == X.shape
        assert torch.equal(out, expected), (dtype, value)
        Y = X.clone()
        assert seq2seq_ext.sequence_mask(Y, valid_len, v) is Y
        assert torch.equal(Y, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_complex_value(device):
    X = _random((2, 4, 3), torch.complex64, device, seed=3)
    valid_len = torch.tensor([1, 3], device=device)
    out = ops.sequence_mask(X, valid_len, 1 - 2j)
    assert torch.equal(out, _expected(X, valid_len, 1 - 2j))
    assert (out[0, 1:] == 1 - 2j).all()


def _layouts(device, dtype=torch.float32):
    """Non-contiguous X of rank 3 and 4, with the valid_len that fits them."""
    base4 = _random((3, 5, 4, 6), dtype, device, seed=4)
    base3 = _random((5, 3, 7), dtype, device, seed=5)
    return [
        base4.transpose(2, 3),                 # trailing dimensions transposed
        base4[:, :, 1:3, ::2],                 # sliced trailing dimensions
        base4[:, 1:4],                         # narrowed steps
        base3.transpose(0, 1),                 # (T, B, F) storage seen as (B, T, F)
        base3.transpose(0, 1)[:, :, ::3],      # and strided features
        base3.transpose(0, 1).transpose(1, 2)[:, :, 1:],  # F and T swapped, sliced
        base4.permute(2, 0, 1, 3)[1],          # a slice of a permuted tensor
        base4[::2, :, 0],                      # strided batch
        base3.transpose(1, 2).contiguous().transpose(1, 2)[:, ::2],
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.bfloat16])
def test_non_contiguous_x(device, dtype):
    for i, X in enumerate(_layouts(device, dtype)):
        assert not X.is_contiguous(), i
        steps = X.shape[1]
        valid_len = torch.arange(X.shape[0], device=device) * 2 % (steps + 2) - 1
        expected = _expected(X, valid_len, 9)
        out = ops.sequence_mask(X, valid_len, 9)
        assert torch.equal(out, expected), i
        base = X._base if X._base is not None else X
        before = base.clone()
        assert ops.sequence_mask_(X, valid_len, 9) is X
        assert torch.equal(X, expected), i
        # only X's own elements were written: the rest of the storage is untouched
        untouched = torch.ones_like(base, dtype=torch.bool)
        untouched_view = untouched.as_strided(X.shape, X.stride(),
                                              X.storage_offset() - base.storage_offset())
        untouched_view.fill_(False)
        assert torch.equal(base[untouched], before[untouched]), i


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_place_preserves_layout(device):
    X = _random((5, 3, 7), torch.float32, device, seed=6).transpose(0, 1)
    out = ops.sequence_mask(X, torch.tensor([1, 2, 3], device=device))
    assert out.stride() == X.stride()


@pytest.mark.parametrize("device", DEVICES)
def test_float_negative_huge_and_nan_valid_len(device):
    X = _random((7, 5, 2), torch.float64, device, seed=7)
    cases = [
        torch.tensor([2.5, 0.0, -1.5, 4.999, 5.0, 0.001, 1e30], dtype=torch.float64),
        torch.tensor([2.5, 0.0, -1.5, 4.5, 5.0, 0.25, 1e30], dtype=torch.float32),
        torch.tensor([2.5, 0.0, -1.5, 4.5, 5.0, 0.25, 6e4], dtype=torch.float16),
        torch.tensor([2, 0, -1, 4, 5, -(2**40), 2**40], dtype=torch.int64),
        torch.tensor([2, 0, -1, 4, 5, 1, 2**31 - 1], dtype=torch.int32),
        torch.tensor([True, False, True, False, True, True, False]),
        torch.tensor([float("nan"), float("inf"), -float("inf"), 3, 1, 2, 0]),
    ]
    for valid_len in cases:
        valid_len = valid_len.to(device)
        expected = _expected(X, valid_len, -3)
        assert torch.equal(ops.sequence_mask(X, valid_len, -3), expected), valid_len.dtype
    # 2.5 keeps 3 steps, 0.001 keeps one, negative lengths keep none
    out = ops.sequence_mask(X, cases[0].to(device), 0)
    assert (out[0, :3] != 0).all() and (out[0, 3:] == 0).all()
    assert (out[5, :1] != 0).all() and (out[5, 1:] == 0).all()
    assert (out[2] == 0).all() and (out[1] == 0).all()
    assert torch.equal(out[6], X[6])


@pytest.mark.parametrize("device", DEVICES)
def test_special_values(device):
    X = _random((3, 4), torch.float32, device, seed=8)
    valid_len = torch.tensor([1, 0, 3], device=device)
    for value in (float("inf"), -float("inf"), -1e6, 1e30):
        assert torch.equal(ops.sequence_mask(X, valid_len, value), _expected(X, valid_len, value))
    out = ops.sequence_mask(X, valid_len, float("nan"))
    assert torch.equal(torch.isnan(out), torch.isnan(_expected(X, valid_len, float("nan"))))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,value", [(torch.float16, -1e6), (torch.float16, 7e4),
                                         (torch.bfloat16, 1e39)])
def test_reduced_precision_value_saturates_like_reference(device, dtype, value):
    # The reference's masked assignment rounds a value beyond the dtype's range to +-inf (the
    # attention chapter masks with value=-1e6, which is -inf in float16); the op must give the
    # same result.
    X = _random((2, 3, 4), dtype, device, seed=9)
    valid_len = torch.tensor([1, 2], device=device)
    expected = _expected(X, valid_len, value)
    assert torch.isinf(expected[0, 1:]).all()
    assert torch.equal(ops.sequence_mask(X, valid_len, value), expected)
    Y = X.clone()
    assert torch.equal(seq2seq_ext.sequence_mask(Y, valid_len, value), expected)
    # a step's elements not one contiguous run: the kernels' ATen fill path saturates too
    X = _random((2, 3, 2, 2), dtype, device, seed=9).transpose(2, 3)
    expected = _expected(X, valid_len, value)
    assert torch.equal(ops.sequence_mask(X, valid_len, value), expected)
    Y = X.clone().transpose(2, 3).contiguous().transpose(2, 3)
    seq2seq_ext.sequence_mask(Y, valid_len, value)
    assert torch.equal(Y, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_tensors(device):
    for shape in [(0, 3), (2, 0), (2, 3, 0), (0, 0, 5)]:
        X = torch.ones(shape, device=device)
        valid_len = torch.ones(shape[0], device=device)
        assert torch.equal(ops.sequence_mask(X, valid_len), _expected(X, valid_len))
        assert ops.sequence_mask_(X, valid_len) is X


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 5), steps=st.integers(1, 8),
       trailing=st.lists(st.integers(1, 4), min_size=0, max_size=2),
       dtype=st.sampled_from(DTYPES), len_kind=st.sampled_from(["int", "float", "int32"]),
       value=st.sampled_from([0, 1, -1, 5]), transpose=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_parity_random(batch, steps, trailing, dtype, len_kind, value, transpose, seed):
    X = _random((batch, steps, *trailing), dtype, seed=seed)
    if transpose and X.dim() >= 3:
        X = X.transpose(-1, 1).contiguous().transpose(-1, 1)
    g = generator(seed + 1)
    if len_kind == "float":
        valid_len = torch.rand(batch, generator=g) * (steps + 4) - 2
    else:
        valid_len = torch.randint(-2, steps + 3, (batch,), generator=g)
        if len_kind == "int32":
            valid_len = valid_len.int()
    v = _value_for(dtype, value)
    expected = _expected(X, valid_len, v)
    assert torch.equal(ops.sequence_mask(X, valid_len, v), expected)
    Y = X.clone()
    assert ops.sequence_mask_(Y, valid_len, v) is Y
    assert torch.equal(Y, expected)


# ----------------------------------------------------------------------------------------------
# autograd, opcheck, gradcheck
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_out_of_place_gradient_is_masked(device):
    X = torch.randn(3, 4, 2, device=device, requires_grad=True)
    valid_len = torch.tensor([4, 1, 0], device=device)
    out = ops.sequence_mask(X, valid_len, 5.0)
    up = torch.randn_like(out)
    out.backward(up)
    assert torch.equal(X.grad, reference.sequence_mask(up.clone(), valid_len, 0))


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_wrapper_with_autograd(device):
    # with gradients the chapter's in-place function still writes into X and returns it,
    # recorded by autograd
    leaf = torch.randn(3, 4, device=device, requires_grad=True)
    X = leaf * 2
    valid_len = torch.tensor([2, 0, 4], device=device)
    out = seq2seq_ext.sequence_mask(X, valid_len, -1.0)
    assert out is X
    assert torch.equal(X.detach(), _expected(leaf.detach() * 2, valid_len, -1.0))
    X.sum().backward()
    expected_grad = torch.full((3, 4), 2.0, device=device)
    expected_grad[0, 2:] = 0
    expected_grad[1] = 0
    assert torch.equal(leaf.grad, expected_grad)


def _mask_samples(device, requires_grad):
    out = []
    for i, (shape, dtype) in enumerate([((3, 5), torch.float32), ((2, 4, 3), torch.float64),
                                        ((2, 3, 2, 2), torch.float32)]):
        X = _random(shape, dtype, device, seed=20 + i)
        valid_len = torch.tensor([0, 2.5, 9][:shape[0]], device=device)
        out.append((X.requires_grad_(requires_grad), valid_len, [0, -1.5, 3][i]))
    X = _random((5, 3, 7), torch.float32, device, seed=30).transpose(0, 1)
    out.append((X.requires_grad_(requires_grad), torch.tensor([1, 2, 3], device=device), 2))
    for dtype in (torch.int64, torch.bfloat16):
        X = _random((3, 4), dtype, device, seed=31)
        out.append((X, torch.tensor([1, 3, 0], device=device), _value_for(dtype, 1)))
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_out_of_place(device):
    for X, valid_len, value in _mask_samples(device, requires_grad=True):
        torch.library.opcheck(MASK, (X, valid_len, value))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_inplace_schema_fake_and_autograd(device):
    for X, valid_len, value in _mask_samples(device, requires_grad=False):
        torch.library.opcheck(MASK_, (X.clone(), valid_len, value),
                              test_utils=("test_schema", "test_autograd_registration",
                                          "test_faketensor"))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_inplace(device):
    # every check, test_aot_dispatch_dynamic (torch.compile's functionalization) included
    for X, valid_len, value in _mask_samples(device, requires_grad=False)[:3]:
        torch.library.opcheck(MASK_, (X.clone(), valid_len, value))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_out_of_place(device):
    X = torch.randn(3, 4, 2, dtype=torch.float64, device=device, requires_grad=True)
    valid_len = torch.tensor([4, 1.5, -1], dtype=torch.float64, device=device)
    assert torch.autograd.gradcheck(lambda x: ops.sequence_mask(x, valid_len, 0.5), (X,))
    Xt = torch.randn(4, 3, dtype=torch.float64, device=device).t().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ops.sequence_mask(x, valid_len[:3], -2), (Xt,))


@pytest.mark.parametrize("shape, lengths", [
    ((1, 1), [0]),           # batch 1, one step, nothing kept
    ((1, 1, 3), [1]),        # batch 1, one step, all kept
    ((3, 4), [9, 0, 4]),     # lengths past the sequence and 0
    ((2, 5, 2), [2.5, 7]),   # fractional and past the end
])
def test_gradcheck_and_gradgradcheck_at_the_edges(shape, lengths):
    X = torch.randn(shape, dtype=torch.float64, generator=generator(33)).requires_grad_()
    valid_len = torch.tensor(lengths, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: ops.sequence_mask(x, valid_len, 0.5), (X,))
    assert torch.autograd.gradgradcheck(lambda x: ops.sequence_mask(x, valid_len, 0.5), (X,))
    torch.library.opcheck(MASK, (X, valid_len, 0.5))


def test_opcheck_of_an_empty_batch():
    X = torch.randn(0, 4, requires_grad=True)
    torch.library.opcheck(MASK, (X, torch.zeros(0, dtype=torch.long), 1.0))
    torch.library.opcheck(MASK_, (X.detach().clone(), torch.zeros(0, dtype=torch.long), 1.0))


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [1e40, -3.5e38, 1e300])
def test_float32_value_out_of_range_is_refused_like_reference(value):
    X = _random((2, 3), torch.float32, seed=41)
    valid_len = torch.tensor([1, 2])
    with pytest.raises(RuntimeError, match="overflow"):
        reference.sequence_mask(X.clone(), valid_len, value)
    for fn in (ops.sequence_mask, ops.sequence_mask_):
        before = X.clone()
        with pytest.raises(RuntimeError, match="value"):
            fn(X, valid_len, value)
        assert torch.equal(X, before)


def test_one_element_tensor_value_like_reference():
    X = _random((2, 3, 2), torch.float32, seed=42)
    valid_len = torch.tensor([1, 2])
    for value in (torch.tensor(5.0), torch.tensor([-2.0])):
        want = reference.sequence_mask(X.clone(), valid_len, value)
        torch.testing.assert_close(ops.sequence_mask(X, valid_len, value), want)
        torch.testing.assert_close(ops.sequence_mask_(X.clone(), valid_len, value), want)


def _bad_cases(device):
    X = _random((3, 4, 2), torch.float32, device, seed=40)
    valid_len = torch.tensor([1, 2, 3], device=device)
    return [
        ("X", X[:, 0, 0], valid_len),
        ("X", X[0, 0, 0], valid_len[:1]),
        ("valid_len", X, valid_len[:2]),
        ("valid_len", X, torch.tensor([1, 2, 3, 4], device=device)),
        ("valid_len", X, valid_len[:, None]),
        ("valid_len", X, valid_len[None, :]),
        ("valid_len", X, torch.tensor(2, device=device)),
        ("valid_len", X, valid_len.to(torch.complex64)),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn", [ops.sequence_mask, ops.sequence_mask_, MASK, MASK_],
                         ids=["ops.sequence_mask", "ops.sequence_mask_", "op", "op_"])
def test_bad_input_names_argument_and_changes_nothing(device, fn):
    for name, X, valid_len in _bad_cases(device):
        before_x, before_len = X.clone(), valid_len.clone()
        with pytest.raises(RuntimeError, match=rf"^{name}:"):
            fn(X, valid_len, 1.0)
        assert torch.equal(X, before_x) and torch.equal(valid_len, before_len), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn", [ops.sequence_mask_, MASK_], ids=["ops.sequence_mask_", "op_"])
def test_inplace_on_expanded_tensor_is_refused(device, fn):
    base = torch.arange(1.0, 4.0, device=device)[:, None, None]
    X = base.expand(3, 4, 2)  # every step of a sequence shares one memory location
    valid_len = torch.tensor([1, 2, 3], device=device)
    with pytest.raises(RuntimeError):
        fn(X, valid_len, 0.0)
    assert torch.equal(base.flatten(), torch.arange(1.0, 4.0, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn", [ops.sequence_mask_, MASK_], ids=["ops.sequence_mask_", "op_"])
def test_inplace_on_expanded_tensor_names_x(device, fn):
    # DESIGN: every error message names the argument
    X = torch.arange(1.0, 4.0, device=device)[:, None, None].expand(3, 4, 2)
    with pytest.raises(RuntimeError, match=r"^X:"):
        fn(X, torch.tensor([1, 2, 3], device=device), 0.0)


def test_out_of_place_accepts_expanded_tensor():
    X = torch.arange(1.0, 4.0)[:, None, None].expand(3, 4, 2)
    valid_len = torch.tensor([1, 2, 3])
    assert torch.equal(ops.sequence_mask(X, valid_len), _expected(X.contiguous(), valid_len))


# ----------------------------------------------------------------------------------------------
# the backend switch
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_reference_backend_gives_the_same_results(device):
    cases = [(_random((3, 5, 2), torch.float32, device, seed=50), torch.tensor([0, 2.5, 7])),
             (_random((3, 4), torch.int64, device, seed=51), torch.tensor([1, -1, 4])),
             (_layouts(device)[0], torch.tensor([1, 3, 5]))]
    for X, valid_len in cases:
        valid_len = valid_len.to(device)
        ext = ops.sequence_mask(X, valid_len, 3)
        ext_ = seq2seq_ext.sequence_mask(X.clone(), valid_len, 3)
        with seq2seq_ext.use_backend("reference"):
            assert seq2seq_ext.get_backend() == "reference"
            ref = ops.sequence_mask(X, valid_len, 3)
            Y = X.clone()
            ref_ = seq2seq_ext.sequence_mask(Y, valid_len, 3)
            assert ref_ is Y
            Z = X.clone()
            assert ops.sequence_mask_(Z, valid_len, 3) is Z
        assert seq2seq_ext.get_backend() == "ext"
        assert torch.equal(ext, ref) and torch.equal(ext_, ref_) and torch.equal(Z, ref)


def test_reference_backend_does_not_call_the_library(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the compiled op was called under the reference backend")

    monkeypatch.setattr(ops, "_ops", type("NoOps", (), {"sequence_mask": fail,
                                                       "sequence_mask_": fail}))
    X = torch.ones(2, 3)
    with seq2seq_ext.use_backend("reference"):
        out = ops.sequence_mask(X, torch.tensor([1, 2]))
        assert seq2seq_ext.sequence_mask(X, torch.tensor([1, 2])) is X
    assert torch.equal(out, X)
    assert torch.equal(X, torch.tensor([[1.0, 0, 0], [1, 1, 0]]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_unsigned_valid_len_like_reference(device, dtype):
    X = _random((4, 6, 3), torch.float32, device, seed=40)
    valid_len = torch.tensor([0, 2, 6, 9], dtype=dtype, device=device)
    expected = _expected(X, valid_len, -2.0)
    assert torch.equal(ops.sequence_mask(X, valid_len, -2.0), expected)
    assert torch.equal(seq2seq_ext.sequence_mask(X.clone(), valid_len, -2.0), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn", [MASK_, ops.sequence_mask_], ids=["op", "wrapper"])
@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_inplace_write_reaches_autograd(device, fn, mode):
    # X was saved by a graph: after the mask writes into it (in any grad mode, as for any
    # in-place op on a normal tensor), backward must refuse instead of giving a gradient
    # computed from the masked values
    w = torch.ones(2, 3, device=device, requires_grad=True)
    X = torch.arange(1.0, 7.0, device=device).view(2, 3)
    loss = (w * X).sum()
    version = X._version
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad,
               "inference_mode": torch.inference_mode}[mode]
    with context():
        fn(X, torch.tensor([1, 2], device=device))
    assert X._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_op_refuses_x_that_requires_grad_and_changes_nothing(device):
    X = torch.randn(2, 3, device=device, requires_grad=True)
    before = X.detach().clone()
    with pytest.raises(RuntimeError, match="X: the in-place sequence_mask_ has no derivative"):
        MASK_(X, torch.tensor([1, 2], device=device))
    assert torch.equal(X.detach(), before)
    with torch.no_grad():  # as any in-place op on a leaf, allowed without grad mode
        MASK_(X, torch.tensor([1, 2], device=device))
    assert torch.equal(X.detach(), _expected(before, torch.tensor([1, 2], device=device)))


@pytest.mark.parametrize("fn", [MASK_, ops.sequence_mask_], ids=["op", "wrapper"])
def test_inplace_on_inference_tensor_outside_inference_mode_is_refused(fn):
    with torch.inference_mode():
        X = torch.ones(2, 3)
    with pytest.raises(RuntimeError, match="X: cannot write in place into an inference tensor"):
        fn(X, torch.tensor([1, 2]))
    assert torch.equal(X, torch.ones(2, 3))
    with torch.inference_mode():
        fn(X, torch.tensor([1, 2]))
    assert torch.equal(X, _expected(torch.ones(2, 3), torch.tensor([1, 2])))


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_with_lengths_read_from_x_itself(device):
    # valid_len a view of X's own first elements: every length is read before any is
    # overwritten. Rows of length 0 get the value 7 written over their length; a thread that
    # read it afterwards would keep 7 steps (on CUDA the rows span many blocks).
    X = torch.ones(4, 2048, 33, device=device)
    X[:, 0, 0] = torch.tensor([3.0, 0.0, 0.0, 1500.0], device=device)
    expected = _expected(X, X[:, 0, 0].clone(), 7.0)
    MASK_(X, X[:, 0, 0], 7.0)
    assert torch.equal(X, expected)


@pytest.mark.parametrize("fn", [ops.sequence_mask, ops.sequence_mask_],
                         ids=["ops.sequence_mask", "ops.sequence_mask_"])
def test_tensor_value_that_requires_grad_gets_its_gradient(fn):
    """A one-element tensor ``value`` that requires grad: differentiable in it, as the
    reference's ``X[~mask] = value`` is (its gradient: the number of masked elements)."""
    X = torch.randn(3, 4, generator=generator(7))
    valid_len = torch.tensor([1, 4, 0])
    value = torch.tensor(0.5, requires_grad=True)
    out = fn(X.clone(), valid_len, value)
    (grad,) = torch.autograd.grad(out.sum(), value)
    ref_value = value.detach().clone().requires_grad_()
    (want,) = torch.autograd.grad(reference.sequence_mask(X.clone(), valid_len, ref_value).sum(),
                                  ref_value)
    assert grad.item() == want.item() == 7.0
    torch.testing.assert_close(out, _expected(X, valid_len, 0.5))


def test_inplace_wrapper_on_x_that_requires_grad_checks_and_differentiates():
    """``seq2seq_ext.sequence_mask`` (in place) on an X in a graph (d2l's ``masked_softmax``):
    the op's own checks, naming the argument, and the reference's result and gradient."""
    leaf = torch.randn(2, 4, generator=generator(8), requires_grad=True)
    for bad_len, name in ((torch.tensor([1, 2, 3]), "valid_len"),
                          (torch.tensor([[1, 2]]), "valid_len")):
        X = leaf * 1
        before = X.detach().clone()
        with pytest.raises(RuntimeError, match=rf"^{name}:"):
            ops.sequence_mask_(X, bad_len)
        assert torch.equal(X.detach(), before)
    with pytest.raises(RuntimeError, match=r"^X: expected at least 2 dimensions"):
        ops.sequence_mask_(leaf[0] * 1, torch.tensor([1]))
    valid_len = torch.tensor([1, 3])
    got = ops.sequence_mask_(leaf * 2, valid_len, -1.0)
    want = reference.sequence_mask(leaf * 2, valid_len, -1.0)
    torch.testing.assert_close(got, want)
    g = torch.randn(2, 4, generator=generator(9))
    assert torch.equal(torch.autograd.grad(got, leaf, g)[0], torch.autograd.grad(want, leaf, g)[0])


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64,
                                   torch.float8_e5m2, torch.complex32])
@pytest.mark.parametrize("fn", [MASK, MASK_], ids=["op", "op_"])
def test_dtypes_without_a_kernel_name_x(dtype, fn):
    X = torch.zeros(2, 3).to(dtype)
    with pytest.raises(RuntimeError, match=r"^X: expected a bool, integer"):
        fn(X, torch.tensor([1, 2]))
