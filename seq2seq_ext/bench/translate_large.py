"""Translation one sentence at a time at a realistic size: ``predict_seq2seq`` over many
sentences (the chapter's loop on the reference against the package's fused greedy loop, with
the weights as they are and with ``weight_dtype=torch.bfloat16``, each with and without the int8
screen of the argmax where the CPU runs it), interleaved in one process.

At batch 1 every product is a matrix-vector product: each token reads every weight matrix of
the decoder once (the embedding and W_ih0's embedding columns excepted: they are a table
lookup), so time per token is bounded by the bytes of those matrices over the rate at which
they stream. The floor printed beside the times is that, for each variant at its own bytes an
entry (float32 or bfloat16 decoder matrices; with the screen, an output layer read as int8):
the decoder's matrix bytes per token over the read rate of a working set of that size, plus
the encoder's: each layer's W_hh at every step over the rate of a working set of one W_hh (the
encoder runs a layer over all its steps before the next: that matrix stays in cache from step
to step), its W_ih once for layers > 0 and a row of layer 0's table per step at the decoder's
rate (with bf16 weights the encoder's matrices are bf16 too). Each rate is that of a float32
reduction over as many bytes, measured in the same run (:func:`read_bandwidth`). (Where a
bfloat16 matrix-vector product is bound by its multiply-adds rather than by memory, as on CPUs
without bf16 instructions that widen each weight to float32 first, the bf16 floor is below
what the CPU can reach.) The variants' rounds are interleaved, their order reversed every other
round.
"""
import argparse
import statistics
import time

import torch

import seq2seq_ext as d2l
from seq2seq_ext import reference as R
from seq2seq_ext.bench import common


