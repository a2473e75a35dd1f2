"""The ``seq2seq-ext`` command line: ``train``, ``translate``, ``evaluate`` and ``bench``.

``seq2seq-ext train`` trains the chapter's model and reports the loss every 10 epochs, the
chapter's ``loss ..., ... tokens/sec on ...`` line, translations with BLEU and a held-out BLEU;
it draws a progress bar, saves the loss curve as a PNG and writes a checkpoint every few epochs
and at the end (``--resume`` continues one exactly). Its default corpus is built in (English to
French number names), so it needs no network; ``--dataset fra-eng`` uses the chapter's corpus.

``translate`` and ``evaluate`` load a checkpoint; ``bench`` prints the reference-vs-extension
ratio table. ``train --nproc N`` runs N processes with ``torch.distributed`` (through
``torchrun``).
"""
import argparse
import io
import math
import os
import signal
import sys
import threading

import torch

from . import checkpoint as ckpt
from . import data, malloc, ops, runs
from .config import RUN_KEYS, RunConfig
from .runlock import RunLock, RunLockError
from .beam import MAX_ALPHA
from .decoding import predict_seq2seq_batch
from .metrics import bleu, corpus_bleu
from .utils import Animator

class UsageError(Exception):
    """A command-line mistake: reported as ``seq2seq-ext: error: ...`` with exit status 2."""


def _error_report(exc):
    """``(exit status, one-line message)`` for an exception that reached the command line:
    2 when the command cannot run as given (options, a checkpoint that cannot be used or must
    not be replaced), 1 when it failed while running (a corpus that cannot be read, a file
    system error, a run already holding the checkpoint, anything unexpected)."""
    if isinstance(exc, (UsageError, runs.RunError, ckpt.CheckpointError)):
        return 2, str(exc)
    if isinstance(exc, (RunLockError, data.CorpusError)):
        return 1, str(exc)
    if isinstance(exc, UnicodeDecodeError):
        return 1, f'not UTF-8 text: {exc}'
    if isinstance(exc, OSError):
        where = exc.filename if exc.filename is not None else ''
        reason = exc.strerror or str(exc)
        return 1, f'{where}: {reason}' if where else reason
    return 1, f'{type(exc).__name__}: {exc} (--debug shows the traceback)'


def _sentence_bleu(pred, label):
    """d2l's bleu with k=2, or k=1 for one-token predictions (k=2 is undefined there)."""
    return bleu(pred, label, k=2 if len(pred.split(' ')) >= 2 else 1)


def _positive(kind):
    def parse(text):
        value = kind(text)
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f'expected a positive number, got {text}')
        return value
    return parse


def thread_count(text):
    """--threads (also ``bench``'s): a positive int no larger than the number of logical CPUs
    (far more threads than CPUs only slows the run down, and OpenMP aborts when it cannot create
    them)."""
    value = _positive(int)(text)
    cpus = os.cpu_count() or 1
    if value > cpus:
        raise argparse.ArgumentTypeError(
            f'expected at most {cpus} (the logical CPUs of this machine), got {text}')
    return value


def _non_negative(kind):
    def parse(text):
        value = kind(text)
        if not math.isfinite(value) or value < 0:
            raise argparse.ArgumentTypeError(f'expected a number >= 0, got {text}')
        return value
    return parse


def _device(text):
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (e.g. cpu, cuda, cuda:1)")
    if device.type == 'meta':
        raise argparse.ArgumentTypeError(f"{text!r} holds no data to train or translate with")
    if device.type == 'cuda':  # asked without touching a GPU (each rank binds its own later)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise argparse.ArgumentTypeError(
                f"{text!r} cannot be used here: {count} CUDA device(s) available")
    elif device.type != 'cpu':
        try:  # another backend: a device this machine and build can use
            torch.empty(0, device=device)
        except Exception as exc:  # noqa: BLE001 - any failure means: not here
            reason = (str(exc).splitlines() or [type(exc).__name__])[0].split('. ')[0]
            raise argparse.ArgumentTypeError(f"{text!r} cannot be used here: {reason[:200]}")
    return str(device)


