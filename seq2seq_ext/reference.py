"""The pure-PyTorch reference: a faithful transcription of the d2l.ai seq2seq chapter's code.

This module is the parity oracle of the package and the ``backend="reference"`` path. It is kept
readable beside the chapter: same names, same statements, same numerics. Nothing here calls the
compiled library.
"""
import torch
from torch import nn

from .utils import Accumulator, Animator, Timer
from .data import truncate_pad
from .metrics import bleu  # pure Python, shared with the public API

__all__ = [
    "Encoder", "Decoder", "EncoderDecoder", "Seq2SeqEncoder", "Seq2SeqDecoder",
    "sequence_mask", "MaskedSoftmaxCELoss", "grad_clipping", "xavier_init_weights",
    "train_seq2seq", "predict_seq2seq", "bleu",
]


class Encoder(nn.Module):
    """The base encoder interface of the encoder-decoder architecture."""

    def __init__(self, **kwargs):
        super(Encoder, self).__init__(**kwargs)

    def forward(self, X, *args):
        raise NotImplementedError


class Decoder(nn.Module):
    """The base decoder interface of the encoder-decoder architecture."""

    def __init__(self, **kwargs):
        super(Decoder, self).__init__(**kwargs)

    def init_state(self, enc_outputs, *args):
        raise NotImplementedError

    def forward(self, X, state):
        raise NotImplementedError


class EncoderDecoder(nn.Module):
    """The base class of the encoder-decoder architecture."""

    def __init__(self, encoder, decoder, **kwargs):
        super(EncoderDecoder, self).__init__(**kwargs)
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, enc_X, dec_X, *args):
        enc_outputs = self.encoder(enc_X, *args)
        dec_state = self.decoder.init_state(enc_outputs, *args)
        return self.decoder(dec_X, dec_state)


class Seq2SeqEncoder(Encoder):
    """The RNN encoder for sequence to sequence learning."""

    def __init__(self, vocab_size, embed_size, num_hiddens, num_layers, dropout=0, **kwargs):
        super(Seq2SeqEncoder, self).__init__(**kwargs)
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.rnn = nn.GRU(embed_size, num_hiddens, num_layers, dropout=dropout)

    def forward(self, X, *args):
        # X: (batch_size, num_steps, embed_size) after the embedding
        X = self.embedding(X)
        # the first axis of an RNN's input is time
        X = X.permute(1, 0, 2)
        # no state given: it starts at zeros
        output, state = self.rnn(X)
        # output: (num_steps, batch_size, num_hiddens); state: (num_layers, batch_size, num_hiddens)
        return output, state


class Seq2SeqDecoder(Decoder):
    """The RNN decoder for sequence to sequence learning."""

    def __init__(self, vocab_size, embed_size, num_hiddens, num_layers, dropout=0, **kwargs):
        super(Seq2SeqDecoder, self).__init__(**kwargs)
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.rnn = nn.GRU(embed_size + num_hiddens, num_hiddens, num_layers, dropout=dropout)
        self.dense = nn.Linear(num_hiddens, vocab_size)

    def init_state(self, enc_outputs, *args):
        return enc_outputs[1]

    def forward(self, X, state):
        # X: (num_steps, batch_size, embed_size) after the embedding and permute
        X = self.embedding(X).permute(1, 0, 2)
        # broadcast the context so that it has num_steps like X
        context = state[-1].repeat(X.shape[0], 1, 1)
        X_and_context = torch.cat((X, context), 2)
        output, state = self.rnn(X_and_context, state)
        output = self.dense(output).permute(1, 0, 2)
        # output: (batch_size, num_steps, vocab_size); state: (num_layers, batch_size, num_hiddens)
        return output, state


def sequence_mask(X, valid_len, value=0):
    """Mask irrelevant entries in sequences (writes into X and returns it)."""
    maxlen = X.size(1)
    mask = torch.arange((maxlen), dtype=torch.float32,
                        device=X.device)[None, :] < valid_len[:, None]
    X[~mask] = value
    return X


