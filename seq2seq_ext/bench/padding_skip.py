"""The decoder's recurrent layers skip the padding: one training step of the chapter's model
(``--cell gru``, the chapter's, or ``lstm``; the package's ``fit`` step: forward, loss, backward,
clipping, Adam) on fra-eng batches, with every position projected and scored (``full``), with
the decoder's layers run over every position (``rows``: only the output projection and the loss
skip the padded positions) and in the packed layout (``packed``: the layers skip them too),
interleaved in one process, beside the reference's own step (d2l's ``train_seq2seq`` body on
the reference backend).

Beside them, the floor: the step's GEMM work (:func:`step_flops`, forward and backward: three
products per weight and position) over the best float32 rate of ``torch.mm`` measured in the
same run at the step's product shapes, and the fraction of it each variant reaches.

``seq2seq-ext``'s fit takes the packed path on the CPU; the other two are what it did before
and what the chapter does. The table gives the median milliseconds per batch over the same
batches and the share of decoder positions that are padding.

``--amp``: the reference's step in float32 and under bf16 autocast (``reference-bf16``), the
packed step in float32 and under ``fit(amp="bf16")``'s autocast (``packed-bf16``), with the
bf16 products as ``ops.set_bf16_gemm`` runs them on this CPU, named in the output; beside them
the float32 floor and the bf16 floor (the same FLOPs over the best bf16 ``torch.mm`` rate at the
step's shapes, under ``"native"``; under ``"rounded"`` the products run at float32's rate) and
each variant's peak resident memory, measured in a process of its own (:func:`peak_rss_mb`).
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

import seq2seq_ext as d2l
from seq2seq_ext import malloc, ops, reference as R, training
from seq2seq_ext.bench import common

CONFIGS = {
    "chapter": dict(num_examples=600, embed=32, hidden=32, layers=2, batch=64, steps=10),
    "large": dict(num_examples=20000, embed=256, hidden=512, layers=2, batch=128, steps=12),
}


def _models(cfg, src_vocab, tgt_vocab, mod, cell="gru"):
    torch.manual_seed(0)
    if cell == "gru":
        net = mod.EncoderDecoder(
            mod.Seq2SeqEncoder(len(src_vocab), cfg["embed"], cfg["hidden"], cfg["layers"], 0.1),
            mod.Seq2SeqDecoder(len(tgt_vocab), cfg["embed"], cfg["hidden"], cfg["layers"], 0.1))
    else:
        enc = (R.VariantSeq2SeqEncoder if mod is R else d2l.Seq2SeqEncoder)
        dec = (R.VariantSeq2SeqDecoder if mod is R else d2l.Seq2SeqDecoder)
        net = mod.EncoderDecoder(
            enc(len(src_vocab), cfg["embed"], cfg["hidden"], cfg["layers"], 0.1, cell=cell),
            dec(len(tgt_vocab), cfg["embed"], cfg["hidden"], cfg["layers"], 0.1, cell=cell))
    net.apply(R.xavier_init_weights)
    return net.train()


def step_fn(variant, net, tgt_vocab):
    """One training step on a batch, as ``fit`` (``full`` / ``rows`` / ``packed`` /
    ``packed-bf16``) or the reference runs it."""
    bos_id = tgt_vocab['<bos>']
    amp = "bf16" if variant.endswith("-bf16") else None
    # each side's optimizer: d2l's Adam for the reference, fit's (training.make_adam: PyTorch's
    # fused Adam, the same update rule) for the package
    opt = (torch.optim.Adam(net.parameters(), lr=0.005) if variant.startswith("reference")
           else training.make_adam(net.parameters(), 0.005))
    if variant.startswith("reference"):
        loss = R.MaskedSoftmaxCELoss()

        def step(batch):
            X, X_valid_len, Y, Y_valid_len = batch
            opt.zero_grad()
            bos = torch.full((Y.shape[0], 1), bos_id, dtype=Y.dtype)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
                Y_hat, _ = net(X, torch.cat([bos, Y[:, :-1]], 1), X_valid_len)
                l = loss(Y_hat, Y, Y_valid_len)
            l.float().sum().backward()
            R.grad_clipping(net, 1)
            opt.step()
        return step
    model = training._TrainForward(net, 1.0, d2l.MaskedSoftmaxCELoss())

    def step(batch):
        X, X_valid_len, Y, Y_valid_len = batch
        opt.zero_grad()
        kept = (None if variant == "full" else training._kept_positions(
            Y_valid_len, *Y.shape, packed=variant.startswith("packed")))
        bos = torch.full((Y.shape[0], 1), bos_id, dtype=Y.dtype)
        with training._autocast(amp, torch.device("cpu")):
            l = model(X, torch.cat([bos, Y[:, :-1]], 1), X_valid_len, Y, Y_valid_len, kept)
        l.float().sum().backward()
        training._clip_and_step(net, 1, opt)  # fit's clipping and step
    return step


def step_flops(cfg, tgt_vocab, positions, kept, packed, cell="gru"):
    """The multiply-add FLOPs (x2) of one training step's GEMMs: encoder and decoder layers
    over their positions (the decoder's over the kept ones when packed; the GRU decoder's
    context share of its first layer is once per sequence, not counted; the LSTM decoder reads
    the context at every position, as the reference does), the output projection over the kept
    positions; the backward is twice the forward (the input's and the weight's gradients)."""
    e, h, layers = cfg["embed"], cfg["hidden"], cfg["layers"]
    gates = 3 if cell == "gru" else 4
    per_position = 2 * gates * h * (e + h + (layers - 1) * 2 * h)  # W_ih, W_hh of every layer
    decoder = per_position + (2 * gates * h * h if cell == "lstm" else 0)
    forward = (positions * per_position + (kept if packed else positions) * decoder
               + kept * 2 * h * tgt_vocab)
    return 3 * forward


def gemm_rate(cfg, tgt_vocab, rows, repeat=5, dtype=torch.float32):
    """The best GFLOP/s of torch.mm in ``dtype`` (float32: this build's BLAS; bfloat16: oneDNN)
    over the step's product shapes:
    (rows, in) x (in, 3 hidden) for the input projections, (batch, hidden) x (hidden, 3 hidden)
    per step, (rows, hidden) x (hidden, vocab)."""
    h = cfg["hidden"]
    shapes = [(rows, cfg["embed"], 3 * h), (rows, h, 3 * h), (cfg["batch"], h, 3 * h),
              (rows, h, tgt_vocab)]
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        torch.mm(a, b)
        t = min(_time(lambda: torch.mm(a, b)) for _ in range(repeat))
        best = max(best, 2 * m * k * n / t / 1e9)
    return best


def _time(fn, number=5):
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def run(config="chapter", batches=8, rounds=3, threads=1, cell="gru",
        variants=("reference", "full", "rows", "packed")):
    """{variant: median ms per batch}, the padding share and the sizes."""
    torch.set_num_threads(threads)
    cfg = CONFIGS[config]
    data_iter, src_vocab, tgt_vocab = d2l.load_data_nmt(cfg["batch"], cfg["steps"],
                                                        cfg["num_examples"], path=common.FRA_ENG)
    data = list(data_iter)[:batches]
    kept = sum(int(b[3].clamp(max=cfg["steps"]).sum()) for b in data)
    positions = sum(b[2].numel() for b in data)
    steps = {}
    for variant in variants:
        ref = variant.startswith("reference")
        net = _models(cfg, src_vocab, tgt_vocab, R if ref else d2l, cell)
        steps[variant] = step_fn(variant, net, tgt_vocab)
    times = {v: [] for v in steps}
    for r in range(rounds + 1):  # the first round warms up
        for variant, step in steps.items():
            with ops.use_backend("reference" if variant.startswith("reference") else "ext"):
                for batch in data:
                    t0 = time.perf_counter()
                    step(batch)
                    if r:
                        times[variant].append(time.perf_counter() - t0)
    ms = {v: 1e3 * statistics.median(t) for v, t in times.items()}
    rows = cfg["batch"] * cfg["steps"]
    rate = gemm_rate(cfg, len(tgt_vocab), rows)
    flops = {v: step_flops(cfg, len(tgt_vocab), positions / len(data), kept / len(data),
                           v == "packed", cell) for v in ("rows", "packed")}
    floors = {v: 1e3 * f / (rate * 1e9) for v, f in flops.items()}
    extra = dict(cfg, tgt_vocab=len(tgt_vocab), gemm_gflops=rate, floor_ms=floors,
                 gflop=flops["packed"] / 1e9)
    if any(v.endswith("-bf16") for v in variants):
        # under "rounded" the bf16 products run at float32's rate, under "native" at bf16's
        bf16_rate = (gemm_rate(cfg, len(tgt_vocab), rows, dtype=torch.bfloat16)
                     if ops.bf16_gemm() == "native" else rate)
        extra.update(bf16_gflops=bf16_rate, bf16_floor_ms=1e3 * flops["packed"] / (bf16_rate * 1e9))
    return ms, 1 - kept / positions, extra


def peak_rss_mb(config, cell, variant, batches=2, keep_freed_memory=False):
    """The peak resident memory (MB) of `batches` training steps of `variant`, in a process of
    its own: the kernel's high-water mark is reset after the data, the model and its optimizer
    are set up (Linux: /proc/self/clear_refs), so the figure is the steps' own plus what was
    resident before them, the same for every variant."""
    out = subprocess.run([sys.executable, "-m", "seq2seq_ext.bench.padding_skip", "--peak-rss",
                          variant, "--config", config, "--cell", cell,
                          "--batches", str(batches)]
                         + (["--keep-freed-memory"] if keep_freed_memory else []),
                         capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    return float(out.stdout.strip().splitlines()[-1])


def _peak_rss_child(config, cell, variant, batches):
    torch.set_num_threads(1)
    cfg = CONFIGS[config]
    data_iter, src_vocab, tgt_vocab = d2l.load_data_nmt(cfg["batch"], cfg["steps"],
                                                        cfg["num_examples"], path=common.FRA_ENG)
    data = list(data_iter)[:batches]
    ref = variant.startswith("reference")
    step = step_fn(variant, _models(cfg, src_vocab, tgt_vocab, R if ref else d2l, cell),
                   tgt_vocab)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    with ops.use_backend("reference" if ref else "ext"):
        for batch in data:
            step(batch)
    with open("/proc/self/status") as f:
        hwm = next(line for line in f if line.startswith("VmHWM:"))
    print(int(hwm.split()[1]) / 1024.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=list(CONFIGS), nargs="*", default=list(CONFIGS))
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cell", choices=["gru", "lstm"], default="gru")
    parser.add_argument("--amp", action="store_true",
                        help="the reference and the packed step, float32 and under bf16 "
                             "autocast, with each one's peak memory")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="call seq2seq_ext.malloc.keep_freed_memory() first, as the "
                             "command line's train does (process-wide: every variant)")
    parser.add_argument("--peak-rss", metavar="VARIANT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.keep_freed_memory:
        print(f"freed memory kept: {malloc.keep_freed_memory()}")
    if args.peak_rss:
        return _peak_rss_child(args.config[0], args.cell, args.peak_rss, args.batches)
    print(f"cell {args.cell}")
    if args.amp:
        return _main_amp(args)
    print("| config | padding | reference ms | full ms | rows ms | packed ms | packed vs rows "
          "| packed vs reference | GEMM GFLOP/s | floor rows / packed ms | rows / packed at "
          "% of floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.config:
        ms, pad, cfg = run(name, args.batches, args.rounds, args.threads, args.cell)
        print(f"| {name} (embed {cfg['embed']}, hidden {cfg['hidden']}, batch {cfg['batch']}, "
              f"{cfg['steps']} steps, vocab {cfg['tgt_vocab']}) | {100 * pad:.0f}% "
              f"| {ms['reference']:.1f} | {ms['full']:.1f} | {ms['rows']:.1f} "
              f"| {ms['packed']:.1f} "
              f"| {ms['rows'] / ms['packed']:.2f}x | {ms['reference'] / ms['packed']:.2f}x "
              f"| {cfg['gemm_gflops']:.0f} | {cfg['floor_ms']['rows']:.1f} / "
              f"{cfg['floor_ms']['packed']:.1f} | {100 * cfg['floor_ms']['rows'] / ms['rows']:.0f}%"
              f" / {100 * cfg['floor_ms']['packed'] / ms['packed']:.0f}% |", flush=True)
    return 0


def _main_amp(args):
    print(f"bf16 products: {ops.bf16_gemm()}")
    print("| config | reference float32 ms | reference bf16 ms | package float32 ms "
          "| package bf16 ms | float32: package vs reference | bf16: package vs reference "
          "| package bf16 vs reference float32 | GFLOP a step | float32 GFLOP/s, floor ms, "
          "share | bf16 GFLOP/s, floor ms, share | peak MB: reference f32 / bf16, package "
          "f32 / bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.config:
        ms, _, cfg = run(name, args.batches, args.rounds, args.threads, args.cell,
                         ("reference", "reference-bf16", "packed", "packed-bf16"))
        floor, bf16_floor = cfg["floor_ms"]["packed"], cfg["bf16_floor_ms"]
        keep = args.keep_freed_memory
        peak = (" / ".join(f"{peak_rss_mb(name, args.cell, v, 2, keep):.0f}" for v in
                           ("reference", "reference-bf16", "packed", "packed-bf16"))
                if os.path.exists("/proc/self/clear_refs") else "-")
        print(f"| {name} | {ms['reference']:.1f} | {ms['reference-bf16']:.1f} "
              f"| {ms['packed']:.1f} | {ms['packed-bf16']:.1f} "
              f"| {ms['reference'] / ms['packed']:.2f}x "
              f"| {ms['reference-bf16'] / ms['packed-bf16']:.2f}x "
              f"| {ms['reference'] / ms['packed-bf16']:.2f}x | {cfg['gflop']:.1f} "
              f"| {cfg['gemm_gflops']:.0f}, {floor:.1f}, {100 * floor / ms['packed']:.0f}% "
              f"| {cfg['bf16_gflops']:.0f}, {bf16_floor:.1f}, "
              f"{100 * bf16_floor / ms['packed-bf16']:.0f}% | {peak} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
