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

from . import _C, _fastcall, ops, reference
from ._checks import check_int as _check_int
from . import nn as seq2seq_nn
from .reference import Decoder, Encoder, EncoderDecoder

__all__ = ["Encoder", "Decoder", "EncoderDecoder", "Seq2SeqEncoder", "Seq2SeqDecoder",
           "fused_decoder_args", "supports_fused_decoding", "decoder_stepper", "context_projection",
           "decode_path", "packed_rows", "packed_positions", "project", "encoder_table", "encode"]

_CTX_ATTR = "_seq2seq_ext_ctx_proj"
_TABLE_ATTR = "_seq2seq_ext_encoder_table"
_TABLE_BF16_ATTR = "_seq2seq_ext_encoder_table_bf16"
_FLOATS = (torch.float32, torch.float64)


class Seq2SeqEncoder(reference.Seq2SeqEncoder):
    """The RNN encoder for sequence to sequence learning (d2l's ``Seq2SeqEncoder``).

    ``cell``: ``"gru"`` (the chapter's, the default) or ``"lstm"`` (``self.rnn`` is an
    ``nn.LSTM`` and ``forward`` returns ``(output, (h_n, c_n))``); anything else raises
    ValueError. Under the extension backend the GRU runs as the fused layer op (forward and
    backward), with ``nn.GRU``'s parameters, equations and inter-layer dropout; the LSTM runs as
    the fused stack op (``seq2seq_ext.nn.fused_forward``), with ``nn.LSTM``'s.
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
        rnn = _fastcall.submodule(self, "rnn")
        table = encoder_table(self, X)
        if table is not None:  # inference: layer 0's input projection is a row per token
            return _encode_over_table(rnn, X, table, _fastcall.flat_weights(rnn))
        X = self.embedding(X).permute(1, 0, 2)
        if not _fused_layer_allowed(rnn, X):
            return _lstm_layers(rnn)(X, None) if self.cell == "lstm" else rnn(X)
        h0 = X.new_zeros((rnn.num_layers, X.shape[1], rnn.hidden_size))
        return ops.gru(X, h0, _fastcall.flat_weights(rnn), rnn.dropout, rnn.training)

    def _apply(self, fn, *args, **kwargs):
        # derived from the parameters .to() etc. may swap
        self.__dict__.pop(_TABLE_ATTR, None)
        self.__dict__.pop(_TABLE_BF16_ATTR, None)
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        # pickle, torch.save and copy.deepcopy: the tables are derived data, made again when used
        state = dict(super().__getstate__())
        state.pop(_TABLE_ATTR, None)
        state.pop(_TABLE_BF16_ATTR, None)
        return state


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
    or ``lstm_decode_step``). :meth:`step` is that call without gradient, :meth:`greedy` a
    batch's greedy decoding; :func:`decode_path` chooses their path (bound stepper, registered
    op or plain PyTorch), and nothing else does.

    Multi-step GRU calls and GRU calls that need gradients run the GRU as the fused layer op. The
    context is the same vector at every step, so its share of layer 0's input projection,
    ``context @ W_ih0[:, embed:]^T``, is computed once per sequence and added at each step instead
    of repeating the context ``steps`` times and concatenating it to the embeddings. LSTM calls
    that are not fused decode steps run the LSTM layers as the fused stack op (``rnn_stack``,
    forward and backward; ``nn.LSTM`` where it does not apply).
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

    # The per-token inference call skips nn.Module.__call__ when nothing would run but forward
    # (see _fastcall.decoder_call, which says what that buys); a subclass with its own forward
    # gets the usual __call__.
    __call__ = _fastcall.decoder_call

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _fastcall.ordinary_call_for(cls, Seq2SeqDecoder.forward)

    def forward(self, X, state):
        # (the per-token inference call with bound weights usually never gets here: see __call__)
        chapter = self.__dict__.get("_chapter", True)
        if not chapter:
            rnn_state, context = self._split_state(state)
        if X.dim() == 2 and X.shape[1] == 1:
            path = decode_path(self, state)
            if path != "torch":
                return self._fused_step(X, state, path)
        rnn = _fastcall.submodule(self, "rnn")
        if chapter:
            if not (_fused_layer_allowed(rnn, state) and _state_fits(rnn, state)):
                return super().forward(X, state)  # (nn.GRU's error for a state that does not fit)
            output, state = self._fused_features(X, state, state[-1])
            return project(self, output).permute(1, 0, 2), state
        if (self.fixed_context and self.cell == "gru" and _fused_layer_allowed(rnn, rnn_state)
                and _state_fits(rnn, rnn_state)):
            # the fused GRU layer with the fixed context's projection computed once
            output, new_state = self._fused_features(X, rnn_state, context)
            return project(self, output).permute(1, 0, 2), (new_state, context)
        return reference.variant_decoder_forward(self, X, state, self.fixed_context,
                                                 rnn=_lstm_layers(rnn))

    def step(self, token, state):
        """One decode step without gradient: ``token`` (batch,) or (batch, 1) ids, ``state`` in
        :meth:`init_state`'s format. Returns (logits (batch, vocab), or (batch, 1, vocab) for a
        (batch, 1) token, the new state): ``forward`` on one step, on the path
        :func:`decode_path` chooses (module hooks run, as for any call of the module)."""
        flat = token.dim() == 1
        with torch.no_grad():
            logits, new_state = self(token[:, None] if flat else token, state)
        return (logits[:, 0] if flat else logits), new_state

    def greedy(self, state, bos, eos, num_steps, *, weight_dtype=None):
        """Greedy decoding of a batch from ``state`` (:meth:`init_state`'s result), without
        gradient: every row starts from ``bos`` and feeds its argmax back, as the chapter's
        ``predict_seq2seq`` does for one sentence. Returns (tokens (batch, num_steps) int64,
        ``eos`` at and after each row's end; lengths (batch,) int64, the tokens before the first
        ``eos``, at most num_steps).

        The GRU decoder on the ``"stepper"`` or ``"op"`` path of :func:`decode_path` runs the
        whole loop in one call (the bound stepper's greedy loop, or the ``greedy_decode`` op);
        otherwise (the LSTM decoder, the ``"torch"`` path, a decoder with a module hook) it is a
        loop of one-step calls of the module, which ends once every row has produced ``eos``.

        ``weight_dtype=torch.bfloat16`` decodes with the weight matrices rounded to bfloat16
        (the embedding, every ``W_ih`` and ``W_hh``, the output layer's weight; biases, states
        and sums stay float32): each token reads half the bytes, which is what batch-1 decoding
        of a large model waits for. The result is that of a copy of the decoder whose matrices
        were rounded to bfloat16. Only the GRU decoder on the ``"stepper"`` path (float32, CPU
        tensors, the extension backend) decodes so; elsewhere it is a ValueError."""
        bos = _check_int("bos", _int_of(bos), 0)
        num_steps = _check_int("num_steps", _int_of(num_steps), 0)
        eos = _check_int("eos", _int_of(eos), None)  # (a negative one never ends a row)
        bf16 = bf16_weights_requested(weight_dtype)
        with torch.no_grad():
            # a hooked decoder: the loop calls the module, so that its hooks run every step
            path = "torch" if _fastcall.has_hooks(self) else decode_path(self, state)
            if bf16 and (self.cell != "gru" or path != "stepper" or _fastcall.flat_weights(
                    _fastcall.submodule(self, "rnn"))[0].dtype != torch.float32):
                raise ValueError(
                    "weight_dtype: bfloat16 weights are decoded by the GRU decoder's CPU stepper "
                    f"(float32 CPU tensors, the extension backend, no module hooks); this "
                    f"decoder ({self.cell}) decodes on the {path!r} path, or its weights are "
                    "not float32")
            if self.cell == "gru" and path != "torch":
                rnn_state, ctx_proj = state, None
                if self.fixed_context:
                    rnn_state, context = state
                    ctx_proj = (_rounded_context_projection(self, context) if bf16
                                else context_projection(self, context))
                if path == "stepper":
                    return decoder_stepper(self).greedy(rnn_state, ctx_proj, bos, eos, num_steps,
                                                        bf16)
                emb_proj, _, weights, dense_w, dense_b = fused_decoder_args(self)
                return ops.greedy_decode(rnn_state, emb_proj, ctx_proj, weights, dense_w,
                                         dense_b, bos, eos, num_steps)
            return self._greedy_steps(state, bos, eos, num_steps)

    def _greedy_steps(self, state, bos, eos, num_steps):
        """:meth:`greedy` as a loop of one-step calls of the module (batched)."""
        first = next(t for t in _nested_tensors(state))
        batch = first.shape[1] if first.dim() == 3 else first.shape[0]
        X = torch.full((batch, 1), bos, dtype=torch.long, device=first.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=first.device)
        steps = []
        for _ in range(num_steps):
            Y, state = self(X, state)
            X = Y.argmax(dim=2)
            steps.append(X[:, 0])
            finished |= X[:, 0] == eos
            if bool(finished.all()):
                break
        tokens = torch.full((batch, num_steps), eos, dtype=torch.long, device=first.device)
        if steps:
            tokens[:, :len(steps)] = torch.stack(steps, dim=1)
        # a row's length: its first eos (argmax gives the first maximum), num_steps without one
        ended = torch.cat((tokens, tokens.new_full((batch, 1), eos)), dim=1) == eos
        lengths = ended.int().argmax(dim=1)
        tokens[torch.arange(num_steps, device=first.device)[None, :] >= lengths[:, None]] = eos
        return tokens, lengths

    def _split_state(self, state):
        """(rnn_state, context) of a variant decoder's state, checked (TypeError otherwise);
        context is None with the chapter's context rule."""
        if self.fixed_context:
            if not (isinstance(state, (tuple, list)) and len(state) == 2):
                raise TypeError("state: a fixed-context decoder expects (rnn_state, context) "
                                f"from init_state, got {type(state).__name__}")
            rnn_state, context = state
        else:
            rnn_state, context = state, None
        return reference.check_rnn_state(rnn_state, self.cell), context

    def _fused_step(self, X, state, path):
        """One step (X (batch, 1)) on the ``"stepper"`` or ``"op"`` path of :func:`decode_path`."""
        lstm, fixed = self.cell == "lstm", self.fixed_context
        rnn_state, context, ctx_proj = state, None, None
        if fixed:
            rnn_state, context = state
            ctx_proj = context_projection(self, context)
        if path == "stepper":
            stepper = decoder_stepper(self)
            if lstm:
                logits, h, c = stepper.lstm_step(X, rnn_state[0], rnn_state[1], ctx_proj)
                new_state = (h, c)
            elif ctx_proj is None:
                logits, new_state = stepper.step(X, rnn_state)
            else:
                logits, new_state = stepper.step_with_context(X, rnn_state, ctx_proj)
        else:
            emb_proj, _, weights, dw, db = fused_decoder_args(self)
            if lstm:
                logits, h, c = ops.lstm_decode_step(X, rnn_state[0], rnn_state[1], emb_proj,
                                                    ctx_proj, weights, dw, db)
                new_state = (h, c)
            else:
                logits, new_state = ops.gru_decode_step(X, rnn_state, emb_proj, ctx_proj,
                                                        weights, dw, db)
        return logits, ((new_state, context) if fixed else new_state)

    def _fused_features(self, X, rnn_state, context, batch_sizes=None, order=None):
        """The fused GRU layers over the sequence X (batch, steps), the context's share of layer
        0's input projection computed once: (top layer's output (steps, batch, hidden), state).
        With ``batch_sizes`` and ``order`` only the packed positions run (see
        :meth:`forward_features`)."""
        rnn = _fastcall.submodule(self, "rnn")
        positions = None
        if batch_sizes is None:
            X = self.embedding(X).permute(1, 0, 2)
        else:
            order = order.to(X.device)
            positions = packed_positions(batch_sizes, order)
            X = self.embedding(X.t().reshape(-1).index_select(0, positions))
            rnn_state = rnn_state.index_select(1, order)
            context = context.index_select(0, order)
        weights = _fastcall.flat_weights(rnn)
        w_ih0 = weights[0]
        embed = X.shape[-1]
        if embed + context.shape[-1] != w_ih0.shape[1]:  # nn.GRU's check of [embedding, context]
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected "
                               f"{w_ih0.shape[1]}, got {embed + context.shape[-1]}")
        # one split, not two slices: its backward writes W_ih0's gradient once (a cat of the
        # two parts), where each slice's would zero a copy of the whole matrix, then add them
        w_emb, w_ctx = w_ih0.split([embed, w_ih0.shape[1] - embed], 1)
        extra = ops.autocast_linear(context, w_ctx)
        output, state = ops.gru(X, rnn_state, weights, rnn.dropout, rnn.training,
                                w_ih0=w_emb, extra0=extra, batch_sizes=batch_sizes,
                                positions=positions)
        if order is not None:  # the state back in the batch's order
            state = torch.empty_like(state).index_copy(1, order, state)
        return output, state

    def _lstm_features(self, X, rnn_state, context, batch_sizes=None, order=None):
        """The LSTM layers over the sequence X, the context concatenated to every step's
        embedding (the reference's rule): (top layer's output, (h_n, c_n)). With
        ``batch_sizes`` and ``order`` only the packed positions run, as in
        :meth:`_fused_features`, through ``rnn_stack``'s packed layout; the dropout masks are
        those of the unpacked call (``nn.LSTM``'s draws for every position), the packed ones
        kept."""
        rnn = _fastcall.submodule(self, "rnn")
        emb = self.embedding(X).permute(1, 0, 2)
        steps, batch = emb.shape[:2]
        x = torch.cat((emb, context.expand(steps, batch, context.shape[-1])), 2)
        if batch_sizes is None:
            return _lstm_layers(rnn)(x, rnn_state)
        order = order.to(X.device)
        positions = packed_positions(batch_sizes, order)
        h0, c0 = (t.index_select(1, order) for t in rnn_state)
        layers, hidden, p = rnn.num_layers, rnn.hidden_size, rnn.dropout
        mask = None
        if p and rnn.training and layers > 1:
            mask = seq2seq_nn.torch_dropout_masks(x, layers, steps, batch, hidden, p)
            mask = mask.view(layers - 1, steps * batch, hidden).index_select(1, positions)
        output, h_n, c_n = ops.rnn_stack(
            "lstm", x.reshape(steps * batch, -1).index_select(0, positions), h0, c0,
            _fastcall.flat_weights(rnn), mask, batch_sizes)
        # the state back in the batch's order
        h_n, c_n = (torch.empty_like(t).index_copy(1, order, t) for t in (h_n, c_n))
        return output, (h_n, c_n)

    def supports_features(self):
        """True when :meth:`forward_features` is available: the package's own decoder under the
        extension backend whose layers have their fused op for the parameters' device and
        dtype (``gru_layer`` for the GRU, ``rnn_stack`` for the LSTM)."""
        if not _fastcall.own_forward(self, Seq2SeqDecoder.forward):
            return False
        rnn = _fastcall.submodule(self, "rnn")
        like = _fastcall.flat_weights(rnn)[0]
        if self.cell == "lstm":
            return (ops.get_backend() == "ext" and _plain_lstm(rnn)
                    and like.dtype in (torch.float32, torch.float64)
                    and ops.has_kernel("rnn_stack", like.device))
        return _fused_layer_allowed(rnn, like)

    def forward_features(self, X, state, batch_sizes=None, order=None):
        """``forward`` without the output projection: (the top layer's output (steps, batch,
        hidden), the new state), for a decoder that :meth:`supports_features`. Training uses it
        to project only the positions the loss reads (see ``training.fit``).

        Packed (CPU): ``order`` (batch,) sorts the batch by decreasing length and ``batch_sizes``
        (one per step of X) are the lengths' ``PackedSequence`` sizes for that order: step t
        runs only the first ``batch_sizes[t]`` rows of the sorted batch. The output is then
        (N, hidden), those positions one step after the other (:func:`packed_positions` gives
        their places in X), and the state, in the batch's order, is each row's state after its
        last step. The positions computed are the same as without packing, dropout masks
        included (drawn for every position, as then, and the packed ones kept); the others cost
        nothing."""
        if self.fixed_context:
            rnn_state, context = state
        else:
            rnn_state, context = state, reference.top_hidden_state(state)
        features = self._lstm_features if self.cell == "lstm" else self._fused_features
        output, new_state = features(X, rnn_state, context, batch_sizes, order)
        return output, ((new_state, context) if self.fixed_context else new_state)

    def _apply(self, fn, *args, **kwargs):
        # .to(), .double(), .cuda() may swap parameter tensors: drop the bound weights
        self.__dict__.pop(_fastcall.STEPPER_ATTR, None)
        self.__dict__.pop(_CTX_ATTR, None)
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        # pickle, torch.save and copy.deepcopy: the bound weights (a C++ object) and the cached
        # context projection are derived data, rebuilt on the next decode
        state = dict(super().__getstate__())
        state.pop(_fastcall.STEPPER_ATTR, None)
        state.pop(_CTX_ATTR, None)
        return state


def packed_rows(batch_sizes, batch):
    """The positions of the packed layout of ``batch_sizes`` (the first ``batch_sizes[t]`` rows
    of step t, step after step) as indices into the step-major (steps * batch) positions."""
    sizes = torch.as_tensor(batch_sizes, dtype=torch.int64)
    kept = torch.arange(batch, dtype=torch.int64)[None, :] < sizes[:, None]
    return kept.reshape(-1).nonzero().squeeze(1)


def packed_positions(batch_sizes, order):
    """The packed layout's positions in the batch as given: ``order`` (batch,) sorts the batch
    by decreasing length, ``batch_sizes`` are the packed sizes of the sorted batch; returns, for
    each packed row, its index among the step-major (steps * batch) positions of the unsorted
    batch."""
    batch = order.shape[0]
    rows = packed_rows(batch_sizes, batch).to(order.device)
    return rows - rows % batch + order.index_select(0, rows % batch)


_STEP_OPS = {"gru": "gru_decode_step", "lstm": "lstm_decode_step"}


def bf16_weights_requested(weight_dtype):
    """True for ``torch.bfloat16``, False for None or ``torch.float32`` (decode with the weights
    as they are); ValueError for anything else."""
    if weight_dtype is None or weight_dtype == torch.float32:
        return False
    if weight_dtype == torch.bfloat16:
        return True
    raise ValueError(f"weight_dtype: expected None, torch.float32 or torch.bfloat16, got "
                     f"{weight_dtype!r}")


def decode_path(decoder, state=None):
    """How ``decoder`` computes a decode step (and :meth:`Seq2SeqDecoder.greedy` its loop): the
    one place where the fast path is chosen. ``state`` is the decoder state the step starts
    from (:meth:`Seq2SeqDecoder.init_state`'s format); with None the decoder's parameters stand
    for it (a state from ``init_state`` has their dtype and device).

    ``"stepper"``: the decoder's weights bound once in a C++ stepper (:func:`decoder_stepper`),
    whose kernels are called directly; ``"op"``: the registered ops (``gru_decode_step`` or
    ``lstm_decode_step``, ``greedy_decode``) through ``torch.ops``, so that autograd's
    inference checks, ``torch.compile``, dispatch modes and CUDA see them; ``"torch"``: the
    module's plain PyTorch computation (d2l's, or the reference backend's).

    The rules, in order (the first that applies decides):

    ======================================================================  =========
    ``decoder`` is not this package's ``Seq2SeqDecoder``, or its class or    "torch"
    the instance overrides ``forward`` (the fused path would skip it)
    the backend in force is ``"reference"``                                 "torch"
    ``_fastcall.submodule(decoder, "rnn")`` is not a plain ``nn.GRU`` / ``nn.LSTM`` of its cell      "torch"
    (with biases, unidirectional, time first, no LSTM projection, no hooks)
    the embedding or the output layer is not a plain ``nn.Embedding`` /     "torch"
    ``nn.Linear`` (another class, a parametrization, pruning, hooks, an
    embedding's ``max_norm``, an output layer without bias)
    the embedding's width plus the hidden size is not layer 0's input size  "torch"
    the state is not in the decoder's format, or its tensors (the context   "torch"
    included) are not all float32 or all float64 on one device
    the library has no kernel of the step op for that device (CPU or CUDA)  "torch"
    autocast in force for that device (the modules' calls give its dtypes)  "torch"
    the recurrent layer in training mode with dropout > 0                   "torch"
    grad mode on and a state tensor or a parameter requires grad            "torch"
    a plain CPU tensor state, grad mode off, no ``torch.compile`` tracing,  "stepper"
    no dispatch or function mode (``ops.direct_cpu_call_ok``)
    otherwise                                                               "op"
    ======================================================================  =========

    ``Seq2SeqDecoder.__call__`` restates the ``"stepper"`` row cheaply for the per-token call
    of the chapter's decoder once its weights are bound (``seq2seq_ext._fastcall``); the tests
    check that it never takes a call this function would not send to the stepper.
    """
    if not isinstance(decoder, Seq2SeqDecoder) or not _fastcall.own_forward(decoder, _FORWARD):
        return "torch"
    if ops.get_backend() != "ext":
        return "torch"
    cell = decoder.cell
    rnn = _fastcall.submodule(decoder, "rnn")
    if not (_plain_lstm(rnn) if cell == "lstm" else _plain_gru(rnn)):
        return "torch"
    emb = _fastcall.submodule(decoder, "embedding")
    dense = _fastcall.submodule(decoder, "dense")
    if not (_fastcall.plain_leaf(emb, nn.Embedding) and emb.max_norm is None
            and _fastcall.plain_leaf(dense, nn.Linear) and _has_bias(dense)):
        return "torch"
    if emb.weight.shape[-1] + rnn.hidden_size != rnn.input_size:
        return "torch"  # layer 0's input [embedding, context] does not fit (torch.nn's error)
    tensors = _step_tensors(decoder, state)
    if not tensors:
        return "torch"
    if state is not None and not all(_state_fits(rnn, t) for t in tensors[:2 if cell == "lstm"
                                                                           else 1]):
        return "torch"  # (torch.nn's error)
    first = tensors[0]
    if first.dtype not in _FLOATS or any(t.dtype != first.dtype or t.device != first.device
                                         for t in tensors):
        return "torch"
    device_type = first.device.type
    if device_type != "cpu" and (device_type != "cuda"  # (the CPU kernels are always built)
                                 or not ops.has_kernel(_STEP_OPS[cell], first.device)):
        return "torch"
    if torch.is_autocast_enabled(device_type):
        return "torch"  # the modules' own calls, under autocast's casts (bf16 logits)
    if rnn.training and rnn.dropout > 0:  # (nn.GRU's and nn.LSTM's rule: the layer's own mode)
        return "torch"
    if torch.is_grad_enabled():
        if any(t.requires_grad for t in tensors) or any(p.requires_grad
                                                        for p in decoder.parameters()):
            return "torch"
    return "stepper" if ops.direct_cpu_call_ok(first) else "op"


def _step_tensors(decoder, state):
    """The tensors of a decoder state, the one the decode ops read first (h for an LSTM)
    first; an empty list when the state is not in the decoder's format."""
    if state is None:  # a tensor like the state init_state would give
        return [_fastcall.flat_weights(_fastcall.submodule(decoder, "rnn"))[0].detach()]
    context = None
    if decoder.fixed_context:
        if not (isinstance(state, (tuple, list)) and len(state) == 2):
            return []
        state, context = state
        if not isinstance(context, torch.Tensor):
            return []
    if decoder.cell == "lstm":
        if not (isinstance(state, (tuple, list)) and len(state) == 2):
            return []
        tensors = list(state)
    else:
        tensors = [state]
    if context is not None:
        tensors.append(context)
    return tensors if all(isinstance(t, torch.Tensor) for t in tensors) else []


def _nested_tensors(state):
    """The tensors of a (nested) state, in order."""
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, (tuple, list)):
        for s in state:
            yield from _nested_tensors(s)


