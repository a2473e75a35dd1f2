"""The ``seq2seq-ext`` command line, driven through its real entry points: ``python -m
seq2seq_ext.cli`` and the installed console script."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
DEVICE = 'cuda:0' if torch.cuda.is_available() else 'cpu'
CONSOLE_SCRIPT = Path(sys.executable).parent / 'seq2seq-ext'

CHAPTER_LINE = re.compile(r'^loss \d+\.\d{3}, \d+\.\d tokens/sec on (\S+)$', re.M)
EPOCH_LINE = re.compile(r'^epoch (\d+), loss \d+\.\d{3}, \d+\.\d tokens/sec$', re.M)
TRANSLATION_LINE = re.compile(r'^(.+) => (.*), bleu (\d\.\d{3})$', re.M)
HELD_OUT_LINE = re.compile(
    r'^held-out \((\d+) sentences\): mean bleu (\d\.\d{3}), exact (\d+\.\d)%', re.M)
HEADER_LINE = re.compile(
    r'^dataset (\S+): (\d+) training pairs, vocab (\d+) -> (\d+), backend (\w+)$', re.M)


def _env():
    env = dict(os.environ)
    for name in ('SEQ2SEQ_EXT_BACKEND', 'SEQ2SEQ_EXT_DATA', 'SEQ2SEQ_EXT_PLOT'):
        env.pop(name, None)
    return env


def run_cli(args, cwd, command=None, timeout=300):
    """Run the command line in ``cwd`` (nothing may land in the repository)."""
    command = [sys.executable, '-m', 'seq2seq_ext.cli'] if command is None else command
    return subprocess.run(command + [str(a) for a in args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def _ok(proc):
    assert proc.returncode == 0, f'exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}'
    return proc.stdout


def test_train_numbers_reports_loss_speed_translations_bleu_and_plot(tmp_path):
    plot = tmp_path / 'loss.png'
    out = _ok(run_cli(['train', '--epochs', '10', '--threads', '1', '--plot', plot], tmp_path))

    header = HEADER_LINE.search(out)
    assert header, out
    assert header.group(1) == 'numbers' and header.group(5) == 'ext'
    assert int(header.group(2)) == 900  # 1000 numbers, 100 held out

    assert 'epoch 10, loss' in out
    assert [int(e) for e in EPOCH_LINE.findall(out)] == [10]
    chapter = CHAPTER_LINE.findall(out)
    assert chapter == [DEVICE], out

    translations = TRANSLATION_LINE.findall(out)
    assert len(translations) == 4, out
    for src, translation, score in translations:
        assert src and 0.0 <= float(score) <= 1.0

    held = HELD_OUT_LINE.search(out)
    assert held, out
    assert int(held.group(1)) == 100
    assert 0.0 <= float(held.group(2)) <= 1.0
    assert 0.0 <= float(held.group(3)) <= 100.0
    if importlib.util.find_spec('sacrebleu') is not None:
        assert re.search(r'corpus BLEU \d+\.\d$', out, re.M), out

    assert plot.read_bytes().startswith(PNG_MAGIC)
    assert f'loss curve saved to {plot}' in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ['loss.png']


def test_train_under_the_reference_backend(tmp_path):
    out = _ok(run_cli(['train', '--epochs', '1', '--threads', '1', '--plot', '',
                       '--held-out', '10', '--num-hiddens', '16', '--backend', 'reference'],
                      tmp_path))
    assert HEADER_LINE.search(out).group(5) == 'reference'
    assert CHAPTER_LINE.findall(out) == [DEVICE]
    assert len(TRANSLATION_LINE.findall(out)) == 4, out
    assert list(tmp_path.iterdir()) == []  # --plot '' writes nothing


def test_console_script_help(tmp_path):
    if not CONSOLE_SCRIPT.exists():
        pytest.skip(f'console script not installed at {CONSOLE_SCRIPT}')
    out = _ok(run_cli(['--help'], tmp_path, command=[str(CONSOLE_SCRIPT)]))
    assert out.startswith('usage: seq2seq-ext')
    assert 'train' in out

    out = _ok(run_cli(['train', '--help'], tmp_path, command=[str(CONSOLE_SCRIPT)]))
    assert out.startswith('usage: seq2seq-ext train')
    for option in ('--dataset', '--data', '--num-examples', '--epochs', '--threads', '--plot',
                   '--backend', '--device', '--seed', '--held-out'):
        assert option in out, option
    assert '{numbers,fra-eng,pairs}' in out


def test_no_command_is_a_usage_error(tmp_path):
    proc = run_cli([], tmp_path)
    assert proc.returncode == 2
    assert 'usage: seq2seq-ext' in proc.stderr


def test_train_pairs_file(small_corpus, tmp_path):
    out = _ok(run_cli(['train', '--dataset', 'pairs', '--data', small_corpus, '--epochs', '2',
                       '--threads', '1', '--plot', tmp_path / 'curve.png'], tmp_path))
    header = HEADER_LINE.search(out)
    assert header, out
    # the chapter's num_examples=600 semantics: 601 training pairs, then 100 held out
    assert header.group(1) == 'pairs' and int(header.group(2)) == 601
    assert CHAPTER_LINE.findall(out) == [DEVICE]
    translations = TRANSLATION_LINE.findall(out)
    assert len(translations) == 4, out
    held = HELD_OUT_LINE.search(out)
    assert held and int(held.group(1)) == 100, out
    # no 10th epoch: no point was plotted, and no file needs to exist; if one does, it is a PNG
    curve = tmp_path / 'curve.png'
    if curve.exists():
        assert curve.read_bytes().startswith(PNG_MAGIC)


def test_pairs_without_data_fails_clearly(tmp_path):
    proc = run_cli(['train', '--dataset', 'pairs', '--epochs', '1', '--plot', ''], tmp_path)
    assert proc.returncode != 0
    assert '--data' in proc.stderr and 'pairs' in proc.stderr, proc.stderr
    assert 'Traceback' not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_train_fra_eng_file(fra_eng_path, tmp_path):
    out = _ok(run_cli(['train', '--dataset', 'fra-eng', '--data', fra_eng_path, '--epochs', '2',
                       '--num-examples', '100', '--threads', '1', '--plot', ''], tmp_path))
    header = HEADER_LINE.search(out)
    assert header, out
    assert header.group(1) == 'fra-eng' and int(header.group(2)) == 101
    assert CHAPTER_LINE.findall(out) == [DEVICE]
    srcs = [src for src, _, _ in TRANSLATION_LINE.findall(out)]
    assert srcs == ['go .', 'i lost .', "he's calm .", "i'm home ."], out
    assert HELD_OUT_LINE.search(out), out
