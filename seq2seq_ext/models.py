"""The chapter's encoder and decoder, with the same parameters as the reference, routed through
``seq2seq_ext.ops`` under the extension backend.

The classes subclass the reference ones, so ``state_dict()`` keys and shapes are identical and
weights load both ways; ``isinstance`` checks against the reference classes hold.

Two options go beyond the chapter (both off by default): ``cell="lstm"`` (``nn.LSTM`` in the
encoder and the decoder, the cell state passed along with the hidden state) and, for the
decoder, ``fixed_context=True`` (the encoder's final top-layer hidden state is the context at
every step, in training and at prediction alike). The decoder state formats are documented in
:class:`Seq2SeqDecoder`.
"""
import torch
from torch import nn

from . import ops, reference
from .reference import Decoder, Encoder, EncoderDecoder

__all__ = ["Encoder", "Decoder", "EncoderDecoder", "Seq2SeqEncoder", "Seq2SeqDecoder",
           "fused_decoder_args", "supports_fused_decoding", "decoder_stepper", "context_projection"]

_STEPPER_ATTR = "_seq2seq_ext_stepper"
_CTX_ATTR = "_seq2seq_ext_ctx_proj"
_FLOATS = (torch.float32, torch.float64)


class Seq2SeqEncoder(reference.Seq2SeqEncoder):
    """The RNN encoder for sequence to sequence learning (d2l's ``Seq2SeqEncoder``).

    ``cell``: ``"gru"`` (the chapter's, the default) or ``"lstm"`` (``self.rnn`` is an
    ``nn.LSTM`` and ``forward`` returns ``(output, (h_n, c_n))``); anything else raises
    ValueError. Under the extension backend the GRU runs as the fused layer op (forward and
    backward), with ``nn.GRU``'s parameters, equations and inter-layer dropout; the LSTM runs as
    ``nn.LSTM``.
    """

    def __init__(self, vocab_size, embed_size, num_hiddens, num_layers, dropout=0, *,
                 cell="gru", **kwargs):
        if reference.check_cell(cell) == "gru":
            super().__init__(vocab_size, embed_size, num_hiddens, num_layers, dropout, **kwargs)
        else:  # the reference's construction order, with an nn.LSTM
            reference.Encoder.__init__(self, **kwargs)
            self.embedding = nn.Embedding(vocab_size, embed_size)
            self.rnn = reference.make_rnn(cell, embed_size, num_hiddens, num_layers, dropout)
        self.cell = cell

    def forward(self, X, *args):
        X = self.embedding(X).permute(1, 0, 2)
        rnn = self._modules["rnn"]
        if not _fused_layer_allowed(rnn, X):
            output, state = rnn(X)
            return output, state
        h0 = X.new_zeros((rnn.num_layers, X.shape[1], rnn.hidden_size))
        return ops.gru(X, h0, rnn._flat_weights, rnn.dropout, self.training)


