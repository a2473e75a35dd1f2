"""Reference vs extension, side by side in one process: prints a ratio table (markdown).

    seq2seq-ext bench                            # every CPU case, 1 thread
    seq2seq-ext bench --cases ce-large decode-step --threads 1
    seq2seq-ext bench --profile-train            # where training time goes (extension)

(``python benchmarks/compare.py`` and ``make bench`` run the same.)

Each row times the pure-PyTorch reference (seq2seq_ext.reference, the chapter's code) and the
extension on the same inputs and weights, median of several rounds after warm-up. Peak memory
of the training cases is measured in separate processes (a process's peak RSS cannot be reset).
"""
import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import seq2seq_ext as d2l
from seq2seq_ext import ops
from seq2seq_ext import reference as R
from seq2seq_ext.bench import common
from seq2seq_ext.cli import thread_count
from seq2seq_ext.utils import PLOT_ENV


def case_ce(batch, steps, vocab, repeat):
    pred, label, valid_len = common.ce_inputs(batch, steps, vocab)
    ref = common.ce_fwd_bwd(R.MaskedSoftmaxCELoss())
    ext = common.ce_fwd_bwd(d2l.MaskedSoftmaxCELoss())
    t_ref, t_ext = common.paired_times(lambda: ref(pred, label, valid_len),
                                       lambda: ext(pred, label, valid_len), repeat=repeat,
                                       number=1 if vocab > 1000 else 20)
    kept = int(valid_len.clamp(max=steps).sum()) * vocab
    return t_ref, t_ext, ce_floor(batch * steps * vocab, kept)


def ce_floor(n, kept):
    """Lower bound for forward+backward over n float32 logits of which ``kept`` lie within
    their rows' valid lengths (the others never reach the loss, and their gradient is zero):
    the kept logits read twice and the whole gradient written once at the measured copy
    bandwidth, or two exps per kept logit at the measured exp throughput, whichever is slower."""
    src = torch.randn(n)
    dst = torch.empty_like(src)
    t_copy = common.median_time(lambda: dst.copy_(src), repeat=5)
    bandwidth = 2 * 4 * n / t_copy  # bytes read + written per second
    small = torch.randn(4096)
    out = torch.empty_like(small)
    t_exp = common.median_time(lambda: torch.exp(small, out=out), repeat=5, number=200)
    exp_rate = small.numel() / t_exp
    t_bytes = 4 * (2 * kept + n) / bandwidth
    t_exps = 2 * kept / exp_rate
    return dict(floor_s=max(t_bytes, t_exps), bandwidth_gbs=bandwidth / 1e9,
                exp_per_ns=exp_rate / 1e9, bytes_floor_s=t_bytes, exp_floor_s=t_exps,
                kept_share=kept / n)


def case_decode_step(repeat):
    src_vocab, tgt_vocab = common.toy_vocabs()
    net, ref = common.chapter_models(len(src_vocab), len(tgt_vocab))
    with torch.no_grad():
        X = torch.randint(0, len(src_vocab), (1, 10))
        state = ref.encoder(X)[1]
        tok = torch.tensor([[tgt_vocab['<bos>']]])
        t_ref, t_ext = common.paired_times(lambda: ref.decoder(tok, state),
                                           lambda: net.decoder(tok, state),
                                           repeat=3 * repeat, number=200)
    return t_ref, t_ext, None


def case_predict(repeat):
    src_vocab, tgt_vocab = common.toy_vocabs()
    net, ref = common.chapter_models(len(src_vocab), len(tgt_vocab))
    sents = common.CHAPTER_SENTENCES

    def run(mod, model):
        return [mod.predict_seq2seq(model, s, src_vocab, tgt_vocab, 10, 'cpu')[0] for s in sents]

    assert run(d2l, net) == run(R, ref)
    t_ref, t_ext = common.paired_times(lambda: run(R, ref), lambda: run(d2l, net),
                                       repeat=3 * repeat, number=5)
    return t_ref, t_ext, None


def case_greedy_1000(repeat):
    src_vocab, tgt_vocab = common.toy_vocabs()
    net, ref = common.chapter_models(len(src_vocab), len(tgt_vocab))
    sents = common.sentences(1000, src_vocab)

    def run_ref():
        return [R.predict_seq2seq(ref, s, src_vocab, tgt_vocab, 10, 'cpu')[0] for s in sents]

    def run_ext():
        return d2l.predict_seq2seq_batch(net, sents, src_vocab, tgt_vocab, 10, 'cpu')

    assert run_ext() == run_ref(), "batched translations differ from the reference"
    # the reference takes seconds a round: three interleaved rounds, the check above the warm-up
    t_ref, t_ext = common.paired_times(run_ref, run_ext, repeat=3, warmup=0)
    return t_ref, t_ext, None


