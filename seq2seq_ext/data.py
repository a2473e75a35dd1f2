"""Data pipeline of d2l.ai's machine-translation chapter and an offline corpus.

The functions ``download``, ``download_extract``, ``read_data_nmt``,
``preprocess_nmt``, ``tokenize_nmt``, ``Vocab``, ``count_corpus``,
``truncate_pad``, ``build_array_nmt``, ``load_array`` and ``load_data_nmt``
reproduce d2l's behaviour exactly (same vocabularies, same arrays), with these
additions:

* ``read_data_nmt`` and ``load_data_nmt`` accept a ``path`` to a local copy of
  ``fra.txt`` (or read the environment variable ``SEQ2SEQ_EXT_DATA``), and
  fail with a :class:`RuntimeError` that explains what to do when the corpus
  can be neither found nor downloaded;
* ``download`` verifies the SHA-1 of what it downloads, not only of the
  cached file, and its cache directory can be set with ``SEQ2SEQ_EXT_CACHE``;
* ``number_pairs`` / ``load_data_numbers`` provide a deterministic offline
  corpus (English and French number names) that needs no download;
* ``read_pairs_file`` and ``load_data_pairs`` load any parallel corpus
  through the same preprocessing, tokenisation and vocabulary pipeline.

Reading corpus files (``read_data_nmt``, ``load_data_nmt``,
``read_pairs_file``) has one defined behaviour for every kind of bad input:

========================  ===================================================
input                     behaviour
========================  ===================================================
path does not exist       :class:`FileNotFoundError` naming the path
path is a directory       :class:`IsADirectoryError` naming the path
invalid UTF-8             :class:`CorpusError` (a :class:`ValueError`) naming
                          the path, the line number and the byte; nothing is
                          returned (no guessing of another encoding)
UTF-8 byte-order mark     dropped
``\\r\\n`` or ``\\r``        end a line, like ``\\n`` (universal newlines)
empty line                skipped silently (e.g. the file's last newline)
line without a tab        ``read_pairs_file``: skipped, and counted in one
                          :class:`CorpusWarning` (or :class:`CorpusError`
                          with ``malformed='raise'``); ``load_data_nmt``:
                          skipped as d2l does, counted in a CorpusWarning
empty source or target    ``read_pairs_file``: malformed, as above;
                          ``load_data_nmt``: kept, as d2l does
extra tab-separated       ``read_pairs_file``: ignored (the first two columns
columns                   are the pair, as in Tatoeba's attribution files);
                          ``load_data_nmt``: the line is skipped as d2l does
                          (only exactly two columns) and counted as above
========================  ===================================================
"""

import collections
import errno
import hashlib
import os
import random
import re
import tarfile
import tempfile
import urllib.request
import warnings
import zipfile

import torch
from torch.utils import data

__all__ = [
    'DATA_URL', 'DATA_HUB', 'download', 'download_extract', 'read_data_nmt',
    'preprocess_nmt', 'tokenize_nmt', 'Vocab', 'count_corpus',
    'truncate_pad', 'build_array_nmt', 'load_array', 'load_data_nmt',
    'read_pairs_file', 'load_data_pairs', 'english_number',
    'french_number', 'number_pairs', 'load_data_numbers', 'CorpusError',
    'CorpusWarning',
]

DATA_URL = 'http://d2l-data.s3-accelerate.amazonaws.com/'
DATA_HUB = {
    'fra-eng': (DATA_URL + 'fra-eng.zip',
                '94646ad1522d915e7b0f9296181140edcf86a4f5'),
}

#: Environment variable overriding the download cache directory.
CACHE_ENV = 'SEQ2SEQ_EXT_CACHE'
#: Environment variable naming a local copy of ``fra.txt``.
DATA_ENV = 'SEQ2SEQ_EXT_DATA'
#: Reserved tokens used by d2l's machine-translation vocabularies.
RESERVED_TOKENS = ('<pad>', '<bos>', '<eos>')

_CHUNK = 1 << 20
_PUNCT_AFTER_NON_SPACE = re.compile(r'(?<=[^ ])([,.!?])')


# ---------------------------------------------------------------------------
# Downloading
# ---------------------------------------------------------------------------

