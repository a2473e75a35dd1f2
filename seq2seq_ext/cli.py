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
import copy
import os
import random
import sys

import torch

from . import checkpoint as ckpt
from . import data, ops
from .decoding import predict_seq2seq_batch
from .metrics import bleu, corpus_bleu
from .training import fit, make_adam
from .utils import Animator

# The chapter's hyper-parameters, and the ones the built-in corpus trains well with in a minute.
CHAPTER = dict(embed_size=32, num_hiddens=32, num_layers=2, dropout=0.1, batch_size=64,
               num_steps=10, lr=0.005, epochs=300, num_examples=600)
NUMBERS = dict(CHAPTER, num_hiddens=64, epochs=60)
CHAPTER_EXAMPLES = [('go .', 'va !'), ("i lost .", "j'ai perdu ."),
                    ("he's calm .", 'il est calme .'), ("i'm home .", 'je suis chez moi .')]
# What defines a run: a resumed run takes these from its checkpoint.
RUN_KEYS = ('dataset', 'data', 'num_examples', 'held_out', 'embed_size', 'num_hiddens',
            'num_layers', 'dropout', 'batch_size', 'num_steps', 'lr', 'seed', 'cell',
            'fixed_context', 'teacher_forcing', 'amp')
MODEL_KEYS = ('cell', 'fixed_context', 'embed_size', 'num_hiddens', 'num_layers', 'dropout',
              'num_steps')


class UsageError(Exception):
    """A command-line mistake: reported as ``seq2seq-ext: error: ...`` with exit status 2."""


def _sentence_bleu(pred, label):
    """d2l's bleu with k=2, or k=1 for one-token predictions (k=2 is undefined there)."""
    return bleu(pred, label, k=2 if len(pred.split(' ')) >= 2 else 1)


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f'expected a positive number, got {text}')
        return value
    return parse


def _ratio(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f'expected a number in [0, 1], got {text}')
    return value


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

def _add_data_args(p, train=True):
    p.add_argument('--dataset', choices=['numbers', 'fra-eng', 'pairs'],
                   default='numbers' if train else None,
                   help="'numbers' (built in, offline), 'fra-eng' (d2l's corpus: downloaded, "
                        "or --data PATH to fra.txt), 'pairs' (any tab-separated file, --data)")
    p.add_argument('--data', help='path to fra.txt or a tab-separated parallel file')
    p.add_argument('--num-examples', type=_positive(int), default=None,
                   help='fra-eng/pairs: how many examples to train on (chapter: 600)')
    p.add_argument('--held-out', type=int, default=None,
                   help='sentences held out from training and scored with BLEU (default 100)')


def _read_corpus(dataset, path):
    if dataset == 'fra-eng':
        text = data.preprocess_nmt(data.read_data_nmt(path))
        return [tuple(line.split('\t')) for line in text.split('\n')
                if len(line.split('\t')) == 2]
    if not path:
        raise UsageError("--dataset pairs needs --data PATH (a tab-separated file)")
    return data.read_pairs_file(path)


def _split(run):
    """``(train_pairs or None, held_out_pairs)`` of a run's data settings; ``None`` for the
    built-in corpus, whose loader splits it itself."""
    if run['dataset'] == 'numbers':
        return None, None
    pairs = _read_corpus(run['dataset'], run['data'])
    # the chapter's num_examples semantics: up to num_examples + 1 pairs
    train = pairs[:run['num_examples'] + 1]
    held = pairs[run['num_examples'] + 1:][:run['held_out']]
    if not train:
        raise UsageError(f"no training pairs in {run['data']}")
    return train, held


