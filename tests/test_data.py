"""Tests for seq2seq_ext.data: d2l's data pipeline and the offline corpus."""

import hashlib
import os
import urllib.error
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seq2seq_ext import data
from seq2seq_ext.data import corpus  # the hub and file reading, patched below
from seq2seq_ext.data import (
    CorpusError, CorpusWarning, DATA_HUB, DATA_URL, Vocab, build_array_nmt,
    count_corpus, download,
    download_extract, english_number, french_number, load_array,
    load_data_nmt, load_data_numbers, load_data_pairs, number_pairs,
    preprocess_nmt, read_data_nmt, read_pairs_file, tokenize_nmt,
    truncate_pad)

REAL_CORPUS = (Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
               / 'fra-eng.txt')
RESERVED = ['<pad>', '<bos>', '<eos>']


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """Keep the user's data/cache settings out of every test."""
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / 'cache'))


def _sha1(payload):
    return hashlib.sha1(payload).hexdigest()


# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

def test_data_hub_entry_matches_d2l():
    assert DATA_URL == 'http://d2l-data.s3-accelerate.amazonaws.com/'
    assert DATA_HUB['fra-eng'] == (
        'http://d2l-data.s3-accelerate.amazonaws.com/fra-eng.zip',
        '94646ad1522d915e7b0f9296181140edcf86a4f5')


# ---------------------------------------------------------------------------
# Vocab
# ---------------------------------------------------------------------------

def test_vocab_reserved_ids_frequency_order_and_min_freq():
    tokens = [['b', 'a', 'c'], ['a', 'b', 'd'], ['a']]
    vocab = Vocab(tokens, min_freq=2, reserved_tokens=RESERVED)
    assert vocab.idx_to_token == ['<unk>', '<pad>', '<bos>', '<eos>',
                                  'a', 'b']
    assert vocab['<unk>'] == 0 and vocab.unk == 0
    assert (vocab['<pad>'], vocab['<bos>'], vocab['<eos>']) == (1, 2, 3)
    assert vocab['a'] == 4 and vocab['b'] == 5
    assert vocab['c'] == 0 and vocab['never seen'] == 0
    assert len(vocab) == 6


def test_vocab_refuses_reserved_tokens_given_as_one_string():
    # list('<pad>') would reserve its characters: d2l's list + str raises
    with pytest.raises(TypeError, match='reserved_tokens'):
        Vocab([['a']], reserved_tokens='<pad>')


def test_load_data_numbers_refuses_a_held_out_count_that_is_not_an_int():
    for count in (2.5, True, '3'):
        with pytest.raises(TypeError, match='num_held_out'):
            load_data_numbers(8, 8, num_held_out=count)


def test_vocab_ties_keep_first_seen_order():
    vocab = Vocab([['y', 'x', 'z', 'x', 'y', 'w']])
    # y and x both occur twice (y first), then z and w once (z first).
    assert vocab.idx_to_token == ['<unk>', 'y', 'x', 'z', 'w']
    assert vocab.token_freqs == [('y', 2), ('x', 2), ('z', 1), ('w', 1)]


def test_vocab_stops_at_first_token_below_min_freq():
    tokens = ['a'] * 5 + ['b'] * 3 + ['c'] * 2 + ['d']
    vocab = Vocab(tokens, min_freq=3)
    assert vocab.idx_to_token == ['<unk>', 'a', 'b']
    assert Vocab(tokens, min_freq=0).idx_to_token == [
        '<unk>', 'a', 'b', 'c', 'd']


def test_vocab_does_not_duplicate_reserved_tokens_in_corpus():
    vocab = Vocab([['<eos>', 'x', '<eos>']], reserved_tokens=RESERVED)
    assert vocab.idx_to_token == ['<unk>', '<pad>', '<bos>', '<eos>', 'x']