class Seq2SeqDecoder(reference.Seq2SeqDecoder):
    """The RNN decoder for sequence to sequence learning (d2l's ``Seq2SeqDecoder``).

    Options (keyword-only, off by default so that the default is the chapter's decoder):

    * ``cell``: ``"gru"`` or ``"lstm"`` (``self.rnn`` is an ``nn.LSTM`` whose input is the
      embedding concatenated with the context, like the GRU's); ValueError otherwise.
    * ``fixed_context``: the chapter's decoder concatenates the incoming ``state[-1]`` to the
      input. In training that is the encoder's final top-layer state at every step; at
      prediction (one call per token) it is the decoder's own previous state, so training and
      inference see different contexts. With ``fixed_context=True`` the encoder's final
      top-layer hidden state is kept in the state and is the context of every step.

    State formats (``init_state``'s result and ``forward``'s second output):

    * GRU: a tensor (layers, batch, hidden); the context is ``state[-1]``.
    * LSTM: a tuple ``(h, c)`` of (layers, batch, hidden) tensors; the context is ``h[-1]``.
    * ``fixed_context=True``: a tuple ``(rnn_state, context)``, ``rnn_state`` as above and
      ``context`` (batch, hidden); ``forward`` returns the same ``context`` with the new
      ``rnn_state``.

    Every tensor of a state is (layers, batch, hidden) (batch at dim 1) or (batch, hidden)
    (batch at dim 0), so that states can be reordered along the batch generically.

    Under the extension backend a one-step call (``X`` of shape (batch, 1)) that needs no
    gradient runs as one fused op for all layers and the output projection
    (``gru_decode_step``, with the context's projection ``ctx_proj`` when the context is fixed,
    or ``lstm_decode_step``).

    Multi-step GRU calls and GRU calls that need gradients run the GRU as the fused layer op. The
    context is the same vector at every step, so its share of layer 0's input projection,
    ``context @ W_ih0[:, embed:]^T``, is computed once per sequence and added at each step instead
    of repeating the context ``steps`` times and concatenating it to the embeddings. LSTM calls
    that are not fused steps run ``nn.LSTM`` (the loss stays the fused one).
    """

    def __init__(self, vocab_size, embed_size, num_hiddens, num_layers, dropout=0, *,
                 cell="gru", fixed_context=False, **kwargs):
        if reference.check_cell(cell) == "gru":
            super().__init__(vocab_size, embed_size, num_hiddens, num_layers, dropout, **kwargs)
        else:  # the reference's construction order, with an nn.LSTM
            reference.Decoder.__init__(self, **kwargs)
            self.embedding = nn.Embedding(vocab_size, embed_size)
            self.rnn = reference.make_rnn(cell, embed_size + num_hiddens, num_hiddens,
                                          num_layers, dropout)
            self.dense = nn.Linear(num_hiddens, vocab_size)
        if not isinstance(fixed_context, bool):
            raise TypeError(f"fixed_context: expected a bool, got {type(fixed_context).__name__}")
        self.cell = cell
        self.fixed_context = fixed_context
        # the chapter's decoder exactly: the fast paths below apply
        self._chapter = cell == "gru" and not fixed_context

    def init_state(self, enc_outputs, *args):
        if self.__dict__.get("_chapter", True):
            return enc_outputs[1]
        return reference.variant_init_state(enc_outputs, self.cell, self.fixed_context)

    def __call__(self, *args, **kwargs):
        # The per-token inference call, straight to the bound stepper: nn.Module.__call__ and
        # forward's frame cost as much as the step itself at the chapter's sizes. Taken only
        # when nn.Module.__call__ would do nothing but call forward (no hooks of any kind, not
        # compiled) and forward would call the stepper too (the stepper's try_step tests the
        # tensors, grad mode and dispatch modes, and returns None when they rule it out); else
        # the usual call.
        attrs = self.__dict__
        cached = attrs.get(_STEPPER_ATTR)
        if (cached is not None and len(args) == 2 and not kwargs and cached[0] == _generation[0]
                and not attrs["training"] and attrs.get("_chapter", True)
                and not (attrs["_forward_hooks"] or attrs["_forward_pre_hooks"]
                         or attrs["_backward_hooks"] or attrs["_backward_pre_hooks"]
                         or attrs.get("_compiled_call_impl") is not None or _any_global_hook())
                and ops.ext_shortcut_ok()):
            out = cached[1].try_step(*args)
            if out is not None:
                return out
        return super().__call__(*args, **kwargs)

    def forward(self, X, state):
        # (the per-token inference call with bound weights usually never gets here: see __call__)
        if not self.__dict__.get("_chapter", True):
            return self._variant_forward(X, state)
        if X.dim() == 2 and X.shape[1] == 1:
            if _fused_step_allowed(self, state):
                if ops.direct_cpu_call_ok(state):
                    return decoder_stepper(self).step(X, state)
                return ops.gru_decode_step(X, state, *fused_decoder_args(self))
        rnn = self._modules["rnn"]
        if not _fused_layer_allowed(rnn, state):
            return super().forward(X, state)
        output, state = self._fused_features(X, state, state[-1])
        output = self.dense(output).permute(1, 0, 2)
        return output, state

    def _fused_features(self, X, rnn_state, context):
        """The fused GRU layers over the sequence X (batch, steps), the context's share of layer
        0's input projection computed once: (top layer's output (steps, batch, hidden), state)."""
        rnn = self._modules["rnn"]
        X = self.embedding(X).permute(1, 0, 2)
        w_ih0 = rnn._flat_weights[0]
        embed = X.shape[-1]
        extra = torch.mm(context, w_ih0[:, embed:].t())
        return ops.gru(X, rnn_state, rnn._flat_weights, rnn.dropout, self.training,
                       w_ih0=w_ih0[:, :embed], extra0=extra)

    def supports_features(self):
        """True when :meth:`forward_features` is available: a GRU decoder under the extension
        backend with the fused layer op for its parameters' device and dtype."""
        if type(self).forward is not Seq2SeqDecoder.forward or self.cell != "gru":
            return False
        rnn = self._modules["rnn"]
        return _fused_layer_allowed(rnn, rnn._flat_weights[0])

    def forward_features(self, X, state):
        """``forward`` without the output projection: (the top layer's output (steps, batch,
        hidden), the new state), for a decoder that :meth:`supports_features`. Training uses it
        to project only the positions the loss reads (see ``training.fit``)."""
        if self.fixed_context:
            rnn_state, context = state
            output, new_state = self._fused_features(X, rnn_state, context)
            return output, (new_state, context)
        return self._fused_features(X, state, state[-1])

    def _variant_forward(self, X, state):
        """forward for ``cell="lstm"`` or ``fixed_context=True`` (see the class docstring)."""
        fixed, lstm = self.fixed_context, self.cell == "lstm"
        if fixed:
            if not (isinstance(state, (tuple, list)) and len(state) == 2):
                raise TypeError("state: a fixed-context decoder expects (rnn_state, context) "
                                f"from init_state, got {type(state).__name__}")
            rnn_state, context = state
        else:
            rnn_state, context = state, None
        reference.check_rnn_state(rnn_state, self.cell)
        if X.dim() == 2 and X.shape[1] == 1 and _fused_variant_step_allowed(self, rnn_state,
                                                                            context):
            ctx_proj = context_projection(self, context) if fixed else None
            direct = ops.direct_cpu_call_ok(rnn_state[0] if lstm else rnn_state)
            if lstm:
                h, c = rnn_state
                if direct:
                    logits, h, c = decoder_stepper(self).lstm_step(X, h, c, ctx_proj)
                else:
                    emb_proj, _, weights, dw, db = fused_decoder_args(self)
                    logits, h, c = ops.lstm_decode_step(X, h, c, emb_proj, ctx_proj, weights,
                                                        dw, db)
                new_state = (h, c)
            elif direct:
                logits, new_state = decoder_stepper(self).step_with_context(X, rnn_state,
                                                                            ctx_proj)
            else:
                emb_proj, _, weights, dw, db = fused_decoder_args(self)
                logits, new_state = ops.gru_decode_step(X, rnn_state, emb_proj, ctx_proj,
                                                        weights, dw, db)
            return logits, ((new_state, context) if fixed else new_state)
        rnn = self._modules["rnn"]
        if fixed and not lstm and _fused_layer_allowed(rnn, rnn_state):
            # the fused GRU layer with the fixed context's projection computed once
            output, new_state = self._fused_features(X, rnn_state, context)
            return self.dense(output).permute(1, 0, 2), (new_state, context)
        return reference.variant_decoder_forward(self, X, state, fixed)

    def _apply(self, fn, *args, **kwargs):
        # .to(), .double(), .cuda() may swap parameter tensors: drop the bound weights
        self.__dict__.pop(_STEPPER_ATTR, None)
        self.__dict__.pop(_CTX_ATTR, None)
        return super()._apply(fn, *args, **kwargs)


