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
    assert f'checkpoint saved to {tmp_path / "checkpoint.pt"}' in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint.pt', 'loss.png']


def test_train_under_the_reference_backend(tmp_path):
    out = _ok(run_cli(['train', '--epochs', '1', '--threads', '1', '--plot', '',
                       '--held-out', '10', '--num-hiddens', '16', '--backend', 'reference',
                       '--checkpoint', ''], tmp_path))
    assert HEADER_LINE.search(out).group(5) == 'reference'
    assert CHAPTER_LINE.findall(out) == [DEVICE]
    assert len(TRANSLATION_LINE.findall(out)) == 4, out
    assert list(tmp_path.iterdir()) == []  # --plot '' and --checkpoint '' write nothing


def test_console_script_help(tmp_path):
    if not CONSOLE_SCRIPT.exists():
        pytest.skip(f'console script not installed at {CONSOLE_SCRIPT}')
    out = _ok(run_cli(['--help'], tmp_path, command=[str(CONSOLE_SCRIPT)]))
    assert out.startswith('usage: seq2seq-ext')
    for command in ('train', 'translate', 'evaluate', 'bench'):
        assert command in out

    out = _ok(run_cli(['train', '--help'], tmp_path, command=[str(CONSOLE_SCRIPT)]))
    assert out.startswith('usage: seq2seq-ext train')
    for option in ('--dataset', '--data', '--num-examples', '--epochs', '--threads', '--plot',
                   '--backend', '--device', '--seed', '--held-out', '--checkpoint',
                   '--save-every', '--resume', '--nproc', '--amp', '--cell', '--fixed-context',
                   '--teacher-forcing', '--no-progress'):
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
    proc = run_cli(['train', '--dataset', 'pairs', '--epochs', '1', '--plot', '',
                    '--checkpoint', ''], tmp_path)
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


# --- checkpoints, translate, evaluate, resume, bench -------------------------------------------