def test_vocab_lookup_is_recursive_and_to_tokens_inverts_it():
    vocab = Vocab([['a', 'b', 'b']], reserved_tokens=RESERVED)
    assert vocab[['b', 'a', 'zzz']] == [4, 5, 0]
    assert vocab[('a', ['b', ('a',)])] == [5, [4, [5]]]
    assert vocab.to_tokens(4) == 'b'
    assert vocab.to_tokens([5, 4, 3]) == ['a', 'b', '<eos>']
    assert vocab.to_tokens((0, 1)) == ['<unk>', '<pad>']


def test_empty_vocab_and_count_corpus():
    assert len(Vocab()) == 1
    assert count_corpus(['a', 'b', 'a'])['a'] == 2
    assert count_corpus([['a'], ['b', 'a']])['a'] == 2
    assert count_corpus([]) == {}


# ---------------------------------------------------------------------------
# Preprocessing and tokenisation
# ---------------------------------------------------------------------------

def test_preprocess_replaces_special_spaces_and_spaces_punctuation():
    assert preprocess_nmt('Ça alors\u202f!') == 'ça alors !'
    assert preprocess_nmt('Va\xa0!') == 'va !'
    assert preprocess_nmt('Hello,World!Ok?Yes.') == 'hello ,world !ok ?yes .'
    assert preprocess_nmt('Go.\tVa !') == 'go .\tva !'
    # No space is added at position 0 or after an existing space.
    assert preprocess_nmt('!a .') == '!a .'
    # A punctuation mark after a tab still gets its space (d2l behaviour).
    assert preprocess_nmt('Hi\t!') == 'hi\t !'


def _d2l_preprocess_loop(text):
    """d2l's preprocess_nmt, transcribed literally as the oracle."""
    def no_space(char, prev_char):
        return char in set(',.!?') and prev_char != ' '

    text = text.replace('\u202f', ' ').replace('\xa0', ' ').lower()
    out = [' ' + char if i > 0 and no_space(char, text[i - 1]) else char
           for i, char in enumerate(text)]
    return ''.join(out)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(
    list('aZÉç,.!? ?\t\n\'') + ['\u202f', '\xa0', '\u2009', 'İ']),
    max_size=40))
def test_preprocess_matches_d2l_character_loop(text):
    assert preprocess_nmt(text) == _d2l_preprocess_loop(text)


def test_tokenize_returns_num_examples_plus_one_pairs():
    text = '\n'.join(f'e{i} x\tf{i}' for i in range(10))
    source, target = tokenize_nmt(text, num_examples=3)
    assert len(source) == len(target) == 4
    assert source[0] == ['e0', 'x'] and target[3] == ['f3']
    assert len(tokenize_nmt(text)[0]) == 10
    # A falsy num_examples means no limit, as in d2l.
    assert len(tokenize_nmt(text, num_examples=0)[0]) == 10


def test_tokenize_keeps_only_two_part_lines_but_counts_all_lines():
    text = 'a\tb\nbad line\nc\td\te\nf\tg\nh\ti\n'
    source, target = tokenize_nmt(text)
    assert source == [['a'], ['f'], ['h']]
    assert target == [['b'], ['g'], ['i']]
    # Lines 0..2 are read: only line 0 has exactly two parts.
    assert tokenize_nmt(text, num_examples=2) == ([['a']], [['b']])


# ---------------------------------------------------------------------------
# Arrays
# ---------------------------------------------------------------------------

def test_truncate_pad():
    assert truncate_pad([1, 2, 3], 5, 0) == [1, 2, 3, 0, 0]
    assert truncate_pad([1, 2, 3], 2, 0) == [1, 2]
    assert truncate_pad([1, 2], 2, 9) == [1, 2]
    assert truncate_pad([], 2, 9) == [9, 9]