def _has_bias(dense):
    """The output layer has a bias (the decode ops add one)."""
    return dense._parameters.get("bias") is not None


def supports_fused_decoding(decoder):
    """True when ``decoder`` computes exactly the chapter's ``Seq2SeqDecoder.forward`` with a
    plain GRU (with the chapter's context rule or, for this package's decoder, a fixed context),
    so that the fused GRU decode ops (``gru_decode_step``, ``greedy_decode``) can stand in for it.
    LSTM decoders are not covered: they have their own fused step, ``lstm_decode_step``.
    (A question about the weights' layout, for callers of the ops; the package's own decoding
    asks :func:`decode_path`.)"""
    if not isinstance(decoder, reference.Seq2SeqDecoder):
        return False
    if type(decoder).forward not in (reference.Seq2SeqDecoder.forward, Seq2SeqDecoder.forward):
        return False
    if getattr(decoder, "cell", "gru") != "gru":
        return False
    dense = _fastcall.submodule(decoder, "dense")
    if not (isinstance(dense, nn.Linear) and _has_bias(dense)):
        return False
    return _plain_gru(_fastcall.submodule(decoder, "rnn"))


def _plain_lstm(rnn):
    return (type(rnn) is torch.nn.LSTM and rnn.bias and not rnn.bidirectional
            and not rnn.batch_first and rnn.proj_size == 0 and not _fastcall.has_hooks(rnn))