class MaskedSoftmaxCELoss(nn.CrossEntropyLoss):
    """The softmax cross-entropy loss with masks."""
    # pred: (batch_size, num_steps, vocab_size); label: (batch_size, num_steps);
    # valid_len: (batch_size,)

    def forward(self, pred, label, valid_len):
        weights = torch.ones_like(label)
        weights = sequence_mask(weights, valid_len)
        self.reduction = 'none'
        unweighted_loss = super(MaskedSoftmaxCELoss, self).forward(
            pred.permute(0, 2, 1), label)
        weighted_loss = (unweighted_loss * weights).mean(dim=1)
        return weighted_loss


def grad_clipping(net, theta):
    """Clip the gradient (d2l's global L2-norm rule)."""
    if isinstance(net, nn.Module):
        params = [p for p in net.parameters() if p.requires_grad]
    else:
        params = net.params
    norm = torch.sqrt(sum(torch.sum((p.grad ** 2)) for p in params))
    if norm > theta:
        for param in params:
            param.grad[:] *= theta / norm


def xavier_init_weights(m):
    """The chapter's initialisation: Xavier-uniform for Linear weights and GRU weight matrices."""
    if type(m) == nn.Linear:
        nn.init.xavier_uniform_(m.weight)
    if type(m) == nn.GRU:
        for param in m._flat_weights_names:
            if "weight" in param:
                nn.init.xavier_uniform_(m._parameters[param])


def train_seq2seq(net, data_iter, lr, num_epochs, tgt_vocab, device):
    """Train a model for sequence to sequence."""
    net.apply(xavier_init_weights)
    net.to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    loss = MaskedSoftmaxCELoss()
    net.train()
    animator = Animator(xlabel='epoch', ylabel='loss', xlim=[10, num_epochs])
    for epoch in range(num_epochs):
        timer = Timer()
        metric = Accumulator(2)  # sum of training loss, number of tokens
        for batch in data_iter:
            optimizer.zero_grad()
            X, X_valid_len, Y, Y_valid_len = [x.to(device) for x in batch]
            bos = torch.tensor([tgt_vocab['<bos>']] * Y.shape[0], device=device).reshape(-1, 1)
            dec_input = torch.cat([bos, Y[:, :-1]], 1)  # teacher forcing
            Y_hat, _ = net(X, dec_input, X_valid_len)
            l = loss(Y_hat, Y, Y_valid_len)
            l.sum().backward()  # backpropagate the scalar loss
            grad_clipping(net, 1)
            num_tokens = Y_valid_len.sum()
            optimizer.step()
            with torch.no_grad():
                metric.add(l.sum(), num_tokens)
        if (epoch + 1) % 10 == 0:
            animator.add(epoch + 1, (metric[0] / metric[1],))
    print(f'loss {metric[0] / metric[1]:.3f}, {metric[1] / timer.stop():.1f} '
          f'tokens/sec on {str(device)}')


def predict_seq2seq(net, src_sentence, src_vocab, tgt_vocab, num_steps,
                    device, save_attention_weights=False):
    """Predict for sequence to sequence."""
    # evaluation mode for prediction
    net.eval()
    src_tokens = src_vocab[src_sentence.lower().split(' ')] + [src_vocab['<eos>']]
    enc_valid_len = torch.tensor([len(src_tokens)], device=device)
    src_tokens = truncate_pad(src_tokens, num_steps, src_vocab['<pad>'])
    # add the batch axis
    enc_X = torch.unsqueeze(torch.tensor(src_tokens, dtype=torch.long, device=device), dim=0)
    enc_outputs = net.encoder(enc_X, enc_valid_len)
    dec_state = net.decoder.init_state(enc_outputs, enc_valid_len)
    # add the batch axis
    dec_X = torch.unsqueeze(torch.tensor([tgt_vocab['<bos>']], dtype=torch.long, device=device),
                            dim=0)
    output_seq, attention_weight_seq = [], []
    for _ in range(num_steps):
        Y, dec_state = net.decoder(dec_X, dec_state)
        # the most likely token is the decoder's input at the next step
        dec_X = Y.argmax(dim=2)
        pred = dec_X.squeeze(dim=0).type(torch.int32).item()
        # save the attention weights (used by attention decoders)
        if save_attention_weights:
            attention_weight_seq.append(net.decoder.attention_weights)
        # generation ends once the end-of-sequence token is predicted
        if pred == tgt_vocab['<eos>']:
            break
        output_seq.append(pred)
    return ' '.join(tgt_vocab.to_tokens(output_seq)), attention_weight_seq


