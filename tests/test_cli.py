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
TRANSLATION_LINE = re.compile(
    r'^(.+) => (.*), bleu (\d\.\d{3}), (right|wrong \(reference: .+\))$', re.M)
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
    plot = tmp_path / 'checkpoint.loss.png'  # the curve goes beside the checkpoint
    out = _ok(run_cli(['train', '--epochs', '10', '--threads', '1'], tmp_path))

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
    for src, translation, score, verdict in translations:
        assert src and 0.0 <= float(score) <= 1.0
        if verdict == 'right':
            assert float(score) == 1.0

    held = HELD_OUT_LINE.search(out)
    assert held, out
    assert int(held.group(1)) == 100
    # the held-out score (with its exact-match rate) comes first, then the marked sample of it
    assert held.start() < out.index(f'{translations[0][0]} => ')
    assert 0.0 <= float(held.group(2)) <= 1.0
    assert 0.0 <= float(held.group(3)) <= 100.0
    if importlib.util.find_spec('sacrebleu') is not None:
        assert re.search(r'corpus BLEU \d+\.\d$', out, re.M), out

    assert plot.read_bytes().startswith(PNG_MAGIC)
    assert f'loss curve saved to {plot}' in out
    assert f'checkpoint saved to {tmp_path / "checkpoint.pt"}' in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint.loss.png', 'checkpoint.pt']


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
    srcs = [src for src, _, _, _ in TRANSLATION_LINE.findall(out)]
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


