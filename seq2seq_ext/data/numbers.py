"""The built-in offline corpus: English and French number names (``number_pairs``), split into
training pairs and held-out pairs by ``load_data_numbers``.
"""
import collections
import random

from .._checks import check_int
from .pipeline import load_data_pairs

__all__ = ['english_number', 'french_number', 'number_pairs', 'load_data_numbers']


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
    num_held_out = check_int('num_held_out', num_held_out, None)
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
