"""Typed wrappers over ``torch.ops.seq2seq_ext.*``: the only place the package calls the library.

Each op has a fake (meta) implementation for ``torch.compile`` / FakeTensor tracing and, where it
is differentiable, an autograd formula, both registered here. Every public function honours the
backend switch: under ``"reference"`` it computes the same thing with the pure-PyTorch reference.

Backend selection, in order of precedence: the :func:`use_backend` context manager,
:func:`set_backend`, the environment variable ``SEQ2SEQ_EXT_BACKEND`` (``ext`` or ``reference``),
and the default ``"ext"``.
"""
import contextlib
import os
import threading

import torch

from . import reference

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
]

BACKENDS = ("ext", "reference")
_ENV = "SEQ2SEQ_EXT_BACKEND"
_state = threading.local()
_default = None  # set_backend's choice; None: the environment variable, read at import


def _check_backend(name):
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return name


def get_backend():
    """The backend in force: ``"ext"`` (compiled ops) or ``"reference"`` (pure PyTorch)."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    return _default if _default is not None else _ENV_BACKEND


_ENV_BACKEND = _check_backend(os.environ.get(_ENV, "ext") or "ext")


def set_backend(name):
    """Select the backend for the whole process (``"ext"`` or ``"reference"``)."""
    global _default
    _default = _check_backend(name)


@contextlib.contextmanager
def use_backend(name):
    """Context manager selecting a backend for the current thread inside a ``with`` block."""
    _check_backend(name)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
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
# fake (meta) implementations
# ----------------------------------------------------------------------------------------------

def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("seq2seq_ext::masked_softmax_ce")
def _masked_softmax_ce_fake(pred, label, valid_len):
    torch._check(pred.dim() == 3, lambda: "pred: expected a 3-D tensor")
    batch, steps, _ = pred.shape
    return pred.new_empty((batch,)), pred.new_empty((batch, steps), dtype=_acc_dtype(pred.dtype))


@torch.library.register_fake("seq2seq_ext::masked_softmax_ce_backward")
def _masked_softmax_ce_backward_fake(grad_loss, pred, label, valid_len, lse):
    return torch.empty_like(pred)


@torch.library.register_fake("seq2seq_ext::sequence_mask")
def _sequence_mask_fake(X, valid_len, value=0):
    return torch.empty_like(X)


@torch.library.register_fake("seq2seq_ext::sequence_mask_")
def _sequence_mask_inplace_fake(X, valid_len, value=0):
    return None


@torch.library.register_fake("seq2seq_ext::gru_decode_step")
def _gru_decode_step_fake(token, state, emb_proj, ctx_proj, weights, dense_weight, dense_bias):
    return (state.new_empty((*token.shape, dense_weight.shape[0])), state.new_empty(state.shape))


@torch.library.register_fake("seq2seq_ext::greedy_decode")
def _greedy_decode_fake(state, emb_proj, ctx_proj, weights, dense_weight, dense_bias, bos, eos,
                        num_steps):
    batch = state.shape[1]
    return (state.new_empty((batch, num_steps), dtype=torch.int64),
            state.new_empty((batch,), dtype=torch.int64))


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------

def _ce_setup_context(ctx, inputs, output):
    pred, label, valid_len = inputs
    _, lse = output
    ctx.save_for_backward(pred, label, valid_len, lse)
    ctx.mark_non_differentiable(lse)


def _ce_backward(ctx, grad_loss, grad_lse):
    if not ctx.needs_input_grad[0] or grad_loss is None:
        return None, None, None
    pred, label, valid_len, lse = ctx.saved_tensors
    return _ops.masked_softmax_ce_backward(grad_loss, pred, label, valid_len, lse), None, None


torch.library.register_autograd("seq2seq_ext::masked_softmax_ce", _ce_backward,
                                setup_context=_ce_setup_context)


def _mask_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _mask_backward(ctx, grad):
    (valid_len,) = ctx.saved_tensors
    return _ops.sequence_mask(grad, valid_len, 0), None, None


torch.library.register_autograd("seq2seq_ext::sequence_mask", _mask_backward,
                                setup_context=_mask_setup_context)


# ----------------------------------------------------------------------------------------------
# public wrappers
# ----------------------------------------------------------------------------------------------

def masked_softmax_ce(pred, label, valid_len):
    """Per-sequence masked softmax cross-entropy, exactly ``MaskedSoftmaxCELoss()(pred, label,
    valid_len)``: pred (batch, steps, vocab) with any strides, label (batch, steps) int64/int32,
    valid_len (batch,). Returns (batch,): the mean over all ``steps`` of the per-token losses,
    masked tokens contributing 0. Differentiable in ``pred``."""
    if get_backend() == "reference":
        return reference.MaskedSoftmaxCELoss()(pred, label, valid_len)
    return _ops.masked_softmax_ce(pred, label, valid_len)[0]


def sequence_mask_(X, valid_len, value=0):
    """``X[b, t, ...] = value`` for ``t >= valid_len[b]``, in place; returns ``X`` (the
    reference's ``sequence_mask`` semantics). Any dtype."""
    if get_backend() == "reference" or (X.requires_grad and torch.is_grad_enabled()):
        # the in-place op has no autograd formula: let PyTorch record index_put_
        return reference.sequence_mask(X, valid_len, value)
    _ops.sequence_mask_(X, valid_len, value)
    return X


def sequence_mask(X, valid_len, value=0):
    """Out-of-place sequence mask: a new tensor equal to ``X`` with steps at or after
    ``valid_len`` set to ``value``. Differentiable in ``X``."""
    if get_backend() == "reference":
        return reference.sequence_mask(X.clone(), valid_len, value)
    return _ops.sequence_mask(X, valid_len, value)


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


def greedy_decode(state, emb_proj, ctx_proj, weights, dense_weight, dense_bias, bos, eos,
                  num_steps):
    """Greedy decoding of a batch in one call. Returns (tokens (batch, num_steps) int64 with
    ``eos`` after each sentence's end, lengths (batch,) int64: tokens before ``eos``)."""
    return _ops.greedy_decode(state, emb_proj, ctx_proj, list(weights), dense_weight, dense_bias,
                              int(bos), int(eos), int(num_steps))
