"""Typed wrappers over ``torch.ops.seq2seq_ext.*``: the only place the package calls the library.

One section per op, named after it, holds all of the op's Python side together: its fake (meta)
implementation for ``torch.compile`` / FakeTensor tracing, its autograd formula where it is
differentiable, its autocast rule where it has one, and its public wrapper; the section's header
names the op's schema, kernels and test file. Every public function honours the backend switch:
under ``"reference"`` it computes the same thing with the pure-PyTorch reference.

Backend selection, in order of precedence: the :func:`use_backend` context manager,
:func:`set_backend`, the environment variable ``SEQ2SEQ_EXT_BACKEND`` (``ext`` or ``reference``),
and the default ``"ext"``.
"""
import contextlib
import functools
import operator
import os
import threading

import torch
import torch.utils.flop_counter

from . import cuda_graphs, reference

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.seq2seq_ext.*)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "seq2seq_ext: the compiled library seq2seq_ext._C could not be loaded "
        f"({exc}). It is built from csrc/ when the package is installed; rebuild it with "
        "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`) "
        "using the same torch you import now "
        f"(torch {torch.__version__}).") from exc

__all__ = [
    "BACKENDS", "get_backend", "set_backend", "use_backend", "built_with_cuda",
    "masked_softmax_ce", "sequence_mask", "sequence_mask_", "gru_decode_step", "greedy_decode",
    "gru_layer", "gru", "gru_over_projection", "has_kernel", "decoder_stepper",
    "direct_cpu_call_ok", "ext_shortcut_ok",
    "lstm_decode_step", "enable_autocast_rules",
]

BACKENDS = ("ext", "reference")
_ENV = "SEQ2SEQ_EXT_BACKEND"


class _BackendState(threading.local):
    def __init__(self):
        # the use_backend blocks of the thread, made before its first use (as cuda_graphs'
        # mode stack: code that torch.compile traces only reads and appends)
        self.stack = []


_state = _BackendState()
_default = None  # set_backend's choice; None: the environment variable, read at import


def _check_backend(name, what="backend"):
    if name not in BACKENDS:
        raise ValueError(f"{what}: expected one of {BACKENDS}, got {name!r}")
    return name


_are_functorch_transforms_active = torch._C._are_functorch_transforms_active
_forward_ad = torch.autograd.forward_ad


def _transform_active():
    """A ``torch.func`` transform (grad, vmap, jacrev, ...) is running, or a forward-mode AD
    level is open (``torch.autograd.forward_ad.dual_level``: tensors may carry tangents): the
    compiled ops have no rules for them (no batching rule, no forward-mode formula: a tangent
    would be dropped), so the package computes as the reference does. (Private queries, the
    only ones there are: about 70 ns, as ``is_compiling``. The forward-AD level is the
    process's: while one thread holds a ``dual_level`` open, every thread computes so.)"""
    return _are_functorch_transforms_active() or _forward_ad._current_level >= 0


def get_backend():
    """The backend in force: ``"ext"`` (compiled ops) or ``"reference"`` (pure PyTorch), which
    is also what a ``torch.func`` transform or forward-mode AD in progress gets."""
    if _transform_active():
        return "reference"
    stack = _state.stack
    if stack:
        return stack[-1]
    return _default if _default is not None else _ENV_BACKEND


_ENV_BACKEND = _check_backend(os.environ.get(_ENV, "ext") or "ext",
                              f"backend (the environment variable {_ENV})")


def set_backend(name):
    """Select the backend for the whole process (``"ext"`` or ``"reference"``)."""
    global _default
    _default = _check_backend(name)


@contextlib.contextmanager
def use_backend(name):
    """Context manager selecting a backend for the current thread inside a ``with`` block."""
    _check_backend(name)
    stack = _state.stack
    stack.append(name)
    try:
        yield name
    finally:
        stack.pop()


def built_with_cuda():
    """True when the CUDA kernels were compiled into the library."""
    return _C.built_with_cuda()


_ops = torch.ops.seq2seq_ext


# ----------------------------------------------------------------------------------------------
# shared by the ops: device rule of the fakes, which kernels exist, when a CPU kernel
# may be called directly, how bf16 products run
# ----------------------------------------------------------------------------------------------


# The bf16 products of the recurrent layer ops under CPU autocast (csrc/bf16_products.h): how
# their CPU kernels run them, chosen once here.

__all__ += ["set_bf16_gemm", "bf16_gemm", "cpu_has_bf16_gemm", "set_amx_products",
            "amx_products", "set_argmax_screen",
            "argmax_screen", "argmax_screen_usable"]

_BF16_GEMMS = ("native", "rounded")


_cpu_bf16 = None


def cpu_has_bf16_gemm():
    """Whether oneDNN runs bf16 products on bf16 instructions of this CPU (AVX512-BF16 or AMX):
    PyTorch's own checks (private: the public API has none), made once. oneDNN also takes bf16
    on AVX-512 CPUs without those instructions, converting as it goes; there, as on CPUs without
    AVX-512, this is False."""
    global _cpu_bf16
    if _cpu_bf16 is None:
        try:
            _cpu_bf16 = bool(torch.backends.mkldnn.is_available()
                             and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                             and (torch.cpu._is_avx512_bf16_supported()
                                  or torch.cpu._is_amx_tile_supported()))
        except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
            _cpu_bf16 = False
    return _cpu_bf16


def set_bf16_gemm(mode):
    """How the CPU kernels of the recurrent layer ops (``gru_layer``, ``rnn_stack``) run their
    products when the weight matrices are bfloat16 (under CPU autocast to bfloat16). Both give a
    bf16 GEMM's products (bf16 operands, float32 sums):

    * ``"native"``: products of at least 2^22 multiply-adds as bf16 GEMMs (oneDNN; fast on
      CPUs with bf16 instructions), whose results are rounded to bf16 before they meet the
      float32 gates (those of few rows on AMX tiles, with float32 results, where
      :func:`set_amx_products` is on), and a matrix's gradient one bf16 GEMM over all rows;
      smaller products as under ``"rounded"`` (an ATen bf16 GEMM's fixed cost exceeds their
      arithmetic);
    * ``"rounded"``: every product on float32 copies of the bf16 values, at float32's rate (a
      product of two bf16 values is exact in float32): the fast way on CPUs without bf16
      instructions, where a bf16 GEMM is emulated and several times slower than float32.

    The default, chosen once at import, is ``"native"`` where the CPU has bf16 instructions
    (:func:`cpu_has_bf16_gemm`) and ``"rounded"`` elsewhere."""
    if mode not in _BF16_GEMMS:
        raise ValueError(f"mode: expected one of {_BF16_GEMMS}, got {mode!r}")
    _C.set_bf16_gemm(mode == "native")


