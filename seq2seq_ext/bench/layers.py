"""The drop-in recurrent layers alone over a sequence: ``nn.GRU`` / ``nn.LSTM`` against the same
module after ``seq2seq_ext.accelerate``, the forward in training mode with gradients on (what a
training step's forward runs, the saved activations written) and the forward with its backward,
in float32 and under CPU autocast to bfloat16, interleaved in one process, one thread by default.

    python benchmarks/layers.py                               # the GRU at three sizes
    python benchmarks/layers.py --cell lstm --sizes 12,128,256,512 --repeat 15
    python benchmarks/layers.py --mkl-packed                  # the accelerated layer, float32,
                                                              # MKL's packed products off / on

A size is steps,batch,input,hidden; every layer stack has 2 layers and dropout 0.5 between them.
"""
import argparse
import copy

import torch

import seq2seq_ext
from seq2seq_ext import _C, ops
from seq2seq_ext.bench.common import interleaved
from seq2seq_ext.bench.dropin import fmt, print_machine

# seed 004's encoder at its large size, a longer sequence, a long one at a small batch
SIZES = ("12,128,256,512", "30,64,128,256", "50,32,256,256")


def layer_times(cell, steps, batch, input_size, hidden, amp, repeat):
    """Median seconds of the forward and of the forward + backward, plain and accelerated."""
    torch.manual_seed(0)
    plain = getattr(torch.nn, cell.upper())(input_size, hidden, 2, dropout=0.5)
    models = {"plain": plain, "accelerated": seq2seq_ext.accelerate(copy.deepcopy(plain))}
    x = torch.randn(steps, batch, input_size, requires_grad=True)

    def forward(k):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            return models[k](x)[0]

    def both(k):
        forward(k).float().sum().backward()

    fns = {}
    for k in models:
        fns[("forward", k)] = lambda k=k: forward(k)
        fns[("forward+backward", k)] = lambda k=k: both(k)
    return interleaved(fns, repeat)


def packed_times(cell, steps, batch, input_size, hidden, repeat):
    """Median seconds of the accelerated layer's forward and forward + backward in float32 with
    its per-step products through ATen and over W_hh laid out once by MKL
    (``ops.set_mkl_packed_products`` off and on), interleaved."""
    torch.manual_seed(0)
    layer = seq2seq_ext.accelerate(
        getattr(torch.nn, cell.upper())(input_size, hidden, 2, dropout=0.5))
    x = torch.randn(steps, batch, input_size, requires_grad=True)

    def run(packed, backward):
        def fn():
            ops.set_mkl_packed_products(packed)
            y = layer(x)[0]
            if backward:
                y.sum().backward()
        return fn

    was = ops.mkl_packed_products()
    try:
        return interleaved({(part, mode): run(mode == "packed", part != "forward")
                            for part in ("forward", "forward+backward")
                            for mode in ("ATen", "packed")}, repeat)
    finally:
        ops.set_mkl_packed_products(was)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", choices=("gru", "lstm"), default="gru")
    parser.add_argument("--sizes", nargs="*", default=list(SIZES),
                        help="steps,batch,input,hidden (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--mkl-packed", action="store_true",
                        help="time the accelerated layer in float32 with MKL's packed per-step "
                             "products off and on instead")
    args = parser.parse_args(argv)
    if args.mkl_packed and not _C.mkl_packed_usable():
        parser.error("--mkl-packed: PyTorch in this process is not built with MKL")
    sizes = []
    for s in args.sizes:
        try:
            sizes.append(tuple(int(v) for v in s.split(",")))
        except ValueError:
            parser.error(f"--sizes: expected steps,batch,input,hidden, got {s!r}")
        if len(sizes[-1]) != 4 or min(sizes[-1]) < 1:
            parser.error(f"--sizes: expected four positive integers, got {s!r}")
    torch.set_num_threads(args.threads)
    print_machine(args)
    if args.mkl_packed:
        print("| layer (steps, batch, input, hidden) | ATen forward | packed forward | speed-up "
              "| ATen forward+backward | packed forward+backward | speed-up |")
        print("|---|---|---|---|---|---|---|")
        for size in sizes:
            t = packed_times(args.cell, *size, args.repeat)
            row = []
            for part in ("forward", "forward+backward"):
                a, p = t[(part, "ATen")], t[(part, "packed")]
                row += [fmt(a), fmt(p), f"**{a / p:.2f}x**"]
            print(f"| {args.cell.upper()} {size} | " + " | ".join(row) + " |", flush=True)
        return 0
    print("| layer (steps, batch, input, hidden) | dtype | plain forward | accelerated forward "
          "| speed-up | plain forward+backward | accelerated forward+backward | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for size in sizes:
        for amp in (False, True):
            t = layer_times(args.cell, *size, amp, args.repeat)
            row = []
            for part in ("forward", "forward+backward"):
                p, a = t[(part, "plain")], t[(part, "accelerated")]
                row += [fmt(p), fmt(a), f"**{p / a:.2f}x**"]
            print(f"| {args.cell.upper()} {size} | {'bf16 autocast' if amp else 'float32'} | "
                  + " | ".join(row) + " |", flush=True)
    return 0
