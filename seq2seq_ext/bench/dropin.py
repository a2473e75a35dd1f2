"""The drop-in layers on programs the package did not write: the seeds' per-step
teacher-forcing model (``seed_models``) and the chapter's model as a notebook defines it, plain
PyTorch against the same program after ``seq2seq_ext.accelerate`` and against
``torch.compile`` of the plain program, interleaved in one process, one thread by default.

    python benchmarks/dropin.py                       # every case
    python benchmarks/dropin.py --cases seed-lstm seed-gru-large --threads 1
    python benchmarks/dropin.py --amp --cases seed-gru-large   # training under bf16 autocast

Each case also times the program with its recurrent layers replaced by a stub that costs nothing
(the ceiling of what a faster recurrent layer can give) and reports the share of the ceiling's
gain reached: (t_plain / t_fast - 1) / (t_plain / t_stub - 1).
"""
import argparse
import copy
import platform
import random
import subprocess
import sys
import time

import torch
from torch import nn

import seq2seq_ext
from seq2seq_ext import reference as R
from seq2seq_ext.bench import common, seed_models

# (src vocab, tgt vocab, embed, hidden, layers, dropout, batch, steps)
SIZES = {
    "seed": (10, 10, 16, 32, 2, 0.5, 32, 5),        # seed 004's own hyper-parameters
    "chapter": (200, 200, 32, 32, 2, 0.5, 64, 10),  # the chapter's sizes
    "large": (4000, 4000, 256, 512, 2, 0.5, 128, 12),
}


class _WeightGrads(torch.autograd.Function):
    """Passes a layer's results through and gives the stubbed layer's weights a zero gradient."""

    @staticmethod
    def forward(ctx, stub, n_results, *tensors):
        ctx.stub = stub
        ctx.save_for_backward(*tensors[n_results:])
        ctx.set_materialize_grads(False)
        return tuple(t.view_as(t) for t in tensors[:n_results])

    @staticmethod
    def backward(ctx, *grads):
        ctx.stub.pending = False
        return (None, None, *grads, *(torch.zeros_like(w) for w in ctx.saved_tensors))


class StubRNN(nn.Module):
    """A recurrent layer that costs nothing: the output is the input's first feature broadcast
    to the hidden size (a gradient path, no work), the state passes through. It keeps the
    layer's parameters, and a training step gives them a zero gradient (at the first call
    after a backward: one set of zeros a step, however many calls), so that ``zero_grad``,
    gradient clipping and the optimizer do the same work on them as on a real layer's: the
    ceiling removes the recurrent layers' own work, not the optimizer's."""

    def __init__(self, rnn):
        super().__init__()
        self.hidden = rnn.hidden_size
        self.layers = rnn.num_layers
        self.lstm = isinstance(rnn, nn.LSTM)
        self.batch_first = rnn.batch_first
        self.weights = nn.ParameterList(rnn.parameters())
        self.pending = False

    def forward(self, x, hx=None):
        out = x[..., :1].expand(*x.shape[:-1], self.hidden)
        if hx is None:
            h = x.new_zeros(self.layers, x.shape[0 if self.batch_first else 1], self.hidden)
            hx = (h, h) if self.lstm else h
        if torch.is_grad_enabled() and not self.pending:
            # on the output and the state: a seeds' encoder hands on its state only
            self.pending = True
            results = (out, *hx) if self.lstm else (out, hx)
            results = _WeightGrads.apply(self, len(results), *results, *self.weights)
            out, hx = results[0], (tuple(results[1:]) if self.lstm else results[1])
        return out, hx


def stubbed(model):
    model = copy.deepcopy(model)
    for holder in list(model.modules()):
        for name, child in list(holder.named_children()):
            if isinstance(child, (nn.GRU, nn.LSTM)):
                setattr(holder, name, StubRNN(child))
    return model


