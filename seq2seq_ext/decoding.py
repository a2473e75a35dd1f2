"""Prediction: the chapter's ``predict_seq2seq`` and a batched greedy translator, both on the
fused greedy decode op when the model is the chapter's GRU decoder."""
import torch

from . import ops, reference
from .data import truncate_pad
from .models import fused_decoder_args, supports_fused_decoding

__all__ = ["predict_seq2seq", "predict_seq2seq_batch"]


def _encode_sources(sentences, src_vocab, num_steps, device):
    tokens = [src_vocab[s.lower().split(' ')] + [src_vocab['<eos>']] for s in sentences]
    valid_len = torch.tensor([len(t) for t in tokens], device=device)
    padded = [truncate_pad(t, num_steps, src_vocab['<pad>']) for t in tokens]
    return torch.tensor(padded, dtype=torch.long, device=device).reshape(len(sentences), -1), valid_len


def _fused_greedy(net, sentences, src_vocab, tgt_vocab, num_steps, device):
    if any(m.training for m in net.modules()):
        net.eval()
    with torch.no_grad():
        enc_X, enc_valid_len = _encode_sources(sentences, src_vocab, num_steps, device)
        enc_outputs = net.encoder(enc_X, enc_valid_len)
        state = net.decoder.init_state(enc_outputs, enc_valid_len)
        tokens, lengths = ops.greedy_decode(state, *fused_decoder_args(net.decoder),
                                            tgt_vocab['<bos>'], tgt_vocab['<eos>'], num_steps)
    tokens, lengths = tokens.tolist(), lengths.tolist()
    return [' '.join(tgt_vocab.to_tokens(row[:n])) for row, n in zip(tokens, lengths)]


def _use_fused(net, save_attention_weights=False):
    return (ops.get_backend() == "ext" and not save_attention_weights
            and supports_fused_decoding(getattr(net, "decoder", None)))


def predict_seq2seq(net, src_sentence, src_vocab, tgt_vocab, num_steps, device,
                    save_attention_weights=False):
    """Predict for sequence to sequence (d2l's signature and output).

    Returns ``(translation, attention_weight_seq)``. For the chapter's GRU decoder under the
    extension backend the whole greedy loop runs in one op (no per-token host sync); any other
    decoder, ``save_attention_weights=True`` or the reference backend run the chapter's loop.
    """
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
    if not _use_fused(net):
        return [reference.predict_seq2seq(net, s, src_vocab, tgt_vocab, num_steps, device)[0]
                for s in sentences]
    out = []
    for i in range(0, len(sentences), batch_size):
        out += _fused_greedy(net, sentences[i:i + batch_size], src_vocab, tgt_vocab, num_steps,
                             device)
    return out