def read_bandwidth(nbytes, rounds=None):
    """Bytes per second of ``torch.sum`` over a float32 tensor of ``nbytes`` (the best of
    ``rounds``, by default more for a smaller tensor): the rate at which a working set of that
    size streams from wherever it stays."""
    x = torch.ones(max(1, int(nbytes) // 4))
    rounds = rounds or max(7, min(200, (32 << 20) // max(1, x.numel() * 4)))
    x.sum()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / min(times)


def token_bytes(net, elem, dense_elem=None):
    """Matrix bytes the decoder reads per token at ``elem`` bytes an entry: layer 0's context
    columns of W_ih, the other layers' W_ih, every W_hh and the output weight (at
    ``dense_elem`` bytes an entry when given: 1 for the int8 screen of the argmax, whose few
    candidate rows are not counted)."""
    dec = net.decoder.rnn
    entries = 0
    for layer in range(dec.num_layers):
        w_ih = getattr(dec, f"weight_ih_l{layer}")
        entries += w_ih[:, -dec.hidden_size:].numel() if layer == 0 else w_ih.numel()
        entries += getattr(dec, f"weight_hh_l{layer}").numel()
    dense = net.decoder.dense.weight.numel()
    return entries * elem + dense * (elem if dense_elem is None else dense_elem)


def sentence_bytes(net, steps, tokens, decoder_elem, dense_elem=None):
    """Matrix bytes one sentence reads: the encoder's W_hh at each of ``steps`` steps and its
    W_ih once for layers > 0, at ``decoder_elem`` bytes an entry as the decoder's (bf16 weights
    round both: ``models.encode``), and for layer 0 a float32 row of its table per step
    (``models.encoder_table``); then :func:`token_bytes` at each of ``tokens`` tokens."""
    enc = net.encoder.rnn
    enc_bytes = 0
    for layer in range(enc.num_layers):
        w_ih = getattr(enc, f"weight_ih_l{layer}")
        enc_bytes += (4 * steps * w_ih.shape[0] if layer == 0 else decoder_elem * w_ih.numel())
        enc_bytes += decoder_elem * steps * getattr(enc, f"weight_hh_l{layer}").numel()
    return enc_bytes + tokens * token_bytes(net, decoder_elem, dense_elem)


def encoder_recurrent_bytes(net, steps, elem):
    """The part of :func:`sentence_bytes` that is the encoder's W_hh at each of ``steps`` steps
    (every layer), and the bytes of its largest layer's W_hh, the working set those reads
    repeat."""
    enc = net.encoder.rnn
    sizes = [elem * getattr(enc, f"weight_hh_l{layer}").numel() for layer in range(enc.num_layers)]
    return steps * sum(sizes), max(sizes)


def sentence_floor(net, steps, tokens, decoder_elem, dense_elem=None, rate=None):
    """Seconds a sentence's matrix reads take at least: the encoder's recurrent reads
    (:func:`encoder_recurrent_bytes`) at the rate of one W_hh's working set, the rest of
    :func:`sentence_bytes` at the rate of a token's (:func:`token_bytes`). ``rate(nbytes)``:
    bytes per second for a working set of nbytes (default :func:`read_bandwidth`)."""
    rate = rate or read_bandwidth
    recurrent, w_hh = encoder_recurrent_bytes(net, steps, decoder_elem)
    rest = sentence_bytes(net, steps, tokens, decoder_elem, dense_elem) - recurrent
    return recurrent / rate(w_hh) + rest / rate(token_bytes(net, decoder_elem, dense_elem))


def without_screen(fn):
    """``fn`` run with the int8 screen of greedy decoding's argmax switched off
    (``ops.set_argmax_screen``)."""
    def run_it():
        d2l.ops.set_argmax_screen(False)
        try:
            return fn()
        finally:
            d2l.ops.set_argmax_screen(True)
    return run_it


def run(sentences=200, rounds=3, embed=256, hidden=256, layers=2, src_size=4000,
        tgt_size=3880, num_steps=10, threads=1):
    torch.set_num_threads(threads)
    src_vocab, tgt_vocab = common.toy_vocabs(src_size, tgt_size)
    net, ref = common.chapter_models(len(src_vocab), len(tgt_vocab), embed, hidden, layers)
    sents = common.sentences(sentences, src_vocab)

    def translate(mod, model, **kwargs):
        return [mod.predict_seq2seq(model, s, src_vocab, tgt_vocab, num_steps, "cpu",
                                    **kwargs)[0] for s in sents]

    f32 = lambda: translate(d2l, net)  # noqa: E731
    bf16 = lambda: translate(d2l, net, weight_dtype=torch.bfloat16)  # noqa: E731
    screen = d2l.ops.argmax_screen_usable()
    variants = {"reference": lambda: translate(R, ref), "package float32": f32}
    if screen:
        variants["package float32, no screen"] = without_screen(f32)
    variants["package bf16 weights"] = bf16
    if screen:
        variants["package bf16 weights, no screen"] = without_screen(bf16)
    outputs = {name: fn() for name, fn in variants.items()}  # warm-up, and the outputs
    assert outputs["package float32"] == outputs["reference"], "translations differ"
    for name in ("package float32", "package bf16 weights"):
        assert outputs.get(name + ", no screen", outputs[name]) == outputs[name], (
            "the screen changed a translation")
    same_bf16 = sum(a == b for a, b in zip(outputs["package bf16 weights"], outputs["reference"]))
    times = common.interleaved(variants, rounds, warmup=0)  # the outputs above were the warm-up
    rates = {}

    def rate(nbytes):
        if nbytes not in rates:
            rates[nbytes] = read_bandwidth(nbytes)
        return rates[nbytes]
    bandwidth = rate(token_bytes(net, 4))
    tokens = statistics.mean(len(o.split()) + 1 for o in outputs["reference"])
    tokens = min(tokens, num_steps)
    dense_elem = 1 if screen else None
    floors = {"package float32": (4, dense_elem), "package float32, no screen": (4, None),
              "package bf16 weights": (2, dense_elem), "package bf16 weights, no screen": (2, None)}
    floors = {name: sentence_floor(net, num_steps, tokens, elem, dense, rate)
              for name, (elem, dense) in floors.items() if name in variants}
    per_1000 = {name: t / sentences * 1000 for name, t in times.items()}
    return dict(per_1000=per_1000, floors=floors, bandwidth=bandwidth, rates=rates,
                tokens=tokens,
                same_bf16=same_bf16, sentences=sentences, screen=screen,
                config=dict(embed=embed, hidden=hidden, layers=layers,
                            src_vocab=len(src_vocab), tgt_vocab=len(tgt_vocab),
                            num_steps=num_steps, threads=threads))


def format_table(result):
    ref = result["per_1000"]["reference"]
    lines = ["| variant | s per 1,000 sentences | vs reference | floor (s per 1,000) | "
             "share of floor reached |", "|---|---|---|---|---|"]
    for name, t in result["per_1000"].items():
        floor = result["floors"].get(name)
        floor_cells = (f"{floor * 1000:.2f} | {floor * 1000 / t:.0%}" if floor is not None
                       else "- | -")
        lines.append(f"| {name} | {t:.2f} | {ref / t:.2f}x | {floor_cells} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    result = run(sentences=args.sentences, rounds=args.rounds, threads=args.threads)
    cfg = result["config"]
    print(f"embed {cfg['embed']}, hidden {cfg['hidden']}, {cfg['layers']} layers, vocabularies "
          f"{cfg['src_vocab']}/{cfg['tgt_vocab']}, {cfg['num_steps']} steps, "
          f"{result['tokens']:.1f} tokens a sentence, {cfg['threads']} thread(s); read rates "
          + ", ".join(f"{n / 2**20:.2f} MiB {r / 1e9:.1f} GB/s"
                      for n, r in sorted(result['rates'].items()))
          + f"; bf16 weights give the reference's translation "
          f"for {result['same_bf16']} of {result['sentences']} sentences; int8 screen of the "
          f"argmax: {'yes' if result['screen'] else 'no (neither AVX512-VNNI nor AVX2)'}")
    print(format_table(result))
    return 0