# the accelerated model's variants --per-call and --amx-off add: the setting each changes for
# its steps (an ops setter and its value) and the getter that restores it
VARIANTS = {"per-call": ("set_deferred_grads", "off", "deferred_grads"),
            "amx-off": ("set_amx_products", False, "amx_products")}


def seed_case(cell, size, repeat, amp=False, per_call=False, amx_off=False):
    """The seeds' training step. ``amp``: every model under CPU autocast to bfloat16, beside the
    plain model in float32 ("plain-f32"); a model whose step raises (PyTorch's bf16 LSTM on a
    CPU without bf16 instructions) is reported as failing. ``per_call``: also the accelerated
    model with per-call weight gradients ("per-call": ``ops.set_deferred_grads("off")`` for its
    steps); ``amx_off``: also with its bf16 products of few rows as ATen GEMMs ("amx-off":
    ``ops.set_amx_products(False)``); interleaved with the rest."""
    src_v, tgt_v, embed, hidden, layers, dropout, batch, steps = SIZES[size]
    torch.manual_seed(0)
    plain = seed_models.Seq2Seq(src_v, tgt_v, embed, hidden, layers, dropout, cell=cell)
    models = {"plain": plain,
              "accelerated": seq2seq_ext.accelerate(copy.deepcopy(plain)),
              "compiled": torch.compile(copy.deepcopy(plain)),
              "stub": stubbed(plain)}
    if amp:
        models["plain-f32"] = copy.deepcopy(plain)
    for name, wanted in (("per-call", per_call), ("amx-off", amx_off)):
        if wanted:
            models[name] = seq2seq_ext.accelerate(copy.deepcopy(plain))
    opts = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in models.items()}
    src, trg = seed_models.batch(batch, steps, src_v, tgt_v)
    coins = random.Random(0)

    def step(k):
        setter, value, getter = VARIANTS.get(k, (None, None, None))

        def run():
            before = getattr(seq2seq_ext.ops, getter)() if setter else None
            if setter:
                getattr(seq2seq_ext.ops, setter)(value)
            try:
                return seed_models.train_step(models[k], opts[k], src, trg, coins,
                                              amp=amp and k != "plain-f32")
            finally:
                if setter:
                    getattr(seq2seq_ext.ops, setter)(before)
        return run

    failed, compile_s = {}, None
    for k in list(models):
        try:
            t0 = time.perf_counter()
            step(k)()  # compiles outside the timing
            if k == "compiled":
                compile_s = time.perf_counter() - t0
        except RuntimeError as e:
            failed[k] = str(e).splitlines()[0][:80]
    times = common.interleaved({k: step(k) for k in models if k not in failed}, repeat)
    return times, dict(compile_s=compile_s, failed=failed)


def decode_step_case(cell, size, repeat):
    """One decoder call at batch 1 in inference (the seeds' decoder, greedy translation)."""
    src_v, tgt_v, embed, hidden, layers, dropout, _, _ = SIZES[size]
    torch.manual_seed(0)
    plain = seed_models.Decoder(tgt_v, embed, hidden, layers, dropout, cell=cell).eval()
    models = {"plain": plain, "accelerated": seq2seq_ext.accelerate(copy.deepcopy(plain)),
              "stub": stubbed(plain)}
    token = torch.tensor([1])
    h = torch.randn(layers, 1, hidden)
    state = (h, torch.randn_like(h)) if cell == "lstm" else h

    def call(k):
        def run():
            with torch.no_grad():
                for _ in range(50):
                    models[k](token, state)
        return run
    times = common.interleaved({k: call(k) for k in models}, repeat)
    return {k: v / 50 for k, v in times.items()}, {}


