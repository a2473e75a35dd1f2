"""Drop-in recurrent layers: :class:`GRU` and :class:`LSTM` are ``torch.nn.GRU`` and
``torch.nn.LSTM`` (subclasses: the same constructor, attributes, parameters, ``state_dict`` and
``forward``) whose forward runs the fused ``rnn_stack`` op, and :func:`accelerate` puts them into
any model in place.

The whole stack of layers is one op forward and one op backward, over a whole sequence or over
the single time step of a decoder called once per token in a Python loop (the teacher-forcing
pattern), where the per-call cost of ``nn.GRU`` / ``nn.LSTM`` dominates at small sizes.

What runs the fused op, and what runs PyTorch's own implementation (transparently: the same
results and the same errors as ``torch.nn``):

=========================================  ===================================================
fused (``rnn_stack``)                      PyTorch's ``nn.GRU`` / ``nn.LSTM`` forward
=========================================  ===================================================
any ``num_layers``, ``bias`` either way,   ``bidirectional=True``, ``proj_size > 0``,
``batch_first`` either way, unbatched      a ``PackedSequence`` on CUDA or under
input, ``hx`` given or not, inter-layer    ``torch.compile``, dtypes other than float32 /
dropout, float32 / float64 on the CPU      float64, ``torch.autocast`` on CUDA or to
(and CUDA when built with it), grad mode   float16, devices without the kernel, the
on or off, ``torch.compile``, DDP; a       reference backend
``PackedSequence`` on the CPU (the         (``seq2seq_ext.set_backend("reference")``), and
padded positions skipped, as PyTorch's     any input whose shapes ``nn.GRU`` would reject
packed layers do); CPU autocast to         (so that its error is raised), and a float32
bfloat16 (bf16 products, see below)        ``LSTM`` on a non-Intel CPU with ``hidden_size
                                           >= 128`` over more than one time step (see below)
=========================================  ===================================================

PyTorch's CPU ``nn.LSTM`` runs float32 on oneDNN's fused RNN, whose products over a whole
sequence reach a higher rate than the per-step BLAS products of ``rnn_stack`` once the hidden
size makes them GEMM-bound on CPUs where that BLAS (MKL) runs float32 at half oneDNN's rate (AMD;
at hidden 128 and above; benchmarks/RESULTS.md): there the drop-in LSTM hands a float32
sequence (padded or packed) to PyTorch, and keeps the fused op for one-step calls (a decoder's
step in a Python loop), whose per-call cost it cuts. On Intel CPUs the fused op is the faster
one for sequences too and runs them. ``nn.GRU`` has no oneDNN path: the GRU always runs fused.

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` the op's autocast rule (csrc/rnn_stack.cpp)
gives it the weight matrices in bfloat16, cast once per autocast region, and the rest in float32:
every product takes bf16 operands with float32 sums; states, gates, outputs, biases and the
parameters' gradients stay float32 (:func:`seq2seq_ext.ops.set_bf16_gemm` says how the products
run). A large LSTM sequence goes to PyTorch's bf16 LSTM (oneDNN) only where oneDNN has bf16
products and the fused op's per-step products do not run on AMX tiles
(:func:`seq2seq_ext.ops.set_amx_products`); with them the fused op is the faster one, and
without oneDNN's bf16 products PyTorch's bf16 LSTM cannot run.

A one-step call's backward on the CPU hands the large weight matrices' gate gradients and inputs
to one node per matrix and graph, which sums the gradient over all the loop's calls in one
product (:func:`seq2seq_ext.ops.set_deferred_grads`), instead of a full gradient per call that
autograd adds up.

Dropout between layers draws its masks from the default generator in one pass
(``_C.dropout_keep_mask`` in eager calls; a uniform sample below ``1 - p`` when traced), so the
masks differ from those ``nn.GRU`` / ``nn.LSTM`` would draw for the same seed; the distribution
(Bernoulli(1 - p)) and the scaling (``1 / (1 - p)``) are the same, and ``torch_masks=True``
draws theirs on the CPU. On a GPU no mask is ``nn.GRU``'s: cuDNN draws its own masks with its
own generator.
"""
import copy

import torch
import torch.fx
from torch.nn.utils.rnn import PackedSequence

from . import _C, _fastcall, ops

__all__ = ["GRU", "LSTM", "accelerate", "fused_forward"]

_FLOATS = (torch.float32, torch.float64)


# hidden sizes from which PyTorch's oneDNN LSTM beats rnn_stack over a sequence (float32, CPU)
_ONEDNN_LSTM_HIDDEN = 128
_ONEDNN = torch.backends.mkldnn.is_available()