_GLOBAL_HOOKS = tuple(getattr(torch.nn.modules.module, name) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
    "_global_backward_pre_hooks", "_global_forward_hooks_always_called"))


def _any_global_hook():
    """True when a global module hook is registered (``register_module_forward_hook`` etc.)."""
    h = _GLOBAL_HOOKS
    return bool(h[0] or h[1] or h[2] or h[3] or h[4])


def supports_fused_decoding(decoder):
    """True when ``decoder`` computes exactly the chapter's ``Seq2SeqDecoder.forward`` with a
    plain GRU (with the chapter's context rule or, for this package's decoder, a fixed context),
    so that the fused GRU decode ops (``gru_decode_step``, ``greedy_decode``) can stand in for it.
    LSTM decoders are not covered: they have their own fused step, ``lstm_decode_step``."""
    if not isinstance(decoder, reference.Seq2SeqDecoder):
        return False
    if type(decoder).forward not in (reference.Seq2SeqDecoder.forward, Seq2SeqDecoder.forward):
        return False
    if getattr(decoder, "cell", "gru") != "gru":
        return False
    return _plain_gru(decoder._modules["rnn"])


def _plain_lstm(rnn):
    return (type(rnn) is torch.nn.LSTM and rnn.bias and not rnn.bidirectional
            and not rnn.batch_first and rnn.proj_size == 0)


def _fused_variant_step_allowed(decoder, rnn_state, context):
    """The fused one-step path of a variant decoder applies: extension backend, plain cell, CPU
    or CUDA kernel present, float32/float64 tensors of one dtype, no dropout in training and no
    gradient needed."""
    if ops.get_backend() != "ext":
        return False
    rnn = decoder._modules["rnn"]
    lstm = decoder.cell == "lstm"
    if not (_plain_lstm(rnn) if lstm else _plain_gru(rnn)):
        return False
    tensors = list(rnn_state) if lstm else [rnn_state]
    if context is not None:
        tensors.append(context)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return False
    first = tensors[0]
    if first.dtype not in _FLOATS:
        return False
    if any(t.dtype != first.dtype or t.device != first.device for t in tensors):
        return False
    op_name = "lstm_decode_step" if lstm else "gru_decode_step"
    if not ops.has_kernel(op_name, first.device):
        return False
    if decoder.training and rnn.dropout > 0:
        return False
    if torch.is_grad_enabled():
        if any(t.requires_grad for t in tensors) or any(p.requires_grad
                                                        for p in decoder.parameters()):
            return False
    return True