def _load_training_data(run):
    """``(train_iter, src_vocab, tgt_vocab, held_out_pairs, example_pairs)``."""
    if run['dataset'] == 'numbers':
        train_iter, src_vocab, tgt_vocab, held = data.load_data_numbers(
            run['batch_size'], run['num_steps'], num_held_out=run['held_out'], seed=run['seed'])
        examples = held[:: max(1, len(held) // 4)][:4]
        return train_iter, src_vocab, tgt_vocab, held, examples
    train, held = _split(run)
    train_iter, src_vocab, tgt_vocab = data.load_data_pairs(train, run['batch_size'],
                                                            run['num_steps'])
    examples = CHAPTER_EXAMPLES if run['dataset'] == 'fra-eng' else held[:4]
    return train_iter, src_vocab, tgt_vocab, held, examples


def _held_out(run):
    """The held-out pairs of a run's data settings (as its training saw them)."""
    if run['dataset'] == 'numbers':
        return data.load_data_numbers(run['batch_size'], run['num_steps'],
                                      num_held_out=run['held_out'], seed=run['seed'])[3]
    return _split(run)[1]


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------

def _add_train_args(p):
    _add_data_args(p)
    for name in ('embed_size', 'num_hiddens', 'num_layers', 'batch_size', 'num_steps'):
        p.add_argument('--' + name.replace('_', '-'), type=_positive(int), default=None,
                       help=f'chapter: {CHAPTER[name]}')
    p.add_argument('--dropout', type=_ratio, default=None, help='chapter: 0.1')
    p.add_argument('--lr', type=_positive(float), default=None, help='chapter: 0.005')
    p.add_argument('--epochs', type=_positive(int), default=None,
                   help=f"chapter: 300 (numbers default: {NUMBERS['epochs']}); with --resume, "
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
                   help='mixed precision: autocast to bfloat16 (the loss accumulates in float32)')
    p.add_argument('--device', default=None, help="e.g. cpu, cuda, cuda:1 (default: d2l's try_gpu)")
    p.add_argument('--seed', type=int, default=None, help='random seed (default 0)')
    p.add_argument('--threads', type=_positive(int), default=None, help='torch.set_num_threads')
    p.add_argument('--backend', choices=list(ops.BACKENDS), default=None)
    p.add_argument('--plot', default='loss.png', help="loss curve PNG ('' to skip)")
    p.add_argument('--checkpoint', default='checkpoint.pt',
                   help="checkpoint file, written every --save-every epochs, at the end and on "
                        "Ctrl-C ('' to skip; with --resume: the resumed file)")
    p.add_argument('--save-every', type=_positive(int), default=10, metavar='N',
                   help='epochs between checkpoints (default 10)')
    p.add_argument('--resume', metavar='PATH',
                   help="continue the run saved in this checkpoint exactly (same settings, "
                        "optimizer state and data order); --epochs sets the total to reach")
    p.add_argument('--nproc', type=_positive(int), default=1,
                   help='train with N processes (torch.distributed via torchrun; gloo on CPU, '
                        'NCCL on GPU); the global batch is --batch-size')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')


def _run_settings(args, saved=None):
    """The run's settings: the command line's, the chapter's (or the built-in corpus's)
    defaults, or, when resuming, the checkpoint's."""
    if saved is not None:
        for key in RUN_KEYS:
            given = getattr(args, key, None)
            if key == 'data' and given is not None:
                given = os.path.abspath(given)
            if given is not None and given != saved.get(key) and key != 'dataset':
                raise UsageError(
                    f"--{key.replace('_', '-')} {given} differs from the checkpoint's "
                    f"{saved.get(key)}: a resumed run keeps the settings it was started with")
        run = dict(saved)
        run['epochs'] = args.epochs if args.epochs is not None else saved['epochs']
        return run
    run = {key: getattr(args, key, None) for key in RUN_KEYS + ('epochs',)}
    defaults = NUMBERS if run['dataset'] == 'numbers' else CHAPTER
    defaults = dict(defaults, held_out=100, seed=0, cell='gru', fixed_context=False,
                    teacher_forcing=1.0)
    for key, value in defaults.items():
        if run.get(key) is None:
            run[key] = value
    if run['data']:
        run['data'] = os.path.abspath(run['data'])
    if run['held_out'] < 0:
        raise UsageError(f"--held-out must be >= 0, got {run['held_out']}")
    return run


def _model_config(run):
    return {key: run[key] for key in MODEL_KEYS}


def cmd_train(args, argv):
    from . import distributed as dist
    if args.nproc > 1 and os.environ.get('LOCAL_RANK') is None:
        # re-run this very command in N processes; each sees torchrun's environment
        return dist.launch(args.nproc, list(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backend:
        ops.set_backend(args.backend)
    saved = None
    if args.resume:
        saved = ckpt.load_checkpoint(args.resume)
        if not saved.get('train') or 'run' not in (saved.get('extra') or {}):
            raise UsageError(f"--resume {args.resume}: the checkpoint has no training state")
    run = _run_settings(args, saved and saved['extra']['run'])
    device = torch.device(args.device) if args.device else _try_gpu()
    distributed = dist.init_from_env(device)
    if distributed and device.type == 'cuda':
        device = torch.device('cuda', torch.cuda.current_device())
    main = not distributed or dist.is_main_process()
    say = print if main else (lambda *a, **k: None)

    random.seed(run['seed'])
    torch.manual_seed(run['seed'])
    train_iter, src_vocab, tgt_vocab, held, examples = _load_training_data(run)
    if distributed:
        train_iter = dist.shard_loader(train_iter.dataset, run['batch_size'], shuffle=True,
                                       seed=run['seed'])
    say(f'dataset {run["dataset"]}: {len(train_iter.dataset)} training pairs, '
        f'vocab {len(src_vocab)} -> {len(tgt_vocab)}, backend {ops.get_backend()}'
        + (f', {dist.world_size()} processes' if distributed else ''))
    net = ckpt.build_model(_model_config(run), len(src_vocab), len(tgt_vocab))
    history = []
    start_epoch = 0
    if saved is not None:
        _check_same_vocab(saved, src_vocab, tgt_vocab, args.resume)
        net.load_state_dict(saved['model'])
    net.to(device)
    # fit would make the same optimizer; making it here lets the checkpoints hold its state
    optimizer = make_adam(net.parameters(), run['lr'])
    if saved is not None:
        optimizer.load_state_dict(saved['train']['optimizer'])
        start_epoch = saved['train']['epoch']
        history = [tuple(h) for h in saved['extra'].get('history', [])]
        if start_epoch >= run['epochs']:
            raise UsageError(f"--resume {args.resume}: the run already has {start_epoch} epochs; "
                             f"pass --epochs above {start_epoch} to continue it")
        ckpt.restore_rng_state(saved['train']['rng'])
        say(f'resumed {args.resume} at epoch {start_epoch}')
    path = args.checkpoint if not args.resume or args.checkpoint != 'checkpoint.pt' \
        else args.resume
    curve = Animator(xlabel='epoch', ylabel='loss', xlim=[10, run['epochs']],
                     out=args.plot or None) if (args.plot and main) else None
    for epoch, loss in history:
        if curve is not None:
            curve.add(epoch, (loss,))
    bar = _progress(run['epochs'], start_epoch, disable=args.no_progress or not main)
    last = {}

    def snapshot(epoch):
        # the state at the end of this epoch, kept so that Ctrl-C can save it
        return dict(epoch=epoch, model=_Frozen(net.state_dict()),
                    optimizer=_Frozen(optimizer.state_dict()), rng=ckpt.capture_rng_state(),
                    history=list(history))

    def save(state):
        ckpt.save_checkpoint(path, state['model'], src_vocab, tgt_vocab, _model_config(run),
                             optimizer=state['optimizer'], epoch=state['epoch'], rng=state['rng'],
                             extra=dict(run=run, history=state['history']))

    def on_epoch(epoch, loss, speed):
        history.append((epoch, loss))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f'{loss:.3f}', tokens_per_s=f'{speed:.0f}')
        if epoch % 10 == 0:
            _write(bar, f'epoch {epoch}, loss {loss:.3f}, {speed:.1f} tokens/sec', main)
            if curve is not None:
                curve.add(epoch, (loss,))
        if not (main and path):
            return
        state = snapshot(epoch)
        last['state'] = state
        if epoch % args.save_every == 0 or epoch == run['epochs']:
            save(state)

    try:
        loss, speed = fit(net, train_iter, run['lr'], run['epochs'], tgt_vocab, device,
                          on_epoch=on_epoch, plot=False, optimizer=optimizer,
                          start_epoch=start_epoch, init_weights=saved is None,
                          teacher_forcing_ratio=run['teacher_forcing'], amp=run['amp'])
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        if main and path and 'state' in last:
            save(last['state'])
            print(f"\ninterrupted: the checkpoint of epoch {last['state']['epoch']} is in "
                  f"{os.path.abspath(path)}; continue with: seq2seq-ext train --resume {path}",
                  file=sys.stderr)
        else:
            print('\ninterrupted before the first epoch ended: nothing saved', file=sys.stderr)
        return 130
    finally:
        if distributed:
            dist.cleanup()
    if bar is not None:
        bar.close()
    if not main:
        return 0
    print(f'loss {loss:.3f}, {speed:.1f} tokens/sec on {str(device)}')
    srcs = [s for s, _ in examples]
    for (src, ref), out in zip(examples, predict_seq2seq_batch(
            net, srcs, src_vocab, tgt_vocab, run['num_steps'], device)):
        print(f'{src} => {out}, bleu {_sentence_bleu(out, ref):.3f}')
    if held:
        preds = predict_seq2seq_batch(net, [s for s, _ in held], src_vocab, tgt_vocab,
                                      run['num_steps'], device)
        print(_score_line(preds, [t for _, t in held]))
    if path:
        print(f'checkpoint saved to {os.path.abspath(path)}')
    if curve is not None and curve.save():
        print(f'loss curve saved to {os.path.abspath(curve.save())}')
    return 0


class _Frozen:
    """A deep copy of a module's or optimizer's ``state_dict()``, taken at the end of an epoch,
    that answers ``state_dict()`` like the object it was taken from."""

    def __init__(self, state):
        self._state = copy.deepcopy(state)

    def state_dict(self):
        return self._state


def _check_same_vocab(saved, src_vocab, tgt_vocab, path):
    for name, vocab in (('src_vocab', src_vocab), ('tgt_vocab', tgt_vocab)):
        if ckpt.vocab_from_state(saved[name]).idx_to_token != vocab.idx_to_token:
            raise UsageError(f"--resume {path}: the data now gives a different {name} than the "
                             "checkpoint's (has the corpus file changed?)")


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
    p.add_argument('--alpha', type=float, default=0.75,
                   help="beam search length normalisation: log P / L^alpha (default 0.75)")
    p.add_argument('--batch-size', type=_positive(int), default=256,
                   help='sentences decoded per call (default 256)')
    p.add_argument('--num-steps', type=_positive(int), default=None,
                   help="maximum output length (default: the model's num_steps)")
    p.add_argument('--device', default='cpu', help='e.g. cpu, cuda (default cpu)')
    p.add_argument('--threads', type=_positive(int), default=None, help='torch.set_num_threads')
    p.add_argument('--backend', choices=list(ops.BACKENDS), default=None)


def _load_for_inference(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backend:
        ops.set_backend(args.backend)
    if args.alpha < 0:
        raise UsageError(f'--alpha must be >= 0, got {args.alpha}')
    device = torch.device(args.device)
    net, src_vocab, tgt_vocab, saved = ckpt.load_model(args.checkpoint, device=device)
    num_steps = args.num_steps or saved['config']['num_steps']
    return net, src_vocab, tgt_vocab, saved, num_steps, device


def _decode(args, net, sentences, src_vocab, tgt_vocab, num_steps, device):
    if args.beam > 1:
        from .beam import beam_search
        return beam_search(net, sentences, src_vocab, tgt_vocab, num_steps, device,
                           beam_size=args.beam, alpha=args.alpha, batch_size=args.batch_size)
    return predict_seq2seq_batch(net, sentences, src_vocab, tgt_vocab, num_steps, device,
                                 batch_size=args.batch_size)


def cmd_translate(args, argv):
    net, src_vocab, tgt_vocab, _, num_steps, device = _load_for_inference(args)
    if args.sentences and args.file:
        raise UsageError('give sentences as arguments or --file, not both')
    if args.sentences:
        lines = list(args.sentences)
    elif args.file:
        lines = _read_lines(args.file)
    else:
        lines = [line.rstrip('\r\n') for line in sys.stdin]
    sentences = [data.preprocess_nmt(line).strip() for line in lines]
    outputs = _decode(args, net, sentences, src_vocab, tgt_vocab, num_steps, device) \
        if sentences else []
    for out in outputs:
        print(out)
    return 0


def _read_lines(path):
    try:
        with open(path, encoding='utf-8') as f:
            return [line.rstrip('\r\n') for line in f]
    except FileNotFoundError:
        raise UsageError(f'--file {path}: no such file') from None
    except UnicodeDecodeError as exc:
        raise UsageError(f'--file {path}: not UTF-8 text ({exc})') from None


def cmd_evaluate(args, argv):
    net, src_vocab, tgt_vocab, saved, num_steps, device = _load_for_inference(args)
    run = dict((saved.get('extra') or {}).get('run') or {})
    if args.dataset or args.data:
        run.update(dataset=args.dataset or run.get('dataset', 'pairs'),
                   data=os.path.abspath(args.data) if args.data else run.get('data'))
    if args.num_examples is not None:
        run['num_examples'] = args.num_examples
    if args.held_out is not None:
        run['held_out'] = args.held_out
    if not run.get('dataset'):
        raise UsageError(f'{args.checkpoint} does not say what it was trained on: '
                         'pass --dataset and --data')
    run.setdefault('held_out', 100)
    held = _held_out(run)
    if not held:
        raise UsageError('the held-out split is empty (check --held-out and --num-examples)')
    srcs, refs = [s for s, _ in held], [t for _, t in held]
    preds = _decode(args, net, srcs, src_vocab, tgt_vocab, num_steps, device)
    decoding = f'beam {args.beam}, alpha {args.alpha}' if args.beam > 1 else 'greedy'
    print(f'evaluate {args.checkpoint}: dataset {run["dataset"]}, {decoding}, '
          f'backend {ops.get_backend()}')
    print(_score_line(preds, refs))
    for src, ref, out in list(zip(srcs, refs, preds))[:args.samples]:
        print(f'{src} => {out} (reference: {ref}), bleu {_sentence_bleu(out, ref):.3f}')
    return 0


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------

def cmd_bench(args, argv):
    from .bench import compare
    return compare.run(args)


def _try_gpu():
    from .utils import try_gpu
    return try_gpu()


def build_parser():
    parser = argparse.ArgumentParser(
        prog='seq2seq-ext',
        description='Train and run the d2l.ai GRU encoder-decoder on fused C++/CUDA ops.')
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
    _add_model_args(p)
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser('evaluate', help='corpus BLEU of a checkpoint on a held-out split',
                       description="Score a checkpoint on the held-out split of the data it was "
                                   "trained on (or of --dataset/--data): corpus BLEU (sacrebleu), "
                                   "the chapter's bleu and sample translations.")
    _add_data_args(p, train=False)
    p.add_argument('--samples', type=int, default=4, help='sample translations to print')
    _add_model_args(p)
    p.set_defaults(func=cmd_evaluate)

    from .bench import compare
    p = sub.add_parser('bench', help='reference vs extension ratio table (1 thread)',
                       description=compare.__doc__.splitlines()[0])
    compare.add_arguments(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args, argv)
    except (UsageError, ckpt.CheckpointError) as exc:
        parser.exit(2, f'seq2seq-ext: error: {exc}\n')


if __name__ == '__main__':
    sys.exit(main())