def bf16_gemm():
    """The current :func:`set_bf16_gemm` mode, ``"native"`` or ``"rounded"``."""
    return "native" if _C.bf16_gemm_native() else "rounded"


set_bf16_gemm("native" if cpu_has_bf16_gemm() else "rounded")


def _expect_bool(enabled):
    """`enabled` itself, a switch's argument, when it is a bool."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
    return enabled


def set_amx_products(enabled):
    """Under ``"native"`` bf16 products (:func:`set_bf16_gemm`), whether the products of few rows
    (at most 256: one time step's, or a one-step call's) with a bf16 matrix whose both sizes are
    multiples of 32 run on the CPU's AMX tiles over a copy of the matrix laid out once per matrix
    and version (csrc/cpu/amx_gemm.h). The ATen bf16 GEMM they replace lays the matrix out at
    every call, and rounds its result to bf16; these return float32 sums. The copy is found by
    the matrix's memory and version counter: a matrix changed in place through ``.data`` (which
    does not count as a change) must be given to the op anew. On by default where the CPU and
    the OS run AMX-BF16 (``_C.amx_usable()``); ``True`` elsewhere raises."""
    _C.set_amx_products(_expect_bool(enabled))


def amx_products():
    """Whether :func:`set_amx_products` is on."""
    return _C.amx_products()


set_amx_products(_C.amx_usable())


__all__ += ["set_mkl_packed_products", "mkl_packed_products", "mkl_packed_default",
            "cpu_vendor"]


def set_mkl_packed_products(enabled):
    """Whether the CPU kernels of the recurrent layer ops (``gru_layer``, ``rnn_stack``: the
    drop-in layers and the chapter's models) run a float32 layer's per-step products with W_hh
    (or with the float32 copy of a bf16 W_hh under ``"rounded"`` bf16 products) over a copy of
    it that MKL lays out once per call (MKL's packed GEMM, csrc/cpu/mkl_packed.h),
    where ATen's GEMM lays the matrix out again at every step. They do so for products that go to
    BLAS, of at least 4 rows, over at least 4 steps; the results equal the ATen products' to
    float32 rounding. Usable where PyTorch is built with MKL (``_C.mkl_packed_usable()``, the x86
    wheels; ``True`` elsewhere raises), and on by default there on Intel CPUs
    (:func:`mkl_packed_default`)."""
    _C.set_mkl_packed_products(_expect_bool(enabled))


def mkl_packed_products():
    """Whether :func:`set_mkl_packed_products` is on."""
    return _C.mkl_packed_products()


@functools.lru_cache(maxsize=None)
def cpu_vendor():
    """The CPU's vendor string (Linux: /proc/cpuinfo's ``vendor_id``, e.g. ``"GenuineIntel"``,
    ``"AuthenticAMD"``; elsewhere empty), read once. Some of the kernels' defaults depend on it:
    MKL runs its own fastest code on Intel CPUs only."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def mkl_packed_default():
    """The default of :func:`set_mkl_packed_products`: on where MKL's packed GEMM is present and
    the CPU is Intel's. On an AMD EPYC (Zen 4) the packed products bought nothing at batch 32 and
    more and cost 11% of a layer's forward at batch 8 (benchmarks/RESULTS.md), where on an Intel
    Xeon they ran the same forwards 1.05-1.46x faster."""
    return _C.mkl_packed_usable() and cpu_vendor() == "GenuineIntel"


set_mkl_packed_products(mkl_packed_default())


def set_argmax_screen(enabled):
    """Whether greedy decoding of few rows (the CPU GRU decoder's ``greedy``: up to 3 rows with
    float32 weights, any batch with bfloat16 ones; hence :func:`seq2seq_ext.predict_seq2seq`)
    finds each token's argmax over a large output layer (at least 512 rows and 2^18 entries,
    64 to 1,024 columns) by first reading an int8 copy of
    the layer's matrix, made once per set of weights: bounds on every logit leave the few rows
    that can hold the maximum, whose logits are then computed exactly (csrc/cpu/argmax_screen.h).
    The tokens are those of the full product, with a quarter of float32's bytes read per token
    (half of bfloat16's). On by default; it runs in AVX-512 builds on CPUs with AVX512-VNNI and
    in AVX2 builds (:func:`argmax_screen_usable`), and elsewhere this switch changes nothing."""
    _C.set_argmax_screen(_expect_bool(enabled))


def argmax_screen():
    """Whether :func:`set_argmax_screen` is on."""
    return _C.argmax_screen()


def argmax_screen_usable():
    """Whether this CPU runs the int8 screen of :func:`set_argmax_screen` (AVX512-VNNI in an
    AVX-512 build of the extension; AVX2 and FMA in an AVX2 build)."""
    return _C.argmax_screen_usable()


__all__ += ["autocast_linear"]

_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)


def _rounded_bf16_autocast(*tensors):
    """True when CPU autocast to bfloat16 is active, products are ``"rounded"`` and every tensor
    is one autocast would cast (a floating CPU tensor that is not float64)."""
    return (torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and not _C.bf16_gemm_native()
            and all(t.device.type == "cpu" and t.dtype in _AUTOCAST_CASTS for t in tensors))


def autocast_linear(input, weight, bias=None):
    """``torch.nn.functional.linear(input, weight, bias)`` whose bf16 products under CPU autocast
    follow :func:`set_bf16_gemm`. Under ``"rounded"`` (CPUs without bf16 instructions, where
    autocast's bf16 GEMM is emulated and tens of times slower than float32) the operands are
    rounded to bfloat16 and multiplied by a float32 GEMM, and the result is rounded to bfloat16:
    autocast's bf16 linear (bf16 operands, float32 sums, a bf16 result; the gradients are
    rounded to bfloat16 as autocast's are), at float32's rate. Anywhere else, under the
    ``"reference"`` backend and while ``torch.compile`` traces, ``linear`` itself. The
    package's models call it for the output projection and the context's projection."""
    tensors = (input, weight) if bias is None else (input, weight, bias)
    if (torch.compiler.is_compiling() or get_backend() == "reference"
            or not _rounded_bf16_autocast(*tensors)):
        return torch.nn.functional.linear(input, weight, bias)
    with torch.autocast("cpu", enabled=False):
        rounded = [t.to(torch.bfloat16).float() for t in tensors]
        return torch.nn.functional.linear(*rounded).to(torch.bfloat16)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _same_device(ref_name, ref, **others):
    """The kernels' device rule in the fake kernels too: every tensor argument (or tensor in a
    list) on ``ref``'s device. A CPU call with one meta argument is dispatched here, so without
    it such a call would return uninitialised tensors instead of an error."""
    for name, value in others.items():
        for t in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(t, torch.Tensor):
                torch._check(t.device == ref.device, lambda: (
                    f"{name}: expected a tensor on {ref.device} (the device of {ref_name}), "
                    f"got {t.device}"))


