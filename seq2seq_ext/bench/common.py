"""Shared set-up for the benchmarks: the cases, timed identically by compare.py and by the
pytest-benchmark suites."""
import os
import statistics
import time
from pathlib import Path

import torch

import seq2seq_ext as d2l
from seq2seq_ext import reference as R
from seq2seq_ext.data import Vocab, number_pairs

# the fra-eng corpus for the training cases: $SEQ2SEQ_EXT_DATA, else ../shared/data/fra-eng.txt
# beside the repository
FRA_ENG = Path(os.environ.get("SEQ2SEQ_EXT_DATA") or
               Path(__file__).resolve().parents[3] / "shared" / "data" / "fra-eng.txt")
CHAPTER_SENTENCES = ['go .', "i lost .", "he's calm .", "i'm home ."]
os.environ.setdefault("SEQ2SEQ_EXT_PLOT", "")  # benchmarks never write plots


def median_time(fn, repeat=7, number=1, warmup=1):
    """Median seconds per call of fn over `repeat` rounds of `number` calls, after warm-up."""
    for _ in range(warmup):
        fn()
    rounds = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        rounds.append((time.perf_counter() - t) / number)
    return statistics.median(rounds)


def interleaved(fns, repeat, warmup=1, number=1, sync=None):
    """Median seconds per call of each function of the dict ``fns``, their rounds interleaved
    so that all see the same machine state: on a shared 2-core machine the speed of the same
    code drifts over seconds, and timing one after the other would fold that drift into their
    ratios. The order reverses every other round: a function that runs after another finds in
    the caches what that one left there (the same inputs, the allocator's freed blocks), which
    made identical code time up to 1.2x faster second. Each round (warm-up rounds included) is
    ``number`` calls; ``sync`` (a device synchronisation) is called around each timed round."""
    for _ in range(warmup):
        for fn in fns.values():
            for _ in range(number):
                fn()
    rounds = {k: [] for k in fns}
    items = list(fns.items())
    for i in range(repeat):
        for k, fn in (items if i % 2 == 0 else items[::-1]):
            if sync is not None:
                sync()
            t = time.perf_counter()
            for _ in range(number):
                fn()
            if sync is not None:
                sync()
            rounds[k].append((time.perf_counter() - t) / number)
    return {k: statistics.median(v) for k, v in rounds.items()}


def paired_times(f_ref, f_ext, repeat=7, number=1, warmup=1):
    """Median seconds per call of f_ref and of f_ext (:func:`interleaved`: ref, ext, then ext,
    ref, ...), each round ``number`` calls."""
    t = interleaved({"ref": f_ref, "ext": f_ext}, repeat, warmup, number)
    return t["ref"], t["ext"]


def ce_inputs(batch, steps, vocab, seed=0, dtype=torch.float32):
    """The decoder's logits layout: a (steps, batch, vocab) tensor seen as (batch, steps, vocab)."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(steps, batch, vocab, generator=g, dtype=dtype).permute(1, 0, 2)
    pred.requires_grad_(True)
    label = torch.randint(0, vocab, (batch, steps), generator=g)
    valid_len = torch.randint(1, steps + 1, (batch,), generator=g)
    return pred, label, valid_len


def ce_fwd_bwd(loss_module):
    def run(pred, label, valid_len):
        pred.grad = None
        loss_module(pred, label, valid_len).sum().backward()
    return run


def toy_vocabs(src_size=184, tgt_size=201):
    """Vocabularies of the chapter's sizes built from number names (any words do)."""
    pairs = number_pairs(0, 1000)
    src = Vocab([s.split() for s, _ in pairs] + [[f"s{i}"] * 2 for i in range(src_size)],
                min_freq=2, reserved_tokens=['<pad>', '<bos>', '<eos>'])
    tgt = Vocab([t.split() for _, t in pairs] + [[f"t{i}"] * 2 for i in range(tgt_size)],
                min_freq=2, reserved_tokens=['<pad>', '<bos>', '<eos>'])
    return src, tgt


def chapter_models(src_vocab_size, tgt_vocab_size, embed=32, hidden=32, layers=2, seed=0):
    """(extension net, reference net) with identical weights, in eval mode."""
    torch.manual_seed(seed)
    net = d2l.EncoderDecoder(d2l.Seq2SeqEncoder(src_vocab_size, embed, hidden, layers, 0.1),
                             d2l.Seq2SeqDecoder(tgt_vocab_size, embed, hidden, layers, 0.1))
    ref = R.EncoderDecoder(R.Seq2SeqEncoder(src_vocab_size, embed, hidden, layers, 0.1),
                           R.Seq2SeqDecoder(tgt_vocab_size, embed, hidden, layers, 0.1))
    ref.load_state_dict(net.state_dict())
    net.eval()
    ref.eval()
    return net, ref


def sentences(n, src_vocab, seed=0):
    """n source sentences of 1 to 8 known words."""
    g = torch.Generator().manual_seed(seed)
    words = [w for w in src_vocab.idx_to_token if not w.startswith('<')]
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 9, (1,), generator=g))
        idx = torch.randint(0, len(words), (k,), generator=g).tolist()
        out.append(' '.join(words[i] for i in idx))
    return out
