"""d2l's machine-translation data pipeline, with its exact semantics: ``preprocess_nmt``,
``tokenize_nmt``, ``Vocab``, ``count_corpus``, ``truncate_pad``, ``build_array_nmt``,
``load_array``, ``load_data_nmt``, and ``load_data_pairs`` for any list of sentence pairs.
"""
import collections
import re

import torch
from torch.utils import data

from .corpus import _read_data_nmt, _warn_skipped

__all__ = ['RESERVED_TOKENS', 'preprocess_nmt', 'tokenize_nmt', 'Vocab', 'count_corpus',
           'truncate_pad', 'build_array_nmt', 'load_array', 'load_data_nmt',
           'load_data_pairs', 'read_nmt_pairs']

#: Reserved tokens used by d2l's machine-translation vocabularies.
RESERVED_TOKENS = ('<pad>', '<bos>', '<eos>')

_PUNCT_AFTER_NON_SPACE = re.compile(r'(?<=[^ ])([,.!?])')


# ---------------------------------------------------------------------------
# Preprocessing, tokenisation and vocabulary (d2l semantics)
# ---------------------------------------------------------------------------

def preprocess_nmt(text):
    """Normalise spaces, lower-case and put a space before ``, . ! ?``.

    ``\\u202f`` and ``\\xa0`` become ordinary spaces; a space is inserted
    before each punctuation mark whose previous character is not a space.
    This is d2l's character loop written as one regular expression (the
    look-behind sees the original text, as d2l's ``text[i - 1]`` does).
    """
    text = text.replace('\u202f', ' ').replace('\xa0', ' ').lower()
    return _PUNCT_AFTER_NON_SPACE.sub(r' \1', text)


def tokenize_nmt(text, num_examples=None):
    """Split the corpus into source and target token lists, as d2l does.

    Lines are split on ``'\\n'``, kept only if they have exactly two
    tab-separated parts, and each part is split on single spaces.  Reading
    stops when the line index ``i`` exceeds ``num_examples`` (a falsy
    ``num_examples`` means no limit), so up to ``num_examples + 1`` pairs
    are returned.  Other lines are skipped silently (d2l's behaviour);
    :func:`load_data_nmt` reports them with a :class:`CorpusWarning`.
    """
    return _tokenize_nmt(text, num_examples)[:2]


def _nmt_lines(text, num_examples=None):
    """The ``(source, target)`` strings of the lines :func:`tokenize_nmt`
    keeps, and the (1-based) numbers of the non-empty lines it skips within
    the lines it reads."""
    pairs, skipped = [], []
    for i, line in enumerate(text.split('\n')):
        if num_examples and i > num_examples:
            break
        parts = line.split('\t')
        if len(parts) == 2:
            pairs.append((parts[0], parts[1]))
        elif line:
            skipped.append(i + 1)
    return pairs, skipped


def _tokenize_nmt(text, num_examples=None):
    """:func:`tokenize_nmt`, also returning the (1-based) numbers of the
    non-empty lines it skipped within the lines it read."""
    pairs, skipped = _nmt_lines(text, num_examples)
    return ([src.split(' ') for src, _ in pairs],
            [tgt.split(' ') for _, tgt in pairs], skipped)


def read_nmt_pairs(path=None, num_examples=None):
    """The fra-eng corpus (:func:`read_data_nmt`'s ``path``) as
    ``(source, target)`` strings after :func:`preprocess_nmt`, split in two:
    ``(first, rest)``, ``first`` the pairs :func:`load_data_nmt` trains on
    with ``num_examples`` (those of lines ``0 .. num_examples``: d2l counts
    lines, not pairs; a falsy ``num_examples``, all), ``rest`` the pairs
    after them. The lines it skips (not exactly two tab-separated columns)
    are reported in one :class:`CorpusWarning`, as there."""
    raw, source_path = _read_data_nmt(path)
    text = preprocess_nmt(raw)
    pairs, skipped = _nmt_lines(text)
    if skipped:
        _warn_skipped(source_path, skipped,
                      'not exactly two tab-separated columns')
    first = len(_nmt_lines(text, num_examples)[0])
    return pairs[:first], pairs[first:]


def count_corpus(tokens):
    """Count token frequencies; ``tokens`` is a 1D or 2D list."""
    if len(tokens) == 0 or isinstance(tokens[0], list):
        tokens = [token for line in tokens for token in line]
    return collections.Counter(tokens)


class Vocab:
    """Vocabulary for text (d2l's ``Vocab``).

    Index 0 is ``<unk>``, followed by ``reserved_tokens`` and then the
    corpus tokens in descending frequency (ties keep first-seen order);
    tokens are added until the first one whose frequency is below
    ``min_freq``.
    """

    def __init__(self, tokens=None, min_freq=0, reserved_tokens=None):
        if tokens is None:
            tokens = []
        if reserved_tokens is None:
            reserved_tokens = []
        if isinstance(reserved_tokens, str):  # d2l's list + str raises too
            raise TypeError(f"reserved_tokens: expected a list of tokens, got the string "
                            f"{reserved_tokens!r}")
        counter = count_corpus(tokens)
        self._token_freqs = sorted(counter.items(), key=lambda x: x[1],
                                   reverse=True)
        self.idx_to_token = ['<unk>'] + list(reserved_tokens)
        self.token_to_idx = {token: idx
                             for idx, token in enumerate(self.idx_to_token)}
        for token, freq in self._token_freqs:
            if freq < min_freq:
                break
            if token not in self.token_to_idx:
                self.idx_to_token.append(token)
                self.token_to_idx[token] = len(self.idx_to_token) - 1

    def __len__(self):
        return len(self.idx_to_token)

    def __getitem__(self, tokens):
        """Map a token, or a (nested) list/tuple of tokens, to indices."""
        if not isinstance(tokens, (list, tuple)):
            return self.token_to_idx.get(tokens, self.unk)
        return [self.__getitem__(token) for token in tokens]

    def to_tokens(self, indices):
        """Map an index, or a list/tuple of indices, back to tokens."""
        if not isinstance(indices, (list, tuple)):
            return self.idx_to_token[indices]
        return [self.idx_to_token[index] for index in indices]

    @property
    def unk(self):
        """Index of the unknown token (always 0)."""
        return 0

    @property
    def token_freqs(self):
        """``(token, frequency)`` pairs sorted by descending frequency."""
        return self._token_freqs