# what torch.manual_seed takes, with room for DistributedSampler's seed + epoch
_SEED_RANGE = (-(1 << 63), (1 << 63) - (1 << 32))


def _seed(text):
    value = int(text)
    if not _SEED_RANGE[0] <= value <= _SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(
            f"expected an integer in [{_SEED_RANGE[0]}, {_SEED_RANGE[1]}], got {value}")
    return value


def _ratio(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f'expected a number in [0, 1], got {text}')
    return value


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

def _add_data_args(p, train=True):
    # (train's default, 'numbers', is applied by cmd_train when not resuming: a resumed run
    # keeps its own dataset, and a --dataset given with --resume must agree with it)
    p.add_argument('--dataset', choices=list(runs.DATASETS), default=None,
                   help="'numbers' (built in, offline; the default), 'fra-eng' (d2l's corpus: "
                        "downloaded, or --data PATH to fra.txt), 'pairs' (any tab-separated "
                        "file, --data)" if train else
                        "'numbers', 'fra-eng' or 'pairs' (default: the checkpoint's)")
    p.add_argument('--data', help='path to fra.txt or a tab-separated parallel file')
    p.add_argument('--num-examples', type=_positive(int), default=None,
                   help='fra-eng/pairs: how many examples to train on (chapter: 600)')
    p.add_argument('--held-out', type=_non_negative(int), default=None,
                   help='sentences held out from training and scored with BLEU (default 100)')


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------

def _add_train_args(p):
    _add_data_args(p)
    for name in ('embed_size', 'num_hiddens', 'num_layers', 'batch_size', 'num_steps'):
        p.add_argument('--' + name.replace('_', '-'), type=_positive(int), default=None,
                       help=f'chapter: {RunConfig.CHAPTER[name]}')
    p.add_argument('--dropout', type=_ratio, default=None, help='chapter: 0.1')
    p.add_argument('--lr', type=_positive(float), default=None, help='chapter: 0.005')
    p.add_argument('--epochs', type=_positive(int), default=None,
                   help=f"chapter: 300 (numbers default: {RunConfig.NUMBERS['epochs']}); with --resume, "
                        "the total to reach")
    p.add_argument('--cell', choices=['gru', 'lstm'], default=None,
                   help="the recurrent cell of encoder and decoder (chapter: gru)")
    p.add_argument('--fixed-context', action='store_true', default=None,
                   help="decoder context: the encoder's final state at every step (d2l's later "
                        "fix) instead of the decoder's current state (the chapter's rule)")
    p.add_argument('--teacher-forcing', type=_ratio, default=None, metavar='RATIO',
                   help='probability of feeding the ground truth at each decoder step '
                        '(chapter: 1.0; below 1 the decoder runs step by step)')
    p.add_argument('--amp', choices=['bf16'], default=None,
                   help='mixed precision: autocast to bfloat16 (the loss accumulates in float32; '
                        "on a CPU without bf16 instructions, bf16's numbers at about float32's "
                        'speed)')
    p.add_argument('--device', type=_device, default=None,
                   help="e.g. cpu, cuda, cuda:1 (default: d2l's try_gpu)")
    p.add_argument('--seed', type=_seed, default=None, help='random seed (default 0)')
    p.add_argument('--threads', type=thread_count, default=None,
                   help='torch.set_num_threads (at most the logical CPUs)')
    p.add_argument('--backend', choices=list(ops.BACKENDS), default=None)
    p.add_argument('--plot', default=None, metavar='PATH',
                   help="loss curve PNG (default: beside the checkpoint, <stem>.loss.png; "
                        "'' to skip)")
    p.add_argument('--checkpoint', default=None, metavar='PATH',
                   help="checkpoint file, written every --save-every epochs, at the end and on "
                        "Ctrl-C (default checkpoint.pt, or with --resume the resumed file; '' to "
                        "skip). A file already there is never replaced without --overwrite")
    p.add_argument('--overwrite', action='store_true',
                   help='replace the run already saved at --checkpoint (otherwise refused)')
    p.add_argument('--save-every', type=_positive(int), default=10, metavar='N',
                   help='epochs between checkpoints (default 10)')
    p.add_argument('--resume', metavar='PATH',
                   help="continue the run saved in this checkpoint exactly (same settings, "
                        "optimizer state and data order); --epochs sets the total to reach")
    p.add_argument('--nproc', type=_positive(int), default=1,
                   help='train with N processes (torch.distributed via torchrun; gloo on CPU, '
                        'NCCL on GPU); the global batch is --batch-size')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')