def test_build_array_nmt_appends_eos_then_truncates_and_pads():
    lines = [['a', 'b'], ['a', 'b', 'c', 'd', 'e'], ['zzz']]
    vocab = Vocab(lines, reserved_tokens=RESERVED)
    a, b, c, d = vocab[['a', 'b', 'c', 'd']]
    eos, pad = vocab['<eos>'], vocab['<pad>']
    array, valid_len = build_array_nmt(lines, vocab, 4)
    assert array.dtype == torch.int64
    assert array.shape == (3, 4)
    assert array.tolist() == [[a, b, eos, pad], [a, b, c, d],
                              [vocab['zzz'], eos, pad, pad]]
    assert valid_len.tolist() == [3, 4, 2]
    assert valid_len.shape == (3,)


def test_load_array_shuffles_only_when_training():
    x = torch.arange(20)
    ordered = load_array((x,), batch_size=5, is_train=False)
    assert torch.cat([b for (b,) in ordered]).tolist() == list(range(20))
    torch.manual_seed(0)
    shuffled = torch.cat([b for (b,) in load_array((x,), 5)])
    assert sorted(shuffled.tolist()) == list(range(20))
    assert shuffled.tolist() != list(range(20))


# ---------------------------------------------------------------------------
# Reading and downloading
# ---------------------------------------------------------------------------

def test_read_data_nmt_path_takes_precedence_over_env(tmp_path, monkeypatch):
    by_path = tmp_path / 'a.txt'
    by_env = tmp_path / 'b.txt'
    by_path.write_text('Ça\tva\n', encoding='utf-8')
    by_env.write_text('Go.\tVa !\n', encoding='utf-8')

    def no_download(*args, **kwargs):
        raise AssertionError('must not download')

    monkeypatch.setattr(corpus, 'download_extract', no_download)
    monkeypatch.setenv(data.DATA_ENV, str(by_env))
    assert read_data_nmt(by_path) == 'Ça\tva\n'
    assert read_data_nmt(str(by_path)) == 'Ça\tva\n'
    assert read_data_nmt() == 'Go.\tVa !\n'


def test_read_data_nmt_without_file_or_network_explains_what_to_do(
        monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError('no network')

    monkeypatch.setattr(corpus, 'download', offline)
    with pytest.raises(data.CorpusUnavailableError) as info:
        read_data_nmt()
    assert isinstance(info.value, RuntimeError)
    message = str(info.value)
    assert 'path=' in message
    assert 'SEQ2SEQ_EXT_DATA' in message
    assert DATA_HUB['fra-eng'][0] in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)
    with pytest.raises(RuntimeError):
        load_data_nmt(2, 8)


def test_download_rejects_corrupted_cache_and_bad_download(tmp_path,
                                                           monkeypatch):
    payload = b'the real bytes\n'
    source = tmp_path / 'payload.bin'
    source.write_bytes(payload)
    cache = tmp_path / 'mycache'
    cache.mkdir()
    cached = cache / 'payload.bin'
    cached.write_bytes(b'corrupted')
    monkeypatch.setitem(DATA_HUB, 'toy', (source.as_uri(), _sha1(payload)))

    # The corrupted cached copy fails the check and is fetched again.
    assert download('toy', cache_dir=str(cache)) == str(cached)
    assert cached.read_bytes() == payload

    # A download whose SHA-1 does not match is refused and not cached.
    cached.write_bytes(b'corrupted')
    monkeypatch.setitem(DATA_HUB, 'toy', (source.as_uri(), '0' * 40))
    with pytest.raises(ValueError, match='SHA-1 mismatch'):
        download('toy', cache_dir=str(cache))
    assert cached.read_bytes() == b'corrupted'
    assert sorted(os.listdir(cache)) == ['payload.bin']


def test_download_reuses_valid_cache_without_network(tmp_path, monkeypatch):
    payload = b'cached'
    cache = tmp_path / 'c'
    cache.mkdir()
    (cache / 'thing.bin').write_bytes(payload)
    monkeypatch.setitem(DATA_HUB, 'thing', (
        'http://invalid.invalid/thing.bin', _sha1(payload)))

    def no_network(*args, **kwargs):
        raise AssertionError('must not open a URL')

    monkeypatch.setattr(corpus.urllib.request, 'urlopen', no_network)
    assert download('thing', cache_dir=str(cache)) == str(cache / 'thing.bin')
    with pytest.raises(KeyError):
        download('no such dataset', cache_dir=str(cache))


