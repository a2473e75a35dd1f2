"""The ``seq2seq-ext`` command line.

``seq2seq-ext train`` trains the chapter's model and reports: the loss every 10 epochs, the
chapter's ``loss ..., ... tokens/sec on ...`` line, translations with BLEU, a held-out BLEU, and
the loss curve as a PNG. Its default corpus is built in (English to French number names), so it
needs no network; ``--dataset fra-eng`` uses the chapter's corpus.
"""
import argparse
import os
import random
import sys

import torch

from . import data, ops
from .decoding import predict_seq2seq_batch
from .metrics import bleu, corpus_bleu
from .models import EncoderDecoder, Seq2SeqDecoder, Seq2SeqEncoder
from .training import fit
from .utils import Animator

# The chapter's hyper-parameters, and the ones the built-in corpus trains well with in a minute.
CHAPTER = dict(embed_size=32, num_hiddens=32, num_layers=2, dropout=0.1, batch_size=64,
               num_steps=10, lr=0.005, epochs=300, num_examples=600)
NUMBERS = dict(CHAPTER, num_hiddens=64, epochs=60)
CHAPTER_EXAMPLES = [('go .', 'va !'), ("i lost .", "j'ai perdu ."),
                    ("he's calm .", 'il est calme .'), ("i'm home .", 'je suis chez moi .')]


def _sentence_bleu(pred, label):
    """d2l's bleu with k=2, or k=1 for one-token predictions (k=2 is undefined there)."""
    return bleu(pred, label, k=2 if len(pred.split(' ')) >= 2 else 1)


def _add_train_args(p):
    p.add_argument('--dataset', choices=['numbers', 'fra-eng', 'pairs'], default='numbers',
                   help="'numbers' (built in, offline), 'fra-eng' (d2l's corpus: downloaded, "
                        "or --data PATH to fra.txt), 'pairs' (any tab-separated file, --data)")
    p.add_argument('--data', help='path to fra.txt or a tab-separated parallel file')
    p.add_argument('--num-examples', type=int, default=None,
                   help='fra-eng/pairs: how many examples to read (chapter: 600)')
    for name in ('embed_size', 'num_hiddens', 'num_layers', 'batch_size', 'num_steps'):
        p.add_argument('--' + name.replace('_', '-'), type=int, default=None,
                       help=f'chapter: {CHAPTER[name]}')
    p.add_argument('--dropout', type=float, default=None, help='chapter: 0.1')
    p.add_argument('--lr', type=float, default=None, help='chapter: 0.005')
    p.add_argument('--epochs', type=int, default=None,
                   help=f"chapter: 300 (numbers default: {NUMBERS['epochs']})")
    p.add_argument('--held-out', type=int, default=100,
                   help='sentences held out from training and scored with BLEU')
    p.add_argument('--device', default=None, help="e.g. cpu, cuda, cuda:1 (default: d2l's try_gpu)")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads')
    p.add_argument('--backend', choices=list(ops.BACKENDS), default=None)
    p.add_argument('--plot', default='loss.png', help="loss curve PNG ('' to skip)")


def _resolve(args):
    defaults = NUMBERS if args.dataset == 'numbers' else CHAPTER
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def _load(args):
    if args.dataset == 'numbers':
        train_iter, src_vocab, tgt_vocab, held = data.load_data_numbers(
            args.batch_size, args.num_steps, num_held_out=args.held_out, seed=args.seed)
        examples = held[:: max(1, len(held) // 4)][:4]
        return train_iter, src_vocab, tgt_vocab, held, examples
    if args.dataset == 'fra-eng':
        text = data.preprocess_nmt(data.read_data_nmt(args.data))
        pairs = [tuple(line.split('\t')) for line in text.split('\n')
                 if len(line.split('\t')) == 2]
    else:
        if not args.data:
            raise SystemExit("--dataset pairs needs --data PATH (a tab-separated file)")
        pairs = data.read_pairs_file(args.data)
    # the chapter's num_examples semantics: up to num_examples + 1 pairs
    train = pairs[:args.num_examples + 1]
    rest = pairs[args.num_examples + 1:]
    held = rest[:args.held_out]
    train_iter, src_vocab, tgt_vocab = data.load_data_pairs(train, args.batch_size,
                                                            args.num_steps)
    examples = CHAPTER_EXAMPLES if args.dataset == 'fra-eng' else held[:4]
    return train_iter, src_vocab, tgt_vocab, held, examples


def cmd_train(args):
    args = _resolve(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.backend:
        ops.set_backend(args.backend)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device(args.device) if args.device else _try_gpu()
    train_iter, src_vocab, tgt_vocab, held, examples = _load(args)
    print(f'dataset {args.dataset}: {len(train_iter.dataset)} training pairs, '
          f'vocab {len(src_vocab)} -> {len(tgt_vocab)}, backend {ops.get_backend()}')
    encoder = Seq2SeqEncoder(len(src_vocab), args.embed_size, args.num_hiddens, args.num_layers,
                             args.dropout)
    decoder = Seq2SeqDecoder(len(tgt_vocab), args.embed_size, args.num_hiddens, args.num_layers,
                             args.dropout)
    net = EncoderDecoder(encoder, decoder)
    curve = Animator(xlabel='epoch', ylabel='loss', xlim=[10, args.epochs],
                     out=args.plot or None) if args.plot else None

    def on_epoch(epoch, loss, speed):
        if epoch % 10 == 0:
            print(f'epoch {epoch}, loss {loss:.3f}, {speed:.1f} tokens/sec', flush=True)
            if curve is not None:
                curve.add(epoch, (loss,))

    loss, speed = fit(net, train_iter, args.lr, args.epochs, tgt_vocab, device,
                      on_epoch=on_epoch, plot=False)
    print(f'loss {loss:.3f}, {speed:.1f} tokens/sec on {str(device)}')
    srcs = [s for s, _ in examples]
    for (src, ref), out in zip(examples, predict_seq2seq_batch(
            net, srcs, src_vocab, tgt_vocab, args.num_steps, device)):
        print(f'{src} => {out}, bleu {_sentence_bleu(out, ref):.3f}')
    if held:
        preds = predict_seq2seq_batch(net, [s for s, _ in held], src_vocab, tgt_vocab,
                                      args.num_steps, device)
        refs = [t for _, t in held]
        mean = sum(_sentence_bleu(p, r) for p, r in zip(preds, refs)) / len(held)
        exact = sum(p == r for p, r in zip(preds, refs)) / len(held)
        line = f'held-out ({len(held)} sentences): mean bleu {mean:.3f}, exact {exact:.1%}'
        try:
            line += f', corpus BLEU {corpus_bleu(preds, refs):.1f}'
        except ImportError:
            pass
        print(line)
    if curve is not None and curve.save():
        print(f'loss curve saved to {os.path.abspath(curve.save())}')
    return 0


def _try_gpu():
    from .utils import try_gpu
    return try_gpu()


def build_parser():
    parser = argparse.ArgumentParser(
        prog='seq2seq-ext',
        description='Train and run the d2l.ai GRU encoder-decoder on fused C++/CUDA ops.')
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('train', help='train a model and report loss, speed, translations, BLEU',
                       description='Train the chapter\'s seq2seq model.')
    _add_train_args(p)
    p.set_defaults(func=cmd_train)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