def _check_data_args(dataset, args):
    """--data and --num-examples describe a file corpus: refused beside the built-in one
    (which would ignore them)."""
    if dataset == 'numbers':
        for flag, value in (('--data', args.data), ('--num-examples', args.num_examples)):
            if value is not None:
                raise UsageError(f"{flag} applies to --dataset fra-eng or pairs, not to the "
                                 f"built-in 'numbers' corpus")


def _same_file(a, b):
    """Whether paths ``a`` and ``b`` name one file: the same path once links are resolved, or
    two links (hard or symbolic) to one existing file."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def _check_folder(flag, path):
    """Refuses ``path`` (a file to write) when a folder above it is an existing file: training
    would fail there only when it first writes, after epochs of work."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UsageError(f'{flag} {path}: {folder} is a file, not a folder')


def _check_plot_path(args, path):
    """The loss curve never replaces the checkpoint, nor a file that is not a PNG image
    (a loss curve an earlier run drew is redrawn), unless --overwrite."""
    if path:
        _check_folder('--checkpoint', path)
    plot = _plot_path(args, path)
    if not plot:
        return
    for flag, other in (('--checkpoint', path), ('--resume', args.resume)):
        if other and _same_file(plot, other):
            raise UsageError(f'--plot {plot} is the file of {flag}: choose another file')
    _check_folder('--plot', plot)
    if os.path.isdir(plot):
        raise UsageError(f'--plot {plot} is a directory')
    if os.path.exists(plot) and not args.overwrite:
        with open(plot, 'rb') as f:
            if f.read(8) != b'\x89PNG\r\n\x1a\n':
                raise UsageError(f'--plot {plot} already holds a file that is not a PNG image: '
                                 f'pass --overwrite to replace it, or choose another file')


def _checkpoint_path(args):
    """Where this run writes its checkpoint ('' for nowhere)."""
    if args.checkpoint is not None:
        return args.checkpoint
    return args.resume or 'checkpoint.pt'


def _plot_path(args, path):
    """The loss curve's file: --plot, else beside the checkpoint (``<stem>.loss.png``), else
    none."""
    if args.plot is not None:
        return args.plot
    return os.path.splitext(path)[0] + '.loss.png' if path else ''


def _describe_run(path):
    """A few words on the run saved at ``path``, for the refusal to replace it."""
    try:
        saved = ckpt.load_checkpoint(path)
    except ckpt.CheckpointError:
        return 'a file that is not a checkpoint of this tool'
    run = (saved.get('extra') or {}).get('run') or {}
    epoch = (saved.get('train') or {}).get('epoch')
    what = f"a run on dataset {run['dataset']}" if run.get('dataset') else 'a model'
    return what + (f' at epoch {epoch}' if epoch is not None else '')


def _refuse_to_clobber(args, path):
    """A training run replaces the file at its checkpoint path only when it continues that very
    run (``--resume`` of the same file) or when told to (``--overwrite``)."""
    if not path or args.overwrite:
        return
    if args.resume and os.path.abspath(args.resume) == os.path.abspath(path):
        return
    if os.path.isdir(path):
        raise UsageError(f'--checkpoint {path} is a directory')
    if os.path.exists(path):
        raise UsageError(
            f'{path} already holds {_describe_run(path)}: pass --overwrite to replace it, '
            f'--resume {path} to continue it, or --checkpoint to choose another file')


