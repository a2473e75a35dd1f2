"""Training runs as a library: a :class:`~seq2seq_ext.config.RunConfig` turned into data, a model
and an optimizer, trained with a checkpoint every few epochs, at the end and on interruption, and
resumed exactly from such a checkpoint (:func:`resume`). The command line's ``train`` is a thin
layer over this module; a library user does the same in a few lines::

    run = TrainingRun.start(RunConfig(dataset="numbers", epochs=30), checkpoint="run.pt")
    run.train()                          # run.pt every 10 epochs and at the end
    run = resume("run.pt", epochs=60)    # later: continues bitwise as if never stopped (CPU)
    run.train()
"""
import copy
import os
import random

import torch

from . import checkpoint as ckpt
from . import data, distributed
from .config import RUN_KEYS, RunConfig
from .training import fit, make_adam

__all__ = ["RunError", "TrainingInterrupted", "RunData", "TrainingRun", "resume", "load_data",
           "held_out_pairs", "trained_on_count", "CHAPTER_EXAMPLES", "DATASETS"]

#: The chapter's four example translations, shown after training on fra-eng.
CHAPTER_EXAMPLES = [('go .', 'va !'), ("i lost .", "j'ai perdu ."),
                    ("he's calm .", 'il est calme .'), ("i'm home .", 'je suis chez moi .')]


class RunError(ValueError):
    """A run that cannot be set up as asked: settings that contradict the checkpoint being
    resumed, a checkpoint without training state, data that no longer gives its vocabularies."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training was interrupted (Ctrl-C). ``epoch`` is the last completed epoch saved to ``path``,
    or ``None`` when nothing was saved."""

    def __init__(self, epoch, path):
        super().__init__(epoch, path)
        self.epoch, self.path = epoch, path


class RunData:
    """A run's data: ``train_iter``, ``src_vocab``, ``tgt_vocab``, ``held_out`` pairs (never
    trained on) and four ``examples`` pairs to show."""

    def __init__(self, train_iter, src_vocab, tgt_vocab, held_out, examples):
        self.train_iter, self.src_vocab, self.tgt_vocab = train_iter, src_vocab, tgt_vocab
        self.held_out, self.examples = held_out, examples


#: The corpora a run reads: the built-in one, d2l's fra-eng, a tab-separated file of pairs.
DATASETS = ('numbers', 'fra-eng', 'pairs')


def _read_corpus(dataset, path, num_examples):
    """A file corpus's ``(training pairs, the pairs after them)``, as its training reads them:
    after ``preprocess_nmt`` (lower case, a space before punctuation), so that held-out sources
    and references are tokens of the vocabularies too; with the chapter's ``num_examples``
    (fra-eng: the pairs of its first ``num_examples + 1`` lines, as ``load_data_nmt`` counts;
    pairs: up to ``num_examples + 1`` pairs)."""
    if dataset == 'fra-eng':
        try:
            return data.read_nmt_pairs(path, num_examples)
        except data.CorpusUnavailableError as err:
            reason = str(err.__cause__ or err)
            raise RunError(f"--dataset fra-eng: the corpus is not cached and could not be "
                           f"downloaded ({reason}); pass --data PATH to a local fra.txt (or set "
                           f"{data.DATA_ENV})") from None
    if dataset != 'pairs':
        raise RunError(f"dataset: expected one of {DATASETS}, got {dataset!r}")
    if not path:
        raise RunError("--dataset pairs needs --data PATH (a tab-separated file)")
    # one pass over the joined text, as load_data_pairs makes (a field that starts with
    # punctuation gets its space there too); its own pass then leaves the pairs as they are
    pairs = data.read_pairs_file(path)
    text = data.preprocess_nmt('\n'.join(f'{src}\t{tgt}' for src, tgt in pairs))
    pairs = [tuple(line.split('\t')) for line in text.split('\n')] if pairs else []
    return pairs[:num_examples + 1], pairs[num_examples + 1:]


def _split(run):
    """``(train_pairs, held_out_pairs)`` of a file corpus, with the chapter's ``num_examples``
    semantics (:func:`_read_corpus`); the held-out pairs follow them."""
    train, rest = _read_corpus(run.dataset, run.data, run.num_examples)
    held = rest[:run.held_out]
    if not train:
        raise RunError(f"no training pairs in {run.data}")
    return train, held


def _numbers(run):
    """The built-in corpus's ``load_data_numbers`` for ``run``; a held-out count it cannot
    give (its words must stay in the training vocabularies) is the run's setting's error."""
    try:
        return data.load_data_numbers(run.batch_size, run.num_steps,
                                      num_held_out=run.held_out, seed=run.seed)
    except ValueError as err:
        if 'num_held_out' not in str(err):
            raise
        raise RunError(f"--held-out {run.held_out}: {err}") from None