TRAIN_CONFIGS = {
    "train-chapter": dict(num_examples=600, embed=32, hidden=32, layers=2, batch=64, steps=10,
                          epochs=10, max_batches=None),
    # the package's cell="lstm" model; its reference is the same model on the reference backend
    "train-chapter-lstm": dict(num_examples=600, embed=32, hidden=32, layers=2, batch=64,
                               steps=10, epochs=10, max_batches=None, cell="lstm"),
    "train-large": dict(num_examples=20000, embed=256, hidden=512, layers=2, batch=128, steps=10,
                        epochs=1, max_batches=20),
}


def _train_setup(cfg):
    if not common.FRA_ENG.exists():
        raise FileNotFoundError(f"{common.FRA_ENG} is needed for the training benchmarks")
    torch.manual_seed(0)
    data_iter, src_vocab, tgt_vocab = d2l.load_data_nmt(cfg["batch"], cfg["steps"],
                                                        cfg["num_examples"], path=common.FRA_ENG)
    batches = list(data_iter)
    if cfg["max_batches"]:
        batches = batches[:cfg["max_batches"]]
    tokens = sum(int(b[3].sum()) for b in batches) * cfg["epochs"]
    return batches, src_vocab, tgt_vocab, tokens


def _train_once(impl, cfg, batches, src_vocab, tgt_vocab):
    cell = cfg.get("cell")
    mod = R if impl == "reference" and cell is None else d2l
    kw = dict(cell=cell) if cell else {}
    torch.manual_seed(0)
    net = mod.EncoderDecoder(
        mod.Seq2SeqEncoder(len(src_vocab), cfg["embed"], cfg["hidden"], cfg["layers"], 0.1, **kw),
        mod.Seq2SeqDecoder(len(tgt_vocab), cfg["embed"], cfg["hidden"], cfg["layers"], 0.1, **kw))
    backend = "reference" if impl == "reference" else "ext"
    with ops.use_backend(backend):
        t0 = time.perf_counter()
        mod.train_seq2seq(net, batches, 0.005, cfg["epochs"], tgt_vocab, 'cpu')
        return time.perf_counter() - t0


