"""What the loss curve costs the chapter's run: ``train_seq2seq`` with the curve written as the
package writes it, with it rewritten every 10 epochs (every point, the older behaviour), and with
no curve at all; the three interleaved, one thread.

    python benchmarks/plot_overhead.py                      # 300 epochs, fra-eng 600, 2 rounds
    python benchmarks/plot_overhead.py --epochs 60 --rounds 3

Uses the shared fra-eng corpus (``$SEQ2SEQ_EXT_DATA`` or ``../shared/data/fra-eng.txt``), or the
built-in numbers corpus when it is absent.
"""
import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

import seq2seq_ext as d2l
from seq2seq_ext.bench import common
from seq2seq_ext.training import fit
from seq2seq_ext.utils import PLOT_ENV, Animator


def _data(batch_size=64, num_steps=10):
    if common.FRA_ENG.exists():
        it, src, tgt = d2l.load_data_nmt(batch_size, num_steps, 600, path=common.FRA_ENG)
        return list(it), src, tgt, 'fra-eng 600'
    it, src, tgt, _ = d2l.load_data_numbers(batch_size, num_steps)
    return list(it), src, tgt, 'numbers (fra-eng absent)'


class _CurveClock:
    """Adds up the seconds spent inside the Animator (made, points added, written): on a busy
    machine that share is steadier than the difference of two whole runs."""

    def __init__(self):
        self.seconds = 0.0
        self._saved = {}

    def __enter__(self):
        for name in ('__init__', 'add', 'flush'):
            real = getattr(Animator, name)
            self._saved[name] = real

            def timed(*args, _real=real, **kwargs):
                t = time.perf_counter()
                try:
                    return _real(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - t
            setattr(Animator, name, timed)
        return self

    def __exit__(self, *exc):
        for name, real in self._saved.items():
            setattr(Animator, name, real)


def _run(mode, epochs, batches, src_vocab, tgt_vocab, png):
    torch.manual_seed(0)
    net = d2l.EncoderDecoder(d2l.Seq2SeqEncoder(len(src_vocab), 32, 32, 2, 0.1),
                             d2l.Seq2SeqDecoder(len(tgt_vocab), 32, 32, 2, 0.1))
    os.environ[PLOT_ENV] = png
    saved = Animator.min_interval, Animator.max_share
    if mode == 'every 10 epochs':
        Animator.min_interval, Animator.max_share = 0.0, float('inf')
    try:
        with _CurveClock() as clock:
            t0 = time.perf_counter()
            fit(net, batches, 0.005, epochs, tgt_vocab, 'cpu', plot=mode != 'off')
            return time.perf_counter() - t0, clock.seconds
    finally:
        Animator.min_interval, Animator.max_share = saved


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--epochs', type=int, default=300)
    parser.add_argument('--rounds', type=int, default=2)
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches, src_vocab, tgt_vocab, corpus = _data()
    modes = ('off', 'package', 'every 10 epochs')
    times = {m: [] for m in modes}
    curve = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, 'loss.png')
        _run('package', 1, batches, src_vocab, tgt_vocab, png)  # warm-up, imports matplotlib
        for _ in range(args.rounds):
            for mode in modes:
                total, in_curve = _run(mode, args.epochs, batches, src_vocab, tgt_vocab, png)
                times[mode].append(total)
                curve[mode].append(in_curve)
                print(f'{mode}: {total:.2f} s, {in_curve:.3f} s in the curve', file=sys.stderr,
                      flush=True)
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                            text=True).stdout.strip()
    cpu = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo')
                if line.startswith('model name')), platform.processor()) \
        if os.path.exists('/proc/cpuinfo') else platform.processor()
    print(f'# loss curve cost: train_seq2seq, chapter model, {corpus}, {args.epochs} epochs, '
          f'{args.threads} thread(s), {cpu}, commit {commit}')
    print()
    print('| curve | run, median | all rounds | over no curve | inside the curve, median | '
          'its share of the run |')
    print('|---|---|---|---|---|---|')
    base = sorted(times['off'])[len(times['off']) // 2]
    for mode in modes:
        t = sorted(times[mode])[len(times[mode]) // 2]
        c = sorted(curve[mode])[len(curve[mode]) // 2]
        rounds = ', '.join(f'{x:.2f}' for x in times[mode])
        print(f'| {mode} | {t:.2f} s | {rounds} | {100 * (t / base - 1):+.1f}% | {c:.3f} s | '
              f'{100 * c / t:.1f}% |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