def _check_launch(args):
    """What would make every process of ``train --nproc N`` fail, refused before any starts:
    a global batch the processes cannot share equally, a resume with another number of
    processes than the checkpoint's run."""
    batch_size, saved_world = args.batch_size, None
    if args.resume:
        saved = ckpt.load_checkpoint(args.resume)
        extra = saved.get('extra') or {}
        saved_world = extra.get('world_size')
        if batch_size is None:
            batch_size = (extra.get('run') or {}).get('batch_size')
    if batch_size is None:
        batch_size = RunConfig(dataset=args.dataset or 'numbers').with_defaults().batch_size
    if batch_size % args.nproc:
        raise UsageError(f'--batch-size: expected a multiple of --nproc {args.nproc} (each '
                         f'process takes an equal share), got {batch_size}')
    if saved_world is not None and saved_world != args.nproc:
        raise UsageError(f'--nproc {args.nproc}: the run in {args.resume} was trained with '
                         f'{saved_world} process(es); resume it with as many (the data order '
                         'depends on it)')


def cmd_train(args, argv):
    from . import distributed as dist
    path = _checkpoint_path(args)
    if not args.resume:
        args.dataset = args.dataset or 'numbers'
        _check_data_args(args.dataset, args)
    _check_plot_path(args, path)
    if args.nproc > 1 and os.environ.get('LOCAL_RANK') is None:
        _check_launch(args)
        _refuse_to_clobber(args, path)
        # re-run this very command in N processes; each sees torchrun's environment
        return dist.launch(args.nproc, list(argv))
    lock = RunLock(path) if path and (os.environ.get('RANK') or '0') == '0' else None
    if lock is None:
        return _train(args, path)
    with lock:  # held until the run ends, however it ends
        _refuse_to_clobber(args, path)
        return _train(args, path)


def _terminate_as_interrupt(terminated):
    """Make SIGTERM (``kill``, ``docker stop``, a batch scheduler, torchrun stopping the
    processes of a failed run) end training as Ctrl-C does: the last completed epoch is saved.
    Appends to ``terminated`` when it fires; returns the previous handler (None off the main
    thread, where no handler can be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        terminated.append(signum)
        raise KeyboardInterrupt
    return signal.signal(signal.SIGTERM, handler)


def _train(args, path):
    from . import distributed as dist
    malloc.keep_freed_memory()  # the steps reuse freed memory instead of faulting it in again
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backend:
        ops.set_backend(args.backend)
    device = torch.device(args.device) if args.device else _try_gpu()
    settings = {key: getattr(args, key, None) for key in RUN_KEYS}
    distributed = dist.init_from_env(device)
    _IN_PROCESS_GROUP[0] = distributed and dist.world_size() > 1
    if distributed and device.type == 'cuda':
        device = torch.device('cuda', torch.cuda.current_device())
    main = not distributed or dist.is_main_process()
    say = print if main else (lambda *a, **k: None)
    shard = _shard_for(dist) if distributed else None
    try:
        if args.resume:
            training = runs.resume(args.resume, epochs=args.epochs, device=device,
                                   checkpoint=path, shard=shard, **settings)
        else:
            training = runs.TrainingRun.start(RunConfig(**settings, epochs=args.epochs),
                                              device=device, checkpoint=path, shard=shard)
    except BaseException as err:
        if distributed:
            dist.cleanup()
        if isinstance(err, runs.RunError):
            raise UsageError(str(err)) from None
        raise
    run, d = training.run, training.data
    say(f'dataset {run.dataset}: {len(d.train_iter.dataset)} training pairs, '
        f'vocab {len(d.src_vocab)} -> {len(d.tgt_vocab)}, backend {ops.get_backend()}'
        + (f', {dist.world_size()} processes' if distributed else ''))
    if args.resume:
        say(f'resumed {args.resume} at epoch {training.start_epoch}')
    if run.held_out and not d.held_out and main:
        print(f'seq2seq-ext: warning: no held-out pairs: the corpus has none after the '
              f'{len(d.train_iter.dataset)} training pairs (lower --num-examples to keep some '
              'out, or --held-out 0)', file=sys.stderr)
    plot = _plot_path(args, path)
    curve = Animator(xlabel='epoch', ylabel='loss', xlim=[0, run.epochs],
                     out=plot) if (plot and main) else None
    for epoch, loss in training.history:
        if curve is not None:
            curve.add(epoch, (loss,))
    bar = _progress(run.epochs, training.start_epoch, disable=args.no_progress or not main)

    def on_epoch(epoch, loss, speed):
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f'{loss:.3f}', tokens_per_s=f'{speed:.0f}')
        if epoch % 10 == 0:
            _write(bar, f'epoch {epoch}, loss {loss:.3f}, {speed:.1f} tokens/sec', main)
            if curve is not None:
                curve.add(epoch, (loss,))

    terminated = []
    previous = _terminate_as_interrupt(terminated)
    try:
        loss, speed = training.train(on_epoch, save_every=args.save_every, save=main)
    except runs.TrainingInterrupted as stop:
        if bar is not None:
            bar.close()
        if curve is not None:
            curve.flush()
        if main and stop.epoch is not None:
            print(f"\ninterrupted: the checkpoint of epoch {stop.epoch} is in "
                  f"{os.path.abspath(path)}; continue with: seq2seq-ext train --resume {path}",
                  file=sys.stderr)
        elif main:  # (the other ranks save nothing by design: rank 0 reports)
            print('\ninterrupted before the first epoch ended: nothing saved', file=sys.stderr)
        return 143 if terminated else 130  # 128 + SIGTERM or SIGINT, as a shell reports them
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if distributed:
            dist.cleanup()
    if bar is not None:
        bar.close()
    if not main:
        return 0
    print(f'loss {loss:.3f}, {speed:.1f} tokens/sec on {str(device)}')
    net = training.net
    if d.held_out:  # the held-out score first: the examples below are a sample of it (numbers)
        preds = predict_seq2seq_batch(net, [s for s, _ in d.held_out], d.src_vocab, d.tgt_vocab,
                                      run.num_steps, device)
        print(_score_line(preds, [t for _, t in d.held_out]))
    srcs = [s for s, _ in d.examples]
    for (src, ref), out in zip(d.examples, predict_seq2seq_batch(
            net, srcs, d.src_vocab, d.tgt_vocab, run.num_steps, device)):
        print(f'{src} => {out}, bleu {_sentence_bleu(out, ref):.3f}, '
              + ('right' if out == ref else f'wrong (reference: {ref})'))
    if path:
        print(f'checkpoint saved to {os.path.abspath(path)}')
    if curve is not None and curve.save():
        print(f'loss curve saved to {os.path.abspath(curve.out)}')
    return 0


def _shard_for(dist):
    """One process's share of the batches in multi-process training."""
    def shard(dataset, run):
        return dist.shard_loader(dataset, run.batch_size, shuffle=True, seed=run.seed)
    return shard


