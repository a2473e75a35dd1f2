"""Training with dropout converges the same through the drop-in layers: the seeds' per-step
teacher-forcing model (``seed_models``) with dropout between its recurrent layers, trained on the
built-in numbers corpus by plain PyTorch and through ``seq2seq_ext.accelerate``, from the same
initial weights and the same teacher-forcing coins, for several seeds.

The drop-in layers draw their dropout masks from another random stream than ``nn.LSTM`` /
``nn.GRU`` (seq2seq_ext.nn), so the two runs of one seed differ by as much as two seeds of plain
PyTorch do, and no more: the table prints the mean training loss per epoch of every run and,
at the last epoch, the spread between seeds beside the gap between plain and accelerated.
"""
import argparse
import copy
import random
import statistics

import torch

import seq2seq_ext
from seq2seq_ext.bench import seed_models
from seq2seq_ext.data.numbers import load_data_numbers


def curve(model, train_iter, bos, epochs, seed, lr):
    """Mean training loss per epoch of the seeds' loop over the numbers corpus."""
    torch.manual_seed(seed)
    coins = random.Random(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(epochs):
        total, n = 0.0, 0
        for X, _, Y, _ in train_iter:
            trg = torch.cat([torch.full((Y.shape[0], 1), bos, dtype=Y.dtype), Y], dim=1)
            total += seed_models.train_step(model, opt, X, trg, coins)
            n += 1
        losses.append(total / n)
    return losses


def run(cells=("lstm", "gru"), seeds=(0, 1, 2, 3), epochs=30, dropout=0.2, lr=5e-3, threads=1):
    """{(cell, variant, seed): losses per epoch} for variant in ("plain", "accelerated")."""
    torch.set_num_threads(threads)
    train_iter, src_vocab, tgt_vocab, _ = load_data_numbers(64, 10)
    bos = tgt_vocab['<bos>']
    out = {}
    for cell in cells:
        for seed in seeds:
            torch.manual_seed(seed)
            plain = seed_models.Seq2Seq(len(src_vocab), len(tgt_vocab), 32, 32, 2, dropout,
                                        cell=cell)
            accelerated = seq2seq_ext.accelerate(copy.deepcopy(plain))
            for name, model in (("plain", plain), ("accelerated", accelerated)):
                out[cell, name, seed] = curve(model, train_iter, bos, epochs, seed, lr)
    return out


def table(curves, every=5):
    """Markdown: the loss curves, then the last epoch's spread between seeds and variants."""
    keys = sorted(curves)
    epochs = len(next(iter(curves.values())))
    lines = ["| epoch | " + " | ".join(f"{c} {v} seed {s}" for c, v, s in keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    for e in list(range(0, epochs, every)) + ([epochs - 1] if (epochs - 1) % every else []):
        lines.append(f"| {e + 1} | " + " | ".join(f"{curves[k][e]:.3f}" for k in keys) + " |")
    lines += ["", "| cell | last loss, plain (mean over seeds) | accelerated | "
              "gap plain - accelerated | spread between plain seeds |", "|---|---|---|---|---|"]
    for cell in sorted({k[0] for k in keys}):
        seeds = sorted({k[2] for k in keys if k[0] == cell})
        last = {v: [curves[cell, v, s][-1] for s in seeds] for v in ("plain", "accelerated")}
        p, a = statistics.mean(last["plain"]), statistics.mean(last["accelerated"])
        spread = max(last["plain"]) - min(last["plain"])
        lines.append(f"| {cell} | {p:.3f} | {a:.3f} | {p - a:+.3f} | {spread:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    curves = run(seeds=tuple(args.seeds), epochs=args.epochs, dropout=args.dropout,
                 threads=args.threads)
    print(f"numbers corpus, seed model embed 32 / hidden 32 / 2 layers, dropout {args.dropout}, "
          f"teacher forcing 0.5, Adam 5e-3, batch 64; mean training loss per epoch\n")
    print(table(curves))
    return 0