def test_a_failed_download_leaves_no_cache_folder_it_made(tmp_path, monkeypatch):
    monkeypatch.setitem(DATA_HUB, 'thing', ('http://invalid.invalid/thing.bin', _sha1(b'x')))

    def no_network(*args, **kwargs):
        raise OSError('no network')

    monkeypatch.setattr(corpus.urllib.request, 'urlopen', no_network)
    with pytest.raises(OSError, match='no network'):
        download('thing', cache_dir=str(tmp_path / 'new' / 'deeper'))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / 'old').mkdir()  # a folder that was there stays
    with pytest.raises(OSError, match='no network'):
        download('thing', cache_dir=str(tmp_path / 'old'))
    assert [p.name for p in tmp_path.iterdir()] == ['old']


def test_read_data_nmt_downloads_and_extracts_the_archive(tmp_path,
                                                          monkeypatch):
    archive = tmp_path / 'src' / 'fra-eng.zip'
    archive.parent.mkdir()
    text = 'Go.\tVa !\nHi.\tSalut\u202f!\n'
    with zipfile.ZipFile(archive, 'w') as zf:
        zf.writestr('fra-eng/fra.txt', text.encode('utf-8'))
    monkeypatch.setitem(DATA_HUB, 'fra-eng', (
        archive.as_uri(), _sha1(archive.read_bytes())))
    cache = tmp_path / 'cache'  # set by the autouse fixture
    assert read_data_nmt() == text
    assert (cache / 'fra-eng.zip').exists()
    assert (cache / 'fra-eng' / 'fra.txt').exists()
    assert download_extract('fra-eng') == str(cache / 'fra-eng')


def test_read_pairs_file(tmp_path):
    path = tmp_path / 'pairs.tsv'
    path.write_bytes('Go.\tVa !\tCC-BY attribution\r\nbroken\n'
                     'Hi.\tSalut !\r\nRun!\tCours\u202f!\n'.encode('utf-8'))
    with pytest.warns(CorpusWarning, match='skipped 1 malformed'):
        assert read_pairs_file(path) == [
            ('Go.', 'Va !'), ('Hi.', 'Salut !'), ('Run!', 'Cours\u202f!')]
    with pytest.warns(CorpusWarning):
        assert read_pairs_file(path, num_examples=2) == [
            ('Go.', 'Va !'), ('Hi.', 'Salut !')]


# ---------------------------------------------------------------------------
# Malformed corpus files: one defined behaviour per case
# ---------------------------------------------------------------------------

def _no_warning(fn, *args, **kwargs):
    """Call ``fn`` with every warning turned into an error."""
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        return fn(*args, **kwargs)


def test_read_pairs_file_counts_and_names_skipped_lines(tmp_path):
    path = tmp_path / 'pairs.tsv'
    lines = ['Go.\tVa !',        # 1 good
             'no tab here',        # 2 malformed: no tab
             '',                   # 3 empty: skipped silently
             'Hi.\t\tSalut !',   # 4 malformed: empty target column
             '   \tblank source',  # 5 malformed: blank source
             'Run!\tCours !\tCC-BY\tx',  # 6 good: extra columns ignored
             'tab at end\t',      # 7 malformed: empty target
             'Who?\tQui ?',       # 8 good
             'Sorry.\t   ']       # 9 malformed: blank target
    path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    with pytest.warns(CorpusWarning) as record:
        pairs = read_pairs_file(path)
    assert pairs == [('Go.', 'Va !'), ('Run!', 'Cours !'), ('Who?', 'Qui ?')]
    assert len(record) == 1
    warning = record[0].message
    assert warning.count == 5 and warning.lines == [2, 4, 5, 7, 9]
    assert warning.path == str(path)
    assert str(path) in str(warning) and 'skipped 5 malformed' in str(warning)
    assert 'line 2, 4, 5, 7, 9' in str(warning)

    with pytest.raises(CorpusError, match='line 2') as info:
        read_pairs_file(path, malformed='raise')
    assert info.value.lineno == 2 and info.value.path == str(path)
    assert isinstance(info.value, ValueError) and str(path) in str(info.value)
    # num_examples stops reading: the lines after the first pair are not read
    assert _no_warning(read_pairs_file, path, num_examples=1) == [
        ('Go.', 'Va !')]