# ----------------------------------------------------------------------------------------------
# Variants beyond the chapter's code: LSTM cells and the fixed-context decoder
# ----------------------------------------------------------------------------------------------
# The chapter's decoder concatenates ``state[-1]`` to every input. In training (one call over the
# whole teacher-forced sequence) that is the encoder's final top-layer state; at prediction, one
# call per token, it is the decoder's own state from the previous step, so training and inference
# see different contexts (the defect described at the end of the chapter's prediction section).
# ``fixed_context=True`` keeps the encoder's final top-layer hidden state beside the recurrent
# state and concatenates it at every step. With LSTM cells the recurrent state is nn.LSTM's
# ``(h, c)`` and the context is a hidden state (``h[-1]``), never a cell state.
#
# State formats (other code relies on them):
#   GRU,  fixed_context=False: Tensor (layers, batch, hidden); context = state[-1]
#   LSTM, fixed_context=False: tuple (h, c), each (layers, batch, hidden); context = h[-1]
#   fixed_context=True: tuple (rnn_state, context), rnn_state as above, context (batch, hidden)
# Every tensor of a state is (layers, batch, hidden) or (batch, hidden).

CELLS = ("gru", "lstm")


def check_cell(cell):
    """``cell`` validated: ``"gru"`` or ``"lstm"`` (ValueError naming ``cell`` otherwise)."""
    if not isinstance(cell, str) or cell not in CELLS:
        raise ValueError(f"cell: expected one of {CELLS}, got {cell!r}")
    return cell


def make_rnn(cell, input_size, num_hiddens, num_layers, dropout=0):
    """``nn.GRU`` or ``nn.LSTM`` (time first, unidirectional, with biases)."""
    if check_cell(cell) == "lstm":
        return nn.LSTM(input_size, num_hiddens, num_layers, dropout=dropout)
    return nn.GRU(input_size, num_hiddens, num_layers, dropout=dropout)


def top_hidden_state(rnn_state):
    """The top layer's hidden state (batch, hidden) of a GRU state or an LSTM ``(h, c)``."""
    if isinstance(rnn_state, (tuple, list)):
        return rnn_state[0][-1]
    return rnn_state[-1]


def check_rnn_state(rnn_state, cell, name="state"):
    """Raises TypeError (naming ``name``) unless ``rnn_state`` has the format of ``cell``."""
    if cell == "lstm":
        if not (isinstance(rnn_state, (tuple, list)) and len(rnn_state) == 2
                and all(isinstance(t, torch.Tensor) for t in rnn_state)):
            raise TypeError(f"{name}: an LSTM decoder expects nn.LSTM's state, a pair of tensors "
                            f"(h, c), got {type(rnn_state).__name__}")
    elif not isinstance(rnn_state, torch.Tensor):
        raise TypeError(f"{name}: a GRU decoder expects nn.GRU's state, a tensor (layers, batch, "
                        f"hidden), got {type(rnn_state).__name__}")
    return rnn_state


def variant_init_state(enc_outputs, cell="gru", fixed_context=False):
    """The decoder state from the encoder's ``(output, state)``: the encoder's final state, and
    with ``fixed_context`` the pair ``(state, context)`` with context its top-layer hidden state."""
    rnn_state = check_rnn_state(enc_outputs[1], cell, "enc_outputs")
    if fixed_context:
        return rnn_state, top_hidden_state(rnn_state)
    return rnn_state