def load_data(run):
    """The :class:`RunData` of ``run`` (a :class:`RunConfig` with its defaults filled)."""
    if run.dataset == 'numbers':
        train_iter, src_vocab, tgt_vocab, held = _numbers(run)
        examples = held[:: max(1, len(held) // 4)][:4]
        return RunData(train_iter, src_vocab, tgt_vocab, held, examples)
    train, held = _split(run)
    train_iter, src_vocab, tgt_vocab = data.load_data_pairs(train, run.batch_size,
                                                            run.num_steps)
    examples = CHAPTER_EXAMPLES if run.dataset == 'fra-eng' else held[:4]
    return RunData(train_iter, src_vocab, tgt_vocab, held, examples)


def held_out_pairs(run):
    """The held-out pairs of ``run``'s data settings, as its training saw them."""
    if run.dataset == 'numbers':
        return _numbers(run)[3]
    return _split(run)[1]


def trained_on_count(trained, run, held):
    """How many of ``held`` (the held-out pairs of ``run``'s data settings) the training of
    ``trained`` (a run of the same corpus) read: for a file corpus, the positions the two
    splits share (its training reads the pairs of :func:`_read_corpus`; a pair repeated in
    the corpus is not the same position); for the built-in corpus, whose pairs are distinct,
    the pairs outside ``trained``'s held-out set."""
    if run.dataset == 'numbers':
        kept_out = set(held_out_pairs(trained))
        return sum(pair not in kept_out for pair in held)
    start = len(_read_corpus(run.dataset, run.data, run.num_examples)[0])
    trained_end = len(_read_corpus(trained.dataset, trained.data, trained.num_examples)[0])
    return max(0, min(trained_end, start + len(held)) - start)


class _Frozen:
    """A deep copy of a module's or optimizer's ``state_dict()``, taken at the end of an epoch,
    that answers ``state_dict()`` like the object it was taken from."""

    def __init__(self, state):
        self._state = copy.deepcopy(state)

    def state_dict(self):
        return self._state


class TrainingRun:
    """A run ready to train: :attr:`run` (its :class:`RunConfig`), :attr:`data`
    (:class:`RunData`), :attr:`net`, :attr:`optimizer`, :attr:`history` (``(epoch, loss)``
    pairs), :attr:`start_epoch`, :attr:`device` and :attr:`path` (its checkpoint, ``''`` for
    none). Make one with :meth:`start` or :func:`resume`.

    ``shard(dataset, run)``, when given, replaces the data loader (one process's share of the
    batches in multi-process training)."""

    def __init__(self, run, *, device, checkpoint='', saved=None, shard=None):
        self.run, self.device, self.path = run, torch.device(device), checkpoint
        if saved is not None and saved['train']['epoch'] >= run.epochs:
            raise RunError(f"the run already has {saved['train']['epoch']} epochs; pass "
                           f"--epochs above {saved['train']['epoch']} to continue it")
        before = ckpt.capture_rng_state()
        try:
            self._set_up(run, saved, shard)
        except BaseException:  # a run that cannot be set up leaves the CPU and Python
            try:               # generators as they were (the error raised is the run's)
                ckpt.restore_rng_state(before)
            except Exception:
                pass
            raise

    def _set_up(self, run, saved, shard):
        # the order of the random draws below is part of exact resume: seed, data (the
        # built-in corpus's split), the model's initial weights; then a resumed run puts back
        # its generators last
        random.seed(run.seed)
        torch.manual_seed(run.seed)
        self.data = load_data(run)
        if shard is not None:
            self.data.train_iter = shard(self.data.train_iter.dataset, run)
        self.net = ckpt.build_model(run.model.to_dict(), len(self.data.src_vocab),
                                    len(self.data.tgt_vocab))
        self.history, self.start_epoch = [], 0
        if saved is not None:
            self._check_same_vocab(saved)
            self._check_same_world(saved)
            self.net.load_state_dict(saved['model'])
        self.net.to(self.device)
        self.optimizer = make_adam(self.net.parameters(), run.lr)
        self._fresh = saved is None
        if saved is not None:
            self.optimizer.load_state_dict(saved['train']['optimizer'])
            self.start_epoch = saved['train']['epoch']
            self.history = [tuple(h) for h in saved['extra'].get('history', [])]
            ckpt.restore_rng_state(saved['train']['rng'])

    @classmethod
    def start(cls, run, *, device='cpu', checkpoint='checkpoint.pt', shard=None):
        """A new run of ``run`` (``None`` fields take their defaults)."""
        run = run.with_defaults()
        if run.data:
            run.data = os.path.abspath(run.data)
        if run.held_out < 0:
            raise RunError(f"--held-out must be >= 0, got {run.held_out}")
        return cls(run, device=device, checkpoint=checkpoint, shard=shard)

    def _check_same_vocab(self, saved):
        for name in ('src_vocab', 'tgt_vocab'):
            if ckpt.vocab_from_state(saved[name]).idx_to_token != \
                    getattr(self.data, name).idx_to_token:
                raise RunError(f"the data now gives a different {name} than the checkpoint's "
                               "(has the corpus file changed?)")

    @staticmethod
    def _check_same_world(saved):
        # each process's share of the batches (and so the data order) depends on their number
        # (checkpoints written before it was recorded are taken as they are)
        before, now = saved['extra'].get('world_size'), distributed.world_size()
        if before is not None and before != now:
            raise RunError(f"the run was trained with {before} process(es), this one has {now}: "
                           f"resume it with --nproc {before} (the data order depends on it)")

    def _snapshot(self, epoch):
        return dict(epoch=epoch, model=_Frozen(self.net.state_dict()),
                    optimizer=_Frozen(self.optimizer.state_dict()),
                    rng=ckpt.capture_rng_state(), history=list(self.history))

    def _save(self, state):
        ckpt.save_checkpoint(self.path, state['model'], self.data.src_vocab,
                             self.data.tgt_vocab, self.run.model.to_dict(),
                             optimizer=state['optimizer'], epoch=state['epoch'],
                             rng=state['rng'],
                             extra=dict(run=self.run.to_dict(), history=state['history'],
                                        world_size=distributed.world_size()))

    def train(self, on_epoch=None, *, save_every=10, save=True):
        """Train from :attr:`start_epoch` to ``run.epochs``; return the last epoch's (loss per
        token, tokens/sec). ``on_epoch(epoch, loss, tokens_per_sec)`` is called after each
        epoch. With ``save`` and a :attr:`path`, the checkpoint is written every ``save_every``
        epochs and at the end, atomically; on Ctrl-C the last completed epoch is saved and
        :class:`TrainingInterrupted` raised."""
        save = bool(save and self.path)
        last = {}

        def after_epoch(epoch, loss, speed):
            self.history.append((epoch, loss))
            if save:
                last['state'] = state = self._snapshot(epoch)
                if epoch % save_every == 0 or epoch == self.run.epochs:
                    self._save(state)
            if on_epoch is not None:
                on_epoch(epoch, loss, speed)

        try:
            return fit(self.net, self.data.train_iter, self.run.lr, self.run.epochs,
                       self.data.tgt_vocab, self.device, on_epoch=after_epoch, plot=False,
                       optimizer=self.optimizer, start_epoch=self.start_epoch,
                       init_weights=self._fresh, teacher_forcing_ratio=self.run.teacher_forcing,
                       amp=self.run.amp)
        except KeyboardInterrupt:
            if 'state' in last:
                self._save(last['state'])
                raise TrainingInterrupted(last['state']['epoch'], self.path) from None
            raise TrainingInterrupted(None, self.path) from None


def resume(path, *, epochs=None, device='cpu', checkpoint=None, shard=None, **settings):
    """The run saved in checkpoint ``path``, ready to continue to ``epochs`` (default: the
    saved total): the same settings, weights, optimizer state, data order and random generators,
    so that on the CPU it continues bitwise as if it had never stopped. It saves to ``path``
    unless ``checkpoint`` names another file. ``settings`` (any :class:`RunConfig` field) must
    agree with the saved ones, else :class:`RunError`: a resumed run keeps the settings it was
    started with."""
    saved = ckpt.load_checkpoint(path)
    if not saved.get('train') or 'run' not in (saved.get('extra') or {}):
        raise RunError(f"--resume {path}: the checkpoint has no training state")
    stored = saved['extra']['run']
    for key, given in settings.items():
        if key not in RUN_KEYS:
            raise TypeError(f"resume() got an unexpected setting {key!r}")
        if key == 'data' and given is not None:
            given = os.path.abspath(given)
        if given is not None and given != stored.get(key):
            raise RunError(
                f"--{key.replace('_', '-')} {given} differs from the checkpoint's "
                f"{stored.get(key)}: a resumed run keeps the settings it was started with")
    run = RunConfig.from_dict(stored)
    if epochs is not None:
        run.epochs = epochs
    try:
        return TrainingRun(run, device=device, shard=shard, saved=saved,
                           checkpoint=path if checkpoint is None else checkpoint)
    except RunError as err:
        raise RunError(f"--resume {path}: {err}") from None