def _default_cache_dir():
    """Return ``$SEQ2SEQ_EXT_CACHE`` if set, else d2l's ``../data``."""
    return os.environ.get(CACHE_ENV) or os.path.join('..', 'data')


def _sha1_of(fname):
    """Return the hexadecimal SHA-1 digest of a file."""
    sha1 = hashlib.sha1()
    with open(fname, 'rb') as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            sha1.update(chunk)
    return sha1.hexdigest()


def download(name, cache_dir=None):
    """Download the ``DATA_HUB`` file ``name`` and return its local path.

    A cached copy whose SHA-1 matches is reused; a cached copy that does not
    match is downloaded again.  The downloaded bytes are checked against the
    expected SHA-1 before they replace the cached file, and a mismatch raises
    :class:`ValueError`.  Network failures propagate as :class:`OSError`
    (``urllib.error.URLError``).

    ``cache_dir`` defaults to ``$SEQ2SEQ_EXT_CACHE`` or, like d2l, ``../data``.
    """
    if name not in DATA_HUB:
        raise KeyError(f'{name!r} is not in DATA_HUB '
                       f'(known: {sorted(DATA_HUB)})')
    url, sha1_hash = DATA_HUB[name]
    if cache_dir is None:
        cache_dir = _default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    fname = os.path.join(cache_dir, url.split('/')[-1])
    if os.path.exists(fname) and _sha1_of(fname) == sha1_hash:
        return fname
    print(f'Downloading {fname} from {url}...')
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix='.part')
    try:
        sha1 = hashlib.sha1()
        with os.fdopen(fd, 'wb') as out, urllib.request.urlopen(url) as resp:
            while True:
                chunk = resp.read(_CHUNK)
                if not chunk:
                    break
                sha1.update(chunk)
                out.write(chunk)
        if sha1.hexdigest() != sha1_hash:
            raise ValueError(
                f'SHA-1 mismatch for {url}: expected {sha1_hash}, '
                f'got {sha1.hexdigest()}')
        os.replace(tmp, fname)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return fname


def download_extract(name, folder=None, cache_dir=None):
    """Download and extract a zip/tar archive; return the extracted folder.

    As in d2l, the archive is extracted next to the downloaded file and the
    result is ``<cache_dir>/<folder>`` if ``folder`` is given, else the
    archive's path without its extension.
    """
    fname = download(name, cache_dir)
    base_dir = os.path.dirname(fname)
    data_dir, ext = os.path.splitext(fname)
    if ext == '.zip':
        with zipfile.ZipFile(fname, 'r') as fp:
            fp.extractall(base_dir)
    elif ext in ('.tar', '.gz'):
        with tarfile.open(fname, 'r') as fp:
            fp.extractall(base_dir, filter='data')
    else:
        raise ValueError(f'only zip/tar files can be extracted, got {fname}')
    return os.path.join(base_dir, folder) if folder else data_dir


class CorpusError(ValueError):
    """A corpus file that cannot be read: invalid UTF-8, or (on request) a
    malformed line.  ``path`` and ``lineno`` (1-based) name the place."""

    def __init__(self, message, path=None, lineno=None):
        super().__init__(message)
        self.path = path
        self.lineno = lineno


class CorpusWarning(UserWarning):
    """Lines of a corpus file were skipped.  ``path`` names the file,
    ``lines`` holds the skipped (1-based) line numbers and ``count`` their
    number."""

    def __init__(self, message, path=None, lines=()):
        super().__init__(message)
        self.path = path
        self.lines = list(lines)
        self.count = len(self.lines)


def _warn_skipped(path, lines, what, stacklevel=3):
    """Emit one :class:`CorpusWarning` for the skipped ``lines``."""
    shown = ', '.join(str(n) for n in lines[:10])
    more = f' and {len(lines) - 10} more' if len(lines) > 10 else ''
    warnings.warn(CorpusWarning(
        f'{path}: skipped {len(lines)} malformed line(s) ({what}): '
        f'line {shown}{more}', path=path, lines=lines), stacklevel=stacklevel)