def _progress(total, initial, disable):
    if disable:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, initial=initial, unit='epoch', dynamic_ncols=True, leave=False,
                file=sys.stderr)


def _write(bar, line, main):
    if not main:
        return
    if bar is not None:
        bar.write(line, file=sys.stdout)
    else:
        print(line, flush=True)


def _score_line(preds, refs):
    mean = sum(_sentence_bleu(p, r) for p, r in zip(preds, refs)) / len(refs)
    exact = sum(p == r for p, r in zip(preds, refs)) / len(refs)
    line = f'held-out ({len(refs)} sentences): mean bleu {mean:.3f}, exact {exact:.1%}'
    try:
        line += f', corpus BLEU {corpus_bleu(preds, refs):.1f}'
    except ImportError:
        pass
    return line


# ---------------------------------------------------------------------------------------------
# translate / evaluate
# ---------------------------------------------------------------------------------------------

def _add_model_args(p):
    p.add_argument('--checkpoint', default='checkpoint.pt',
                   help='the checkpoint written by train (default checkpoint.pt)')
    p.add_argument('--beam', type=_positive(int), default=1, metavar='K',
                   help='beam search with K beams (default 1: greedy)')
    p.add_argument('--alpha', type=_non_negative(float), default=0.75,
                   help="beam search length normalisation: log P / L^alpha (default 0.75)")
    p.add_argument('--batch-size', type=_positive(int), default=256,
                   help='sentences decoded per call (default 256)')
    p.add_argument('--num-steps', type=_positive(int), default=None,
                   help="time steps, as d2l's predict_seq2seq takes them: each source is cut "
                        "or padded to this many tokens and each output stops at this length "
                        "(default: the model's num_steps)")
    p.add_argument('--device', type=_device, default='cpu', help='e.g. cpu, cuda (default cpu)')
    p.add_argument('--threads', type=thread_count, default=None,
                   help='torch.set_num_threads (at most the logical CPUs)')
    p.add_argument('--backend', choices=list(ops.BACKENDS), default=None)
    p.add_argument('--dtype', choices=['float32', 'bf16'], default='float32',
                   help="weights greedy decoding reads: bf16 rounds the model's weight "
                        "matrices, the encoder's and the decoder's, to bfloat16 (half the bytes "
                        "per token; states and sums stay float32). GRU models on the CPU, "
                        "greedy only (default float32)")