def chapter_predict_case(repeat):
    """predict_seq2seq of the chapter's model written by a user (the reference classes)."""
    src_vocab, tgt_vocab = common.toy_vocabs()
    _, plain = common.chapter_models(len(src_vocab), len(tgt_vocab))
    plain.eval()
    models = {"plain": plain, "accelerated": seq2seq_ext.accelerate(copy.deepcopy(plain)),
              "stub": stubbed(plain)}

    sentences = common.CHAPTER_SENTENCES

    def translate(k, steps):
        return [R.predict_seq2seq(models[k], s, src_vocab, tgt_vocab, n, "cpu")[0]
                for s, n in zip(sentences, steps)]
    out = translate("plain", [10] * len(sentences))
    assert out == translate("accelerated", [10] * len(sentences))
    # decoder calls a sentence: its tokens and the <eos> that ended it, or all 10 steps. The
    # stub's output does not depend on its input, so it never says <eos>: it gets each
    # sentence's number of calls as its step limit (and must use them all)
    calls = [min(10, len(t.split()) + 1) for t in out]
    assert [len(t.split()) for t in translate("stub", calls)] == calls, "the stub said <eos>"
    steps = {"plain": [10] * len(sentences), "accelerated": [10] * len(sentences),
             "stub": calls}
    return common.interleaved({k: (lambda k: lambda: translate(k, steps[k]))(k)
                               for k in models}, repeat), {}