@torch.compiler.assume_constant_result  # a constant of the build: no graph break under compile
def has_kernel(op_name, device):
    """True when the compiled library has a kernel for ``seq2seq_ext::op_name`` on ``device``."""
    return _has_kernel(op_name, torch.device(device).type)


_kernels = {}  # (op_name, device_type) -> bool; the kernels registered never change
# the dispatch keys of the device types the library registers for (Meta: the fakes)
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}


def _has_kernel(op_name, device_type):
    found = _kernels.get((op_name, device_type))
    if found is None:
        key = _DISPATCH_KEYS.get(device_type)
        found = _kernels[(op_name, device_type)] = key is not None and (
            torch._C._dispatch_has_kernel_for_dispatch_key(f"seq2seq_ext::{op_name}", key))
    return found


def direct_cpu_call_ok(state):
    """True when a CPU kernel may be called directly for ``state``: a plain CPU tensor, no grad
    mode, no CPU autocast (a direct call would skip its casts), no torch.compile tracing, no
    dispatch or function mode."""
    return (type(state) is torch.Tensor and state.is_cpu and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and _no_dispatch_hooks())


def ext_shortcut_ok():
    """The Python half of the decoder's per-token shortcut test: the ext backend is in force in
    this thread (not inside a ``use_backend`` block: the general path honours those) and nothing
    is being traced by torch.compile. The tensor, grad-mode and dispatch-mode half is the bound
    stepper's ``try_step``."""
    return (not torch.compiler.is_compiling() and not _state.stack
            and (_ENV_BACKEND if _default is None else _default) == "ext"
            and not _transform_active())


def _no_dispatch_hooks():
    """No torch.compile tracing, dispatch mode or function mode is active."""
    # is_compiling first: Dynamo then folds the whole test to False without tracing the rest
    return (not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._is_torch_function_mode_enabled()
            and not _transform_active())


# ----------------------------------------------------------------------------------------------
# masked_softmax_ce (+ masked_softmax_ce_backward)
# csrc/masked_softmax_ce.cpp (schema, entry), csrc/cpu/masked_softmax_ce.cpp,
# csrc/cuda/masked_softmax_ce.cu,
# tests/ops/test_masked_softmax_ce.py
# ----------------------------------------------------------------------------------------------


@torch.library.register_fake("seq2seq_ext::masked_softmax_ce")
def _masked_softmax_ce_fake(pred, label, valid_len):
    _same_device("pred", pred, label=label, valid_len=valid_len)
    torch._check(pred.dim() == 3, lambda: "pred: expected a 3-D tensor")
    batch, steps, _ = pred.shape
    return (pred.new_empty((batch,)),
            pred.new_empty((batch, steps, 2), dtype=_acc_dtype(pred.dtype)))


@torch.library.register_fake("seq2seq_ext::masked_softmax_ce_backward")
def _masked_softmax_ce_backward_fake(grad_loss, pred, label, valid_len, lse):
    _same_device("pred", pred, grad_loss=grad_loss, label=label, valid_len=valid_len, lse=lse)
    return torch.empty_like(pred)


def _graph_grads(layers, args, grads):
    """An op's backward under ``create_graph=True`` (a double backward ahead, as a gradient
    penalty's ``torch.autograd.grad(..., create_graph=True)`` asks): the gradients of
    ``layers(*args)``'s outputs, weighted by ``grads`` (None where an output has none), with
    respect to each of ``args`` that requires one, as tensors that carry a graph. The kernels'
    backward is not differentiable, so ``layers`` recomputes the call from its saved inputs in
    differentiable ATen ops (the reference) and ``torch.func.vjp`` differentiates it; autograd
    then differentiates those gradients again. (``torch.autograd.grad`` would not do: it would
    also follow the inputs' own history, an earlier call's state back into the same weights,
    and count that part twice.) The loss, the GRU layer and the stack op use it. Returns one
    gradient per argument, None where there is none."""
    wrt = [i for i, t in enumerate(args) if isinstance(t, torch.Tensor) and t.requires_grad]
    wanted = [k for k, g in enumerate(grads) if g is not None]
    result = [None] * len(args)
    if not wrt or not wanted:
        return result

    def chosen(*primals):
        full = list(args)
        for i, t in zip(wrt, primals):
            full[i] = t
        outs = layers(*full)
        return tuple(outs[k] for k in wanted)

    with torch.enable_grad():
        _, vjp = torch.func.vjp(chosen, *[args[i] for i in wrt])
        got = vjp(tuple(grads[k] for k in wanted))
    for i, g in zip(wrt, got):
        result[i] = g
    return result


def _product_dtype(weights):
    """The reference's ``product_dtype`` for a call whose matrices autocast made bfloat16."""
    return torch.bfloat16 if any(w is not None and w.dtype == torch.bfloat16
                                 for w in weights) else None


def _float_values(weights):
    """bfloat16 matrices as float32 tensors of the same values (differentiably), the rest as
    they are: the reference's bf16 products take float32 operands and round them."""
    return [w.float() if w is not None and w.dtype == torch.bfloat16 else w for w in weights]


def _ce_setup_context(ctx, inputs, output):
    pred, label, valid_len = inputs
    _, lse = output
    ctx.save_for_backward(pred, label, valid_len, lse)
    ctx.mark_non_differentiable(lse)


def _ce_backward(ctx, grad_loss, grad_lse):
    if not ctx.needs_input_grad[0] or grad_loss is None:
        return None, None, None
    pred, label, valid_len, lse = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: a gradient that carries a graph
        grad, _, _ = _graph_grads(lambda p, l, v: (reference.MaskedSoftmaxCELoss()(p, l, v),),
                                  [pred, label, valid_len], [grad_loss])
        return grad, None, None
    return _ops.masked_softmax_ce_backward(grad_loss, pred, label, valid_len, lse), None, None


