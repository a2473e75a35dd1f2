"""The chapter's encoder and decoder, with the same parameters as the reference, routed through
``seq2seq_ext.ops`` under the extension backend.

The classes subclass the reference ones, so ``state_dict()`` keys and shapes are identical and
weights load both ways; ``isinstance`` checks against the reference classes hold.
"""
import torch

from . import ops, reference
from .reference import Decoder, Encoder, EncoderDecoder

__all__ = ["Encoder", "Decoder", "EncoderDecoder", "Seq2SeqEncoder", "Seq2SeqDecoder",
           "fused_decoder_args", "supports_fused_decoding", "decoder_stepper"]

_STEPPER_ATTR = "_seq2seq_ext_stepper"
_FLOATS = (torch.float32, torch.float64)


class Seq2SeqEncoder(reference.Seq2SeqEncoder):
    """The RNN encoder for sequence to sequence learning (d2l's ``Seq2SeqEncoder``).

    Under the extension backend the GRU runs as the fused layer op (forward and backward),
    with ``nn.GRU``'s parameters, equations and inter-layer dropout.
    """

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

    Under the extension backend a one-step call (``X`` of shape (batch, 1)) that needs no
    gradient runs as one fused op for all layers and the output projection.

    Multi-step calls and calls that need gradients run the GRU as the fused layer op. The
    context is the same vector at every step, so its share of layer 0's input projection,
    ``context @ W_ih0[:, embed:]^T``, is computed once per sequence and added at each step instead
    of repeating the context ``steps`` times and concatenating it to the embeddings.
    """

    def forward(self, X, state):
        if X.dim() == 2 and X.shape[1] == 1:
            # the common inference case first, with the checks that the cached stepper implies
            cached = self.__dict__.get(_STEPPER_ATTR)
            if (cached is not None and cached[0] == _generation[0] and not self.training
                    and state.dtype in _FLOATS and ops.get_backend() == "ext"
                    and ops.direct_cpu_call_ok(state)):
                return cached[1].step(X, state)
            if _fused_step_allowed(self, state):
                if ops.direct_cpu_call_ok(state):
                    return decoder_stepper(self).step(X, state)
                return ops.gru_decode_step(X, state, *fused_decoder_args(self))
        rnn = self._modules["rnn"]
        if not _fused_layer_allowed(rnn, state):
            return super().forward(X, state)
        X = self.embedding(X).permute(1, 0, 2)
        w_ih0 = rnn._flat_weights[0]
        embed = X.shape[-1]
        extra = torch.mm(state[-1], w_ih0[:, embed:].t())
        output, state = ops.gru(X, state, rnn._flat_weights, rnn.dropout, self.training,
                                w_ih0=w_ih0[:, :embed], extra0=extra)
        output = self.dense(output).permute(1, 0, 2)
        return output, state

    def _apply(self, fn, *args, **kwargs):
        # .to(), .double(), .cuda() may swap parameter tensors: drop the bound weights
        self.__dict__.pop(_STEPPER_ATTR, None)
        return super()._apply(fn, *args, **kwargs)


def supports_fused_decoding(decoder):
    """True when ``decoder`` computes exactly the chapter's ``Seq2SeqDecoder.forward`` with a
    plain GRU, so that the fused decode ops can stand in for it."""
    if not isinstance(decoder, reference.Seq2SeqDecoder):
        return False
    if type(decoder).forward not in (reference.Seq2SeqDecoder.forward, Seq2SeqDecoder.forward):
        return False
    return _plain_gru(decoder._modules["rnn"])


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
    """The decoder's weights as the decode ops take them: ``(emb_proj, ctx_proj=None, flat GRU
    weights, dense weight, dense bias)``.

    ``emb_proj = embedding.weight @ W_ih0[:, :embed]^T + b_ih0`` (tgt_vocab, 3*hidden) is layer
    0's input projection of every token, computed once per set of weights (see
    :func:`decoder_stepper`).
    """
    mods = decoder._modules
    dense = mods["dense"]._parameters
    return (decoder_stepper(decoder).emb_proj(), None, mods["rnn"]._flat_weights,
            dense["weight"], dense["bias"])


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
    """The decoder's :func:`seq2seq_ext.ops.decoder_stepper`, cached on the decoder (only for a
    decoder that :func:`supports_fused_decoding`)."""
    cached = decoder.__dict__.get(_STEPPER_ATTR)
    if cached is not None and cached[0] == _generation[0]:
        return cached[1]
    mods = decoder._modules
    dense = mods["dense"]._parameters
    stepper = ops.decoder_stepper(mods["embedding"]._parameters["weight"],
                                  mods["rnn"]._flat_weights, dense["weight"], dense["bias"])
    decoder.__dict__[_STEPPER_ATTR] = (_generation[0], stepper)
    return stepper