def variant_decoder_forward(decoder, X, state, fixed_context=False, rnn=None):
    """The chapter's decoder forward for either cell and either context rule, in plain PyTorch:
    embedding, ``repeat`` of the context over the steps, ``cat``, the RNN, ``dense``. ``rnn``
    (a callable with ``nn.LSTM``'s signature) stands in for ``decoder.rnn`` when given."""
    # X: (num_steps, batch_size, embed_size) after the embedding and permute
    X = decoder.embedding(X).permute(1, 0, 2)
    if fixed_context:
        rnn_state, context = state
    else:
        rnn_state, context = state, top_hidden_state(state)
    context_steps = context.repeat(X.shape[0], 1, 1)
    X_and_context = torch.cat((X, context_steps), 2)
    output, rnn_state = (rnn or decoder.rnn)(X_and_context, rnn_state)
    output = decoder.dense(output).permute(1, 0, 2)
    if fixed_context:
        return output, (rnn_state, context)
    return output, rnn_state


class VariantSeq2SeqEncoder(Encoder):
    """The chapter's RNN encoder with a choice of cell: ``"gru"`` (the chapter's) or ``"lstm"``,
    whose forward returns ``(output, (h_n, c_n))``."""

    def __init__(self, vocab_size, embed_size, num_hiddens, num_layers, dropout=0, cell="gru",
                 **kwargs):
        super(VariantSeq2SeqEncoder, self).__init__(**kwargs)
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.rnn = make_rnn(cell, embed_size, num_hiddens, num_layers, dropout)

    def forward(self, X, *args):
        X = self.embedding(X).permute(1, 0, 2)
        output, state = self.rnn(X)
        return output, state


class VariantSeq2SeqDecoder(Decoder):
    """The chapter's RNN decoder with a choice of cell and of context rule (see the state formats
    above); ``cell="gru", fixed_context=False`` is the chapter's decoder."""

    def __init__(self, vocab_size, embed_size, num_hiddens, num_layers, dropout=0, cell="gru",
                 fixed_context=False, **kwargs):
        super(VariantSeq2SeqDecoder, self).__init__(**kwargs)
        self.embedding = nn.Embedding(vocab_size, embed_size)
        self.rnn = make_rnn(cell, embed_size + num_hiddens, num_hiddens, num_layers, dropout)
        self.dense = nn.Linear(num_hiddens, vocab_size)
        self.cell, self.fixed_context = check_cell(cell), bool(fixed_context)

    def init_state(self, enc_outputs, *args):
        return variant_init_state(enc_outputs, self.cell, self.fixed_context)

    def forward(self, X, state):
        return variant_decoder_forward(self, X, state, self.fixed_context)


def lstm_decode_step(token, h, c, emb_proj, ctx_proj, weights, dense_weight, dense_bias):
    """``seq2seq_ext::lstm_decode_step`` in plain PyTorch: one step of an LSTM decoder for all
    layers and the output projection (nn.LSTM's equations, gate order i, f, g, o).

    token (batch,) or (batch, 1); h, c (layers, batch, hidden); emb_proj (tgt_vocab, 4*hidden) =
    embedding @ W_ih0[:, :embed]^T + b_ih0; ctx_proj (batch, 4*hidden) for a fixed context or None
    for the context h[-1]; weights: nn.LSTM's flat weights. Returns (logits, h', c')."""
    hidden = h.shape[-1]
    gates_in = emb_proj[token.reshape(-1).long()]
    if ctx_proj is None:
        w_ih0 = weights[0]
        ctx_proj = h[-1] @ w_ih0[:, w_ih0.shape[1] - hidden:].t()
    x = None
    hs, cs = [], []
    for layer in range(h.shape[0]):
        w_ih, w_hh, b_ih, b_hh = weights[4 * layer: 4 * layer + 4]
        gi = gates_in + ctx_proj if layer == 0 else x @ w_ih.t() + b_ih
        i, f, g, o = (gi + (h[layer] @ w_hh.t() + b_hh)).chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c[layer] + torch.sigmoid(i) * torch.tanh(g)
        x = torch.sigmoid(o) * torch.tanh(c_new)
        hs.append(x)
        cs.append(c_new)
    logits = x @ dense_weight.t() + dense_bias
    return logits.reshape(*token.shape, dense_weight.shape[0]), torch.stack(hs), torch.stack(cs)