def test_translate_input_with_a_byte_order_mark_or_cr_line_ends(trained, tmp_path):
    path, _ = trained
    sentences = ['forty two', 'seven']
    args = ['translate', '--checkpoint', path, '--threads', '1']
    out = _ok(run_cli(args + sentences, tmp_path)).splitlines()
    for raw in ('\ufeff' + '\n'.join(sentences) + '\n', '\r'.join(sentences) + '\r',
                '\ufeff' + '\r\n'.join(sentences)):
        src = tmp_path / 'in.txt'
        src.write_bytes(raw.encode('utf-8'))
        got = run_cli(args + ['--file', src], tmp_path)
        assert _ok(got).splitlines() == out and 'unknown' not in got.stderr, repr(raw)
        proc = subprocess.run([sys.executable, '-m', 'seq2seq_ext.cli'] + [str(a) for a in args],
                              input=raw.encode('utf-8'), cwd=tmp_path, env=_env(),
                              capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.decode().splitlines() == out, repr(raw)
        assert b'unknown' not in proc.stderr, repr(raw)


def test_translate_refuses_a_num_steps_no_source_can_be_padded_to(trained, capsys):
    status, out, err = _main(['translate', '--checkpoint', trained[0], '--num-steps',
                              str(2 ** 62), 'seven'], capsys)
    assert '--num-steps' in _one_line_error(status, err, 2) and out == ''


def test_translate_reads_a_text_stream_in_place_of_stdin_and_refuses_a_closed_one(
        trained, monkeypatch, capsys):
    import io
    args = ['translate', '--checkpoint', trained[0], '--threads', '1']
    want, _ = _main(args + ['forty two', 'seven'], capsys)[1:]
    monkeypatch.setattr(sys, 'stdin', io.StringIO('\ufeffforty two\rseven\n'))
    status, out, err = _main(args, capsys)
    assert status == 0 and out == want, err
    monkeypatch.setattr(sys, 'stdin', None)
    status, out, err = _main(args, capsys)
    assert 'standard input is closed' in _one_line_error(status, err, 2)


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


def test_evaluate_refuses_a_split_moved_into_the_training_data(trained, tmp_path):
    path, _ = trained  # trained with --held-out 20
    proc = run_cli(['evaluate', '--checkpoint', path, '--threads', '1', '--held-out', '60'],
                   tmp_path)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr
    assert re.search(r'--held-out 60: 40 of the 60 pairs .* training data', proc.stderr), \
        proc.stderr
    # fewer held-out pairs than it was trained beside: a part of that split, still held out
    out = _ok(run_cli(['evaluate', '--checkpoint', path, '--threads', '1', '--held-out', '10'],
                      tmp_path))
    held = HELD_OUT_LINE.search(out)
    assert held and int(held.group(1)) == 10, out


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
    # Adam's state too: its step counts and both moments, bit for bit
    opt_a = torch.load(straight / 'checkpoint.pt', weights_only=True)['train']['optimizer']
    opt_b = state['train']['optimizer']
    assert opt_a['param_groups'] == opt_b['param_groups']
    assert opt_a['state'].keys() == opt_b['state'].keys() and opt_a['state']
    for index, moments in opt_a['state'].items():
        assert moments.keys() == opt_b['state'][index].keys()
        for name, value in moments.items():
            assert torch.equal(value, opt_b['state'][index][name]), (index, name)


def test_resume_refuses_changed_settings_and_bad_files(trained, tmp_path):
    path, _ = trained
    proc = run_cli(['train', '--resume', path, '--epochs', '8', '--lr', '0.1'], tmp_path)
    assert proc.returncode == 2 and '--lr' in proc.stderr and 'Traceback' not in proc.stderr
    proc = run_cli(['train', '--resume', path, '--epochs', '6'], tmp_path)
    assert proc.returncode == 2 and '--epochs' in proc.stderr, proc.stderr
    proc = run_cli(['train', '--resume', path, '--epochs', '8', '--dataset', 'fra-eng'],
                   tmp_path)
    assert proc.returncode == 2 and '--dataset fra-eng differs' in proc.stderr, proc.stderr
    missing = tmp_path / 'missing.pt'
    for command in (['train', '--resume', missing], ['translate', '--checkpoint', missing, 'x'],
                    ['evaluate', '--checkpoint', missing]):
        proc = run_cli(command, tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert str(missing) in proc.stderr and 'Traceback' not in proc.stderr


@pytest.mark.parametrize('signame, status', [('SIGINT', 130), ('SIGTERM', 143)])
def test_ctrl_c_leaves_a_resumable_checkpoint(tmp_path, signame, status):
    """Ctrl-C, and SIGTERM (kill, a scheduler, torchrun stopping a failed run's processes),
    save the last completed epoch and exit with 128 + the signal's number."""
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
    proc.send_signal(getattr(signal, signame))
    out, err = proc.communicate(timeout=60)
    out = ''.join(seen) + out
    assert proc.returncode == status, (out, err)
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
        for line in ('', 'seven'):  # refused whatever the input, none of it decoded
            proc = run_cli(['translate', '--checkpoint', 'checkpoint.pt', '--dtype', 'bf16',
                            line], tmp_path)
            line = _one_line_error(proc.returncode, proc.stderr, 2)
            assert '--dtype bf16' in line and 'lstm' in line and proc.stdout == ''
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


def test_sigterm_to_a_multi_process_run_stops_every_process(tmp_path):
    """kill, a scheduler or docker stop signal the launcher only: torchrun gets the SIGTERM, its
    workers save their last epoch, and nothing is left running (exit 143, as one process's)."""
    import signal
    import time
    torch_dist = pytest.importorskip('torch.distributed')
    if not torch_dist.is_available() or not torch_dist.is_gloo_available():
        pytest.skip('torch.distributed with gloo is not available')
    log = tmp_path / 'out.txt'
    ckpt = tmp_path / 'run.pt'  # in every process's arguments: how the test finds them
    args = ['train', '--nproc', '2', '--epochs', '500', '--batch-size', '64', '--device', 'cpu',
            '--save-every', '1', '--checkpoint', str(ckpt), *QUICK]
    with open(log, 'w') as out:
        proc = subprocess.Popen([sys.executable, '-m', 'seq2seq_ext.cli'] + args, cwd=tmp_path,
                                env=_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while 'epoch 10,' not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(1)
    ps = subprocess.run(['ps', '-eo', 'args'], capture_output=True, text=True).stdout
    assert str(ckpt) not in ps, ps  # the launcher, torchrun and the workers all ended
    saved = torch.load(ckpt, weights_only=True)['train']['epoch']
    assert 10 <= saved < 500
    assert not (tmp_path / 'run.pt.lock').exists()


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


# --- never lose a run: refusal to overwrite, the checkpoint lock -------------------------------

def _main(args, capsys):
    """Run the command line in this process through its entry point ``cli.main``: ``(exit
    status, stdout, stderr)``."""
    from seq2seq_ext import cli
    try:
        status = cli.main([str(a) for a in args])
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status or 0, out, err


def _one_line_error(status, err, expected_status):
    assert status == expected_status, err
    assert 'Traceback' not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('seq2seq-ext: error: '), err
    return lines[0]


def test_train_refuses_to_replace_another_run(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / 'checkpoint.pt'
    path.write_bytes(trained[0].read_bytes())
    before = path.read_bytes()
    status, out, err = _main(['train', '--epochs', '1', '--no-progress'], capsys)
    line = _one_line_error(status, err, 2)
    assert 'checkpoint.pt already holds a run on dataset numbers at epoch 6' in line
    assert '--overwrite' in line and '--resume checkpoint.pt' in line
    assert path.read_bytes() == before and out == ''
    # a file that is not a checkpoint is not replaced either
    notes = tmp_path / 'notes.txt'
    notes.write_text('my notes')
    status, _, err = _main(['train', '--checkpoint', notes, '--epochs', '1'], capsys)
    assert 'not a checkpoint' in _one_line_error(status, err, 2)
    assert notes.read_text() == 'my notes'
    # the refusal left no lock file and no plot behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint.pt', 'notes.txt']


def test_overwrite_replaces_the_run(trained, tmp_path):
    path = tmp_path / 'checkpoint.pt'
    path.write_bytes(trained[0].read_bytes())
    _ok(run_cli(['train', '--epochs', '1', '--overwrite', *QUICK], tmp_path))
    assert torch.load(path, weights_only=True)['train']['epoch'] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint.pt']


def test_two_trainings_on_one_checkpoint_one_fails_at_once_naming_the_other(tmp_path):
    """Both start together; whichever takes the lock trains, the other stops at once with the
    winner's pid, and the checkpoint is the winner's alone."""
    import signal
    import time
    command = [sys.executable, '-m', 'seq2seq_ext.cli', 'train', '--epochs', '500',
               '--save-every', '1000', *[str(a) for a in QUICK]]
    procs = [subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        deadline = time.monotonic() + 120
        while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        loser = next(p for p in procs if p.poll() is not None)
        winner = procs[1 - procs.index(loser)]
        assert winner.poll() is None  # still training
        out, err = loser.communicate()
        assert loser.returncode == 1, (out, err)
        assert 'Traceback' not in err
        assert f'pid {winner.pid}' in err and 'checkpoint.pt is in use' in err, err
        assert not (tmp_path / 'checkpoint.pt').exists()
        # the lock file names the winner while it runs
        assert (tmp_path / 'checkpoint.pt.lock').read_text().strip() == str(winner.pid)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
    out, err = winner.communicate(timeout=120)
    assert winner.returncode == 130, err
    assert torch.load(tmp_path / 'checkpoint.pt', weights_only=True)['train']['epoch'] >= 1
    assert not (tmp_path / 'checkpoint.pt.lock').exists()


# --- errors a person reads ---------------------------------------------------------------------

def _error_cases(tmp_path, trained_path):
    latin1 = tmp_path / 'latin1.txt'
    latin1.write_bytes('caf\xe9\tcaf\xe9\n'.encode('latin-1'))
    corrupt = tmp_path / 'corrupt.pt'
    corrupt.write_bytes(trained_path.read_bytes()[:500])
    (tmp_path / 'a_directory').mkdir()
    return [
        # (arguments, exit status, words the message must hold)
        (['train', '--dataset', 'pairs', '--data', latin1, '--checkpoint', ''], 1,
         [str(latin1), 'UTF-8']),
        (['train', '--dataset', 'fra-eng', '--data', latin1, '--checkpoint', ''], 1,
         [str(latin1), 'UTF-8']),
        (['train', '--dataset', 'pairs', '--data', tmp_path / 'missing.txt',
          '--checkpoint', ''], 1, ['missing.txt', 'not found']),
        (['train', '--dataset', 'pairs', '--data', tmp_path / 'a_directory',
          '--checkpoint', ''], 1, ['a_directory']),
        (['train', '--dataset', 'pairs', '--checkpoint', ''], 2, ['--data']),
        (['train', '--checkpoint', tmp_path / 'a_directory'], 2, ['a_directory', 'directory']),
        (['translate', '--checkpoint', tmp_path / 'missing.pt', 'x'], 2, ['missing.pt']),
        (['translate', '--checkpoint', corrupt, 'x'], 2, [str(corrupt)]),
        (['translate', '--checkpoint', trained_path, '--file', tmp_path / 'none.txt'], 2,
         ['none.txt']),
        (['translate', '--checkpoint', trained_path, '--file', latin1], 2,
         [str(latin1), 'UTF-8']),
        (['evaluate', '--checkpoint', trained_path, '--dataset', 'pairs', '--data', latin1], 1,
         [str(latin1)]),
        (['train', '--resume', tmp_path / 'missing.pt'], 2, ['missing.pt']),
        (['translate', '--checkpoint', trained_path, '--dtype', 'bf16', '--beam', '2', 'seven'], 2,
         ['--dtype bf16', '--beam']),
        (['translate', '--checkpoint', trained_path, '--dtype', 'bf16', '--backend',
          'reference', 'seven'], 2, ['--dtype bf16', 'weight_dtype']),
        (['translate', '--checkpoint', trained_path, '--file', tmp_path / 'a_directory'], 2,
         ['a_directory', 'directory']),
        (['translate', '--checkpoint', trained_path, '--file', latin1 / 'x'], 2,
         ['--file', str(latin1 / 'x'), 'Not a directory']),
        # --data / --num-examples beside the built-in corpus, which would ignore them
        (['train', '--data', tmp_path / 'pairs.txt', '--checkpoint', ''], 2,
         ['--data', 'numbers']),
        (['train', '--num-examples', '5', '--checkpoint', ''], 2, ['--num-examples']),
        (['evaluate', '--checkpoint', trained_path, '--data', tmp_path / 'pairs.txt'], 2,
         ['--data', 'numbers']),
        # the loss curve never replaces the checkpoint
        (['train', '--checkpoint', tmp_path / 'run.pt', '--plot', tmp_path / 'run.pt'], 2,
         ['--plot', 'run.pt', '--checkpoint']),
        # held-out sentences the built-in corpus does not have; a global batch the processes
        # cannot share equally (refused before any process starts)
        (['train', '--held-out', '1000', '--checkpoint', ''], 2, ['--held-out', '1000']),
        (['train', '--held-out', '990', '--checkpoint', ''], 2, ['--held-out', '990']),
        (['evaluate', '--checkpoint', trained_path, '--held-out', '990'], 2, ['--held-out']),
        (['train', '--nproc', '2', '--batch-size', '63', '--checkpoint', ''], 2,
         ['--batch-size', '--nproc 2', '63']),
        (['train', '--nproc', '3', '--checkpoint', ''], 2, ['--batch-size', '--nproc 3', '64']),
        # a run of one process resumed by two (refused before they start)
        (['train', '--nproc', '2', '--resume', trained_path, '--epochs', '9'], 2,
         ['--nproc 2', '1 process(es)']),
    ]


def test_every_failure_is_one_line_with_its_exit_status(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for args, status_expected, words in _error_cases(tmp_path, trained[0]):
        status, out, err = _main(args, capsys)
        line = _one_line_error(status, err, status_expected)
        for word in words:
            assert word in line, (args, line)
    # nothing was written by any of them
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a_directory', 'corrupt.pt',
                                                         'latin1.txt']


def test_fra_eng_without_the_corpus_or_network_names_the_data_option(tmp_path, monkeypatch,
                                                                     capsys):
    from seq2seq_ext.data import corpus

    def offline(name):
        raise OSError('no network')
    monkeypatch.setattr(corpus, 'download_extract', offline)
    monkeypatch.delenv('SEQ2SEQ_EXT_DATA', raising=False)
    monkeypatch.chdir(tmp_path)
    status, out, err = _main(['train', '--dataset', 'fra-eng', '--checkpoint', ''], capsys)
    line = _one_line_error(status, err, 2)
    assert '--data' in line and 'SEQ2SEQ_EXT_DATA' in line and 'no network' in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('args, flag', [
    (['train', '--lr', 'nan'], '--lr'),
    (['train', '--device', 'bogus'], '--device'),
    (['train', '--held-out', '-5'], '--held-out'),
    (['translate', '--checkpoint', 'c.pt', '--beam', '2', '--alpha', 'inf', 'x'], '--alpha'),
    (['translate', '--checkpoint', 'c.pt', '--alpha', 'nan', 'x'], '--alpha'),
    (['train', '--device', 'meta'], '--device'),
    (['train', '--seed', str(1 << 70)], '--seed'),
    (['train', '--seed', str((1 << 64) - 1)], '--seed'),  # no room for the sampler's + epoch
    (['train', '--device', 'hpu'], '--device'),
    (['evaluate', '--checkpoint', 'c.pt', '--samples', '-2'], '--samples'),
    (['bench', '--cases', 'ce-small', '--threads', '0'], '--threads'),
    (['bench', '--cases', 'ce-small', '--threads', str((os.cpu_count() or 1) + 1)], '--threads'),
    (['train', '--threads', '100000'], '--threads'),  # OpenMP would abort, or crash
    (['translate', '--checkpoint', 'c.pt', '--threads', '100000', 'x'], '--threads'),
    (['bench', '--cases', 'ce-small', '--repeat', '0'], '--repeat'),
] + ([] if torch.cuda.is_available() else [
    (['train', '--device', 'cuda'], '--device'),   # a build or machine without CUDA
    (['train', '--device', 'cuda:3'], '--device'),
    (['translate', '--checkpoint', 'c.pt', '--device', 'cuda', 'x'], '--device')]))
def test_options_out_of_range_are_usage_errors(args, flag, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status, out, err = _main(args, capsys)
    assert status == 2 and f'argument {flag}' in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('args, unknown, prog', [
    (['train', '--foo'], '--foo', 'seq2seq-ext train'),
    (['translate', '--checkpoint', 'c.pt', '--beams', '2', 'x'], '--beams',
     'seq2seq-ext translate'),
    (['evaluate', '--checkpoint', 'c.pt', 'extra'], 'extra', 'seq2seq-ext evaluate'),
    (['--epochs=3', 'train'], '--epochs=3', 'seq2seq-ext'),  # before the command: the program's
])
def test_unknown_arguments_are_usage_errors_of_their_part(args, unknown, prog, tmp_path,
                                                          monkeypatch, capsys):
    """Reported by the command's parser, after its usage lines, as a bad value is; before the
    command, by the program's."""
    monkeypatch.chdir(tmp_path)
    status, out, err = _main(args, capsys)
    assert status == 2 and err.startswith(f'usage: {prog} '), err
    assert f'{prog}: error: unrecognized arguments: {unknown}\n' in err, err
    assert list(tmp_path.iterdir()) == []


def test_plot_replaces_only_a_loss_curve(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    other = tmp_path / 'other.pt'
    other.write_bytes(trained[0].read_bytes())
    status, _, err = _main(['train', '--epochs', '1', '--checkpoint', '', '--plot', other,
                            '--no-progress'], capsys)
    assert 'not a PNG image' in _one_line_error(status, err, 2)
    assert other.read_bytes() == trained[0].read_bytes()
    # an earlier loss curve is redrawn
    curve = tmp_path / 'curve.png'
    for _ in range(2):
        status, out, err = _main(['train', '--epochs', '1', '--checkpoint', '', '--plot', curve,
                                  '--no-progress', '--threads', '1'], capsys)
        assert status == 0, err
        assert curve.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.skipif(not hasattr(os, 'symlink'), reason='needs symbolic links')
def test_plot_never_reaches_the_checkpoint_by_another_path(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'curve.png').symlink_to('run.pt')
    (tmp_path / 'runs').symlink_to('.')
    for plot in ('curve.png', 'runs/run.pt'):
        status, _, err = _main(['train', '--epochs', '1', '--checkpoint', 'run.pt', '--plot',
                                plot, '--no-progress'], capsys)
        assert 'is the file of --checkpoint' in _one_line_error(status, err, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['curve.png', 'runs']


@pytest.mark.parametrize('flag', ['--plot', '--checkpoint'])
def test_a_file_where_a_folder_of_an_output_should_be_is_refused_first(flag, tmp_path,
                                                                        monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'afile').write_text('not a folder')
    args = ['train', '--epochs', '1', '--no-progress', '--checkpoint', 'run.pt', '--plot', '']
    args[args.index(flag) + 1] = 'afile/sub/out.png' if flag == '--plot' else 'afile/run.pt'
    status, _, err = _main(args, capsys)
    line = _one_line_error(status, err, 2)
    assert flag in line and 'is a file, not a folder' in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ['afile']


def test_train_warns_when_the_corpus_leaves_nothing_held_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / 'pairs.txt'
    corpus.write_text(''.join(f'w{i} .\tm{i} .\n' for i in range(20)), encoding='utf-8')
    status, out, err = _main(['train', '--dataset', 'pairs', '--data', corpus, '--epochs', '1',
                              '--checkpoint', '', '--plot', '', '--no-progress',
                              '--threads', '1'], capsys)
    assert status == 0, err
    assert 'warning: no held-out pairs' in err and 'held-out (' not in out


def test_a_refused_run_leaves_no_folders(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status, _, err = _main(['train', '--epochs', '1', '--held-out', '5000', '--checkpoint',
                            'a/b/run.pt', '--no-progress'], capsys)
    assert '--held-out' in _one_line_error(status, err, 2)
    assert list(tmp_path.iterdir()) == []


def test_bench_refuses_a_json_file_without_a_folder_before_running(tmp_path, monkeypatch,
                                                                   capsys):
    from seq2seq_ext.bench import compare
    ran = []
    monkeypatch.setattr(compare, 'CASES', {'ce-small': ('t', 'x', lambda r: ran.append(r))})
    status, _, err = _main(['bench', '--cases', 'ce-small', '--json', tmp_path / 'no' / 'r.json'],
                           capsys)
    line = _one_line_error(status, err, 2)
    assert '--json' in line and 'ValueError' not in line and ran == []


def test_an_unexpected_failure_is_one_line_and_debug_shows_the_traceback(
        trained, tmp_path, monkeypatch, capsys):
    from seq2seq_ext import cli

    def broken(*args, **kwargs):
        raise RuntimeError('something broke')
    monkeypatch.setattr(cli, 'predict_seq2seq_batch', broken)
    args = ['translate', '--checkpoint', trained[0], 'seven']
    status, _, err = _main(args, capsys)
    line = _one_line_error(status, err, 1)
    assert 'RuntimeError: something broke' in line and '--debug' in line
    for debug in (['--debug'] + args, args + ['--debug']):
        with pytest.raises(RuntimeError, match='something broke'):
            cli.main([str(a) for a in debug])


def test_the_console_script_reports_one_line_or_the_traceback_with_debug(tmp_path):
    if not CONSOLE_SCRIPT.exists():
        pytest.skip(f'console script not installed at {CONSOLE_SCRIPT}')
    bad = tmp_path / 'bad.txt'
    bad.write_bytes(b'caf\xe9\tcaf\xe9\n')
    args = ['train', '--dataset', 'pairs', '--data', bad, '--checkpoint', '']
    proc = run_cli(args, tmp_path, command=[str(CONSOLE_SCRIPT)])
    line = _one_line_error(proc.returncode, proc.stderr, 1)
    assert str(bad) in line
    proc = run_cli(['--debug'] + args, tmp_path, command=[str(CONSOLE_SCRIPT)])
    assert proc.returncode == 1 and 'Traceback' in proc.stderr


# --- translate: empty lines, unknown words -----------------------------------------------------

def test_translate_with_bf16_weights(trained, capsys):
    """--dtype bf16: the library's greedy translations with the decoder's matrices in bfloat16."""
    path = trained[0]
    sentences = ['one hundred twenty three', 'forty two', 'seven']
    status, out, err = _main(['translate', '--checkpoint', path, '--dtype', 'bf16', *sentences],
                             capsys)
    assert status == 0, err
    from seq2seq_ext import checkpoint, predict_seq2seq_batch
    net, src_vocab, tgt_vocab, saved = checkpoint.load_model(path)
    assert out.splitlines() == predict_seq2seq_batch(
        net, sentences, src_vocab, tgt_vocab, saved['config']['num_steps'], 'cpu',
        weight_dtype=torch.bfloat16)


def test_empty_lines_translate_to_empty_lines(trained, tmp_path, capsys):
    path = trained[0]
    status, out, err = _main(['translate', '--checkpoint', path, '', 'seven', '   '], capsys)
    assert status == 0, err
    lines = out.split('\n')
    assert len(lines) == 4 and lines[0] == '' and lines[2] == '' and lines[3] == '', out
    assert lines[1] and lines[1] == _main(['translate', '--checkpoint', path, 'seven'],
                                          capsys)[1].strip()
    src = tmp_path / 'in.txt'
    src.write_text('forty two\n\nseven\n', encoding='utf-8')
    status, out, _ = _main(['translate', '--checkpoint', path, '--file', src], capsys)
    assert out.split('\n')[1] == '' and len(out.split('\n')) == 4, out
    status, out, _ = _main(['translate', '--checkpoint', path, ''], capsys)
    assert status == 0 and out == '\n'


def test_unknown_words_are_reported(trained, capsys):
    path = trained[0]
    status, out, err = _main(['translate', '--checkpoint', path, 'seven', 'xyzzy plugh seven'],
                             capsys)
    assert status == 0 and len(out.splitlines()) == 2
    assert err.count('warning') == 1, err
    assert "line 2 ('xyzzy plugh seven'): 2 of 3 source tokens are unknown" in err, err
    status, out, err = _main(['translate', '--verbose', '--checkpoint', path, 'seven',
                              'xyzzy seven two'], capsys)
    assert status == 0 and 'warning' not in err
    assert 'line 1: 0 of 1 source tokens unknown' in err
    assert 'line 2: 1 of 3 source tokens unknown' in err
    assert 'unknown source tokens: 1 of 4 (25.0%)' in err
    # exactly half unknown is not "more than half": no warning
    status, out, err = _main(['translate', '--checkpoint', path, 'xyzzy seven'], capsys)
    assert status == 0 and 'warning' not in err, err
    assert 'unknown' not in out
    status, out, err = _main(['evaluate', '--checkpoint', path], capsys)
    assert status == 0 and re.search(r'^unknown source tokens: 0 of \d+ \(0\.0%\)$', out, re.M)


# --- bench: the table alone on stdout ----------------------------------------------------------

def test_bench_prints_only_the_table_on_stdout(monkeypatch, capsys):
    """What a case prints (the trainings' ``loss ..., tokens/sec`` lines) goes to stderr;
    stdout is the table alone. The case here trains the chapter's loop as the
    training cases do, at a toy size."""
    from seq2seq_ext.bench import compare
    from seq2seq_ext.data import load_data_numbers
    import seq2seq_ext as d2l

    def noisy_case(repeat):
        train_iter, src_vocab, tgt_vocab, _ = load_data_numbers(64, 6, num_held_out=10, stop=40)
        net = d2l.EncoderDecoder(d2l.Seq2SeqEncoder(len(src_vocab), 8, 8, 1),
                                 d2l.Seq2SeqDecoder(len(tgt_vocab), 8, 8, 1))
        d2l.train_seq2seq(net, train_iter, 0.005, 10, tgt_vocab, 'cpu')  # xlim [10, 10]
        return 2e-3, 1e-3, None
    monkeypatch.setitem(compare.CASES, 'noisy', ('a noisy case', '>=1x', noisy_case))
    monkeypatch.setenv('SEQ2SEQ_EXT_PLOT', '')
    before = torch.get_num_threads()
    try:
        status, out, err = _main(['bench', '--cases', 'noisy', '--repeat', '1'], capsys)
    finally:
        torch.set_num_threads(before)
    assert status == 0, err
    lines = out.strip().splitlines()
    assert lines[0].startswith('# seq2seq_ext vs reference') and lines[1] == ''
    assert all(line.startswith('|') for line in lines[2:]), out
    assert re.search(r'^\| a noisy case \| 2\.00 ms \| 1\.00 ms \| 2\.0x \|', out, re.M), out
    assert 'tokens/sec' in err and 'running noisy' in err
    assert 'xlim' not in err  # no matplotlib warning about the curve's range either