torch.library.register_autograd("seq2seq_ext::masked_softmax_ce", _ce_backward,
                                setup_context=_ce_setup_context)


def masked_softmax_ce(pred, label, valid_len):
    """Per-sequence masked softmax cross-entropy, exactly ``MaskedSoftmaxCELoss()(pred, label,
    valid_len)``: pred (batch, steps, vocab) with any strides, label (batch, steps) int64/int32,
    valid_len (batch,). Returns (batch,): the mean over all ``steps`` of the per-token losses,
    masked tokens contributing 0. Differentiable in ``pred``."""
    if get_backend() == "reference":
        return reference.MaskedSoftmaxCELoss()(pred, label, valid_len)
    return _ops.masked_softmax_ce(pred, label, valid_len)[0]


# ----------------------------------------------------------------------------------------------
# sequence_mask (+ the in-place sequence_mask_)
# csrc/sequence_mask.cpp (schema, entry), csrc/cpu/sequence_mask.cpp, csrc/cuda/sequence_mask.cu,
# tests/ops/test_sequence_mask.py
# ----------------------------------------------------------------------------------------------


@torch.library.register_fake("seq2seq_ext::sequence_mask")
def _sequence_mask_fake(X, valid_len, value=0):
    _same_device("X", X, valid_len=valid_len)
    return torch.empty_like(X)


@torch.library.register_fake("seq2seq_ext::sequence_mask_")
def _sequence_mask_inplace_fake(X, valid_len, value=0):
    _same_device("X", X, valid_len=valid_len)
    return None


def _mask_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _mask_backward(ctx, grad):
    (valid_len,) = ctx.saved_tensors
    return _ops.sequence_mask(grad, valid_len, 0), None, None


torch.library.register_autograd("seq2seq_ext::sequence_mask", _mask_backward,
                                setup_context=_mask_setup_context)


def sequence_mask_(X, valid_len, value=0):
    """``X[b, t, ...] = value`` for ``t >= valid_len[b]``, in place; returns ``X`` (the
    reference's ``sequence_mask`` semantics). Any dtype."""
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"X: expected a tensor, got {type(X).__name__}")
    if get_backend() == "reference" or _value_requires_grad(value):
        return reference.sequence_mask(X, valid_len, value)  # (differentiable in value)
    value = _scalar_value(value)
    if X.requires_grad and torch.is_grad_enabled():
        # the in-place op has no autograd formula: the out-of-place one (its checks, its
        # gradient) copied into X, which autograd records as an in-place write
        return X.copy_(_ops.sequence_mask(X, valid_len, value))
    _ops.sequence_mask_(X, valid_len, value)
    return X


def sequence_mask(X, valid_len, value=0):
    """Out-of-place sequence mask: a new tensor equal to ``X`` with steps at or after
    ``valid_len`` set to ``value``. Differentiable in ``X`` (and in a one-element tensor
    ``value`` that requires grad, as the reference's ``X[~mask] = value`` is)."""
    if get_backend() == "reference" or _value_requires_grad(value):
        return reference.sequence_mask(X.clone(), valid_len, value)
    return _ops.sequence_mask(X, valid_len, _scalar_value(value))


def _value_requires_grad(value):
    return (isinstance(value, torch.Tensor) and value.requires_grad
            and torch.is_grad_enabled())


def _scalar_value(value):
    """A one-element tensor ``value`` (the reference's ``X[mask] = value`` takes one) as the
    number the op's ``Scalar`` takes."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


# ----------------------------------------------------------------------------------------------
# gru_layer (+ gru_layer_backward): one GRU layer over a sequence
# csrc/gru_layer.cpp (schema, entry), csrc/cpu/gru_layer.cpp, csrc/cuda/gru_layer.cu,
# tests/ops/test_gru_layer.py; its CUDA-graph replay is seq2seq_ext/cuda_graphs.py
# ----------------------------------------------------------------------------------------------


def _packed_on_the_cpu(input, batch_sizes):
    """The kernels' rule, in the fakes too (so that tracing refuses what a run would)."""
    torch._check(batch_sizes is None or input.device.type == "cpu",
                 lambda: f"batch_sizes: the packed layout runs on the CPU; input is on "
                         f"{input.device}")