def _read_text(path, origin=''):
    """Read a whole UTF-8 text file, with universal newlines.

    ``\\r\\n`` and a lone ``\\r`` become ``\\n`` and a leading byte-order mark
    is dropped.  A missing file raises :class:`FileNotFoundError` naming the
    path (``origin`` says where the path came from); invalid UTF-8 raises
    :class:`CorpusError` naming the path, the line and the byte.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT,
                                f'corpus file not found{origin}', path)
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        text = raw.decode('utf-8')
    except UnicodeDecodeError as err:
        before = raw[:err.start].replace(b'\r\n', b'\n').replace(b'\r', b'\n')
        lineno = before.count(b'\n') + 1
        column = len(before) - (before.rfind(b'\n') + 1) + 1
        raise CorpusError(
            f'{path}: line {lineno}: invalid UTF-8 (byte '
            f'0x{raw[err.start]:02x} at byte column {column}, file offset '
            f'{err.start}: {err.reason}); corpus files must be UTF-8 text',
            path=path, lineno=lineno) from err
    if text.startswith('\ufeff'):
        text = text[1:]
    return text.replace('\r\n', '\n').replace('\r', '\n')


def _corpus_path(path):
    """Resolve ``path`` / ``$SEQ2SEQ_EXT_DATA``: ``(path or None, origin)``."""
    if path is not None:
        return path, ''
    env = os.environ.get(DATA_ENV) or None
    return env, f' (named by ${DATA_ENV})' if env else ''


def read_data_nmt(path=None):
    """Return the raw text of the English-French corpus (d2l's ``fra.txt``).

    The source is, in order of precedence: ``path``; the file named by the
    environment variable ``SEQ2SEQ_EXT_DATA``; d2l's ``fra-eng.zip``,
    downloaded (with its SHA-1 checked) and extracted into the cache.  If the
    download fails, a :class:`RuntimeError` says how to provide the file.

    A ``path`` (or ``SEQ2SEQ_EXT_DATA``) that does not exist raises
    :class:`FileNotFoundError` naming it; invalid UTF-8 raises
    :class:`CorpusError` naming the line.  Line endings are normalised to
    ``\\n`` (see the module docstring).
    """
    return _read_data_nmt(path)[0]


def _read_data_nmt(path):
    """:func:`read_data_nmt`, also returning the file's path."""
    path, origin = _corpus_path(path)
    if path is not None:
        return _read_text(path, origin), os.fspath(path)
    try:
        data_dir = download_extract('fra-eng')
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        url = DATA_HUB['fra-eng'][0]
        raise RuntimeError(
            'Could not obtain the English-French corpus (fra.txt): '
            f'{err}. Pass the path of a local copy as '
            f'read_data_nmt(path=...) / load_data_nmt(..., path=...), set '
            f'the environment variable {DATA_ENV} to it, or download {url} '
            'yourself and extract fra-eng/fra.txt from it. Without network '
            'access, load_data_numbers() provides an offline corpus.'
        ) from err
    path = os.path.join(data_dir, 'fra.txt')
    return _read_text(path), path


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


def _tokenize_nmt(text, num_examples=None):
    """:func:`tokenize_nmt`, also returning the (1-based) numbers of the
    non-empty lines it skipped within the lines it read."""
    source, target, skipped = [], [], []
    for i, line in enumerate(text.split('\n')):
        if num_examples and i > num_examples:
            break
        parts = line.split('\t')
        if len(parts) == 2:
            source.append(parts[0].split(' '))
            target.append(parts[1].split(' '))
        elif line:
            skipped.append(i + 1)
    return source, target, skipped


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
    """Truncate ``line`` to ``num_steps`` items or pad it with the token."""
    if len(line) > num_steps:
        return line[:num_steps]
    return line + [padding_token] * (num_steps - len(line))


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


# ---------------------------------------------------------------------------
# Generic parallel corpora
# ---------------------------------------------------------------------------

def read_pairs_file(path, num_examples=None, malformed='skip'):
    """Read ``(source, target)`` string pairs from a tab-separated file.

    The file is read as UTF-8 (see :func:`_read_text`: invalid UTF-8 raises
    :class:`CorpusError` naming the line, a missing file
    :class:`FileNotFoundError` naming it, ``\\r\\n`` is normalised).  Each
    line with at least two tab-separated columns, both non-blank, gives one
    pair made of its first two columns (so the three-column
    Tatoeba/manythings files, which add an attribution column, work too).
    Empty lines are skipped silently.  Other lines (no tab, a blank source
    or target) are malformed: with ``malformed='skip'`` (the default) they
    are skipped and reported in one :class:`CorpusWarning` giving their
    count and line numbers; with ``malformed='raise'`` the first one raises
    :class:`CorpusError` naming its line.  Unlike :func:`tokenize_nmt`,
    ``num_examples`` is simply the maximum number of pairs returned (lines
    after the last pair returned are not read).
    """
    if malformed not in ('skip', 'raise'):
        raise ValueError(
            f"malformed must be 'skip' or 'raise', got {malformed!r}")
    if num_examples is not None and (
            not isinstance(num_examples, int) or isinstance(num_examples, bool)
            or num_examples < 0):
        raise ValueError(
            f'num_examples must be None or an int >= 0, got {num_examples!r}')
    path = os.fspath(path)
    pairs, skipped = [], []
    for lineno, line in enumerate(_read_text(path).split('\n'), 1):
        if num_examples is not None and len(pairs) >= num_examples:
            break
        if not line:
            continue
        parts = line.split('\t')
        if len(parts) < 2 or not parts[0].strip() or not parts[1].strip():
            if malformed == 'raise':
                raise CorpusError(
                    f'{path}: line {lineno}: expected "source<TAB>target" '
                    f'with both columns non-blank, got {line[:80]!r}',
                    path=path, lineno=lineno)
            skipped.append(lineno)
            continue
        pairs.append((parts[0], parts[1]))
    if skipped:
        _warn_skipped(path, skipped, 'no tab-separated source and target')
    return pairs


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


# ---------------------------------------------------------------------------
# Offline corpus: number names in English and French
# ---------------------------------------------------------------------------

_EN_UNITS = ('zero one two three four five six seven eight nine ten eleven '
             'twelve thirteen fourteen fifteen sixteen seventeen eighteen '
             'nineteen').split()
_EN_TENS = ('', '', 'twenty', 'thirty', 'forty', 'fifty', 'sixty', 'seventy',
            'eighty', 'ninety')
_FR_UNITS = ('zéro un deux trois quatre cinq six sept huit neuf dix onze '
             'douze treize quatorze quinze seize').split()
_FR_TENS = ('', 'dix', 'vingt', 'trente', 'quarante', 'cinquante', 'soixante')
_MAX_NUMBER = 999_999


def _check_number(n):
    if not isinstance(n, int) or not 0 <= n <= _MAX_NUMBER:
        raise ValueError(f'n must be an int in [0, {_MAX_NUMBER}], got {n!r}')


def _english_below_thousand(n):
    """Words for ``1 <= n <= 999``."""
    words = []
    hundreds, rest = divmod(n, 100)
    if hundreds:
        words += [_EN_UNITS[hundreds], 'hundred']
    if rest >= 20:
        tens, units = divmod(rest, 10)
        words.append(_EN_TENS[tens])
        if units:
            words.append(_EN_UNITS[units])
    elif rest:
        words.append(_EN_UNITS[rest])
    return words


def english_number(n):
    """English name of ``0 <= n <= 999999``, words separated by spaces.

    Compounds are written as separate words and no "and" is used:
    ``english_number(321) == 'three hundred twenty one'``.
    """
    _check_number(n)
    if n == 0:
        return _EN_UNITS[0]
    thousands, rest = divmod(n, 1000)
    words = []
    if thousands:
        words += _english_below_thousand(thousands) + ['thousand']
    if rest:
        words += _english_below_thousand(rest)
    return ' '.join(words)


def _french_below_hundred(n, final):
    """Words for ``1 <= n <= 99``; ``final``: nothing follows in the number."""
    if n <= 16:
        return [_FR_UNITS[n]]
    if n < 20:
        return ['dix', _FR_UNITS[n - 10]]
    if n < 80:
        tens, units = divmod(n, 10)
        if tens == 7:
            tens, units = 6, units + 10
        words = [_FR_TENS[tens]]
        if units in (1, 11):
            words.append('et')
        if units:
            words += _french_below_hundred(units, final)
        return words
    rest = n - 80
    if rest == 0:
        return ['quatre', 'vingts' if final else 'vingt']
    return ['quatre', 'vingt'] + _french_below_hundred(rest, final)


def _french_below_thousand(n, final):
    """Words for ``1 <= n <= 999``; ``final``: nothing follows in the number.

    "cent" and "vingt" take a plural s only when multiplied and last in the
    number (so "deux cents" but "deux cent un" and "deux cent mille").
    """
    hundreds, rest = divmod(n, 100)
    words = []
    if hundreds == 1:
        words.append('cent')
    elif hundreds:
        plural = final and rest == 0
        words += [_FR_UNITS[hundreds], 'cents' if plural else 'cent']
    if rest:
        words += _french_below_hundred(rest, final)
    return words


def french_number(n):
    """French name of ``0 <= n <= 999999``, words separated by spaces.

    Traditional spelling with hyphens written as spaces:
    ``french_number(71) == 'soixante et onze'``,
    ``french_number(99) == 'quatre vingt dix neuf'``,
    ``french_number(200) == 'deux cents'``,
    ``french_number(201) == 'deux cent un'``,
    ``french_number(1000) == 'mille'``.
    """
    _check_number(n)
    if n == 0:
        return _FR_UNITS[0]
    thousands, rest = divmod(n, 1000)
    words = []
    if thousands == 1:
        words.append('mille')
    elif thousands:
        words += _french_below_thousand(thousands, final=False) + ['mille']
    if rest:
        words += _french_below_thousand(rest, final=True)
    return ' '.join(words)


def number_pairs(start=0, stop=1000):
    """Return ``(english, french)`` name pairs for ``range(start, stop)``.

    Deterministic; for example the pair for 321 is
    ``('three hundred twenty one', 'trois cent vingt et un')``.
    """
    return [(english_number(n), french_number(n)) for n in range(start, stop)]


def load_data_numbers(batch_size, num_steps, num_held_out=100, seed=0,
                      start=0, stop=1000):
    """Offline translation task: English to French number names.

    ``num_held_out`` pairs of :func:`number_pairs` ``(start, stop)`` are held
    out (returned in numerical order, never seen in training) and the rest
    feed :func:`load_data_pairs` (same pipeline as :func:`load_data_nmt`,
    vocabularies built from the training pairs only, ``min_freq=2``).

    The held-out pairs are drawn in the order of a ``random.Random(seed)``
    shuffle, keeping only pairs whose every word, English and French, stays
    in the training vocabularies once they are held out: a held-out number
    tests how the model combines words it has learnt, never asks for a word
    it has not seen (which no model could produce).

    Returns ``(train_iter, src_vocab, tgt_vocab, held_out_pairs)``.
    """
    pairs = number_pairs(start, stop)
    if not 0 <= num_held_out < len(pairs):
        raise ValueError(
            f'num_held_out must be in [0, {len(pairs)}), got {num_held_out}')
    held = _held_out_indices(pairs, num_held_out, random.Random(seed),
                             min_freq=2)
    train_pairs = [p for i, p in enumerate(pairs) if i not in held]
    held_out_pairs = [p for i, p in enumerate(pairs) if i in held]
    train_iter, src_vocab, tgt_vocab = load_data_pairs(
        train_pairs, batch_size, num_steps)
    return train_iter, src_vocab, tgt_vocab, held_out_pairs


def _held_out_indices(pairs, count, rng, min_freq):
    """``count`` indices of ``pairs``, in ``rng``'s shuffled order, whose
    words keep at least ``min_freq`` occurrences in the remaining pairs."""
    sides = [collections.Counter(), collections.Counter()]
    tokens = []
    for pair in pairs:
        words = [collections.Counter(text.split(' ')) for text in pair]
        tokens.append(words)
        for side, counter in zip(sides, words):
            side.update(counter)
    held = set()
    for i in rng.sample(range(len(pairs)), len(pairs)):
        if len(held) == count:
            break
        if all(side[w] - n >= min_freq
               for side, counter in zip(sides, tokens[i])
               for w, n in counter.items()):
            held.add(i)
            for side, counter in zip(sides, tokens[i]):
                side.subtract(counter)
    if len(held) < count:
        raise ValueError(
            f'num_held_out: only {len(held)} of these {len(pairs)} pairs can '
            f'be held out with all their words left in training, asked for '
            f'{count}')
    return held