def project(decoder, features):
    """``decoder.dense(features)``, the output projection. An ``nn.Linear`` without hooks runs
    as :func:`ops.autocast_linear` (under CPU bf16 autocast its products follow
    ``ops.set_bf16_gemm``); any other module, or one with hooks, is called."""
    dense = _fastcall.submodule(decoder, "dense")
    if type(dense) is nn.Linear and not _fastcall.has_hooks(dense):
        return ops.autocast_linear(features, dense.weight, dense.bias)
    return dense(features)


def _rounded_context_projection(decoder, context):
    """:func:`context_projection` with W_ih0 rounded to bfloat16 (greedy's bf16 weights)."""
    w_ih0 = _fastcall.flat_weights(_fastcall.submodule(decoder, "rnn"))[0]
    embed = _fastcall.submodule(decoder, "embedding").embedding_dim
    with torch.no_grad():
        return torch.mm(context, w_ih0[:, embed:].to(torch.bfloat16).float().t())


def context_projection(decoder, context):
    """``context @ W_ih0[:, embed:]^T`` (batch, gates*hidden): the fixed context's share of layer
    0's input projection, the ``ctx_proj`` argument of the decode ops (no gradient).

    Cached on the decoder for the last context seen (the same tensor object, unmodified, with
    layer 0's input weights unchanged), so that a greedy loop passing the same context along
    computes it once per sentence batch."""
    w_ih0 = _fastcall.flat_weights(_fastcall.submodule(decoder, "rnn"))[0]
    embed = _fastcall.submodule(decoder, "embedding").embedding_dim
    if torch.compiler.is_compiling():  # traced: no cache (version counters are not traceable)
        return torch.mm(context, w_ih0[:, embed:].t())
    if context.is_inference() or w_ih0.is_inference():
        # no version counter to tell an in-place change: no cache
        with torch.no_grad():
            return torch.mm(context, w_ih0[:, embed:].t())
    cached = decoder.__dict__.get(_CTX_ATTR)
    tensors = (context, w_ih0)
    if cached is not None and cached[0].matches(tensors):
        return cached[1]
    with torch.no_grad():
        proj = torch.mm(context, w_ih0[:, embed:].t())
    decoder.__dict__[_CTX_ATTR] = (_TableKey(tensors), proj)
    return proj