def _int_arg(name, value):
    """An integer argument as the schema's ``int`` (an ``int``, a NumPy integer, a one-element
    integer tensor); a float or a string is a TypeError naming it, not a value rounded."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an integer, got {value!r}") from None


def _int_list(name, values):
    return [_int_arg(name, v) for v in values]


@torch.library.register_fake("seq2seq_ext::gru_layer")
def _gru_layer_fake(input, h0, w_ih, w_hh, b_ih, b_hh, extra, batch_sizes=None):
    _same_device("input", input, h0=h0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, extra=extra)
    _packed_on_the_cpu(input, batch_sizes)
    rows = input.shape[:-1]  # (steps, batch), or (N,) in the packed layout
    hidden = w_hh.shape[1]
    return (input.new_empty((*rows, hidden)), input.new_empty((h0.shape[0], hidden)),
            input.new_empty((*rows, 4 * hidden)))


@torch.library.register_fake("seq2seq_ext::gru_layer_backward")
def _gru_layer_backward_fake(grad_output, grad_hn, input, h0, w_ih, w_hh, output, saved,
                             has_extra, batch_sizes=None):
    _same_device("input", input, grad_output=grad_output, grad_hn=grad_hn, h0=h0, w_ih=w_ih,
                 w_hh=w_hh, output=output, saved=saved)
    gates = w_hh.shape[0]
    # the matrices' gradients in their dtype (bfloat16 under CPU autocast), the rest in input's
    return (input.new_empty(input.shape), h0.new_empty(h0.shape), w_ih.new_empty(w_ih.shape),
            w_hh.new_empty(w_hh.shape), input.new_empty((gates,)), input.new_empty((gates,)),
            h0.new_empty((h0.shape[0], gates) if has_extra else (0,)))


def _gru_setup_context(ctx, inputs, output):
    input, h0, w_ih, w_hh, _, _, extra = inputs[:7]
    out, _, saved = output
    ctx.save_for_backward(input, h0, w_ih, w_hh, out, saved)
    ctx.has_extra = extra is not None
    # what only a create_graph backward reads (the recomputed call): the biases and extra
    ctx.recompute_args = (inputs[4], inputs[5], extra)
    ctx.recompute_versions = tuple(None if t is None or t.is_inference() else t._version
                                   for t in ctx.recompute_args)  # (no counter: nothing to test)
    ctx.batch_sizes = inputs[7] if len(inputs) > 7 else None
    # the backward replays a CUDA graph or not as the forward's caller asked: on a GPU it runs
    # on autograd's device thread, which does not see the caller's thread-local use_mode
    ctx.graph_mode = cuda_graphs.get_mode()
    ctx.mark_non_differentiable(saved)
    # no zero tensors for outputs without a gradient (saved, always: the op's largest output)
    ctx.set_materialize_grads(False)


def _check_unchanged(names, tensors, versions):
    """autograd's error for a tensor changed in place since the forward: what the backward
    would recompute from is gone (the forward kept these without saving them, as only a
    create_graph backward reads them)."""
    for name, t, version in zip(names, tensors, versions):
        if t is not None and version is not None and t._version != version:
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by an "
                f"inplace operation: gru_layer's {name} is at version {t._version}; expected "
                f"version {version} instead (a backward with create_graph=True recomputes the "
                f"layer from it)")


def _gru_backward(ctx, grad_out, grad_hn, grad_saved):
    input, h0, w_ih, w_hh, out, saved = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: gradients that carry a graph
        b_ih, b_hh, extra = ctx.recompute_args
        _check_unchanged(("b_ih", "b_hh", "extra"), ctx.recompute_args, ctx.recompute_versions)
        product = _product_dtype([w_ih, w_hh])

        def layer(input, h0, w_ih, w_hh, b_ih, b_hh, extra):
            w_ih, w_hh = _float_values([w_ih, w_hh])
            return reference.gru_layer(input, h0, w_ih, w_hh, b_ih, b_hh, extra,
                                       ctx.batch_sizes, product_dtype=product)

        grads = _graph_grads(layer, [input, h0, w_ih, w_hh, b_ih, b_hh, extra],
                             [grad_out, grad_hn])
        return (*grads, None) if ctx.batch_sizes is not None else tuple(grads)
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    args = (grad_out, grad_hn, input, h0, w_ih, w_hh, out, saved, ctx.has_extra)
    if ctx.batch_sizes is not None:
        grads = _ops.gru_layer_backward(*args, ctx.batch_sizes)
        return (*grads[:6], grads[6] if ctx.has_extra else None, None)
    with cuda_graphs.use_mode(ctx.graph_mode):
        if cuda_graphs.eligible(*args[:8]):
            grads = cuda_graphs.gru_layer_backward(*args)  # eager or a replayed CUDA graph
        else:
            grads = _ops.gru_layer_backward(*args)
    return (*grads[:6], grads[6] if ctx.has_extra else None)


torch.library.register_autograd("seq2seq_ext::gru_layer", _gru_backward,
                                setup_context=_gru_setup_context)


# Autocast. CPU: csrc/gru_layer.cpp (gru_layer_autocast_cpu, in C++ for autocast's weight-cast
# cache): under bfloat16, w_ih and w_hh reach the kernel in bfloat16 (bf16 products, float32
# sums; see set_bf16_gemm) and everything else in float32. Elsewhere (CUDA) the layer computes in
# float32: its floating inputs are cast to float32 (float64 stays) and it runs with autocast
# disabled, by the rule below.
_FLOAT32_UNDER_AUTOCAST = ("gru_layer",)


def enable_autocast_rules(device_type):
    """Make the extension's ops safe under ``torch.autocast`` on ``device_type``: where the fused
    GRU layer op has no autocast rule of its own (every device but the CPU), a rule that casts
    its floating inputs to float32 (float64 stays) and runs it with autocast disabled. Without
    it, autocast would hand the layer a bfloat16 context projection beside float32 inputs.
    Idempotent; a rule the op already has is kept."""
    if not torch.amp.is_autocast_available(device_type):
        return
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    for name in _FLOAT32_UNDER_AUTOCAST:
        qualname = f"seq2seq_ext::{name}"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key):
            torch.library.register_autocast(qualname, device_type, torch.float32)


def gru_layer(input, h0, w_ih, w_hh, b_ih, b_hh, extra=None, batch_sizes=None):
    """One GRU layer over a sequence with ``nn.GRU``'s equations: input (steps, batch, in), h0
    (batch, hidden) -> (output (steps, batch, hidden), final state (batch, hidden)). ``extra``
    (batch, 3*hidden) is added to the input projection at every step. Differentiable in every
    tensor argument.

    ``batch_sizes`` (CPU): the packed layout of ``torch.nn.utils.rnn.PackedSequence`` (a list of
    ints, non-increasing): input is (N, in), the rows of step t being the first
    ``batch_sizes[t]`` of the batch, one step after the other; the output is packed alike and a
    row's final state is its state after its last step. A padded position costs nothing."""
    if batch_sizes is not None:
        output, h_n, _ = _ops.gru_layer(input, h0, w_ih, w_hh, b_ih, b_hh, extra,
                                        _int_list("batch_sizes", batch_sizes))
        return output, h_n
    if direct_cpu_call_ok(input) and not torch.is_autocast_enabled("cpu"):
        # inference on plain CPU tensors: no graph to record, so the kernel is called directly
        output, h_n, _ = _C.gru_layer_cpu(input, h0, w_ih, w_hh, b_ih, b_hh, extra)
    elif cuda_graphs.eligible(input, h0, w_ih, w_hh, b_ih, b_hh, extra):
        # CUDA in eager mode: the time loop eager or replayed as a CUDA graph (cuda_graphs.Rule)
        output, h_n, _ = cuda_graphs.gru_layer(input, h0, w_ih, w_hh, b_ih, b_hh, extra)
    else:
        output, h_n, _ = _ops.gru_layer(input, h0, w_ih, w_hh, b_ih, b_hh, extra)
    return output, h_n


def torch_dropout_mask(like, shape, p):
    """``like.new_empty(shape).bernoulli_(1 - p).div_(1 - p)`` for ``0 < p < 1``: the mask that
    ``F.dropout`` and ``nn.GRU`` / ``nn.LSTM``'s inter-layer dropout draw, the same values from
    the same generator state. Eager calls on plain CPU tensors take ``_C.torch_dropout_mask``,
    the same draw vectorised (csrc/torch_dropout_mask.cpp); calls traced by torch.compile or
    ``torch.jit.trace``, or under a dispatch or function mode, the expression."""
    if (type(like) is torch.Tensor and like.is_cpu and _no_dispatch_hooks()
            and not torch.jit.is_tracing()):
        return _C.torch_dropout_mask(list(shape), p, like)
    return like.new_empty(shape).bernoulli_(1 - p).div_(1 - p)


