"""bf16 training converges as float32 does: the package's chapter model (``cell="gru"`` and
``cell="lstm"``) trained by ``fit`` on the built-in numbers corpus (or on the first pairs of
fra-eng, ``--dataset fra-eng``) with ``amp=None`` and ``amp="bf16"`` from the same initial
weights, for several seeds; the mean training loss per epoch of every run, and the held-out corpus
BLEU (greedy, float32 weights) at the end.

Under ``amp="bf16"`` the output projection and the loss's input are bf16, and the recurrent
layers (``gru_layer`` / ``rnn_stack``) run bf16 products with float32 states.
"""
import argparse
import dataclasses
import statistics

import torch

import seq2seq_ext as d2l
from seq2seq_ext import runs, training
from seq2seq_ext.bench import common
from seq2seq_ext.config import RunConfig
from seq2seq_ext.decoding import predict_seq2seq_batch
from seq2seq_ext.metrics import corpus_bleu


def one_run(cell, amp, seed, epochs, lr, data, size):
    embed, hidden, steps = size
    torch.manual_seed(seed)
    net = d2l.EncoderDecoder(
        d2l.Seq2SeqEncoder(len(data.src_vocab), embed, hidden, 2, 0.1, cell=cell),
        d2l.Seq2SeqDecoder(len(data.tgt_vocab), embed, hidden, 2, 0.1, cell=cell))
    losses = []
    training.fit(net, data.train_iter, lr, epochs, data.tgt_vocab, torch.device("cpu"),
                 plot=False, amp=amp, on_epoch=lambda e, l, s: losses.append(l))
    preds = predict_seq2seq_batch(net, [s for s, _ in data.held_out], data.src_vocab,
                                  data.tgt_vocab, steps, torch.device("cpu"))
    return losses, corpus_bleu(preds, [t for _, t in data.held_out])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="*", default=["lstm", "gru"], choices=["gru", "lstm"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dataset", default="numbers", choices=["numbers", "fra-eng"])
    parser.add_argument("--num-examples", type=int, default=20000,
                        help="fra-eng: the chapter's num_examples (training pairs)")
    parser.add_argument("--held-out", type=int, default=100,
                        help="sentences held out and scored (fra-eng: the pairs that follow)")
    parser.add_argument("--embed", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = RunConfig(dataset=args.dataset, held_out=args.held_out, batch_size=args.batch,
                    num_steps=args.steps, seed=0)
    if args.dataset == "fra-eng":
        run = dataclasses.replace(run, data=str(common.FRA_ENG), num_examples=args.num_examples)
    data = runs.load_data(run.with_defaults())
    size = (args.embed, args.hidden, args.steps)
    print(f"bf16 products: {d2l.ops.bf16_gemm()}; {args.dataset}, {len(data.tgt_vocab)} target "
          f"words, {len(data.held_out)} held out; embed {args.embed}, hidden {args.hidden}, "
          f"batch {args.batch}, {args.steps} steps; {args.epochs} epochs, lr {args.lr}, seeds "
          f"{args.seeds}")
    for cell in args.cells:
        runs_ = {(amp, s): one_run(cell, amp, s, args.epochs, args.lr, data, size)
                 for s in args.seeds for amp in (None, "bf16")}
        cols = [(amp, s) for amp in (None, "bf16") for s in args.seeds]
        print(f"\n{cell}: mean training loss per epoch")
        print("| epoch | " + " | ".join(f"{amp or 'float32'} seed {s}" for amp, s in cols) + " |")
        print("|---|" + "---|" * len(cols))
        marks = sorted(set([1] + list(range(5, args.epochs + 1, 5)) + [args.epochs]))
        for e in marks:
            print(f"| {e} | " + " | ".join(f"{runs_[c][0][e - 1]:.3f}" for c in cols) + " |")
        print("| held-out corpus BLEU | " + " | ".join(f"{runs_[c][1]:.1f}" for c in cols) + " |")
        last = {amp: [runs_[(amp, s)][0][-1] for s in args.seeds] for amp in (None, "bf16")}
        bleu = {amp: [runs_[(amp, s)][1] for s in args.seeds] for amp in (None, "bf16")}
        spread = max(last[None]) - min(last[None])
        print(f"\nlast epoch: mean loss float32 {statistics.mean(last[None]):.3f}, bf16 "
              f"{statistics.mean(last['bf16']):.3f} (float32 seeds spread {spread:.3f}); mean "
              f"BLEU float32 {statistics.mean(bleu[None]):.1f}, bf16 "
              f"{statistics.mean(bleu['bf16']):.1f}")
    return 0