def context_projection(decoder, context):
    """``context @ W_ih0[:, embed:]^T`` (batch, gates*hidden): the fixed context's share of layer
    0's input projection, the ``ctx_proj`` argument of the decode ops (no gradient).

    Cached on the decoder for the last context seen (the same tensor object, unmodified, with
    layer 0's input weights unchanged), so that a greedy loop passing the same context along
    computes it once per sentence batch."""
    w_ih0 = decoder._modules["rnn"]._flat_weights[0]
    embed = decoder._modules["embedding"].embedding_dim
    if torch.compiler.is_compiling():  # traced: no cache (version counters are not traceable)
        return torch.mm(context, w_ih0[:, embed:].t())
    if context.is_inference() or w_ih0.is_inference():
        # no version counter to tell an in-place change: no cache
        with torch.no_grad():
            return torch.mm(context, w_ih0[:, embed:].t())
    cached = decoder.__dict__.get(_CTX_ATTR)
    if (cached is not None and cached[0] is context and cached[1] == context._version
            and cached[2] is w_ih0 and cached[3] == w_ih0._version):
        return cached[4]
    with torch.no_grad():
        proj = torch.mm(context, w_ih0[:, embed:].t())
    decoder.__dict__[_CTX_ATTR] = (context, context._version, w_ih0, w_ih0._version, proj)
    return proj


def _plain_gru(rnn):
    return (type(rnn) is torch.nn.GRU and rnn.bias and not rnn.bidirectional
            and not rnn.batch_first)


def _fused_layer_allowed(rnn, like):
    return (ops.get_backend() == "ext" and _plain_gru(rnn)
            and like.dtype in (torch.float32, torch.float64)
            and ops.has_kernel("gru_layer", like.device))


def _fused_step_allowed(decoder, state):
    if ops.get_backend() != "ext" or not _plain_gru(decoder._modules["rnn"]):
        return False
    if not isinstance(state, torch.Tensor) or state.dtype not in (torch.float32, torch.float64):
        return False
    if decoder.training and decoder._modules["rnn"].dropout > 0:
        return False
    if torch.is_grad_enabled():
        if state.requires_grad or any(p.requires_grad for p in decoder.parameters()):
            return False
    return True


def fused_decoder_args(decoder):
    """The decoder's weights as the decode ops take them: ``(emb_proj, ctx_proj=None, flat RNN
    weights, dense weight, dense bias)`` (for a fixed-context decoder pass
    :func:`context_projection` of the context as ``ctx_proj`` instead of None).

    ``emb_proj = embedding.weight @ W_ih0[:, :embed]^T + b_ih0`` (tgt_vocab, gates*hidden) is layer
    0's input projection of every token, computed once per set of weights (see
    :func:`decoder_stepper`).
    """
    mods = decoder._modules
    dense = mods["dense"]._parameters
    weights = mods["rnn"]._flat_weights
    if torch.compiler.is_compiling():
        # traced as torch ops (the C++ stepper is opaque to torch.compile)
        table = mods["embedding"]._parameters["weight"]
        emb_proj = torch.nn.functional.linear(table, weights[0][:, :table.shape[1]], weights[2])
    else:
        emb_proj = decoder_stepper(decoder).emb_proj()
    return (emb_proj, None, weights, dense["weight"], dense["bias"])


# Bumped whenever any module registers (or replaces) a parameter or a submodule, so that the
# weights a decoder has bound (decoder_stepper) are rebound after such a change. In-place
# updates (optimizer steps, load_state_dict) need no rebinding: the stepper holds the parameters
# themselves and tracks their version counters.
_generation = [0]


def _bump_generation(*_):
    _generation[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_bump_generation)
torch.nn.modules.module.register_module_module_registration_hook(_bump_generation)


def decoder_stepper(decoder):
    """The decoder's :func:`seq2seq_ext.ops.decoder_stepper`, cached on the decoder (for a
    decoder that :func:`supports_fused_decoding`, or an LSTM decoder of this package)."""
    cached = decoder.__dict__.get(_STEPPER_ATTR)
    if cached is not None and cached[0] == _generation[0]:
        return cached[1]
    mods = decoder._modules
    dense = mods["dense"]._parameters
    stepper = ops.decoder_stepper(mods["embedding"]._parameters["weight"],
                                  mods["rnn"]._flat_weights, dense["weight"], dense["bias"])
    decoder.__dict__[_STEPPER_ATTR] = (_generation[0], stepper)
    return stepper