def _gru_stack_layers(h0, flat_weights):
    """The layer count of ``nn.GRU``'s flat weights (4 a layer), checked against ``h0``."""
    layers = len(flat_weights) // 4
    if len(flat_weights) != 4 * layers or not layers:
        raise ValueError(f"flat_weights: expected nn.GRU's flat weights, 4 tensors a layer, got "
                         f"{len(flat_weights)}")
    if h0.dim() != 3 or h0.shape[0] != layers:
        raise RuntimeError(f"h0: expected the state of a {layers}-layer GRU, ({layers}, batch, "
                           f"hidden), got shape {tuple(h0.shape)}")
    return layers


def gru(input, h0, flat_weights, dropout=0.0, training=False, w_ih0=None, extra0=None,
        batch_sizes=None, positions=None):
    """A multi-layer ``nn.GRU`` (unidirectional, with biases, time first) through the layer op.

    input (steps, batch, in), h0 (layers, batch, hidden), flat_weights: ``nn.GRU``'s
    ``_flat_weights``. Dropout between layers in training, as ``nn.GRU``. ``w_ih0`` replaces
    layer 0's input weights and ``extra0`` is added to its input projection at every step (the
    decoder's context trick). Returns (output (steps, batch, hidden), state (layers, batch,
    hidden)).

    With ``batch_sizes`` (one per step) input and output are in the packed layout of
    :func:`gru_layer` ((N, in) and (N, hidden)) and every layer skips the padded positions.
    ``positions`` (N,): each packed row's index among the (steps * batch) positions of a padded
    layout; dropout then draws that layout's masks, as the padded call would, and keeps the
    packed rows' (the same seed gives the same masks). Without it the masks are drawn for the
    packed rows.
    """
    if get_backend() == "reference":
        raise RuntimeError("ops.gru runs the compiled op; models use nn.GRU under the "
                           "reference backend")
    layers = _gru_stack_layers(h0, flat_weights)
    if training and layers > 1 and not 0 <= dropout <= 1:  # where (and as) torch.nn checks it
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {dropout}")
    x, states = input, []
    for layer in range(layers):
        w_ih, w_hh, b_ih, b_hh = flat_weights[4 * layer: 4 * layer + 4]
        if layer == 0 and w_ih0 is not None:
            w_ih = w_ih0
        x, h_n = gru_layer(x, h0[layer], w_ih, w_hh, b_ih, b_hh, extra0 if layer == 0 else None,
                           batch_sizes)
        states.append(h_n)
        if dropout and training and layer < layers - 1:
            if positions is None:  # F.dropout(x, dropout, True); on the CPU its mask, faster
                x = (x * torch_dropout_mask(x, x.shape, dropout)
                     if dropout < 1 and x.is_cpu and x.is_contiguous()
                     else torch.nn.functional.dropout(x, dropout, True))
            else:  # the padded layout's masks, drawn as F.dropout draws them
                padded = (len(batch_sizes), h0.shape[1], x.shape[-1])
                noise = (x.new_zeros(padded) if dropout >= 1 else
                         torch_dropout_mask(x, padded, dropout))
                x = x * noise.view(-1, x.shape[-1]).index_select(0, positions)
    return x, torch.stack(states)


def gru_over_projection(gi0, h0, flat_weights):
    """:func:`gru` in CPU inference (no grad, plain CPU tensors: :func:`direct_cpu_call_ok`;
    outside CPU autocast) with layer 0's input projection given: ``gi0`` (steps, batch,
    3*hidden) is ``input W_ih0^T + b_ih0`` of every step (for an encoder, rows of a table of
    every token's projection). The other layers run as in :func:`gru` without dropout. Returns
    (output, state) as :func:`gru`.

    Matrices of ``flat_weights`` in bfloat16 beside float32 biases and ``gi0``: each product
    sums the float32 rows times the bf16 weights in float32 (decoding's bf16 weights; the state
    is not rounded, unlike the op under autocast)."""
    if not direct_cpu_call_ok(gi0):
        raise RuntimeError("gru_over_projection: expected plain CPU tensors with grad mode off "
                           "(CPU inference)")
    _gru_stack_layers(h0, flat_weights)
    # layer 0 over gi0, each layer above projecting its input first (csrc/gru_layer.h)
    return _C.gru_over_projection_cpu(gi0, h0, flat_weights)


# ----------------------------------------------------------------------------------------------
# gru_decode_step: one inference step of the GRU decoder (all layers + output layer)
# csrc/gru_decode_step.cpp (schema, entry), csrc/cpu/gru_decode_step.cpp,
# csrc/cuda/gru_decode_step.cu, tests/ops/test_gru_decode_step.py; the bound DecoderStepper
# (decoder_stepper; csrc/decoder_stepper.h) runs the same step on a decoder's bound weights
# ----------------------------------------------------------------------------------------------


@torch.library.register_fake("seq2seq_ext::gru_decode_step")
def _gru_decode_step_fake(token, state, emb_proj, ctx_proj, weights, dense_weight, dense_bias):
    _same_device("state", state, token=token, emb_proj=emb_proj, ctx_proj=ctx_proj,
                 weights=weights, dense_weight=dense_weight, dense_bias=dense_bias)
    return (state.new_empty((*token.shape, dense_weight.shape[0])), state.new_empty(state.shape))


def gru_decode_step(token, state, emb_proj, ctx_proj, weights, dense_weight, dense_bias):
    """One inference step of ``Seq2SeqDecoder`` for all layers and the output projection.

    token (batch,) or (batch, 1) ids; state (layers, batch, hidden); emb_proj (tgt_vocab, 3*hidden), the
    embedding table times the embedding columns of layer 0's ``W_ih`` plus ``b_ih``; ctx_proj
    (batch, 3*hidden) for a fixed context, or None to take the context from ``state[-1]`` as the
    reference decoder does; weights: ``nn.GRU``'s flat weights. Returns (logits (batch, vocab), or
    (batch, 1, vocab) for a (batch, 1) token, and the new state). Not differentiable: models use the differentiable path when gradients are needed.
    """
    return _ops.gru_decode_step(token, state, emb_proj, ctx_proj, list(weights), dense_weight,
                                dense_bias)


