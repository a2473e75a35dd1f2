"""Prediction: the chapter's ``predict_seq2seq`` and a batched greedy translator. For this
package's decoders they call the decoder's :meth:`~seq2seq_ext.Seq2SeqDecoder.greedy`, which
decodes on the path :func:`seq2seq_ext.models.decode_path` chooses (the fused greedy loop for
the GRU decoder, a batched loop of fused steps for the LSTM decoder); any other decoder (the
reference's, a user's subclass with its own ``forward``), the reference backend and
``save_attention_weights=True`` run the chapter's loop."""
import torch

from . import _fastcall, models, reference
from .data import truncate_pad
from .models import _check_int, _int_of, bf16_weights_requested, decode_path, encode

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


def _chapter_loop(net):
    """True when prediction runs the chapter's loop, one sentence at a time: the decoder's
    one-step calls in evaluation mode are plain PyTorch (``decode_path`` says ``"torch"``)."""
    _eval(net)
    with torch.no_grad():
        return decode_path(getattr(net, "decoder", None)) == "torch"


def _greedy(net, sentences, src_vocab, tgt_vocab, num_steps, device, weight_dtype=None):
    """The translations of a batch of sentences by the decoder's ``greedy``."""
    _eval(net)
    with torch.no_grad():
        enc_X, enc_valid_len = _encode_sources(sentences, src_vocab, num_steps, device)
        enc_outputs = encode(net.encoder, enc_X, enc_valid_len, weight_dtype)
        state = net.decoder.init_state(enc_outputs, enc_valid_len)
        # weight_dtype only when asked: a subclass's own greedy need not take it
        kwargs = {} if weight_dtype is None else {"weight_dtype": weight_dtype}
        tokens, lengths = net.decoder.greedy(state, tgt_vocab['<bos>'], tgt_vocab['<eos>'],
                                             num_steps, **kwargs)
    if tokens.shape[0] != len(sentences):  # the reference's loop fails on such a state
        raise ValueError(
            f"state: the decoder's greedy loop decoded {tokens.shape[0]} rows for "
            f"{len(sentences)} sentence(s): the encoder's state does not hold one row per "
            "sentence (expected (num_layers, batch, num_hiddens), time first)")
    tokens, lengths = tokens.tolist(), lengths.tolist()
    return [' '.join(tgt_vocab.to_tokens(row[:n])) for row, n in zip(tokens, lengths)]


def _translate_directly(net, sentence, src_vocab, tgt_vocab, num_steps, device, bf16):
    """:func:`predict_seq2seq`'s translation of the chapter's GRU model without the checks and
    module calls of its usual path, where that path would run the same kernels on the same
    tensors (:func:`seq2seq_ext._fastcall.translation` says when): the encoder over its table
    (:func:`~seq2seq_ext.models.encode`), the decoder's bound stepper for the greedy loop
    (:meth:`~seq2seq_ext.Seq2SeqDecoder.greedy`), both in one call of the compiled library
    (:func:`seq2seq_ext._fastcall.translate_ids`); so the same translation. None where it does
    not apply: :func:`predict_seq2seq` then takes its usual path. It saves the Python that
    tests those paths again for every sentence and the calls between the kernels: at the
    chapter's sizes ``predict_seq2seq`` of its 4 sentences takes 0.29-0.38 ms with it, 0.76-1.06
    ms without (one thread, an Intel Xeon; ``benchmarks/RESULTS.md``)."""
    if not (device == "cpu" or (isinstance(device, torch.device) and device.type == "cpu")):
        return None
    plan = _fastcall.translation(net, models)
    if plan is None:
        return None
    bos, eos = tgt_vocab['<bos>'], tgt_vocab['<eos>']
    if type(bos) is not int or type(eos) is not int or bos < 0:
        return None
    tokens = src_vocab[sentence.lower().split(' ')] + [src_vocab['<eos>']]
    src = truncate_pad(tokens, num_steps, src_vocab['<pad>'])
    # (checked: the plan has made the usual path's tests; neither reads the source's tensor)
    if bf16:
        weights = models._bf16_encoder_weights(plan.encoder, None, checked=True, batch=1)
    else:
        table = models.encoder_table(plan.encoder, None, checked=True)
        weights = None if table is None else (table, _fastcall.flat_weights(plan.encoder_rnn))
    if weights is None:
        return None
    ids = _fastcall.translate_ids(plan, src, weights, bos, eos, num_steps, bf16)
    return None if ids is None else ' '.join(tgt_vocab.to_tokens(ids))