# The largest table encoder_table makes (bytes): beyond, a table would cost more memory than
# the input projections it replaces are worth.
_TABLE_MAX_BYTES = 64 << 20


class _TableKey:
    """What a value derived from ``tensors`` (a table, a projection) depends on: the tensors
    themselves (held, and compared by identity), their version counters, data pointers, shapes
    and dtypes, and their storages (held, so that no new storage can take a pointer's address:
    ``p.data = x`` keeps p's version counter)."""

    def __init__(self, tensors):
        self.tensors = tuple(tensors)
        self.state = _table_state(self.tensors)
        self.storages = tuple(t.untyped_storage() for t in self.tensors)

    def matches(self, tensors):
        return (len(tensors) == len(self.tensors)
                and all(a is b for a, b in zip(tensors, self.tensors))
                and _table_state(tensors) == self.state)


def _table_state(tensors):
    # strides too: `w.data = w.data.t()` keeps a square matrix's storage, shape and version
    return tuple(x for t in tensors
                 for x in (t._version, t.data_ptr(), t.shape, t.stride(), t.dtype))


def _table_weights(encoder, X, checked=False):
    """The encoder's (embedding weight, flat GRU weights) where :func:`encoder_table` applies,
    else None. ``checked``: the caller has made these tests but the table's size
    (``_fastcall.translation`` for ``predict_seq2seq``'s direct path)."""
    if checked:
        table_w = _fastcall.submodule(encoder, "embedding")._parameters["weight"]
        flat = _fastcall.flat_weights(_fastcall.submodule(encoder, "rnn"))
        return (table_w, flat) if _table_fits(table_w, flat[0]) else None
    if not (ops.direct_cpu_call_ok(X) and X.dim() == 2 and X.dtype == torch.int64
            and not encoder.__dict__["training"] and not torch.is_autocast_enabled("cpu")
            and not _fastcall.any_global_hook()):
        return None
    rnn = _fastcall.submodule(encoder, "rnn")
    emb = _fastcall.submodule(encoder, "embedding")
    if not (_plain_gru(rnn) and not rnn.training and _fastcall.plain_leaf(emb, nn.Embedding)
            and emb.max_norm is None and ops.get_backend() == "ext"):
        return None
    table_w, flat = emb.weight, _fastcall.flat_weights(rnn)
    if (any(t.is_inference() or not t.is_cpu or t.dtype not in (torch.float32, torch.float64)
            or t.dtype != table_w.dtype for t in (table_w, *flat))
            or not _table_fits(table_w, flat[0])):
        return None
    return table_w, flat