def test_read_pairs_file_many_skipped_lines_are_summarised(tmp_path):
    path = tmp_path / 'pairs.tsv'
    path.write_text('\n'.join(['a\tb'] + ['junk'] * 25), encoding='utf-8')
    with pytest.warns(CorpusWarning,
                      match=r'skipped 25 .* and 15 more') as record:
        assert read_pairs_file(path) == [('a', 'b')]
    assert record[0].message.lines == list(range(2, 27))


def test_read_pairs_file_empty_lines_and_line_endings(tmp_path):
    lf = tmp_path / 'lf.tsv'
    crlf = tmp_path / 'crlf.tsv'
    cr = tmp_path / 'cr.tsv'
    lines = ['Go.\tVa !', '', 'Hi.\tSalut !', '', '']
    lf.write_bytes('\n'.join(lines).encode('utf-8'))
    crlf.write_bytes('\r\n'.join(lines).encode('utf-8'))
    cr.write_bytes('\r'.join(lines).encode('utf-8'))
    expected = [('Go.', 'Va !'), ('Hi.', 'Salut !')]
    for path in (lf, crlf, cr):
        assert _no_warning(read_pairs_file, path) == expected
    # a UTF-8 byte-order mark does not stick to the first source sentence
    bom = tmp_path / 'bom.tsv'
    bom.write_bytes(b'\xef\xbb\xbf' + '\r\n'.join(lines).encode('utf-8'))
    assert _no_warning(read_pairs_file, bom) == expected


def test_crlf_corpus_loads_like_lf_corpus(tmp_path):
    lines = ['Go.\tVa !', 'Go.\tMarche.', 'Hi.\tSalut !', 'Run!\tCours\u202f!',
             'Run!\tCourez\u202f!', 'Who?\tQui ?', 'Wow!\tÇa alors\u202f!']
    lf = tmp_path / 'lf.txt'
    crlf = tmp_path / 'crlf.txt'
    lf.write_bytes(('\n'.join(lines) + '\n').encode('utf-8'))
    crlf.write_bytes(('\r\n'.join(lines) + '\r\n').encode('utf-8'))
    assert read_data_nmt(crlf) == read_data_nmt(lf)
    assert '\r' not in read_data_nmt(crlf)
    _, src1, tgt1 = _no_warning(load_data_nmt, 2, 5, path=lf)
    _, src2, tgt2 = _no_warning(load_data_nmt, 2, 5, path=crlf)
    assert src1.idx_to_token == src2.idx_to_token
    assert tgt1.idx_to_token == tgt2.idx_to_token
    assert '!' in tgt2.idx_to_token  # not '!\r'


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / 'latin1.txt'
    path.write_bytes('Go.\tVa !\r\nHi.\tSalut !\nWow!\t'.encode('utf-8')
                     + 'Ça alors !'.encode('latin-1') + b'\n')
    for read in (read_pairs_file, read_data_nmt):
        with pytest.raises(CorpusError, match='line 3') as info:
            read(path)
        assert info.value.lineno == 3 and info.value.path == str(path)
        message = str(info.value)
        assert str(path) in message and 'invalid UTF-8' in message
        assert '0xc7' in message  # the byte: latin-1's Ç
        assert isinstance(info.value, ValueError)
        assert isinstance(info.value.__cause__, UnicodeDecodeError)
    with pytest.raises(CorpusError, match='line 3'):
        load_data_nmt(2, 5, path=path)