def case_train(name, repeat):
    cfg = TRAIN_CONFIGS[name]
    batches, src_vocab, tgt_vocab, tokens = _train_setup(cfg)
    impls = ("reference", "ext")
    # whole trainings, interleaved (the order reversing every other round), at least three
    # rounds so that the median is a middle value; each training builds its model afresh
    times = common.interleaved(
        {impl: (lambda impl: lambda: _train_once(impl, cfg, batches, src_vocab, tgt_vocab))(impl)
         for impl in impls}, max(3, repeat // 3), warmup=0)
    t_ref, t_ext = times["reference"], times["ext"]
    extra = dict(tokens=tokens, ref_tokens_per_s=tokens / t_ref, ext_tokens_per_s=tokens / t_ext,
                 tgt_vocab=len(tgt_vocab))
    if name == "train-large":
        extra.update(peak_rss_mb={impl: _peak_rss_subprocess(name, impl) for impl in impls})
    return t_ref, t_ext, extra


def _peak_rss_subprocess(name, impl):
    out = subprocess.run([sys.executable, "-m", "seq2seq_ext.bench.compare", "--peak-rss", name,
                          impl],
                         capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    return float(out.stdout.strip().splitlines()[-1])


def peak_rss_child(name, impl):
    cfg = TRAIN_CONFIGS[name]
    torch.set_num_threads(1)
    batches, src_vocab, tgt_vocab, _ = _train_setup(cfg)
    # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM), so the peak read after
    # training is the training's own, not the data set-up's
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    _train_once(impl, cfg, batches, src_vocab, tgt_vocab)
    with open("/proc/self/status") as f:
        hwm = next(line for line in f if line.startswith("VmHWM:"))
    print(int(hwm.split()[1]) / 1024.0)


CASES = {
    "ce-large": ("masked CE fwd+bwd (128, 30, 10000) f32", ">=10x, <=3x floor",
                 lambda r: case_ce(128, 30, 10000, r)),
    "ce-small": ("masked CE fwd+bwd (64, 10, 201) f32", ">=3x", lambda r: case_ce(64, 10, 201, r)),
    "decode-step": ("decoder one step, batch 1, chapter sizes", ">=20x", case_decode_step),
    "predict": ("predict_seq2seq, the chapter's 4 sentences", ">=10x", case_predict),
    "greedy-1000": ("1,000 sentences: batched vs 1,000 predict_seq2seq", ">=50x",
                    case_greedy_1000),
    "train-chapter": ("train_seq2seq, chapter config, fra-eng 600, 10 epochs", ">=2x",
                      lambda r: case_train("train-chapter", r)),
    "train-chapter-lstm": ("train_seq2seq, chapter config, cell=\"lstm\", fra-eng 600, 10 epochs",
                           ">=1.2x", lambda r: case_train("train-chapter-lstm", r)),
    "train-large": ("train_seq2seq, embed 256 hidden 512 batch 128, 20k fra-eng, 20 batches",
                    ">=1.5x, peak mem <= ref", lambda r: case_train("train-large", r)),
}


def fmt_time(t):
    return f"{t * 1e6:.1f} us" if t < 1e-3 else (f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.2f} s")


def profile_train(name="train-chapter", rows=25):
    cfg = TRAIN_CONFIGS[name]
    batches, src_vocab, tgt_vocab, _ = _train_setup(cfg)
    cfg = dict(cfg, epochs=2)
    _train_once("ext", cfg, batches, src_vocab, tgt_vocab)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _train_once("ext", cfg, batches, src_vocab, tgt_vocab)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


@contextlib.contextmanager
def _quiet():
    """What a case prints (the trainings' own ``loss ..., tokens/sec`` lines) goes to stderr,
    so that stdout holds the table alone; the trainings write no loss curve (it is not what is
    measured)."""
    old = os.environ.get(PLOT_ENV)
    os.environ[PLOT_ENV] = ''
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if old is None:
            os.environ.pop(PLOT_ENV, None)
        else:
            os.environ[PLOT_ENV] = old


def _positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def check_json(path):
    """ValueError naming --json when ``path`` (None: no file) has no folder to be written in:
    refused before the cases run, not after."""
    folder = os.path.dirname(os.path.abspath(path)) if path else None
    if folder and not os.path.isdir(folder):
        raise ValueError(f"--json {path}: no folder {folder} to write it in")


def add_arguments(parser):
    """The benchmark's options (shared by this module's ``main`` and ``seq2seq-ext bench``)."""
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--threads", type=thread_count, default=1)
    parser.add_argument("--repeat", type=_positive_int, default=7)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--profile-train", nargs="?", const="train-chapter",
                        choices=[k for k in CASES if k.startswith("train")],
                        help="profile the extension's training at this configuration")
    parser.add_argument("--peak-rss", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    try:
        check_json(args.json)
    except ValueError as exc:
        parser.error(str(exc))
    return run(args)


def run(args):
    """Run the benchmark with parsed ``args`` (see :func:`add_arguments`)."""
    check_json(args.json)
    torch.set_num_threads(args.threads)
    if args.peak_rss:
        return peak_rss_child(*args.peak_rss)
    if args.profile_train:
        return profile_train(args.profile_train)
    print(f"# seq2seq_ext vs reference: torch {torch.__version__}, {args.threads} thread(s), "
          f"{platform.processor() or platform.machine()}, python {platform.python_version()}")
    print()
    print("| case | reference | extension | ratio | target | notes |")
    print("|---|---|---|---|---|---|")
    results = {}
    for key in args.cases:
        title, target, fn = CASES[key]
        print(f"running {key} ...", file=sys.stderr, flush=True)
        try:
            with _quiet():
                t_ref, t_ext, extra = fn(args.repeat)
        except FileNotFoundError as exc:
            print(f"| {title} | - | - | - | {target} | skipped: {exc} |")
            continue
        notes = ""
        if extra and "floor_s" in extra:
            notes = (f"floor {fmt_time(extra['floor_s'])} ({extra['kept_share']:.0%} of the "
                     f"logits in valid lengths; copy {extra['bandwidth_gbs']:.1f} GB/s, "
                     f"exp {extra['exp_per_ns']:.2f}/ns): ext at "
                     f"{t_ext / extra['floor_s']:.2f}x floor")
        elif extra and "tokens" in extra:
            notes = (f"{extra['ref_tokens_per_s']:.0f} vs {extra['ext_tokens_per_s']:.0f} "
                     f"tokens/s, tgt vocab {extra['tgt_vocab']}")
            if "peak_rss_mb" in extra:
                rss = extra["peak_rss_mb"]
                notes += f"; peak RSS {rss['reference']:.0f} vs {rss['ext']:.0f} MB"
        print(f"| {title} | {fmt_time(t_ref)} | {fmt_time(t_ext)} | {t_ref / t_ext:.1f}x | "
              f"{target} | {notes} |", flush=True)
        results[key] = dict(reference_s=t_ref, extension_s=t_ext, ratio=t_ref / t_ext,
                            **(extra or {}))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