def _table_fits(embedding, w_ih0):
    """Whether the encoder's table (a row of ``w_ih0``'s rows per embedding row) is at most
    ``_TABLE_MAX_BYTES``."""
    return embedding.shape[0] * w_ih0.shape[0] * embedding.element_size() <= _TABLE_MAX_BYTES


def encoder_table(encoder, X, checked=False):
    """For CPU inference of this package's GRU encoder, the table ``embedding.weight @ W_ih0^T +
    b_ih0`` (vocab, 3*hidden): layer 0's input projection of every token, so that an encoder call
    gathers a row per token instead of multiplying its embedded input by W_ih0. None where it
    does not apply: grad mode, training mode, autocast, hooks, tracing, another device, dtype or
    layer than the plain ``nn.GRU`` and ``nn.Embedding``, or a table above ``_TABLE_MAX_BYTES``.

    The table is made once per set of weights (the same tensors, unmodified: version counters
    and storage) and cached on the encoder, as the decoder's table of its embedding's
    projections is (:func:`decoder_stepper`); every inference call with those weights reads it,
    so that the same input gives the same encoding bit for bit from call to call. Its rows are
    layer 0's projections to float32 rounding (a GEMM over the vocabulary instead of one over
    the call's tokens). ``checked``: as for :func:`_table_weights`."""
    weights = _table_weights(encoder, X, checked)
    if weights is None:
        return None
    table_w, (w_ih0, _, b_ih0, _) = weights[0], weights[1][:4]
    tensors = (table_w, w_ih0, b_ih0)
    cached = encoder.__dict__.get(_TABLE_ATTR)
    if cached is not None and cached[0].matches(tensors):
        return cached[1]
    table = torch.addmm(b_ih0, table_w, w_ih0.t())
    encoder.__dict__[_TABLE_ATTR] = (_TableKey(tensors), table)
    return table