CASES = {
    "seed-lstm": lambda r, **kw: seed_case("lstm", "seed", r, **kw),
    "seed-gru": lambda r, **kw: seed_case("gru", "seed", r, **kw),
    "seed-lstm-chapter": lambda r, **kw: seed_case("lstm", "chapter", r, **kw),
    "seed-gru-chapter": lambda r, **kw: seed_case("gru", "chapter", r, **kw),
    "seed-lstm-large": lambda r, **kw: seed_case("lstm", "large", max(3, r // 4), **kw),
    "seed-gru-large": lambda r, **kw: seed_case("gru", "large", max(3, r // 4), **kw),
    "decode-step-lstm": lambda r: decode_step_case("lstm", "seed", r),
    "decode-step-gru": lambda r: decode_step_case("gru", "seed", r),
    "chapter-predict": chapter_predict_case,
}


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def gemm_rates():
    """1-thread GEMM rates (GFLOP/s) at 1024x1024: float32 (torch.mm) and bfloat16."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(1024, 1024, dtype=dtype)
        t = common.median_time(lambda: torch.mm(a, a), repeat=5)
        out[str(dtype).replace("torch.", "")] = 2 * 1024 ** 3 / t / 1e9
    return out


def fmt(t):
    return f"{t * 1e3:.3f} ms" if t >= 1e-3 else f"{t * 1e6:.1f} us"


def print_machine(args, extra=""):
    """The CPU, the thread count, torch's version and the GEMM rates, then a blank line."""
    rates = gemm_rates()
    print(f"CPU: {cpu_name()}, {args.threads} thread(s), torch {torch.__version__}; GEMM 1024^3: "
          + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items()) + extra)
    print()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--amp", action="store_true",
                        help="the seeds' training steps under CPU autocast to bfloat16")
    parser.add_argument("--per-call", action="store_true",
                        help="the seeds' training steps also with per-call weight gradients "
                             "(ops.set_deferred_grads('off')), interleaved; a second table")
    parser.add_argument("--amx-off", action="store_true",
                        help="with --amp: the seeds' training steps also with the bf16 products "
                             "of few rows as ATen GEMMs (ops.set_amx_products(False)), "
                             "interleaved; a table of their own")
    args = parser.parse_args(argv)
    if args.amx_off and not seq2seq_ext.ops.amx_products():
        parser.error("--amx-off: the bf16 products do not run on AMX tiles here "
                     "(seq2seq_ext.ops.amx_products() is False)")
    torch.set_num_threads(args.threads)
    if args.amp:
        return main_amp(args)
    print_machine(args)
    print("| case | plain | accelerated | speed-up | torch.compile | stub (ceiling) "
          "| ceiling speed-up | share of ceiling |")
    print("|---|---|---|---|---|---|---|---|")
    per_call = []
    for name in args.cases:
        print(f"running {name}...", file=sys.stderr, flush=True)
        if args.per_call and name in SEED_CASES:
            times, extra = CASES[name](args.repeat, per_call=True)
            per_call.append((name, times))
        else:
            times, extra = CASES[name](args.repeat)
        p, a, s = times["plain"], times["accelerated"], times["stub"]
        c = times.get("compiled")
        share = (p / a - 1) / (p / s - 1) if p > s else float("nan")
        comp = f"{fmt(c)} ({p / c:.2f}x)" if c else "-"
        print(f"| {name} | {fmt(p)} | {fmt(a)} | **{p / a:.2f}x** | {comp} | {fmt(s)} "
              f"| {p / s:.2f}x | {share:.0%} |", flush=True)
    print_per_call(per_call)
    return 0


def print_per_call(rows):
    """The second table of --per-call: the accelerated step with per-call weight gradients
    against one per matrix and graph (the default), from the same interleaved runs."""
    print_variant(rows, "per-call", "accelerated, per-call gradients")


def print_variant(rows, variant, title):
    """A table of the accelerated step with one of VARIANTS against the default, from the same
    interleaved runs."""
    if not rows:
        return
    print(f"\n| case | plain | {title} | accelerated | change |")
    print("|---|---|---|---|---|")
    for name, times in rows:
        p, o, a = times["plain"], times[variant], times["accelerated"]
        print(f"| {name} | {fmt(p)} | {fmt(o)} ({p / o:.2f}x) | {fmt(a)} ({p / a:.2f}x) "
              f"| **{o / a:.2f}x** |", flush=True)


def main_amp(args):
    """The seeds' training steps under bf16 autocast: plain, accelerated, compiled and the stub
    all under autocast, beside the plain model in float32."""
    print_machine(args, f"; bf16 products: {seq2seq_ext.ops.bf16_gemm()}")
    print("| case (bf16 autocast) | plain float32 | plain bf16 | accelerated bf16 | vs plain bf16 "
          "| vs plain float32 | torch.compile bf16 | stub bf16 (ceiling) | share of ceiling |")
    print("|---|---|---|---|---|---|---|---|---|")
    runs = []
    for name in args.cases:
        cell, size = SEED_CASES.get(name, (None, None))
        if cell is None:
            print(f"skipping {name}: not a training case", file=sys.stderr)
            continue
        print(f"running {name}...", file=sys.stderr, flush=True)
        repeat = max(3, args.repeat // 4) if size == "large" else args.repeat
        times, extra = seed_case(cell, size, repeat, amp=True, per_call=args.per_call,
                                 amx_off=args.amx_off)
        runs.append((name, times))
        failed = extra["failed"]

        def show(k):
            return fmt(times[k]) if k in times else f"fails ({failed[k]})"
        a, f32, s = times["accelerated"], times["plain-f32"], times["stub"]
        p = times.get("plain")
        vs_p = f"**{p / a:.2f}x**" if p else "-"
        share = f"{(p / a - 1) / (p / s - 1):.0%}" if p and p > s else "-"
        c = times.get("compiled")
        comp = f"{fmt(c)} ({p / c:.2f}x)" if c and p else show("compiled")
        print(f"| {name} | {fmt(f32)} | {show('plain')} | {fmt(a)} | {vs_p} | {f32 / a:.2f}x "
              f"| {comp} | {fmt(s)} | {share} |", flush=True)
    rows = [(n, t) for n, t in runs if "plain" in t]
    if args.per_call:
        print_per_call(rows)
    if args.amx_off:
        print_variant(rows, "amx-off", "accelerated, products as ATen GEMMs")
    return 0


SEED_CASES = {"seed-lstm": ("lstm", "seed"), "seed-gru": ("gru", "seed"),
              "seed-lstm-chapter": ("lstm", "chapter"), "seed-gru-chapter": ("gru", "chapter"),
              "seed-lstm-large": ("lstm", "large"), "seed-gru-large": ("gru", "large")}


if __name__ == "__main__":
    sys.exit(main())