def truncate_pad(line, num_steps, padding_token):
    """Truncate ``line`` to ``num_steps`` items or pad it with the token.

    A ``num_steps`` whose padded list cannot be built (it does not fit in
    memory) gets a ValueError naming it.
    """
    if len(line) > num_steps:
        return line[:num_steps]
    try:
        return line + [padding_token] * (num_steps - len(line))
    except (MemoryError, OverflowError):
        raise ValueError(f'num_steps: a line padded to {num_steps} items '
                         'does not fit in memory') from None


def build_array_nmt(lines, vocab, num_steps):
    """Turn token lines into an index array with ``<eos>`` appended.

    Returns ``(array, valid_len)``: an int64 tensor of shape
    ``(len(lines), num_steps)`` and the number of non-``<pad>`` entries of
    each row.
    """
    lines = [vocab[line] for line in lines]
    lines = [line + [vocab['<eos>']] for line in lines]
    array = torch.tensor([truncate_pad(line, num_steps, vocab['<pad>'])
                          for line in lines])
    valid_len = (array != vocab['<pad>']).type(torch.int32).sum(1)
    return array, valid_len


def load_array(data_arrays, batch_size, is_train=True):
    """Return a ``DataLoader`` over the tensors, shuffled when training."""
    dataset = data.TensorDataset(*data_arrays)
    return data.DataLoader(dataset, batch_size, shuffle=is_train)


def _load_tokenized(source, target, batch_size, num_steps, min_freq=2,
                    reserved_tokens=RESERVED_TOKENS, is_train=True,
                    src_vocab=None, tgt_vocab=None):
    """Build vocabularies (unless given), arrays and the data iterator."""
    reserved = list(reserved_tokens)
    if src_vocab is None:
        src_vocab = Vocab(source, min_freq=min_freq, reserved_tokens=reserved)
    if tgt_vocab is None:
        tgt_vocab = Vocab(target, min_freq=min_freq, reserved_tokens=reserved)
    src_array, src_valid_len = build_array_nmt(source, src_vocab, num_steps)
    tgt_array, tgt_valid_len = build_array_nmt(target, tgt_vocab, num_steps)
    data_arrays = (src_array, src_valid_len, tgt_array, tgt_valid_len)
    data_iter = load_array(data_arrays, batch_size, is_train)
    return data_iter, src_vocab, tgt_vocab


def load_data_nmt(batch_size, num_steps, num_examples=600, path=None):
    """Return ``(data_iter, src_vocab, tgt_vocab)`` for the fra-eng corpus.

    Identical to d2l's ``load_data_nmt``: the first ``num_examples + 1``
    lines (see :func:`tokenize_nmt`), vocabularies with ``min_freq=2`` and
    reserved tokens ``<pad>``, ``<bos>``, ``<eos>``, and a shuffling loader
    yielding ``(X, X_valid_len, Y, Y_valid_len)``.  ``path`` is passed to
    :func:`read_data_nmt`.

    Non-empty lines without exactly two tab-separated parts among those
    read are skipped (as d2l does) and reported in one
    :class:`CorpusWarning` with their count and line numbers.
    """
    raw, source_path = _read_data_nmt(path)
    text = preprocess_nmt(raw)
    source, target, skipped = _tokenize_nmt(text, num_examples)
    if skipped:
        _warn_skipped(source_path, skipped,
                      'not exactly two tab-separated columns')
    if not source:
        raise ValueError(
            f'{source_path}: no sentence pairs found (expected lines of '
            'exactly two tab-separated columns, "source<TAB>target"; '
            'read_pairs_file reads files with more columns)')
    return _load_tokenized(source, target, batch_size, num_steps)


def load_data_pairs(pairs, batch_size, num_steps, min_freq=2,
                    reserved_tokens=RESERVED_TOKENS, is_train=True,
                    src_vocab=None, tgt_vocab=None):
    """Load ``(source, target)`` string pairs like :func:`load_data_nmt`.

    The pairs are joined into a tab-separated text and go through exactly
    the same :func:`preprocess_nmt`, :func:`tokenize_nmt`, :class:`Vocab`
    and :func:`build_array_nmt` steps.  Existing vocabularies can be passed
    (for instance to encode a validation set); otherwise they are built from
    ``pairs``.  Returns ``(data_iter, src_vocab, tgt_vocab)``.
    """
    if not pairs:
        raise ValueError('pairs is empty')
    lines = []
    for src, tgt in pairs:
        if any(c in s for s in (src, tgt) for c in '\t\n'):
            raise ValueError(
                f'pair {(src, tgt)!r} contains a tab or a newline')
        lines.append(f'{src}\t{tgt}')
    source, target = tokenize_nmt(preprocess_nmt('\n'.join(lines)))
    return _load_tokenized(source, target, batch_size, num_steps,
                           min_freq=min_freq, reserved_tokens=reserved_tokens,
                           is_train=is_train, src_vocab=src_vocab,
                           tgt_vocab=tgt_vocab)