def decoder_stepper(embedding, weights, dense_weight, dense_bias):
    """A decoder's weights bound for repeated decode steps: ``stepper.emb_proj()`` is the cached
    embedding projection table of :func:`gru_decode_step` (rebuilt when the embedding or layer
    0's input weights change) and ``stepper.step(token, state)`` is ``gru_decode_step`` with the
    reference's context rule on CPU tensors, called without the dispatcher's argument handling;
    ``stepper.step_with_context(token, state, ctx_proj)`` is the same with a fixed context's
    projection, and ``stepper.greedy(state, ctx_proj, bos, eos, num_steps)`` is
    :func:`greedy_decode` with the bound weights. ``stepper.try_step(token, state)`` is ``step``
    when the token is a (B, 1) tensor, the state a CPU tensor, neither a subclass, with grad
    mode off and no dispatch or function mode active, and None otherwise. For up to 32 rows the
    stepper decodes on a transposed copy of the weights (built once per set of weights), which
    agrees with the ops to rounding. For an ``nn.LSTM`` decoder (its flat weights have the same
    layout), ``stepper.lstm_step(token, h, c, ctx_proj=None)`` is :func:`lstm_decode_step`'s CPU
    kernel. Use the step methods only where :func:`direct_cpu_call_ok` holds."""
    return _C.DecoderStepper(embedding, list(weights), dense_weight, dense_bias)


# ----------------------------------------------------------------------------------------------
# greedy_decode: the greedy loop of predict_seq2seq in one call
# csrc/greedy_decode.cpp (schema, entry), csrc/cpu/greedy_decode.cpp, csrc/cuda/greedy_decode.cu,
# tests/ops/test_greedy_decode.py
# ----------------------------------------------------------------------------------------------


@torch.library.register_fake("seq2seq_ext::greedy_decode")
def _greedy_decode_fake(state, emb_proj, ctx_proj, weights, dense_weight, dense_bias, bos, eos,
                        num_steps):
    _same_device("state", state, emb_proj=emb_proj, ctx_proj=ctx_proj, weights=weights,
                 dense_weight=dense_weight, dense_bias=dense_bias)
    batch = state.shape[1]
    return (state.new_empty((batch, num_steps), dtype=torch.int64),
            state.new_empty((batch,), dtype=torch.int64))


def greedy_decode(state, emb_proj, ctx_proj, weights, dense_weight, dense_bias, bos, eos,
                  num_steps):
    """Greedy decoding of a batch in one call. Returns (tokens (batch, num_steps) int64 with
    ``eos`` after each sentence's end, lengths (batch,) int64: tokens before ``eos``)."""
    return _ops.greedy_decode(state, emb_proj, ctx_proj, list(weights), dense_weight, dense_bias,
                              _int_arg("bos", bos), _int_arg("eos", eos),
                              _int_arg("num_steps", num_steps))


# ----------------------------------------------------------------------------------------------
# lstm_decode_step: one inference step of an LSTM decoder
# csrc/lstm_decode_step.cpp (schema, entry), csrc/cpu/lstm_decode_step.cpp,
# csrc/cuda/lstm_decode_step.cu,
# tests/ops/test_lstm_decode_step.py
# ----------------------------------------------------------------------------------------------


@torch.library.register_fake("seq2seq_ext::lstm_decode_step")
def _lstm_decode_step_fake(token, h, c, emb_proj, ctx_proj, weights, dense_weight, dense_bias):
    _same_device("h", h, token=token, c=c, emb_proj=emb_proj, ctx_proj=ctx_proj, weights=weights,
                 dense_weight=dense_weight, dense_bias=dense_bias)
    return (h.new_empty((*token.shape, dense_weight.shape[0])), h.new_empty(h.shape),
            c.new_empty(c.shape))


def lstm_decode_step(token, h, c, emb_proj, ctx_proj, weights, dense_weight, dense_bias):
    """One inference step of an LSTM ``Seq2SeqDecoder`` for all layers and the output projection
    (``nn.LSTM``'s equations, gate order i, f, g, o).

    token (batch,) or (batch, 1) ids; h, c (layers, batch, hidden), the hidden and cell states;
    emb_proj (tgt_vocab, 4*hidden), the embedding table times the embedding columns of layer 0's
    ``W_ih`` plus ``b_ih``; ctx_proj (batch, 4*hidden) for a fixed context, or None to take the
    context from ``h[-1]`` (the current top hidden state); weights: ``nn.LSTM``'s flat weights.
    Returns (logits (batch, vocab), or (batch, 1, vocab) for a (batch, 1) token, new h, new c).
    Not differentiable: models use ``nn.LSTM`` when gradients are needed. Under the
    ``"reference"`` backend the same step is computed in plain PyTorch (without gradient).
    """
    if get_backend() == "reference":
        with torch.no_grad():
            return reference.lstm_decode_step(token, h, c, emb_proj, ctx_proj, list(weights),
                                              dense_weight, dense_bias)
    return _ops.lstm_decode_step(token, h, c, emb_proj, ctx_proj, list(weights), dense_weight,
                                 dense_bias)


# ----------------------------------------------------------------------------------------------
# rnn_stack (+ rnn_stack_backward): a multi-layer GRU or LSTM over a sequence, or one step
# csrc/rnn_stack.cpp (schema and checks), csrc/rnn_cells.h (the cells), csrc/cpu/rnn_stack.h,
# csrc/cuda/rnn_stack.cu, tests/ops/test_rnn_stack.py; the drop-in layers: seq2seq_ext/nn.py
# ----------------------------------------------------------------------------------------------

__all__ += ["rnn_stack"]

_SAVED_WIDTH = {"gru": 5, "lstm": 6}  # a row of `saved`, in multiples of hidden (rnn_cells.h)


@torch.library.register_fake("seq2seq_ext::rnn_stack")
def _rnn_stack_fake(cell, input, h0, c0, weights, dropout_mask, batch_sizes=None):
    _same_device("input", input, h0=h0, c0=c0, weights=weights, dropout_mask=dropout_mask)
    torch._check(cell in _SAVED_WIDTH, lambda: f"cell: expected 'gru' or 'lstm', got {cell!r}")
    _packed_on_the_cpu(input, batch_sizes)
    layers, batch, hidden = h0.shape
    rows = input.shape[:-1]  # (steps, batch), or (N,) in the packed layout
    c_n = h0.new_empty(h0.shape) if cell == "lstm" else input.new_empty((0,))
    return (input.new_empty((*rows, hidden)), h0.new_empty(h0.shape), c_n,
            input.new_empty((layers, *rows, _SAVED_WIDTH[cell] * hidden)))