# The largest batch whose bf16-weight encoding reads the bfloat16 matrices as they are (a
# matrix-vector product per row); larger batches multiply float32 copies of the rounded matrices
# by BLAS, the faster of the two from batch 8-16 on (encoder alone, embed and hidden 256, one
# thread, AMD EPYC: batch 1 225 against 285 us, 8 1.54 against 1.60 ms, 32 6.2 against 5.4 ms).
_BF16_ENCODER_MAX_BATCH = 8


def _bf16_encoder_weights(encoder, X, checked=False, batch=None):
    """(table, flat weights) of the encoder with its matrices rounded to bfloat16 (the table from
    the rounded embedding and W_ih0, in float32; the other matrices in bfloat16 for a batch of
    at most ``_BF16_ENCODER_MAX_BATCH`` rows of X, else float32 copies of their rounded values;
    the biases float32), made once per set of weights like :func:`encoder_table`'s; None where
    that does not apply or the weights are not float32. ``checked``: as for
    :func:`_table_weights` (X is then not read: ``batch`` gives its rows)."""
    weights = _table_weights(encoder, X, checked)
    if weights is None or weights[0].dtype != torch.float32:
        return None
    table_w, flat = weights
    tensors = (table_w, *flat)
    cached = encoder.__dict__.get(_TABLE_BF16_ATTR)
    if cached is None or not cached[0].matches(tensors):
        low = [w.to(torch.bfloat16) if w.dim() == 2 else w for w in flat]
        table = torch.addmm(flat[2], table_w.to(torch.bfloat16).float(), low[0].float().t())
        cached = (_TableKey(tensors), {"table": table, "bf16": low})
        encoder.__dict__[_TABLE_BF16_ATTR] = cached
    made = cached[1]
    if (X.shape[0] if batch is None else batch) <= _BF16_ENCODER_MAX_BATCH:
        return made["table"], made["bf16"]
    if "float32" not in made:
        made["float32"] = [w.float() for w in made["bf16"]]
    return made["table"], made["float32"]