def _load_for_inference(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backend:
        ops.set_backend(args.backend)
    if not 0 <= args.alpha <= MAX_ALPHA:
        raise UsageError(f'--alpha must be in [0, {MAX_ALPHA:g}], got {args.alpha}')
    if args.dtype == 'bf16' and args.beam > 1:
        raise UsageError('--dtype bf16 decodes greedily: leave out --beam')
    device = torch.device(args.device)
    net, src_vocab, tgt_vocab, saved = ckpt.load_model(args.checkpoint, device=device)
    if args.dtype == 'bf16' and (saved['config']['cell'] != 'gru' or device.type != 'cpu'):
        # refused whatever the input (empty lines included); decoding refuses the rest
        raise UsageError(f"--dtype bf16 decodes GRU models on the CPU; this one is "
                         f"{saved['config']['cell']} on {device}")
    num_steps = args.num_steps or saved['config']['num_steps']
    try:  # each source is padded to num_steps tokens
        data.truncate_pad([], num_steps, 0)
    except ValueError as exc:
        raise UsageError(f'--num-steps {num_steps}: {exc}') from None
    return net, src_vocab, tgt_vocab, saved, num_steps, device


def _decode(args, net, sentences, src_vocab, tgt_vocab, num_steps, device):
    """Translations of ``sentences``, one per sentence; an empty sentence gives an empty
    translation (nothing to translate), so output lines stay aligned with input lines."""
    todo = [i for i, s in enumerate(sentences) if s]
    outputs = [''] * len(sentences)
    if not todo:
        return outputs
    batch = [sentences[i] for i in todo]
    if args.beam > 1:
        from .beam import beam_search
        done = beam_search(net, batch, src_vocab, tgt_vocab, num_steps, device,
                           beam_size=args.beam, alpha=args.alpha, batch_size=args.batch_size)
    else:
        bf16 = args.dtype == 'bf16'
        try:
            done = predict_seq2seq_batch(net, batch, src_vocab, tgt_vocab, num_steps, device,
                                         batch_size=args.batch_size,
                                         weight_dtype=torch.bfloat16 if bf16 else None)
        except ValueError as exc:
            if not bf16:
                raise
            raise UsageError(f'--dtype bf16: {exc}') from None
    for i, out in zip(todo, done):
        outputs[i] = out
    return outputs


def _unknown_counts(sentences, src_vocab):
    """``[(unknown, total)]`` source tokens per sentence, tokenised as the decoder does."""
    counts = []
    for sentence in sentences:
        tokens = sentence.lower().split(' ') if sentence else []
        counts.append((sum(src_vocab[t] == src_vocab.unk for t in tokens), len(tokens)))
    return counts


def _unknown_line(counts):
    unknown, total = sum(u for u, _ in counts), sum(t for _, t in counts)
    share = unknown / total if total else 0.0
    return f'unknown source tokens: {unknown} of {total} ({share:.1%})'


def _warn_unknown(sentences, counts, verbose):
    """On stderr: a warning for each line more than half unknown to the model; with
    ``verbose``, every line's count and the total."""
    for number, (sentence, (unknown, total)) in enumerate(zip(sentences, counts), 1):
        if total and unknown * 2 > total:
            print(f'seq2seq-ext: warning: line {number} ({sentence!r}): {unknown} of {total} '
                  'source tokens are unknown to the model', file=sys.stderr)
        elif verbose and total:
            print(f'line {number}: {unknown} of {total} source tokens unknown', file=sys.stderr)
    if verbose:
        print(_unknown_line(counts), file=sys.stderr)


def cmd_translate(args, argv):
    net, src_vocab, tgt_vocab, _, num_steps, device = _load_for_inference(args)
    if args.sentences and args.file:
        raise UsageError('give sentences as arguments or --file, not both')
    if args.sentences:
        lines = list(args.sentences)
    elif args.file:
        lines = _read_lines(args.file)
    else:
        lines = _read_lines(None)
    sentences = [data.preprocess_nmt(line).strip() for line in lines]
    _warn_unknown(sentences, _unknown_counts(sentences, src_vocab), args.verbose)
    for out in _decode(args, net, sentences, src_vocab, tgt_vocab, num_steps, device):
        print(out)
    return 0


def _stdin_text():
    if sys.stdin is None:
        raise UsageError('standard input is closed: give sentences as arguments or --file')
    buffer = getattr(sys.stdin, 'buffer', None)  # (a text stream put in its place has none)
    if buffer is None:
        return sys.stdin.read().removeprefix('\ufeff')
    return buffer.read().decode('utf-8-sig')


def _read_lines(path):
    """The lines of --file ``path``, or of standard input for ``None``: UTF-8, a byte order mark
    dropped, line ends ``\\n``, ``\\r\\n`` or ``\\r``."""
    name = '--file ' + path if path is not None else 'standard input'
    try:
        if path is None:
            return [line.rstrip('\n') for line in io.StringIO(_stdin_text(), newline=None)]
        with open(path, encoding='utf-8-sig') as f:
            return [line.rstrip('\n') for line in f]
    except FileNotFoundError:
        raise UsageError(f'--file {path}: no such file') from None
    except IsADirectoryError:
        raise UsageError(f'--file {path}: a directory, not a file') from None
    except UnicodeDecodeError as exc:
        raise UsageError(f'{name}: not UTF-8 text ({exc})') from None
    except OSError as exc:
        raise UsageError(f'{name}: {exc.strerror or exc}') from None


def _check_held_out(args, config, trained_on, held):
    """Refuses a split that ``--num-examples`` / ``--held-out`` moved into the pairs the
    checkpoint was trained on (the same corpus): its score would not be a held-out one.
    ``config``: the split's run settings; ``trained_on``: the checkpoint's, as saved."""
    options = [f'--{name.replace("_", "-")} {getattr(args, name)}'
               for name in ('num_examples', 'held_out') if getattr(args, name) is not None]
    if not options or (trained_on.get('dataset'), trained_on.get('data')) != (
            config.dataset, config.data):
        return
    overlap = runs.trained_on_count(RunConfig.from_dict(trained_on).with_defaults(), config,
                                    held)
    if overlap:
        raise UsageError(
            f'{" ".join(options)}: {overlap} of the {len(held)} pairs of that split were in '
            f'the training data of {args.checkpoint}; its score would not be a held-out one '
            '(leave the options out to score the split it was trained beside)')


def cmd_evaluate(args, argv):
    net, src_vocab, tgt_vocab, saved, num_steps, device = _load_for_inference(args)
    run = dict((saved.get('extra') or {}).get('run') or {})
    trained_on = dict(run)
    if args.dataset or args.data:
        run.update(dataset=args.dataset or run.get('dataset', 'pairs'),
                   data=os.path.abspath(args.data) if args.data else run.get('data'))
    _check_data_args(run.get('dataset'), args)
    if args.num_examples is not None:
        run['num_examples'] = args.num_examples
    if args.held_out is not None:
        run['held_out'] = args.held_out
    if not run.get('dataset'):
        raise UsageError(f'{args.checkpoint} does not say what it was trained on: '
                         'pass --dataset and --data')
    run.setdefault('held_out', 100)
    config = RunConfig.from_dict(run).with_defaults()
    held = runs.held_out_pairs(config)
    if not held:
        raise UsageError('the held-out split is empty (check --held-out and --num-examples)')
    _check_held_out(args, config, trained_on, held)
    srcs, refs = [s for s, _ in held], [t for _, t in held]
    preds = _decode(args, net, srcs, src_vocab, tgt_vocab, num_steps, device)
    decoding = f'beam {args.beam}, alpha {args.alpha}' if args.beam > 1 else 'greedy'
    print(f'evaluate {args.checkpoint}: dataset {run["dataset"]}, {decoding}, '
          f'backend {ops.get_backend()}')
    print(_score_line(preds, refs))
    print(_unknown_line(_unknown_counts(srcs, src_vocab)))
    for src, ref, out in list(zip(srcs, refs, preds))[:args.samples]:
        print(f'{src} => {out} (reference: {ref}), bleu {_sentence_bleu(out, ref):.3f}')
    return 0


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------

def cmd_bench(args, argv):
    from .bench import compare
    try:
        compare.check_json(args.json)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return compare.run(args)


def _try_gpu():
    from .utils import try_gpu
    return try_gpu()


def build_parser():
    parser = argparse.ArgumentParser(
        prog='seq2seq-ext',
        description='Train and run the d2l.ai GRU encoder-decoder on fused C++/CUDA ops.')
    parser.add_argument('--debug', action='store_true', help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('train', help='train a model and report loss, speed, translations, BLEU',
                       description="Train the chapter's seq2seq model.")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser('translate', help='translate sentences with a trained checkpoint',
                       description='Translate sentences (arguments, --file, or stdin: one per '
                                   'line) with a checkpoint; one translation per line on stdout.')
    p.add_argument('sentences', nargs='*', help='sentences to translate')
    p.add_argument('--file', help='a UTF-8 file with one sentence per line')
    p.add_argument('--verbose', action='store_true',
                   help="report on stderr each line's share of source tokens unknown to the "
                        "model, and the total")
    _add_model_args(p)
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser('evaluate', help='corpus BLEU of a checkpoint on a held-out split',
                       description="Score a checkpoint on the held-out split of the data it was "
                                   "trained on (or of --dataset/--data): corpus BLEU (sacrebleu), "
                                   "the chapter's bleu and sample translations.")
    _add_data_args(p, train=False)
    p.add_argument('--samples', type=_non_negative(int), default=4,
                   help='sample translations to print')
    _add_model_args(p)
    p.set_defaults(func=cmd_evaluate)

    from .bench import compare
    p = sub.add_parser('bench', help='reference vs extension ratio table (1 thread)',
                       description=compare.__doc__.splitlines()[0])
    compare.add_arguments(p)
    p.set_defaults(func=cmd_bench)
    for p in sub.choices.values():
        # also accepted after the command; SUPPRESS keeps the top level's value otherwise
        p.add_argument('--debug', action='store_true', default=argparse.SUPPRESS,
                       help=_DEBUG_HELP)
    parser.commands = sub.choices  # (main: a command's parser reports its unknown arguments)
    return parser


_DEBUG_HELP = 'on failure, show the Python traceback instead of a one-line error'

# True once this process trained in a process group of several processes (train under
# torchrun): its error handler then leaves with os._exit (see main)
_IN_PROCESS_GROUP = [False]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the parser of the part they stand in: the command's, or before it
        before = argv[:argv.index(args.command)]
        reporter = parser if any(a in before for a in unknown) else parser.commands[args.command]
        reporter.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args, argv)
    except KeyboardInterrupt:
        parser.exit(130, '\nseq2seq-ext: interrupted\n')
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line (or --debug)
        if args.debug:
            raise
        status, message = _error_report(exc)
        if _IN_PROCESS_GROUP[0]:
            # a worker of a multi-process run leaves at once, from here: freeing the exception
            # (with the frames and the distributed state it holds) can deadlock in gloo's
            # teardown, and torchrun then never learns that this rank failed and stops the
            # others; os._exit skips that teardown
            sys.stderr.write(f'seq2seq-ext: error: {message}\n')
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        parser.exit(status, f'seq2seq-ext: error: {message}\n')


if __name__ == '__main__':
    sys.exit(main())
