"""Tests for seq2seq_ext.utils (d2l helpers) and seq2seq_ext.metrics."""

import math
import os
import sys

import pytest
import torch

from seq2seq_ext import utils
from seq2seq_ext.metrics import bleu, corpus_bleu
from seq2seq_ext.utils import Accumulator, Animator, Timer, try_gpu

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


# ---------------------------------------------------------------------------
# try_gpu, Timer, Accumulator
# ---------------------------------------------------------------------------

def test_try_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 0)
    assert try_gpu() == torch.device('cpu')
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert try_gpu() == torch.device('cuda:0')
    assert try_gpu(1) == torch.device('cuda:1')
    assert try_gpu(2) == torch.device('cpu')


def test_timer_records_intervals(monkeypatch):
    clock = iter([10.0, 12.5, 20.0, 21.0])
    monkeypatch.setattr(utils.time, 'time', lambda: next(clock))
    timer = Timer()              # starts at 10.0
    assert timer.stop() == 2.5   # 12.5
    timer.start()                # 20.0
    assert timer.stop() == 1.0   # 21.0
    assert timer.times == [2.5, 1.0]
    assert timer.sum() == 3.5
    assert timer.avg() == 1.75
    assert timer.cumsum() == [2.5, 3.5]


def test_timer_measures_real_time():
    timer = Timer()
    elapsed = timer.stop()
    assert 0 <= elapsed < 5
    assert timer.times == [elapsed]


def test_accumulator():
    metric = Accumulator(2)
    metric.add(torch.tensor(1.5), 3)
    metric.add(2, torch.tensor(4))
    assert metric[0] == 3.5 and metric[1] == 7.0
    assert isinstance(metric[1], float)
    assert metric[:] == [3.5, 7.0]
    metric.reset()
    assert metric.data == [0.0, 0.0]


# ---------------------------------------------------------------------------
# Animator
# ---------------------------------------------------------------------------

def test_animator_records_points_and_writes_png(tmp_path):
    out = tmp_path / 'plots' / 'loss.png'
    animator = Animator(xlabel='epoch', ylabel='loss', xlim=[10, 30],
                        out=out)
    animator.add(10, (0.5,))
    animator.add(20, (0.25,))
    assert animator.X == [[10, 20]]
    assert animator.Y == [[0.5, 0.25]]
    assert out.read_bytes().startswith(PNG_MAGIC)
    ax = animator.axes[0]
    assert ax.get_xlabel() == 'epoch' and ax.get_xlim() == (10, 30)
    assert len(ax.get_lines()) == 1

    other = tmp_path / 'copy.png'
    assert animator.save(other) == str(other)
    assert other.read_bytes().startswith(PNG_MAGIC)
    assert animator.save() == str(out)


def test_animator_multiple_curves_and_missing_values(tmp_path):
    animator = Animator(legend=['train', 'test'], out=tmp_path / 'a.png')
    animator.add(1, [0.9, None])
    animator.add([2, 2], [0.8, 0.7])
    assert animator.X == [[1, 2], [2]]
    assert animator.Y == [[0.9, 0.8], [0.7]]
    assert len(animator.axes[0].get_lines()) == 2


def test_animator_default_path_and_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(utils.PLOT_ENV, raising=False)
    Animator().add(1, 1.0)
    assert (tmp_path / 'loss.png').read_bytes().startswith(PNG_MAGIC)

    target = tmp_path / 'from_env.png'
    monkeypatch.setenv(utils.PLOT_ENV, str(target))
    animator = Animator()
    assert animator.out == str(target)
    animator.add(1, 1.0)
    assert target.exists()


def test_animator_empty_path_disables_writing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(utils.PLOT_ENV, '')
    animator = Animator()
    animator.add(1, 2.0)
    assert animator.Y == [[2.0]]
    assert list(tmp_path.iterdir()) == []
    assert animator.save() is None


def test_animator_without_matplotlib_only_records(tmp_path, monkeypatch):
    for name in ('matplotlib', 'matplotlib.figure',
                 'matplotlib.backends', 'matplotlib.backends.backend_agg'):
        monkeypatch.setitem(sys.modules, name, None)
    animator = Animator(out=tmp_path / 'never.png')
    animator.add(10, (0.5,))
    animator.add(20, (0.4,))
    assert animator.X == [[10, 20]] and animator.Y == [[0.5, 0.4]]
    assert animator.fig is None
    assert animator.save() is None
    assert not (tmp_path / 'never.png').exists()