# Whether a float32 LSTM sequence runs fused whatever its size: on Intel CPUs, where MKL (behind
# rnn_stack's float32 GEMMs) runs at oneDNN's rate, the fused op is the faster one there too
# (1.07-2.1x oneDNN's LSTM, hidden 128-1024, forward and backward; benchmarks/RESULTS.md); on
# AMD CPUs MKL runs float32 at half oneDNN's rate and oneDNN's LSTM wins from hidden 128.
_FUSED_FLOAT32_LSTM = ops.cpu_vendor() == "GenuineIntel" and torch.backends.mkl.is_available()


def _onednn_lstm_faster(module, cell, input, steps=None):
    """True where PyTorch's own CPU LSTM (oneDNN) is the faster path over ``steps`` time steps
    (by default those of a padded ``input``; see the module docstring). Under CPU autocast to
    bfloat16 that holds only where oneDNN has bf16 products (elsewhere PyTorch's bf16 LSTM does
    not run at all); in float32, not on Intel CPUs (``_FUSED_FLOAT32_LSTM``)."""
    # the module's settings first: a small layer's one-step call pays for every test here
    if cell != "lstm" or not _ONEDNN or module.hidden_size < _ONEDNN_LSTM_HIDDEN:
        return False
    if steps is None:
        if input.dim() not in (2, 3):
            return False
        steps = input.shape[1 if module.batch_first and input.dim() == 3 else 0]
    if input.dtype != torch.float32 or input.device.type != "cpu" or steps <= 1:
        return False
    if torch.is_autocast_enabled("cpu"):
        # with its per-step products on AMX tiles the fused op is the faster one (1.15-2.4x
        # oneDNN's LSTM, hidden 128-1024, forward and backward; benchmarks/RESULTS.md)
        return ops.cpu_has_bf16_gemm() and not (ops.amx_products()
                                                and ops.bf16_gemm() == "native")
    return not _FUSED_FLOAT32_LSTM


