"""Corpus files: d2l's data hub (download with a SHA-1 check, extraction, cache) and reading
corpus files (``read_data_nmt``, ``read_pairs_file``) with one defined behaviour for every kind of
bad input (see :mod:`seq2seq_ext.data`).
"""
import errno
import hashlib
import os
import tarfile
import tempfile
import urllib.request
import warnings
import zipfile

from ..atomic_io import make_folders, remove_made_folders

__all__ = ['DATA_URL', 'DATA_HUB', 'CACHE_ENV', 'DATA_ENV', 'download', 'download_extract',
           'read_data_nmt', 'read_pairs_file', 'CorpusError', 'CorpusWarning',
           'CorpusUnavailableError']

DATA_URL = 'http://d2l-data.s3-accelerate.amazonaws.com/'
DATA_HUB = {
    'fra-eng': (DATA_URL + 'fra-eng.zip',
                '94646ad1522d915e7b0f9296181140edcf86a4f5'),
}

#: Environment variable overriding the download cache directory.
CACHE_ENV = 'SEQ2SEQ_EXT_CACHE'
#: Environment variable naming a local copy of ``fra.txt``.
DATA_ENV = 'SEQ2SEQ_EXT_DATA'

_CHUNK = 1 << 20


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
    made = make_folders(cache_dir)
    fname = os.path.join(cache_dir, url.split('/')[-1])
    if os.path.exists(fname) and _sha1_of(fname) == sha1_hash:
        return fname
    print(f'Downloading {fname} from {url}...')
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix='.part')
    done = False
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
        done = True
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        if not done:  # a failed download leaves no empty cache folders
            remove_made_folders(made)
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


class CorpusUnavailableError(RuntimeError):
    """The English-French corpus is neither given (``path``, the environment variable) nor
    cached, and cannot be downloaded. The message says what to do."""


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
        raise CorpusUnavailableError(
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
