"""Prediction: the chapter's ``predict_seq2seq`` and a batched greedy translator, both on the
fused greedy decode op when the model is the chapter's GRU decoder (with either context rule),
and on a batched loop of fused decode steps for this package's LSTM decoder."""
import torch

from . import ops, reference
from .data import truncate_pad
from .models import (Seq2SeqDecoder, context_projection, decoder_stepper, fused_decoder_args,
                     supports_fused_decoding)

__all__ = ["predict_seq2seq", "predict_seq2seq_batch"]


def _encode_sources(sentences, src_vocab, num_steps, device):
    tokens = [src_vocab[s.lower().split(' ')] + [src_vocab['<eos>']] for s in sentences]
    valid_len = torch.tensor([len(t) for t in tokens], device=device)
    padded = [truncate_pad(t, num_steps, src_vocab['<pad>']) for t in tokens]
    return torch.tensor(padded, dtype=torch.long, device=device).reshape(len(sentences), -1), valid_len


def _eval(net):
    """``net.eval()``, as the chapter's prediction does, skipped when every module already is in
    evaluation mode (walking the module tree is cheaper than ``nn.Module.modules()``)."""
    todo = [net]
    while todo:
        m = todo.pop()
        if m.__dict__.get("training", False):
            net.eval()
            return
        todo.extend(c for c in m.__dict__.get("_modules", {}).values() if c is not None)


def _fused_greedy(net, sentences, src_vocab, tgt_vocab, num_steps, device):
    _eval(net)
    with torch.no_grad():
        enc_X, enc_valid_len = _encode_sources(sentences, src_vocab, num_steps, device)
        enc_outputs = net.encoder(enc_X, enc_valid_len)
        state = net.decoder.init_state(enc_outputs, enc_valid_len)
        ctx_proj = None
        if getattr(net.decoder, "fixed_context", False):
            state, context = state
            ctx_proj = context_projection(net.decoder, context)
        bos, eos = tgt_vocab['<bos>'], tgt_vocab['<eos>']
        if ops.direct_cpu_call_ok(state):
            # the bound weights' greedy loop (packed weights for a few sentences)
            tokens, lengths = decoder_stepper(net.decoder).greedy(state, ctx_proj, bos, eos,
                                                                  num_steps)
        else:
            emb_proj, _, weights, dense_w, dense_b = fused_decoder_args(net.decoder)
            tokens, lengths = ops.greedy_decode(state, emb_proj, ctx_proj, weights, dense_w,
                                                dense_b, bos, eos, num_steps)
    tokens, lengths = tokens.tolist(), lengths.tolist()
    return [' '.join(tgt_vocab.to_tokens(row[:n])) for row, n in zip(tokens, lengths)]


def _stepwise_greedy(net, sentences, src_vocab, tgt_vocab, num_steps, device):
    """Greedy decoding of a batch through one decoder call per step (the fused decode step for
    this package's decoders under the extension backend): every sentence's argmax is fed back,
    and a sentence's translation is its tokens before the first ``<eos>`` (at most num_steps),
    as in the chapter's loop. The loop ends early once every sentence has produced ``<eos>``."""
    _eval(net)
    bos, eos = tgt_vocab['<bos>'], tgt_vocab['<eos>']
    with torch.no_grad():
        enc_X, enc_valid_len = _encode_sources(sentences, src_vocab, num_steps, device)
        enc_outputs = net.encoder(enc_X, enc_valid_len)
        state = net.decoder.init_state(enc_outputs, enc_valid_len)
        dec_X = torch.full((len(sentences), 1), bos, dtype=torch.long, device=device)
        finished = torch.zeros(len(sentences), dtype=torch.bool, device=device)
        steps = []
        for _ in range(num_steps):
            Y, state = net.decoder(dec_X, state)
            dec_X = Y.argmax(dim=2)
            steps.append(dec_X[:, 0])
            finished |= dec_X[:, 0] == eos
            if bool(finished.all()):
                break
    rows = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in sentences]
    out = []
    for row in rows:
        n = row.index(eos) if eos in row else len(row)
        out.append(' '.join(tgt_vocab.to_tokens(row[:n])))
    return out


def _use_fused(net, save_attention_weights=False):
    return (ops.get_backend() == "ext" and not save_attention_weights
            and supports_fused_decoding(getattr(net, "decoder", None)))


def _use_stepwise(net, save_attention_weights=False):
    """This package's LSTM decoder under the extension backend: a batched loop of fused steps."""
    decoder = getattr(net, "decoder", None)
    return (ops.get_backend() == "ext" and not save_attention_weights
            and type(decoder).forward is Seq2SeqDecoder.forward
            and getattr(decoder, "cell", "gru") == "lstm")


def predict_seq2seq(net, src_sentence, src_vocab, tgt_vocab, num_steps, device,
                    save_attention_weights=False):
    """Predict for sequence to sequence (d2l's signature and output).

    Returns ``(translation, attention_weight_seq)``. For the chapter's GRU decoder (either
    context rule) under the extension backend the whole greedy loop runs in one op (no per-token
    host sync); for the package's LSTM decoder it runs one fused decode step per token; any other
    decoder, ``save_attention_weights=True`` or the reference backend run the chapter's loop.
    """
    if _use_stepwise(net, save_attention_weights):
        return _stepwise_greedy(net, [src_sentence], src_vocab, tgt_vocab, num_steps, device)[0], []
    if not _use_fused(net, save_attention_weights):
        return reference.predict_seq2seq(net, src_sentence, src_vocab, tgt_vocab, num_steps,
                                         device, save_attention_weights)
    return _fused_greedy(net, [src_sentence], src_vocab, tgt_vocab, num_steps, device)[0], []


def predict_seq2seq_batch(net, src_sentences, src_vocab, tgt_vocab, num_steps, device,
                          batch_size=1024):
    """Greedy translations of many sentences, batched: a list of strings, each equal to
    ``predict_seq2seq(net, sentence, ...)[0]``. Sentences are processed ``batch_size`` at a time;
    each stops at ``<eos>`` or ``num_steps``."""
    if isinstance(src_sentences, str):
        raise TypeError("src_sentences: expected a list of sentences, got one string")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive number, got {batch_size}")
    sentences = list(src_sentences)
    if _use_stepwise(net):
        out = []
        for i in range(0, len(sentences), batch_size):
            out += _stepwise_greedy(net, sentences[i:i + batch_size], src_vocab, tgt_vocab,
                                    num_steps, device)
        return out
    if not _use_fused(net):
        return [reference.predict_seq2seq(net, s, src_vocab, tgt_vocab, num_steps, device)[0]
                for s in sentences]
    out = []
    for i in range(0, len(sentences), batch_size):
        out += _fused_greedy(net, sentences[i:i + batch_size], src_vocab, tgt_vocab, num_steps,
                             device)
    return out