def encode(encoder, X, valid_len, weight_dtype=None):
    """The encoder's result for decoding (grad mode off): ``encoder(X, valid_len)``. With
    ``weight_dtype=torch.bfloat16`` this package's GRU encoder, where it runs on the inference
    path of :func:`encoder_table` (and with no hook of its own), runs with its matrices rounded
    to bfloat16 (the embedding, every ``W_ih`` and ``W_hh``; biases, states and sums stay
    float32), as :meth:`Seq2SeqDecoder.greedy` decodes: the result is that of a copy whose
    matrices were rounded, computed from half the bytes. Other encoders run as they are."""
    if (bf16_weights_requested(weight_dtype) and isinstance(encoder, Seq2SeqEncoder)
            and _fastcall.own_forward(encoder, Seq2SeqEncoder.forward)
            and not (encoder._forward_hooks or encoder._forward_pre_hooks)):
        low = _bf16_encoder_weights(encoder, X)
        if low is not None:
            return _encode_over_table(_fastcall.submodule(encoder, "rnn"), X, *low)
    return encoder(X, valid_len)


def _encode_over_table(rnn, X, table, flat_weights):
    """The GRU encoder's (output, state) for the tokens X (batch, steps) from zero states, layer
    0's input projection read from ``table`` (one row per token); in one call of the compiled
    library (``csrc/gru_layer.h``), which ``predict_seq2seq``'s direct path runs too. Its callers
    have tested X and the weights (:func:`_table_weights`)."""
    return _C.encode_over_table_cpu(X, table, flat_weights, rnn.num_layers, rnn.hidden_size)