def test_missing_path_and_directory_are_named(tmp_path, monkeypatch):
    missing = tmp_path / 'nope' / 'fra.txt'
    for read in (read_pairs_file, read_data_nmt):
        with pytest.raises(FileNotFoundError) as info:
            read(missing)
        assert str(missing) in str(info.value)
        assert info.value.filename == str(missing)
        with pytest.raises(IsADirectoryError) as info:
            read(tmp_path)
        assert str(tmp_path) in str(info.value)
    with pytest.raises(FileNotFoundError, match='nope'):
        load_data_nmt(2, 5, path=missing)
    # a path given through the environment: the message says where it came from
    monkeypatch.setenv(data.DATA_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match=data.DATA_ENV) as info:
        read_data_nmt()
    assert info.value.filename == str(missing)


def test_load_data_nmt_reports_lines_it_skips(tmp_path):
    lines = ['Go.\tVa !', 'Go.\tMarche.', 'three\tcolumns\there',
             'Hi.\tSalut !', 'no tab', '', 'Run!\tCours\u202f!',
             'Run!\tCourez\u202f!']
    path = tmp_path / 'fra.txt'
    path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    with pytest.warns(CorpusWarning) as record:
        it, src_vocab, tgt_vocab = load_data_nmt(2, 5, num_examples=6,
                                                 path=path)
    assert [w.message.lines for w in record] == [[3, 5]]
    assert 'skipped 2 malformed' in str(record[0].message)
    # d2l's semantics are kept: lines 0..6 are read, the malformed ones count
    # towards num_examples, the empty one is dropped, so four pairs remain
    assert len(it.dataset) == 4
    source, target = tokenize_nmt(preprocess_nmt(read_data_nmt(path)), 6)
    assert len(source) == 4
    expected = Vocab(source, min_freq=2, reserved_tokens=RESERVED)
    assert src_vocab.idx_to_token == expected.idx_to_token
    # no two-column line at all: a clear error instead of an empty dataset
    bad = tmp_path / 'three.txt'
    bad.write_text('Go.\tVa !\tCC-BY\nHi.\tSalut !\tCC-BY\n', encoding='utf-8')
    with pytest.warns(CorpusWarning), pytest.raises(ValueError,
                                                    match='no sentence pairs'):
        load_data_nmt(2, 5, path=bad)


def test_read_pairs_file_rejects_bad_arguments(tmp_path):
    path = tmp_path / 'p.tsv'
    path.write_text('a\tb\n', encoding='utf-8')
    with pytest.raises(ValueError, match='malformed'):
        read_pairs_file(path, malformed='ignore')
    with pytest.raises(ValueError, match='num_examples'):
        read_pairs_file(path, num_examples=-1)
    assert read_pairs_file(path, num_examples=0) == []


# ---------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------

def test_load_data_nmt_with_path_matches_load_data_pairs(tmp_path):
    lines = ['Go.\tVa !', 'Go.\tMarche.', 'Hi.\tSalut !', 'Run!\tCours\u202f!',
             'Run!\tCourez\u202f!', 'Who?\tQui ?', 'Wow!\tÇa alors\u202f!']
    path = tmp_path / 'fra.txt'
    path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    it, src_vocab, tgt_vocab = load_data_nmt(3, 5, num_examples=4, path=path)
    # num_examples=4 reads lines 0..4, i.e. five pairs.
    assert len(it.dataset) == 5
    # '.' occurs three times; go, run and ! twice each (first-seen order).
    assert src_vocab.idx_to_token == ['<unk>', '<pad>', '<bos>', '<eos>',
                                      '.', 'go', 'run', '!']
    assert tgt_vocab.idx_to_token == ['<unk>', '<pad>', '<bos>', '<eos>',
                                      '!']

    pairs = read_pairs_file(path, num_examples=5)
    it2, src2, tgt2 = load_data_pairs(pairs, 3, 5, is_train=False)
    assert src2.idx_to_token == src_vocab.idx_to_token
    assert tgt2.idx_to_token == tgt_vocab.idx_to_token
    x, x_len, y, y_len = next(iter(it2))
    go, dot, eos, pad = src2[['go', '.', '<eos>', '<pad>']]
    assert x[0].tolist() == [go, dot, eos, pad, pad]
    assert x_len.tolist() == [3, 3, 3]
    assert y[0].tolist() == [0, tgt2['!'], tgt2['<eos>'], pad, pad]


