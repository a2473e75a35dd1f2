"""Data pipeline of d2l.ai's machine-translation chapter and an offline corpus.

Three modules, re-exported here: :mod:`.corpus` (d2l's data hub and reading corpus files),
:mod:`.pipeline` (d2l's preprocessing, tokenisation, vocabulary and loaders) and
:mod:`.numbers` (the built-in English-French number-names corpus).

The functions ``download``, ``download_extract``, ``read_data_nmt``,
``preprocess_nmt``, ``tokenize_nmt``, ``Vocab``, ``count_corpus``,
``truncate_pad``, ``build_array_nmt``, ``load_array`` and ``load_data_nmt``
reproduce d2l's behaviour exactly (same vocabularies, same arrays), with these
additions:

* ``read_data_nmt`` and ``load_data_nmt`` accept a ``path`` to a local copy of
  ``fra.txt`` (or read the environment variable ``SEQ2SEQ_EXT_DATA``), and
  fail with a :class:`CorpusUnavailableError` (a ``RuntimeError``) that
  explains what to do when the corpus can be neither found nor downloaded;
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
from .corpus import (CACHE_ENV, DATA_ENV, DATA_HUB, DATA_URL, CorpusError,
                     CorpusUnavailableError, CorpusWarning, download, download_extract,
                     read_data_nmt, read_pairs_file)
from .numbers import english_number, french_number, load_data_numbers, number_pairs
from .pipeline import (RESERVED_TOKENS, Vocab, build_array_nmt, count_corpus, load_array,
                       load_data_nmt, load_data_pairs, preprocess_nmt, read_nmt_pairs,
                       tokenize_nmt, truncate_pad)

__all__ = [
    'DATA_URL', 'DATA_HUB', 'download', 'download_extract', 'read_data_nmt',
    'preprocess_nmt', 'tokenize_nmt', 'Vocab', 'count_corpus',
    'truncate_pad', 'build_array_nmt', 'load_array', 'load_data_nmt',
    'read_pairs_file', 'load_data_pairs', 'read_nmt_pairs', 'english_number',
    'french_number', 'number_pairs', 'load_data_numbers', 'CorpusError',
    'CorpusUnavailableError', 'CorpusWarning', 'CACHE_ENV', 'DATA_ENV', 'RESERVED_TOKENS',
]