# a small, quick configuration of the built-in corpus
QUICK = ['--threads', '1', '--plot', '', '--num-hiddens', '32', '--held-out', '20',
         '--no-progress']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A checkpoint of 6 epochs on the built-in corpus (every 3 epochs saved)."""
    where = tmp_path_factory.mktemp('trained')
    out = _ok(run_cli(['train', '--epochs', '6', '--save-every', '3', *QUICK], where))
    return where / 'checkpoint.pt', out


def test_translate_arguments_file_and_stdin_agree(trained, tmp_path):
    path, _ = trained
    sentences = ['one hundred twenty three', 'forty two', 'seven']
    args = ['translate', '--checkpoint', path, '--threads', '1']
    out = _ok(run_cli(args + sentences, tmp_path)).splitlines()
    assert len(out) == 3 and all(isinstance(line, str) for line in out)
    src = tmp_path / 'in.txt'
    src.write_text('\r\n'.join(sentences) + '\r\n', encoding='utf-8')
    assert _ok(run_cli(args + ['--file', src], tmp_path)).splitlines() == out
    proc = subprocess.run([sys.executable, '-m', 'seq2seq_ext.cli'] + [str(a) for a in args],
                          input='\n'.join(sentences) + '\n', cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert _ok(proc).splitlines() == out
    # the library gives the same greedy translations
    from seq2seq_ext import checkpoint, predict_seq2seq_batch
    net, src_vocab, tgt_vocab, saved = checkpoint.load_model(path)
    assert predict_seq2seq_batch(net, sentences, src_vocab, tgt_vocab,
                                 saved['config']['num_steps'], 'cpu') == out


def test_translate_with_beam_search(trained, tmp_path):
    path, _ = trained
    sentences = ['one hundred twenty three', 'forty two']
    out = _ok(run_cli(['translate', '--checkpoint', path, '--beam', '3', '--threads', '1']
                      + sentences, tmp_path)).splitlines()
    from seq2seq_ext import checkpoint
    from seq2seq_ext.beam import beam_search
    net, src_vocab, tgt_vocab, saved = checkpoint.load_model(path)
    assert out == beam_search(net, sentences, src_vocab, tgt_vocab,
                              saved['config']['num_steps'], 'cpu', beam_size=3, alpha=0.75)


def test_evaluate_scores_the_held_out_split(trained, tmp_path):
    path, train_out = trained
    out = _ok(run_cli(['evaluate', '--checkpoint', path, '--threads', '1'], tmp_path))
    held = HELD_OUT_LINE.search(out)
    assert held and int(held.group(1)) == 20, out
    # the same split and model as at the end of training: the same scores
    assert held.group(0) in train_out
    if importlib.util.find_spec('sacrebleu') is not None:
        assert re.search(r'corpus BLEU \d+\.\d$', out, re.M), out
    samples = re.findall(r'^(.+) => (.*) \(reference: (.+)\), bleu (\d\.\d{3})$', out, re.M)
    assert len(samples) == 4, out


def _weights(path):
    return torch.load(path, weights_only=True)['model']


def test_resume_continues_exactly(tmp_path):
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    straight.mkdir()
    split.mkdir()
    _ok(run_cli(['train', '--epochs', '4', *QUICK], straight))
    _ok(run_cli(['train', '--epochs', '2', *QUICK], split))
    out = _ok(run_cli(['train', '--resume', 'checkpoint.pt', '--epochs', '4', '--threads', '1',
                       '--plot', '', '--no-progress'], split))
    assert 'resumed checkpoint.pt at epoch 2' in out
    a, b = _weights(straight / 'checkpoint.pt'), _weights(split / 'checkpoint.pt')
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    state = torch.load(split / 'checkpoint.pt', weights_only=True)
    assert state['train']['epoch'] == 4


def test_resume_refuses_changed_settings_and_bad_files(trained, tmp_path):
    path, _ = trained
    proc = run_cli(['train', '--resume', path, '--epochs', '8', '--lr', '0.1'], tmp_path)
    assert proc.returncode == 2 and '--lr' in proc.stderr and 'Traceback' not in proc.stderr
    proc = run_cli(['train', '--resume', path, '--epochs', '6'], tmp_path)
    assert proc.returncode == 2 and '--epochs' in proc.stderr, proc.stderr
    missing = tmp_path / 'missing.pt'
    for command in (['train', '--resume', missing], ['translate', '--checkpoint', missing, 'x'],
                    ['evaluate', '--checkpoint', missing]):
        proc = run_cli(command, tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert str(missing) in proc.stderr and 'Traceback' not in proc.stderr


def test_ctrl_c_leaves_a_resumable_checkpoint(tmp_path):
    import signal
    proc = subprocess.Popen([sys.executable, '-m', 'seq2seq_ext.cli', 'train', '--epochs', '500',
                             '--save-every', '1000', *QUICK], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    path = tmp_path / 'checkpoint.pt'
    # no checkpoint is due before epoch 500: interrupt once epoch 10 is reported
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith('epoch 10,'):
            break
    assert not path.exists()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    out = ''.join(seen) + out
    assert proc.returncode == 130, (out, err)
    assert 'interrupted' in err and '--resume' in err, err
    epoch = torch.load(path, weights_only=True)['train']['epoch']
    assert 1 <= epoch < 500
    out = _ok(run_cli(['train', '--resume', path, '--epochs', str(epoch + 1), '--threads', '1',
                       '--plot', '', '--no-progress'], tmp_path))
    assert f'resumed {path} at epoch {epoch}' in out
    assert torch.load(path, weights_only=True)['train']['epoch'] == epoch + 1


@pytest.mark.parametrize('extra', [['--cell', 'lstm'], ['--fixed-context'],
                                   ['--teacher-forcing', '0.5'], ['--amp', 'bf16']],
                         ids=['lstm', 'fixed-context', 'teacher-forcing', 'amp'])
def test_train_variants_end_to_end(extra, tmp_path):
    out = _ok(run_cli(['train', '--epochs', '2', *QUICK, *extra], tmp_path))
    assert CHAPTER_LINE.findall(out) == [DEVICE]
    config = torch.load(tmp_path / 'checkpoint.pt', weights_only=True)['config']
    if '--cell' in extra:
        assert config['cell'] == 'lstm'
    if '--fixed-context' in extra:
        assert config['fixed_context'] is True
    trans = _ok(run_cli(['translate', '--checkpoint', 'checkpoint.pt', 'seven'], tmp_path))
    assert len(trans.splitlines()) == 1


def test_train_with_two_processes(tmp_path):
    torch_dist = pytest.importorskip('torch.distributed')
    if not torch_dist.is_available() or not torch_dist.is_gloo_available():
        pytest.skip('torch.distributed with gloo is not available')
    out = _ok(run_cli(['train', '--nproc', '2', '--epochs', '2', '--batch-size', '64',
                       '--device', 'cpu', *QUICK], tmp_path, timeout=300))
    assert '2 processes' in out
    assert len(CHAPTER_LINE.findall(out)) == 1, out  # rank 0 reports alone
    assert torch.load(tmp_path / 'checkpoint.pt', weights_only=True)['train']['epoch'] == 2


def test_bench_command_prints_the_ratio_table(tmp_path):
    out = _ok(run_cli(['bench', '--cases', 'ce-small', '--repeat', '1'], tmp_path))
    assert '| case | reference | extension | ratio |' in out
    row = re.search(r'^\| masked CE fwd\+bwd \(64, 10, 201\) f32 \| .+ \| (\d+\.\d)x \|', out,
                    re.M)
    assert row, out


@pytest.mark.parametrize('command', ['translate', 'evaluate', 'bench'])
def test_every_command_has_help(command, capsys):
    from seq2seq_ext import cli
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, '--help'])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f'usage: seq2seq-ext {command}'), out
    options = {'translate': ['--checkpoint', '--file', '--beam', '--alpha', '--batch-size'],
               'evaluate': ['--checkpoint', '--dataset', '--data', '--held-out', '--beam'],
               'bench': ['--cases', '--threads', '--repeat']}[command]
    for option in options:
        assert option in out, option