def test_load_data_pairs_rejects_bad_pairs():
    with pytest.raises(ValueError):
        load_data_pairs([('a\tb', 'c')], 2, 4)
    with pytest.raises(ValueError):
        load_data_pairs([], 2, 4)


@pytest.mark.skipif(not REAL_CORPUS.exists(),
                    reason=f'real corpus not found at {REAL_CORPUS}')
def test_load_data_nmt_on_real_corpus():
    torch.manual_seed(0)
    it, src_vocab, tgt_vocab = load_data_nmt(2, 8, path=REAL_CORPUS)
    # d2l's semantics on this file: 601 pairs, min_freq=2 vocabularies.
    # (This Tatoeba snapshot differs slightly from the one in d2l's
    # fra-eng.zip, whose source vocabulary has 184 entries.)
    assert len(it.dataset) == 601
    assert len(src_vocab) == 189
    assert len(tgt_vocab) == 201
    assert src_vocab.idx_to_token[:8] == [
        '<unk>', '<pad>', '<bos>', '<eos>', '.', 'i', '!', "i'm"]
    x, x_len, y, y_len = next(iter(it))
    assert x.shape == y.shape == (2, 8)
    assert x.dtype == y.dtype == torch.int64
    assert x_len.shape == y_len.shape == (2,)
    for arr, lens, vocab in ((x, x_len, src_vocab), (y, y_len, tgt_vocab)):
        assert (lens == (arr != vocab['<pad>']).sum(1)).all()
        assert (lens >= 1).all() and (lens <= 8).all()

    text = preprocess_nmt(read_data_nmt(REAL_CORPUS))
    source, target = tokenize_nmt(text, 600)
    assert source[0] == ['go', '.'] and target[0] == ['va', '!']


# ---------------------------------------------------------------------------
# Offline number corpus
# ---------------------------------------------------------------------------

NUMBER_NAMES = [
    (0, 'zero', 'zéro'),
    (1, 'one', 'un'),
    (7, 'seven', 'sept'),
    (10, 'ten', 'dix'),
    (11, 'eleven', 'onze'),
    (16, 'sixteen', 'seize'),
    (17, 'seventeen', 'dix sept'),
    (20, 'twenty', 'vingt'),
    (21, 'twenty one', 'vingt et un'),
    (70, 'seventy', 'soixante dix'),
    (71, 'seventy one', 'soixante et onze'),
    (77, 'seventy seven', 'soixante dix sept'),
    (80, 'eighty', 'quatre vingts'),
    (81, 'eighty one', 'quatre vingt un'),
    (90, 'ninety', 'quatre vingt dix'),
    (91, 'ninety one', 'quatre vingt onze'),
    (99, 'ninety nine', 'quatre vingt dix neuf'),
    (100, 'one hundred', 'cent'),
    (101, 'one hundred one', 'cent un'),
    (200, 'two hundred', 'deux cents'),
    (201, 'two hundred one', 'deux cent un'),
    (280, 'two hundred eighty', 'deux cent quatre vingts'),
    (321, 'three hundred twenty one', 'trois cent vingt et un'),
    (999, 'nine hundred ninety nine', 'neuf cent quatre vingt dix neuf'),
    (1000, 'one thousand', 'mille'),
    (1001, 'one thousand one', 'mille un'),
    (2000, 'two thousand', 'deux mille'),
    (80000, 'eighty thousand', 'quatre vingt mille'),
    (200000, 'two hundred thousand', 'deux cent mille'),
]


@pytest.mark.parametrize('n, english, french', NUMBER_NAMES)
def test_number_names(n, english, french):
    assert english_number(n) == english
    assert french_number(n) == french