def _autocast_ok(input):
    """False under an autocast the fused op does not take: it runs CPU autocast to bfloat16
    (bf16 products, see :func:`seq2seq_ext.ops.set_bf16_gemm`) over a float32 input, eager or
    under ``torch.compile`` (the op's autocast rule runs as the graph is traced), and float64
    input under any autocast (which leaves float64 alone)."""
    device = input.device.type
    if device not in ("cpu", "cuda"):
        return True  # no kernel there (has_kernel is asked first); is_autocast_enabled("meta")
        #              raises
    if not torch.is_autocast_enabled(device) or input.dtype == torch.float64:
        return True
    return (device == "cpu" and input.dtype == torch.float32
            and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def _fused_ok(module, input):
    """The one place that decides whether ``module.forward(input, ...)`` runs the fused op."""
    if type(input) is not torch.Tensor or input.dtype not in _FLOATS:
        return False
    if module.bidirectional or getattr(module, "proj_size", 0) or ops.get_backend() != "ext":
        return False
    if not 0 <= module.dropout <= 1:
        return False  # torch.nn raises (NaN included)
    if input.dim() not in (2, 3) or input.shape[-1] != module.input_size:
        return False
    if input.shape[1 if module.batch_first and input.dim() == 3 else 0] == 0:
        return False  # no time step: torch.nn raises
    device = input.device
    if not ops.has_kernel("rnn_stack", device) or not _autocast_ok(input):
        return False
    w = _fastcall.flat_weights(module)[0]  # the parameters, in the op's order
    return w is not None and w.dtype == input.dtype and w.device == device


def torch_dropout_masks(like, layers, steps, batch, hidden, p):
    """The inter-layer dropout masks nn.GRU / nn.LSTM draw in training (one ``bernoulli_`` per
    layer output, layer by layer, as ``_C.rnn_forward`` also draws them), scaled by
    ``1 / (1 - p)``: (layers - 1, steps, batch, hidden), like ``like``'s dtype and device;
    zeros for ``p >= 1`` (as ``nn.GRU``'s dropout gives)."""
    if p >= 1:
        return like.new_zeros((layers - 1, steps, batch, hidden))
    # one draw over the stacked shape takes the generator's outputs in the layers' order
    return ops.torch_dropout_mask(like, (layers - 1, steps, batch, hidden), p)


def _state_ok(state, x):
    """A given state the fused op takes beside the input ``x``: of its dtype and device, or,
    under CPU autocast to bfloat16 over a float32 input, a bfloat16 one (PyTorch's own oneDNN
    LSTM returns its states so), which the op's autocast rule casts to float32."""
    if state.device != x.device:
        return False
    return state.dtype == x.dtype or (
        state.dtype == torch.bfloat16 and x.dtype == torch.float32 and x.device.type == "cpu"
        and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def _split_hx(cell, hx):
    """(h0, c0) of a given ``hx`` (c0 None for the GRU), or (None, None) when an LSTM's is not
    an (h0, c0) pair."""
    if cell != "lstm":
        return hx, None
    if not (isinstance(hx, tuple) and len(hx) == 2):
        return None, None
    return hx


def _run(module, cell, input, hx, torch_masks=False):
    """The fused forward: (output, h_n, c_n) in the module's layout, or None when ``hx`` does
    not have the shape nn.GRU / nn.LSTM expects (the caller then lets torch.nn raise)."""
    layers, hidden = module.num_layers, module.hidden_size
    batched = input.dim() == 3
    if batched:
        x = input.transpose(0, 1) if module.batch_first else input
    else:
        x = input.unsqueeze(1)
    batch = x.shape[1]
    want = (layers, batch, hidden) if batched else (layers, hidden)
    if hx is None:
        h0 = x.new_zeros((layers, batch, hidden))
        c0 = h0 if cell == "lstm" else None
    else:
        h0, c0 = _split_hx(cell, hx)
        if h0 is None or (c0 is not None and tuple(c0.shape) != want):
            return None
        if tuple(h0.shape) != want or not all(
                _state_ok(t, x) for t in (h0, c0) if t is not None):
            return None
        if not batched:
            h0 = h0.unsqueeze(1)
            c0 = c0.unsqueeze(1) if c0 is not None else None
    mask = None
    p = module.dropout
    if p and module.training and layers > 1:
        shape = (layers - 1, x.shape[0], batch, hidden)
        if p >= 1:
            mask = x.new_zeros(shape)
        elif torch_masks:
            mask = torch_dropout_masks(x, layers, x.shape[0], batch, hidden, p)
        else:
            mask = torch.empty(shape, dtype=x.dtype, device=x.device).uniform_().lt_(1 - p)
            mask = mask.div_(1 - p)
    output, h_n, c_n = ops.rnn_stack(cell, x, h0, c0, _fastcall.flat_weights(module), mask)
    if not batched:
        return output.squeeze(1), h_n.squeeze(1), (c_n.squeeze(1) if c_n is not None else None)
    if module.batch_first:
        output = output.transpose(0, 1)
    return output, h_n, c_n


def _forward(module, cell, input, hx, torch_masks=False):
    """(output, h_n, c_n) from the fused op, or None for torch.nn's own forward.

    Eager calls go to ``_C.rnn_forward`` (the layout work and the op's dispatcher call in C++,
    a fraction of the per-call cost of the same in Python: the one-step decoder loop pays it at
    every token); traced calls and calls under a torch function mode take :func:`_run`, the
    same in Python through ``torch.ops``."""
    if (type(input) is not torch.Tensor or module.bidirectional
            or getattr(module, "proj_size", 0) or ops.get_backend() != "ext"
            or _onednn_lstm_faster(module, cell, input)):
        return None
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return _run(module, cell, input, hx, torch_masks) if _fused_ok(module, input) else None
    return _C.rnn_forward(cell, input, hx, _fastcall.flat_weights(module), module.num_layers,
                          module.hidden_size, module.batch_first, float(module.dropout),
                          module.training, torch_masks)


def _packed_forward(module, cell, packed, hx, torch_masks=False):
    """The fused forward of a ``PackedSequence`` (the op's packed layout, CPU): (output packed,
    h_n, c_n), or None for torch.nn's own forward. The padded positions are skipped."""
    data, batch_sizes, sorted_indices, unsorted_indices = packed
    if (type(data) is not torch.Tensor or data.dtype not in _FLOATS or data.dim() != 2
            or data.shape[-1] != module.input_size or data.device.type != "cpu"
            or module.bidirectional or getattr(module, "proj_size", 0)
            or ops.get_backend() != "ext" or not _autocast_ok(data) or not 0 <= module.dropout <= 1
            or torch.compiler.is_compiling() or batch_sizes.numel() == 0):
        return None
    if _onednn_lstm_faster(module, cell, data, steps=batch_sizes.numel()):
        return None  # PyTorch's oneDNN LSTM, as for a padded sequence
    weights = _fastcall.flat_weights(module)
    w = weights[0]
    if w is None or w.dtype != data.dtype or w.device != data.device:
        return None
    layers, hidden, batch = module.num_layers, module.hidden_size, int(batch_sizes[0])
    want = (layers, batch, hidden)
    if hx is None:
        h0 = data.new_zeros(want)
        c0 = h0 if cell == "lstm" else None
    else:
        h0, c0 = _split_hx(cell, hx)
        if h0 is None:
            return None
        states = [t for t in (h0, c0) if t is not None]
        if any(tuple(t.shape) != want or t.dtype != data.dtype or t.device != data.device
               for t in states):
            return None
        if sorted_indices is not None:  # the state's rows in the packed batch's order
            h0 = h0.index_select(1, sorted_indices)
            c0 = c0.index_select(1, sorted_indices) if c0 is not None else None
    mask = None
    p = module.dropout
    if p and module.training and layers > 1:
        shape = (layers - 1, data.shape[0], hidden)
        if p >= 1:
            mask = data.new_zeros(shape)
        elif torch_masks:
            mask = ops.torch_dropout_mask(data, shape, p)
        else:
            mask = _C.dropout_keep_mask(shape, p, data)
    output, h_n, c_n = ops.rnn_stack(cell, data, h0, c0, weights, mask, batch_sizes.tolist())
    if unsorted_indices is not None:  # back to the caller's order
        h_n = h_n.index_select(1, unsorted_indices)
        c_n = c_n.index_select(1, unsorted_indices) if c_n is not None else None
    return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), h_n, c_n


def fused_forward(module, input, hx=None, torch_masks=False):
    """``module.forward(input, hx)`` of an ``nn.GRU`` or ``nn.LSTM`` (drop-in or not) on the fused
    op: ``(output, h_n)`` or ``(output, (h_n, c_n))``, or None when the op does not apply (see
    the table above) and the module's own forward must run. Module hooks are not run.
    ``torch_masks``: draw the dropout masks exactly as ``nn.GRU`` / ``nn.LSTM`` do, so that a
    seeded run gives their numbers (``bernoulli_``'s draws, ``ops.torch_dropout_mask``)."""
    if torch.jit.is_tracing():
        # torch.jit.trace: PyTorch's layer records a graph that takes any batch size (the
        # fused path's zero state would be recorded at the traced batch's size)
        return None
    lstm = isinstance(module, torch.nn.LSTM)
    cell = "lstm" if lstm else "gru"
    if isinstance(input, PackedSequence):
        out = _packed_forward(module, cell, input, hx, torch_masks)
    else:
        out = _forward(module, cell, input, hx, torch_masks)
    if out is None:
        return None
    return (out[0], (out[1], out[2])) if lstm else (out[0], out[1])


def _fx_leaf_call(module, input, hx):
    """Under ``torch.fx.symbolic_trace``: the call recorded as one ``call_module`` node, as FX
    records ``torch.nn``'s own layers (it treats only classes of ``torch.nn`` as leaves, and
    would otherwise trace into the forward's control flow); None for the traced root."""
    tracer = input.tracer
    path = tracer.path_of_module(module)
    if not path:  # the traced root itself: PyTorch's forward is traced, as for nn.GRU / nn.LSTM
        return None
    args = (input,) if hx is None else (input, hx)
    return tracer.create_proxy("call_module", path, args, {})


def _plain_copy(module):
    """``__prepare_scriptable__``: ``torch.jit.script`` compiles PyTorch's own layer, a shallow
    copy of the drop-in of its base class that shares its parameters (the fused forward is not
    scriptable)."""
    plain = copy.copy(module)
    plain.__class__ = torch.nn.LSTM if isinstance(module, torch.nn.LSTM) else torch.nn.GRU
    return plain


class _Fused:
    """The drop-in layers' forward, before ``torch.nn.GRU`` / ``torch.nn.LSTM`` in their bases:
    the fused op where it runs (``fused_forward``), else PyTorch's own forward."""

    def forward(self, input, hx=None):
        out = (_fx_leaf_call(self, input, hx) if isinstance(input, torch.fx.Proxy)
               else fused_forward(self, input, hx))
        return out if out is not None else super().forward(input, hx)

    __prepare_scriptable__ = _plain_copy


class GRU(_Fused, torch.nn.GRU):
    """``torch.nn.GRU`` with the fused multi-layer op underneath (see the module docstring for
    what falls back to PyTorch's implementation). Same constructor, parameters and results."""


class LSTM(_Fused, torch.nn.LSTM):
    """``torch.nn.LSTM`` with the fused multi-layer op underneath (see the module docstring for
    what falls back to PyTorch's implementation). Same constructor, parameters and results."""


_DROP_IN = {torch.nn.GRU: GRU, torch.nn.LSTM: LSTM}


def accelerate(module):
    """Make every ``torch.nn.GRU`` and ``torch.nn.LSTM`` in ``module`` (``module`` itself
    included) the drop-in :class:`GRU` / :class:`LSTM`, in place, and return ``module``.

    Each layer keeps its ``Parameter`` objects (an optimizer built before still updates them),
    its ``state_dict`` keys and its settings: only its class changes, to a subclass that adds no
    state. Subclasses of ``nn.GRU`` / ``nn.LSTM`` (which may have a forward of their own) and the
    layers inside this package's models (already fused) are left as they are."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    from . import models  # the package's own models run fused layers already
    todo = [module]
    while todo:
        m = todo.pop()
        if isinstance(m, (models.Seq2SeqEncoder, models.Seq2SeqDecoder)):
            continue
        drop_in = _DROP_IN.get(type(m))
        if drop_in is not None:
            m.__class__ = drop_in
        todo.extend(c for c in m.children())
    return module