def _count_writes(monkeypatch):
    """Count the PNG renders of every Animator (``Figure.savefig`` calls)."""
    from matplotlib.figure import Figure
    writes = []
    real = Figure.savefig

    def savefig(self, path, *args, **kwargs):
        writes.append(os.fspath(path))
        return real(self, path, *args, **kwargs)
    monkeypatch.setattr(Figure, 'savefig', savefig)
    return writes


def test_animator_writes_at_most_every_min_interval_and_flush_writes_the_rest(
        tmp_path, monkeypatch):
    pytest.importorskip('matplotlib')
    writes = _count_writes(monkeypatch)
    monkeypatch.setattr(Animator, 'min_interval', 3600.0)
    out = tmp_path / 'curve.png'
    animator = Animator(out=out)
    for epoch in range(10, 310, 10):
        animator.add(epoch, (1.0 / epoch,))
    # the first point is written at once, the 29 others wait for the interval
    assert writes == [str(out)]
    assert len(animator.axes[0].get_lines()[0].get_xdata()) == 30  # but drawn
    assert animator.flush() == str(out)
    assert writes == [str(out)] * 2
    assert animator.flush() is None  # nothing new
    monkeypatch.setattr(Animator, 'min_interval', 0.0)
    monkeypatch.setattr(Animator, 'max_share', 1e9)
    animator.add(310, (0.001,))
    assert len(writes) == 3  # due again once the interval has passed


def test_animator_keeps_writing_under_its_share_of_the_time(tmp_path, monkeypatch):
    pytest.importorskip('matplotlib')
    monkeypatch.setattr(Animator, 'min_interval', 0.0)
    animator = Animator(out=tmp_path / 'a.png')
    animator.add(1, 1.0)
    ended, cost = animator._last_write
    assert cost > 0
    # right after a write, the next is not due until cost / max_share has passed
    assert not animator._write_due()
    animator._last_write = (ended - cost / Animator.max_share - 1.0, cost)
    assert animator._write_due()


def test_train_seq2seq_writes_its_curve_once_more_at_the_end(tmp_path, monkeypatch, capsys):
    pytest.importorskip('matplotlib')
    import seq2seq_ext as d2l
    from seq2seq_ext.data import load_data_numbers
    writes = _count_writes(monkeypatch)
    monkeypatch.setattr(Animator, 'min_interval', 3600.0)
    out = tmp_path / 'loss.png'
    monkeypatch.setenv(utils.PLOT_ENV, str(out))
    train_iter, src_vocab, tgt_vocab, _ = load_data_numbers(64, 6, num_held_out=10, stop=60)
    net = d2l.EncoderDecoder(d2l.Seq2SeqEncoder(len(src_vocab), 8, 8, 1),
                             d2l.Seq2SeqDecoder(len(tgt_vocab), 8, 8, 1))
    d2l.train_seq2seq(net, train_iter, 0.005, 30, tgt_vocab, 'cpu')
    # three points (epochs 10, 20, 30): written at the first and once at the end, not 3 times
    assert writes == [str(out)] * 2
    assert out.read_bytes().startswith(PNG_MAGIC)


class _FakeDisplay:
    def __init__(self):
        self.shown = []
        self.cleared = 0

    def display(self, obj):
        self.shown.append(obj)

    def clear_output(self, wait=False):
        assert wait
        self.cleared += 1


def _fake_jupyter_kernel(monkeypatch, kernel=True):
    import types
    display = _FakeDisplay()
    shell = types.SimpleNamespace(config={'IPKernelApp': {}} if kernel else {})
    ipython = types.ModuleType('IPython')
    ipython.get_ipython = lambda: shell
    ipython.display = display
    monkeypatch.setitem(sys.modules, 'IPython', ipython)
    return display


def test_animator_in_a_notebook_shows_inline_and_writes_no_file(tmp_path, monkeypatch):
    pytest.importorskip('matplotlib')
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(utils.PLOT_ENV, raising=False)
    display = _fake_jupyter_kernel(monkeypatch)
    animator = Animator(xlabel='epoch')
    animator.add(10, 0.5)
    animator.add(20, 0.25)
    assert display.shown == [animator.fig, animator.fig] and display.cleared == 2
    assert animator.flush() is None
    assert list(tmp_path.iterdir()) == []
    # an explicit path is still written
    Animator(out=tmp_path / 'x.png').add(1, 1.0)
    assert (tmp_path / 'x.png').exists()