__all__ += ["CELLS", "check_cell", "make_rnn", "top_hidden_state", "check_rnn_state",
            "variant_init_state", "variant_decoder_forward", "VariantSeq2SeqEncoder",
            "VariantSeq2SeqDecoder", "lstm_decode_step"]


def _to_bf16_values(t):
    return t.to(torch.bfloat16).to(t.dtype)


class _Bf16Weight(torch.autograd.Function):
    """The identity whose backward rounds the gradient to bfloat16: a weight matrix under CPU
    autocast, whose gradient (summed over all its products first) is a bf16 weight's. (Both
    functions here keep forward and setup_context apart, so that torch.func can differentiate
    them: rnn_stack's create_graph backward runs them under torch.func.vjp.)"""

    @staticmethod
    def forward(w):
        return w.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return _to_bf16_values(grad)


class _Bf16Linear(torch.autograd.Function):
    """``linear(x, w, b)`` with bfloat16 operands and sums in x's dtype, forward and backward:
    rnn_stack's products under CPU autocast. Backward: the incoming gradient rounded to bf16
    before both products, their results not."""

    @staticmethod
    def forward(x, w, b):
        return torch.nn.functional.linear(_to_bf16_values(x), _to_bf16_values(w), b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, b = inputs
        ctx.save_for_backward(_to_bf16_values(x), _to_bf16_values(w))
        ctx.has_bias = b is not None

    @staticmethod
    def backward(ctx, grad):
        x_low, w_low = ctx.saved_tensors
        g_low = _to_bf16_values(grad)
        grad_b = grad.sum(0) if ctx.has_bias else None
        return g_low @ w_low, g_low.t() @ x_low, grad_b


def rnn_stack(cell, input, h0, c0, weights, dropout_mask=None, batch_sizes=None,
              product_dtype=None):
    """``seq2seq_ext::rnn_stack`` in plain PyTorch: nn.GRU's (gate order r, z, n; b_hn inside
    the reset product) or nn.LSTM's (i, f, g, o) equations over the layers and steps.

    input (steps, batch, in); h0, c0 (layers, batch, hidden) (c0 None for the GRU); weights:
    [w_ih, w_hh, b_ih, b_hh] per layer, or [w_ih, w_hh] without biases; dropout_mask (layers - 1,
    steps, batch, hidden) multiplies each layer's output but the top one's before the next layer
    reads it. Returns (output (steps, batch, hidden), h_n, c_n (None for the GRU)).

    Packed (``batch_sizes``, non-increasing): input (N, in) holds the first ``batch_sizes[t]``
    rows of step t, step after step; output (N, hidden) and dropout_mask (layers - 1, N, hidden)
    likewise, and h_n / c_n are each row's state after its last step.

    ``product_dtype=torch.bfloat16``: the op under CPU autocast to bfloat16, every product's
    operands rounded to bfloat16 and the sums in the input's dtype, forward and backward (see
    :class:`_Bf16Linear`)."""
    check_cell(cell)
    linear, weight = _product_rule(product_dtype)
    layers = h0.shape[0]
    per = len(weights) // layers
    dense = batch_sizes is None
    if dense:
        batch_sizes = [h0.shape[1]] * input.shape[0]
        input = input.reshape(-1, input.shape[-1])
        if dropout_mask is not None:
            dropout_mask = dropout_mask.reshape(layers - 1, -1, h0.shape[2])
    x = input
    hs, cs = [], []
    for layer in range(layers):
        w = weights[per * layer: per * layer + per]
        w_ih, w_hh = weight(w[0]), weight(w[1])
        b_ih, b_hh = (w[2], w[3]) if per == 4 else (None, None)
        h = h0[layer]
        c = c0[layer] if cell == "lstm" else None
        outs, start = [], 0
        for n in batch_sizes:
            gi = linear(x[start:start + n], w_ih, b_ih)
            start += n
            gh = linear(h[:n], w_hh, b_hh)
            if cell == "gru":
                i_r, i_z, i_n = gi.chunk(3, dim=1)
                h_r, h_z, h_n = gh.chunk(3, dim=1)
                r = torch.sigmoid(i_r + h_r)
                z = torch.sigmoid(i_z + h_z)
                n_ = torch.tanh(i_n + r * h_n)
                new_h = (1 - z) * n_ + z * h[:n]
            else:
                i, f, g, o = (gi + gh).chunk(4, dim=1)
                new_c = torch.sigmoid(f) * c[:n] + torch.sigmoid(i) * torch.tanh(g)
                new_h = torch.sigmoid(o) * torch.tanh(new_c)
                c = torch.cat((new_c, c[n:]))
            h = torch.cat((new_h, h[n:]))
            outs.append(new_h)
        hs.append(h)
        cs.append(c)
        x = torch.cat(outs) if outs else x.new_empty((0, h.shape[1]))
        if dropout_mask is not None and layer < layers - 1:
            x = x * dropout_mask[layer]
    c_n = torch.stack(cs) if cell == "lstm" else None
    if dense:
        x = x.reshape(len(batch_sizes), h0.shape[1], h0.shape[2])
    return x, torch.stack(hs), c_n


__all__ += ["rnn_stack"]


def _product_rule(product_dtype):
    """(linear, weight) of the products of a layer: plain, or ``product_dtype=torch.bfloat16``'s
    bf16 operands with float32 sums and a bf16 gradient for each weight matrix."""
    if product_dtype is None:
        return torch.nn.functional.linear, lambda w: w
    if product_dtype != torch.bfloat16:
        raise ValueError(f"product_dtype: expected None or torch.bfloat16, got {product_dtype}")
    return _Bf16Linear.apply, _Bf16Weight.apply


def gru_layer(input, h0, w_ih, w_hh, b_ih, b_hh, extra=None, batch_sizes=None,
              product_dtype=None):
    """``seq2seq_ext::gru_layer`` in plain PyTorch: one layer of nn.GRU's equations; ``extra``
    (batch, 3 * hidden) is added to the input projection at every step.

    Dense: input (steps, batch, in) -> (output (steps, batch, hidden), h_n (batch, hidden)).
    Packed (``batch_sizes``, non-increasing): input (N, in) holds the first ``batch_sizes[t]``
    rows of step t, step after step; the output (N, hidden) likewise, and h_n is each row's
    state after its last step (h0's row for a row in no step).

    ``product_dtype=torch.bfloat16``: the op under CPU autocast to bfloat16, as in
    :func:`rnn_stack`."""
    linear, weight = _product_rule(product_dtype)
    w_ih, w_hh = weight(w_ih), weight(w_hh)
    if batch_sizes is None:
        batch_sizes = [input.shape[1]] * input.shape[0]
        input = input.reshape(-1, input.shape[-1])
        dense = True
    else:
        dense = False
    h = h0
    outs, start = [], 0
    for n in batch_sizes:
        x = input[start:start + n]
        start += n
        gi = linear(x, w_ih, b_ih)
        if extra is not None:
            gi = gi + extra[:n]
        gh = linear(h[:n], w_hh, b_hh)
        i_r, i_z, i_n = gi.chunk(3, dim=1)
        h_r, h_z, h_n = gh.chunk(3, dim=1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        new = (1 - z) * torch.tanh(i_n + r * h_n) + z * h[:n]
        outs.append(new)
        h = torch.cat((new, h[n:]))
    output = torch.cat(outs) if outs else input.new_empty((0, h0.shape[1]))
    if dense:
        output = output.reshape(len(batch_sizes), h0.shape[0], h0.shape[1])
    return output, h


__all__ += ["gru_layer"]