@pytest.mark.parametrize('bad', [-1, 1_000_000, 2.0])
def test_number_names_reject_out_of_range(bad):
    with pytest.raises(ValueError):
        english_number(bad)
    with pytest.raises(ValueError):
        french_number(bad)


def test_number_pairs():
    pairs = number_pairs()
    assert len(pairs) == 1000
    assert pairs[321] == ('three hundred twenty one', 'trois cent vingt et un')
    assert number_pairs(998, 1001)[-1] == ('one thousand', 'mille')
    assert number_pairs() == pairs
    assert len(set(pairs)) == 1000
    assert all('-' not in e + f for e, f in pairs)


def test_load_data_numbers_is_deterministic_and_split_is_disjoint():
    it, src_vocab, tgt_vocab, held = load_data_numbers(32, 8)
    _, src2, tgt2, held2 = load_data_numbers(32, 8)
    assert held == held2 and len(held) == 100
    assert src_vocab.idx_to_token == src2.idx_to_token
    assert tgt_vocab.idx_to_token == tgt2.idx_to_token
    assert load_data_numbers(32, 8, seed=1)[3] != held

    all_pairs = number_pairs()
    assert set(held) <= set(all_pairs)
    assert held == sorted(held, key=all_pairs.index)
    assert len(it.dataset) == 900

    # Encode the held-out sources like the training data: none of them is a
    # training row (the encoding is injective for words in the vocabulary).
    train_rows = {tuple(row) for row in it.dataset.tensors[0].tolist()}
    held_tokens = [preprocess_nmt(e).split(' ') for e, _ in held]
    held_rows, _ = build_array_nmt(held_tokens, src_vocab, 8)
    checked = 0
    for tokens, row in zip(held_tokens, held_rows.tolist()):
        if src_vocab.unk not in src_vocab[tokens]:
            assert tuple(row) not in train_rows
            checked += 1
    assert checked >= 95

    # Vocabularies come from the training pairs only, with d2l's settings.
    train = [p for p in all_pairs if p not in set(held)]
    expected = Vocab([preprocess_nmt(e).split(' ') for e, _ in train],
                     min_freq=2, reserved_tokens=RESERVED)
    assert src_vocab.idx_to_token == expected.idx_to_token
    assert src_vocab.idx_to_token[:5] == [
        '<unk>', '<pad>', '<bos>', '<eos>', 'hundred']
    assert tgt_vocab['cent'] == 4


@pytest.mark.parametrize('seed,stop,held_out', [(0, 1000, 100), (1, 1000, 300), (2, 200, 40),
                                                 (3, 80, 6), (5, 120, 30)])
def test_held_out_numbers_use_only_words_learnt_in_training(seed, stop, held_out):
    """A held-out number never asks for a word the model could not have learnt: every
    English and French word of it is in the training vocabularies (not <unk>)."""
    _, src_vocab, tgt_vocab, held = load_data_numbers(8, 8, num_held_out=held_out, seed=seed,
                                                      stop=stop)
    assert len(held) == held_out
    for en, fr in held:
        assert src_vocab.unk not in src_vocab[en.split(' ')], en
        assert tgt_vocab.unk not in tgt_vocab[fr.split(' ')], fr


def test_held_out_numbers_that_cannot_be_covered_are_refused():
    # 30 of 0..39 cannot be held out while keeping two occurrences of each word in training
    with pytest.raises(ValueError, match='num_held_out: only'):
        load_data_numbers(4, 8, num_held_out=30, stop=40)


def test_load_data_numbers_batches_and_validation():
    it, src_vocab, tgt_vocab, held = load_data_numbers(
        16, 10, num_held_out=10, start=0, stop=200)
    assert len(it.dataset) == 190 and len(held) == 10
    x, x_len, y, y_len = next(iter(it))
    assert x.shape == y.shape == (16, 10)
    assert (y_len >= 2).all()
    with pytest.raises(ValueError):
        load_data_numbers(4, 8, num_held_out=200, start=0, stop=200)