def test_animator_in_plain_ipython_writes_the_file(tmp_path, monkeypatch):
    pytest.importorskip('matplotlib')
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(utils.PLOT_ENV, raising=False)
    display = _fake_jupyter_kernel(monkeypatch, kernel=False)  # a terminal IPython shell
    Animator().add(1, 1.0)
    assert display.shown == [] and (tmp_path / 'loss.png').exists()


# ---------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------

def test_bleu_perfect_matches():
    assert bleu('va !', 'va !', k=2) == 1.0
    assert bleu("j'ai perdu .", "j'ai perdu .", k=2) == 1.0


def test_bleu_partial_matches_by_hand():
    # Unigrams: il, est, . match (3/4); bigrams: only "il est" (1/3).
    expected = (3 / 4) ** 0.5 * (1 / 3) ** 0.25
    assert bleu('il est riche .', 'il est calme .', k=2) == pytest.approx(
        expected, rel=1e-12)
    assert round(expected, 3) == 0.658
    # Unigrams: je, suis (2/5); bigrams: "je suis" (1/4).
    expected = (2 / 5) ** 0.5 * (1 / 4) ** 0.25
    assert bleu('je suis en retard ?', 'je suis chez moi .', k=2) == \
        pytest.approx(expected, rel=1e-12)
    assert round(expected, 3) == 0.447


def test_bleu_brevity_penalty_and_clipping():
    # Prediction shorter than the label: exp(1 - 2/1) penalty.
    assert bleu('va', 'va !', k=1) == pytest.approx(math.exp(-1))
    # Longer prediction: no penalty, repeated "!" is clipped to one match.
    assert bleu('va ! !', 'va !', k=1) == pytest.approx((2 / 3) ** 0.5)
    assert bleu('a b', 'c d', k=1) == 0.0


# ---------------------------------------------------------------------------
# Corpus BLEU (sacrebleu)
# ---------------------------------------------------------------------------

def test_corpus_bleu_uses_sacrebleu():
    sacrebleu = pytest.importorskip('sacrebleu')
    hyps = ['il est riche .', 'je suis en retard .']
    refs = ['il est calme .', 'je suis chez moi .']
    score = corpus_bleu(hyps, refs)
    assert isinstance(score, float)
    assert score == sacrebleu.corpus_bleu(hyps, [refs]).score
    assert 0.0 < score < 100.0
    same = ['je suis chez moi .']
    assert corpus_bleu(same, same) == pytest.approx(100.0)
    # Like sacrebleu, a corpus without any 4-gram scores 0.
    assert corpus_bleu(['va !'], ['va !']) == 0.0


def test_corpus_bleu_multiple_references():
    sacrebleu = pytest.importorskip('sacrebleu')
    hyps = ['il est riche .', 'je pars .']
    refs = [('il est calme .', 'il est riche .'), ('je pars .', 'je vais .')]
    expected = sacrebleu.corpus_bleu(
        hyps, [['il est calme .', 'je pars .'],
               ['il est riche .', 'je vais .']]).score
    assert corpus_bleu(hyps, refs) == expected
    assert corpus_bleu(hyps, refs) == pytest.approx(100.0)


def test_corpus_bleu_input_errors():
    pytest.importorskip('sacrebleu')
    with pytest.raises(ValueError):
        corpus_bleu(['a'], ['a', 'b'])
    with pytest.raises(ValueError):
        corpus_bleu(['a', 'b'], [('a',), ('b', 'c')])
    with pytest.raises(ValueError, match='hypotheses: expected at least one'):
        corpus_bleu([], [])
    # a string beside lists would be read as one reference per character
    for refs in (['ab', ['xy', 'zw']], [['x'], 'ab'], [[]], [['x', 3]]):
        with pytest.raises(ValueError, match=r'references\[\d\]'):
            corpus_bleu(['a b'] * len(refs), refs)


def test_corpus_bleu_without_sacrebleu(monkeypatch):
    monkeypatch.setitem(sys.modules, 'sacrebleu', None)
    with pytest.raises(ImportError, match='pip install sacrebleu'):
        corpus_bleu(['va !'], ['va !'])
