"""The GPU verification run: build with CUDA, run the test suite on the GPU, run
compute-sanitizer over the CUDA op tests once, and print the GPU benchmark tables.

    python benchmarks/gpu.py                 # everything (on a machine with a CUDA GPU)
    python benchmarks/gpu.py --skip-build --skip-tests --skip-sanitizer   # tables only

Timings: CUDA events around many calls after warm-up, median of rounds, on random data.
"""
import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sh(cmd, **kw):
    print(f"$ {cmd}", flush=True)
    return subprocess.run(cmd, shell=True, cwd=ROOT, **kw).returncode


def build():
    env = dict(os.environ, SEQ2SEQ_EXT_CUDA="1",
               TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0"))
    return subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT,
                          env=env).returncode


def cuda_time(fn, rounds=7, number=20, warmup=3):
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / number)
    return sorted(times)[len(times) // 2]


def wall_time(fn, rounds=5):
    import torch
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def row(title, t_ref, t_ext, target, notes=""):
    print(f"| {title} | {t_ref * 1e3:.3f} ms | {t_ext * 1e3:.3f} ms | {t_ref / t_ext:.1f}x | "
          f"{target} | {notes} |", flush=True)


def tables():
    import torch
    from seq2seq_ext.bench import common
    import seq2seq_ext as d2l
    from seq2seq_ext import reference as R
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda}"
          f" | python {platform.python_version()}")
    print("\n| case | reference | extension | ratio | target | notes |\n|---|---|---|---|---|---|")
    src = torch.empty(256 * 1024 * 1024 // 4, device=dev).normal_()
    dst = torch.empty_like(src)
    t_copy = cuda_time(lambda: dst.copy_(src))
    bandwidth = 2 * src.numel() * 4 / t_copy
    print(f"\nmeasured device-to-device copy: {bandwidth / 1e9:.0f} GB/s (read + write)\n")
    for shape in [(128, 30, 32000), (64, 50, 10000)]:
        for dtype in (torch.float32, torch.bfloat16):
            pred, label, valid_len = common.ce_inputs(*shape, dtype=torch.float32)
            pred = pred.detach().to(dev, dtype).requires_grad_(True)
            label, valid_len = label.to(dev), valid_len.to(dev)
            ref = common.ce_fwd_bwd(R.MaskedSoftmaxCELoss())
            ext = common.ce_fwd_bwd(d2l.MaskedSoftmaxCELoss())
            t_ref = cuda_time(lambda: ref(pred, label, valid_len))
            t_ext = cuda_time(lambda: ext(pred, label, valid_len))
            n = pred.numel() * pred.element_size()
            floor = 3 * n / bandwidth * (2 / 2)  # logits read twice, gradient written once
            row(f"masked CE fwd+bwd {shape} {str(dtype)[6:]}", t_ref, t_ext,
                ">=4x, >=70% of floor", f"floor {floor * 1e3:.3f} ms: {floor / t_ext:.0%}")
    src_vocab, tgt_vocab = common.toy_vocabs()
    net, refnet = common.chapter_models(len(src_vocab), len(tgt_vocab))
    net.to(dev)
    refnet.to(dev)
    sents = common.CHAPTER_SENTENCES
    t_ref = wall_time(lambda: [R.predict_seq2seq(refnet, s, src_vocab, tgt_vocab, 10, dev)
                               for s in sents])
    t_ext = wall_time(lambda: [d2l.predict_seq2seq(net, s, src_vocab, tgt_vocab, 10, dev)
                               for s in sents])
    row("predict_seq2seq x 4 (batch 1)", t_ref, t_ext, ">=10x")
    many = common.sentences(1000, src_vocab)
    t_ref = wall_time(lambda: [R.predict_seq2seq(refnet, s, src_vocab, tgt_vocab, 10, dev)
                               for s in many], rounds=1)
    t_ext = wall_time(lambda: d2l.predict_seq2seq_batch(net, many, src_vocab, tgt_vocab, 10,
                                                        dev))
    row("1,000 sentences batched vs 1,000 predict_seq2seq", t_ref, t_ext, ">=50x")
    from seq2seq_ext import ops
    from seq2seq_ext.models import fused_decoder_args
    with torch.no_grad():
        state = refnet.encoder(torch.randint(0, len(src_vocab), (64, 10), device=dev))[1]
        tok = torch.full((64,), tgt_vocab['<bos>'], device=dev)
        args = fused_decoder_args(net.decoder)
        eager = lambda: ops.gru_decode_step(tok, state, *args)  # noqa: E731
        eager()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            eager()
        row("decode step (batch 64): eager vs replayed CUDA graph", cuda_time(eager),
            cuda_time(graph.replay), "report")
    if common.FRA_ENG.exists():
        data_iter, sv, tv = d2l.load_data_nmt(64, 10, 600, path=common.FRA_ENG)
        batches = list(data_iter)
        tokens = sum(int(b[3].sum()) for b in batches) * 10

        def train(mod, wrap=None):
            torch.manual_seed(0)
            m = mod.EncoderDecoder(mod.Seq2SeqEncoder(len(sv), 32, 32, 2, 0.1),
                                   mod.Seq2SeqDecoder(len(tv), 32, 32, 2, 0.1))
            if wrap:
                m = wrap(m)
            t = time.perf_counter()
            mod.train_seq2seq(m, batches, 0.005, 10, tv, dev)
            return time.perf_counter() - t

        t_ref, t_ext = train(R), train(d2l)
        row("train_seq2seq chapter config, 10 epochs", t_ref, t_ext, ">=2x",
            f"{tokens / t_ref:.0f} vs {tokens / t_ext:.0f} tokens/s")
        t_comp = train(R, wrap=torch.compile)
        row("train_seq2seq: torch.compile(reference) vs extension", t_comp, t_ext, ">1x",
            "nn.GRU runs as one opaque aten op (cuDNN) inside the compiled graph")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-build", action="store_true")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-sanitizer", action="store_true")
    args = p.parse_args()
    rc = 0
    if not args.skip_build:
        rc |= build()
    import torch
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to verify here")
        return 1
    if not args.skip_tests:
        rc |= sh(f"{sys.executable} -m pytest -q -x tests")
    if not args.skip_sanitizer:
        sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
        if Path(sanitizer).exists():
            rc |= sh(f"{sanitizer} --tool memcheck --error-exitcode 1 {sys.executable} -m pytest -q "
                     f"-x tests/test_masked_ce.py tests/test_sequence_mask.py tests/test_decode.py "
                     f"tests/test_gru_layer.py -k cuda")
        else:
            print("compute-sanitizer not found")
            rc |= 1
    tables()
    return rc


if __name__ == "__main__":
    sys.exit(main())