@torch.library.register_fake("seq2seq_ext::rnn_stack_backward")
def _rnn_stack_backward_fake(cell, grad_output, grad_hn, grad_cn, input, h0, c0, weights,
                             dropout_mask, saved, batch_sizes=None):
    _same_device("input", input, grad_output=grad_output, grad_hn=grad_hn, grad_cn=grad_cn,
                 h0=h0, c0=c0, weights=weights, dropout_mask=dropout_mask, saved=saved)
    grad_c0 = h0.new_empty(h0.shape) if cell == "lstm" else input.new_empty((0,))
    return (input.new_empty(input.shape), h0.new_empty(h0.shape), grad_c0,
            [w.new_empty(w.shape) for w in weights])


def _stack_gemm_flops(input_shape, weight_shapes):
    """The GEMM FLOPs of one rnn_stack call: every row of the sequence (steps x batch, or the
    packed rows) times each layer's W_ih and W_hh (the biases and gate arithmetic aside)."""
    rows = 1
    for s in input_shape[:-1]:
        rows *= s
    return sum(2 * rows * s[0] * s[1] for s in weight_shapes if s is not None and len(s) == 2)


@torch.utils.flop_counter.register_flop_formula(torch.ops.seq2seq_ext.rnn_stack)
def _rnn_stack_flops(cell, input, h0, c0, weights, *args, out_shape=None, **kwargs):
    """``FlopCounterMode``'s count for the op (shapes in place of tensors)."""
    return _stack_gemm_flops(input, weights)


@torch.utils.flop_counter.register_flop_formula(torch.ops.seq2seq_ext.rnn_stack_backward)
def _rnn_stack_backward_flops(cell, grad_output, grad_hn, grad_cn, input, h0, c0, weights,
                              *args, out_shape=None, **kwargs):
    """Twice the forward's: the products for the gradients of the inputs and of the weights."""
    return 2 * _stack_gemm_flops(input, weights)


# Autograd: csrc/rnn_stack.cpp (RnnStackFunction, in C++ for its per-call cost), with the
# one-step calls' deferred weight gradients of csrc/deferred_weight_grads.h. Its backward under
# create_graph=True is _rnn_stack_graph_backward below.


def _rnn_stack_graph_backward(cell, grads, input, h0, c0, weights, mask, batch_sizes):
    """rnn_stack's backward under ``create_graph=True``: :func:`_graph_grads` of
    :func:`reference.rnn_stack` (bf16 products where autocast gave the op bf16 weights). Called
    by the op's C++ autograd node; returns the gradients of input, h0, c0 and each weight, None
    where an argument takes none."""
    product = _product_dtype(weights)

    def layers(input, h0, c0, *weights):
        return reference.rnn_stack(cell, input, h0, c0, _float_values(weights), mask,
                                   batch_sizes, product_dtype=product)

    return _graph_grads(layers, [input, h0, c0, *weights], grads)


_C.set_rnn_stack_graph_backward(_rnn_stack_graph_backward)

__all__ += ["set_deferred_grads", "deferred_grads"]

_DEFERRED_GRADS = ("off", "auto", "always")


def set_deferred_grads(mode):
    """How the backward of ``rnn_stack``'s one-step calls on the CPU (a decoder called once per
    token in a Python loop, as the drop-in layers run it) gives its weight matrices' gradients:

    * ``"auto"`` (the default): a matrix of at least 65,536 elements gets one gradient per
      autograd graph, one product over the rows of all the graph's calls (their gate gradients
      and inputs), instead of a full gradient per call that autograd adds up: at hidden 512 and
      batch 128 that per-call write and sum cost about 1 ms a matrix a call;
    * ``"always"``: every matrix so (the same gradients up to rounding; tests use it at small
      sizes);
    * ``"off"``: every call returns its own gradients.

    The gradients are the same up to the order of the float32 sums. A ``torch.autograd.grad``
    that does not ask for the matrices, and a backward with ``create_graph=True``, take the
    per-call path."""
    if mode not in _DEFERRED_GRADS:
        raise ValueError(f"mode: expected one of {_DEFERRED_GRADS}, got {mode!r}")
    _C.set_deferred_grads(_DEFERRED_GRADS.index(mode))


def deferred_grads():
    """The current :func:`set_deferred_grads` mode."""
    return _DEFERRED_GRADS[_C.deferred_grads()]


# Autocast (CPU): csrc/rnn_stack.cpp (rnn_stack_autocast_cpu, in C++ for autocast's weight-cast
# cache). Under torch.autocast("cpu", dtype=torch.bfloat16) the weight matrices reach the kernel
# in bfloat16, cast once per autocast region, and every product takes bf16 operands with float32
# sums; input, states, gates, biases and the parameters' gradients stay float32.


def rnn_stack(cell, input, h0, c0, weights, dropout_mask=None, batch_sizes=None):
    """A multi-layer ``nn.GRU`` (``cell="gru"``, ``c0`` None) or ``nn.LSTM`` (``cell="lstm"``)
    over a sequence, unidirectional, time first: input (steps, batch, in), h0 and c0 (layers,
    batch, hidden), weights the module's ``_flat_weights`` (with or without biases).
    ``dropout_mask`` (layers - 1, steps, batch, hidden), already scaled by ``1 / (1 - p)``,
    multiplies every layer's output but the top one's before it feeds the next layer.

    Returns ``(output (steps, batch, hidden), h_n, c_n)`` with ``c_n`` None for the GRU.
    Differentiable in input, h0, c0 and every weight. Under the reference backend it runs
    ``nn.GRU`` / ``nn.LSTM``'s functional form.

    ``batch_sizes`` (CPU; a list of ints, non-increasing): ``PackedSequence``'s layout. input
    is then ``packed.data`` (N, in), the rows of step t being the first ``batch_sizes[t]`` of
    the batch; output (N, hidden) and dropout_mask (layers - 1, N, hidden) are packed alike,
    and h_n / c_n hold each row's state after its last step. Padded positions cost nothing."""
    sizes = None if batch_sizes is None else _int_list("batch_sizes", batch_sizes)
    if get_backend() == "reference":
        return reference.rnn_stack(cell, input, h0, c0, weights, dropout_mask, sizes)
    output, h_n, c_n, _ = _ops.rnn_stack(cell, input, h0, c0, weights, dropout_mask, sizes)
    return output, h_n, (c_n if cell == "lstm" else None)
