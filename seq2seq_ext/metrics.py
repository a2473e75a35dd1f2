"""Translation metrics: d2l's sentence BLEU and sacreBLEU's corpus BLEU."""

import collections
import math

__all__ = ['bleu', 'corpus_bleu']


def bleu(pred_seq, label_seq, k):
    """Compute d2l's sentence-level BLEU of ``pred_seq`` against ``label_seq``.

    Both arguments are strings of space-separated tokens.  The score is the
    brevity penalty ``exp(min(0, 1 - len_label / len_pred))`` times, for
    ``n = 1..k``, the clipped n-gram precision raised to ``0.5 ** n``.
    Behaviour on degenerate input (for instance a prediction shorter than
    ``k`` tokens) is d2l's, including its ``ZeroDivisionError``.
    """
    pred_tokens, label_tokens = pred_seq.split(' '), label_seq.split(' ')
    len_pred, len_label = len(pred_tokens), len(label_tokens)
    score = math.exp(min(0, 1 - len_label / len_pred))
    for n in range(1, k + 1):
        num_matches, label_subs = 0, collections.defaultdict(int)
        for i in range(len_label - n + 1):
            label_subs[' '.join(label_tokens[i: i + n])] += 1
        for i in range(len_pred - n + 1):
            if label_subs[' '.join(pred_tokens[i: i + n])] > 0:
                num_matches += 1
                label_subs[' '.join(pred_tokens[i: i + n])] -= 1
        score *= math.pow(num_matches / (len_pred - n + 1), math.pow(0.5, n))
    return score


def corpus_bleu(hypotheses, references, **kwargs):
    """Return sacreBLEU's corpus BLEU (a float in 0..100).

    ``hypotheses`` is a list of strings.  ``references`` is either a list of
    strings (one reference per hypothesis) or a list of sequences of strings
    (several references per hypothesis, the same number for each).  Extra
    keyword arguments go to ``sacrebleu.corpus_bleu`` (e.g. ``tokenize``). The chapter's
    sentences are already tokenized (a space before punctuation), so ``force=True`` is passed
    by default: sacreBLEU's warning about tokenized input would only be noise here.

    Raises :class:`ImportError` with installation advice when sacrebleu is
    not installed, and :class:`ValueError` when the lengths do not match or
    there are no sentences.
    """
    try:
        import sacrebleu
    except ImportError as err:
        raise ImportError(
            'corpus_bleu needs the sacrebleu package; install it with '
            '"pip install sacrebleu" (or use seq2seq_ext.metrics.bleu for '
            "d2l's sentence-level BLEU)") from err
    hypotheses = list(hypotheses)
    references = list(references)
    if len(hypotheses) != len(references):
        raise ValueError(
            f'got {len(hypotheses)} hypotheses but {len(references)} '
            'references')
    if not hypotheses:
        raise ValueError('hypotheses: expected at least one sentence, got none')
    if all(isinstance(ref, str) for ref in references):
        streams = [references]
    else:
        for i, refs in enumerate(references):
            if isinstance(refs, str) or not all(isinstance(r, str) for r in refs) or not refs:
                raise ValueError(
                    f'references[{i}]: expected one string per hypothesis, or a non-empty '
                    f'sequence of strings for every one, got {refs!r}')
        counts = {len(refs) for refs in references}
        if len(counts) > 1:
            raise ValueError('every hypothesis needs the same number of '
                             f'references, got {sorted(counts)}')
        streams = [list(stream) for stream in zip(*references)]
    kwargs.setdefault('force', True)
    return float(sacrebleu.corpus_bleu(hypotheses, streams, **kwargs).score)