def _bf16_or_none(weight_dtype):
    """:func:`bf16_weights_requested`, or None for a ``weight_dtype`` it refuses (the usual path
    raises for it, after the chapter's ``net.eval()``)."""
    try:
        return bf16_weights_requested(weight_dtype)
    except ValueError:
        return None


def _check_sentence(name, sentence):
    if not isinstance(sentence, str):
        raise TypeError(f"{name}: expected a string, got {type(sentence).__name__}")


def _check_weight_dtype(weight_dtype, chapter_loop):
    """ValueError (before anything runs) when bfloat16 weights are asked of a decoder that the
    chapter's loop decodes: that loop has no such mode."""
    if bf16_weights_requested(weight_dtype) and chapter_loop:
        raise ValueError(
            "weight_dtype: bfloat16 weights are decoded by this package's GRU decoder on the "
            "CPU under the extension backend; this model decodes with the chapter's loop")


def predict_seq2seq(net, src_sentence, src_vocab, tgt_vocab, num_steps, device,
                    save_attention_weights=False, *, weight_dtype=None):
    """Predict for sequence to sequence (d2l's signature and output).

    Returns ``(translation, attention_weight_seq)``. For this package's decoders under the
    extension backend the decoder's ``greedy`` does the work: for the GRU decoder (either context
    rule) the whole greedy loop runs in one call (no per-token host sync), for the LSTM decoder
    one fused decode step per token; any other decoder, ``save_attention_weights=True`` or the
    reference backend run the chapter's loop. ``weight_dtype=torch.bfloat16``: the model's
    weight matrices rounded to bfloat16 (the decoder's: :meth:`Seq2SeqDecoder.greedy`; this
    package's GRU encoder's: :func:`seq2seq_ext.models.encode`).
    """
    _check_sentence("src_sentence", src_sentence)
    num_steps = _check_int("num_steps", _int_of(num_steps))
    bf16 = None if save_attention_weights else _bf16_or_none(weight_dtype)
    if bf16 is not None:
        translation = _translate_directly(net, src_sentence, src_vocab, tgt_vocab, num_steps,
                                          device, bf16)
        if translation is not None:
            return translation, []
    chapter_loop = save_attention_weights or _chapter_loop(net)
    _check_weight_dtype(weight_dtype, chapter_loop)
    if chapter_loop:
        return reference.predict_seq2seq(net, src_sentence, src_vocab, tgt_vocab, num_steps,
                                         device, save_attention_weights)
    return _greedy(net, [src_sentence], src_vocab, tgt_vocab, num_steps, device,
                   weight_dtype)[0], []


def predict_seq2seq_batch(net, src_sentences, src_vocab, tgt_vocab, num_steps, device,
                          batch_size=1024, *, weight_dtype=None):
    """Greedy translations of many sentences, batched: a list of strings, each equal to
    ``predict_seq2seq(net, sentence, ...)[0]``. Sentences are processed ``batch_size`` at a time;
    each stops at ``<eos>`` or ``num_steps``. ``weight_dtype``: as for :func:`predict_seq2seq`."""
    if isinstance(src_sentences, str):
        raise TypeError("src_sentences: expected a list of sentences, got one string")
    num_steps = _check_int("num_steps", _int_of(num_steps))
    batch_size = _check_int("batch_size", _int_of(batch_size))
    sentences = list(src_sentences)
    for i, sentence in enumerate(sentences):
        _check_sentence(f"src_sentences[{i}]", sentence)
    chapter_loop = _chapter_loop(net)
    _check_weight_dtype(weight_dtype, chapter_loop)
    if chapter_loop:
        return [reference.predict_seq2seq(net, s, src_vocab, tgt_vocab, num_steps, device)[0]
                for s in sentences]
    out = []
    for i in range(0, len(sentences), batch_size):
        out += _greedy(net, sentences[i:i + batch_size], src_vocab, tgt_vocab, num_steps, device,
                       weight_dtype)
    return out