# the classes' own methods, as defined here: a fast path compares with them, so that a method
# patched on the class (mock.patch.object) makes it step aside
_FORWARD = Seq2SeqDecoder.forward
_GREEDY = Seq2SeqDecoder.greedy
_INIT_STATE = Seq2SeqDecoder.init_state
_ENCODER_FORWARD = Seq2SeqEncoder.forward


def _lstm_layers(rnn):
    """The LSTM decoder's layers over a sequence: the fused stack op when it applies, else the
    module (``nn.LSTM``), as a callable with ``nn.LSTM``'s signature; None for a GRU."""
    if not isinstance(rnn, nn.LSTM):
        return None

    def run(X, state):
        fused = (None if _fastcall.has_hooks(rnn) else
                 seq2seq_nn.fused_forward(rnn, X, state, torch_masks=True))
        return fused if fused is not None else rnn(X, state)
    return run


def _plain_gru(rnn):
    """An ``nn.GRU`` the fused paths can run in place of calling it (a hook on it makes the
    models call it, so that the hook runs; a parametrized one has another class)."""
    return (type(rnn) is torch.nn.GRU and rnn.bias and not rnn.bidirectional
            and not rnn.batch_first and not _fastcall.has_hooks(rnn))


def _int_of(value):
    """A one-element integer tensor as its number (greedy's arguments may come as such)."""
    if (isinstance(value, torch.Tensor) and value.numel() == 1
            and not (value.is_floating_point() or value.is_complex())):
        return value.item()
    return value


def _state_fits(rnn, state):
    """``state`` (an LSTM's h or c) has the shape ``rnn`` takes, (layers, batch, hidden)."""
    return state.dim() == 3 and state.shape[0] == rnn.num_layers and (
        state.shape[2] == rnn.hidden_size)


def _fused_layer_allowed(rnn, like):
    return (ops.get_backend() == "ext" and _plain_gru(rnn)
            and like.dtype in (torch.float32, torch.float64)
            and ops.has_kernel("gru_layer", like.device))


def fused_decoder_args(decoder):
    """The decoder's weights as the decode ops take them: ``(emb_proj, ctx_proj=None, flat RNN
    weights, dense weight, dense bias)`` (for a fixed-context decoder pass
    :func:`context_projection` of the context as ``ctx_proj`` instead of None).

    ``emb_proj = embedding.weight @ W_ih0[:, :embed]^T + b_ih0`` (tgt_vocab, gates*hidden) is layer
    0's input projection of every token, computed once per set of weights (see
    :func:`decoder_stepper`).
    """
    weights = _fastcall.flat_weights(_fastcall.submodule(decoder, "rnn"))
    if torch.compiler.is_compiling():
        # traced as torch ops (the C++ stepper is opaque to torch.compile)
        table = decoder.embedding.weight
        emb_proj = torch.nn.functional.linear(table, weights[0][:, :table.shape[1]], weights[2])
    else:
        emb_proj = decoder_stepper(decoder).emb_proj()
    dense = decoder.dense
    return (emb_proj, None, weights, dense.weight, dense.bias)


def decoder_stepper(decoder):
    """The decoder's :func:`seq2seq_ext.ops.decoder_stepper`, cached on the decoder (for a
    decoder that :func:`supports_fused_decoding`, or an LSTM decoder of this package)."""
    return _fastcall.bound_stepper(decoder)
