"""Beam search decoding for the encoder-decoder models.

:func:`beam_search` translates many sentences at once: every (sentence, beam) pair is one row of
a single decoder call per time step, so for the chapter's GRU decoder under the extension
backend each step is one fused decode step (``Seq2SeqDecoder.forward`` with ``X`` of shape
(rows, 1) and no gradient). :func:`reference_beam_search` is the same algorithm written plainly
for one sentence (Python lists of hypotheses, one batch-1 decoder call per hypothesis per step);
it is the oracle of the tests. :func:`select_rows` picks batch rows of any decoder state.

Decoding
--------
Every sentence starts from one live hypothesis: ``<bos>`` with log-probability 0. At step
``t = 1 .. num_steps`` every live hypothesis is extended by every target token (the decoder's
whole output vocabulary, as greedy decoding does); a hypothesis's running score is the sum, in
float64, of the log-probabilities of its tokens (``log_softmax`` of the logits in their dtype,
float32 at least). Of all the extensions of a sentence's live hypotheses the ``beam_size`` with
the highest running score are kept (ties: the lower ``hypothesis_rank * vocab_size + token`` first, the hypotheses being ranked
in the order they were selected). A kept extension whose token is ``<eos>`` becomes a *finished
candidate*; at step ``num_steps`` every kept extension becomes one; the others are the live
hypotheses of the next step (so a sentence has at most ``beam_size`` live hypotheses, fewer
while some of the kept extensions ended).

The score of a finished candidate is d2l's length-normalised log-likelihood
``log P(y_1, ..., y_L) / L**alpha``: the numerator is the sum of the log-probabilities of all the
tokens it was scored on, *including* the final ``<eos>`` when it ended with one, and ``L`` is the
number of those tokens, i.e. the step at which it ended (a candidate ended by ``<eos>`` at step
``t`` has ``t - 1`` words and ``L = t``; one cut at ``num_steps`` has ``L = num_steps``). The
translation is the finished candidate with the highest score (ties: the one finished first), its
words joined by spaces, without ``<eos>``.

Scores are computed as the float quotients ``S / L**alpha`` of the sums ``S`` and compared as
they are while ``num_steps**alpha`` (the largest ``L**alpha``) is a float. Beyond the float range
(a large ``alpha``) the search compares them in the log domain instead, by
``alpha * log(L) - log(-S)`` (``inf`` for ``S = 0``), which orders them as the quotient does and
neither overflows nor underflows; a score whose ``L**alpha`` is beyond the float range is then
returned as ``-exp(log(-S) - alpha * log(L))`` (0 where that underflows). So every ``alpha`` in
``[0, MAX_ALPHA]`` (1e300, where ``alpha * log(L)`` is still finite) can be searched with.

Early stopping: a sentence stops when it has no live hypothesis, or when it has at least
``beam_size`` finished candidates and no live hypothesis can still beat the best finished one.
The bound used for the latter: a live hypothesis with running sum ``S`` can only add
log-probabilities, which are ``<= 0``, and ends with ``L <= num_steps`` tokens, so any candidate
grown from it scores ``S' / L**alpha <= S / L**alpha <= S / num_steps**alpha`` (``S <= 0`` and
``alpha >= 0``). When ``max(S) / num_steps**alpha`` over the live hypotheses is ``<=`` the best
finished score, no later candidate can replace the best one (a tie does not replace it), so
stopping never changes the result: it equals the search run to ``num_steps``. (In the log
domain the bound is ``alpha * log(num_steps) - log(-max(S))``: each way of comparing is computed
by operations that never decrease as ``S`` or ``L`` grows, so the inequalities hold for it.)

With ``beam_size=1`` this is greedy decoding: the translation equals ``predict_seq2seq``'s. With
a beam at least as wide as every step's number of extensions it is exhaustive: the translation is
the highest-scoring sequence of at most ``num_steps`` tokens.
"""
import math
import numbers

import torch

from .decoding import _check_sentence, _encode_sources
from .models import _check_int, _nested_tensors

__all__ = ["beam_search", "reference_beam_search", "select_rows"]


# ----------------------------------------------------------------------------------------------
# decoder states
# ----------------------------------------------------------------------------------------------

def _batch_dim(tensor):
    """The batch dimension of a state tensor: 1 for (layers, batch, hidden), 0 for
    (batch, hidden) and (batch,)."""
    if tensor.dim() == 3:
        return 1
    if tensor.dim() in (1, 2):
        return 0
    raise ValueError("state: expected tensors of shape (layers, batch, hidden), (batch, hidden) "
                     f"or (batch,), got a tensor of shape {tuple(tensor.shape)}")


def select_rows(state, index):
    """Rows ``index`` of a decoder state, along the batch dimension of every tensor.

    ``state`` is a tensor, ``None``, or a (nested) tuple, named tuple or list of those. A tensor
    of shape (layers, batch, hidden) is indexed along dimension 1, one of shape (batch, hidden)
    or (batch,) along dimension 0; the nesting (and its container types) is kept. ``index`` is
    a 1-D integer tensor (or a sequence of ints); rows may repeat, which is how a sentence's
    state is expanded to several beams.
    """
    if not isinstance(index, torch.Tensor):
        index = torch.as_tensor(index, dtype=torch.long)
    if index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"index: expected a 1-D int64 or int32 tensor, got dtype {index.dtype} "
                         f"and shape {tuple(index.shape)}")
    return _select(state, index)


def _select(state, index):
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        idx = index if index.device == state.device else index.to(state.device)
        return state.index_select(_batch_dim(state), idx)
    if isinstance(state, tuple):
        items = [_select(s, index) for s in state]
        if hasattr(state, "_fields"):  # a named tuple
            return type(state)(*items)
        return tuple(items) if type(state) is tuple else type(state)(items)
    if isinstance(state, list):
        return [_select(s, index) for s in state]
    raise TypeError("state: expected a tensor or a (nested) tuple or list of tensors, got "
                    f"{type(state).__name__}")


def _check_state_rows(state, rows):
    """Every tensor of the decoder's initial state must have ``rows`` (the number of
    sentences) along its batch dimension."""
    if state is None or not isinstance(state, (torch.Tensor, tuple, list)):
        raise TypeError("state: the decoder's init_state must return a tensor or a (nested) "
                        f"tuple or list of tensors, got {type(state).__name__}")
    for t in _nested_tensors(state):
        dim = _batch_dim(t)
        if t.shape[dim] != rows:
            raise ValueError(f"state: a tensor of shape {tuple(t.shape)} has {t.shape[dim]} rows "
                             f"along its batch dimension {dim}, expected {rows} (one per "
                             "sentence)")


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------

#: The largest ``alpha`` searched with: ``alpha * log(L)``, the log-domain comparison's term,
#: stays finite for every length a search can have.
MAX_ALPHA = 1e300


def _check_common(num_steps, beam_size, alpha):
    num_steps = _check_int("num_steps", num_steps)
    beam_size = _check_int("beam_size", beam_size)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha: expected a real number, got {type(alpha).__name__}")
    alpha = float(alpha)
    if not 0 <= alpha <= MAX_ALPHA:
        raise ValueError(f"alpha: expected a number in [0, {MAX_ALPHA:g}], got {alpha}")
    return num_steps, beam_size, alpha


def _log_domain(num_steps, alpha):
    """True where ``num_steps ** alpha``, the largest ``L ** alpha`` of a search, is beyond the
    float range: the search then compares scores in the log domain."""
    try:
        num_steps ** alpha
    except OverflowError:
        return True
    return False


def _key(total, length, alpha, log_domain):
    """What a candidate with the sum of log-probabilities ``total <= 0`` over ``length`` tokens
    is compared by (higher is better): its score ``total / length ** alpha``, or in the log
    domain ``alpha * log(length) - log(-total)`` (``inf`` for ``total == 0``)."""
    if not log_domain:
        return total / length ** alpha
    if total == 0:
        return math.inf
    return alpha * math.log(length) - math.log(-total)


def _score(total, length, alpha):
    """The score ``total / length ** alpha``; where ``length ** alpha`` is beyond the float
    range, from its logarithm."""
    try:
        return total / length ** alpha
    except OverflowError:
        if total == 0:
            return 0.0
        return 0.0 - math.exp(math.log(-total) - alpha * math.log(length))


def _translation(tokens, tgt_vocab, eos):
    if tokens and tokens[-1] == eos:
        tokens = tokens[:-1]
    return ' '.join(tgt_vocab.to_tokens(list(tokens)))


def _log_probs(Y, rows):
    """Log-probabilities (rows, vocab) of a one-step decoder output (rows, 1, vocab):
    ``log_softmax`` in the logits' dtype (float32 for lower precisions). Running sums add them
    in float64."""
    if not isinstance(Y, torch.Tensor) or Y.dim() != 3 or Y.shape[0] != rows or Y.shape[1] != 1:
        shape = tuple(Y.shape) if isinstance(Y, torch.Tensor) else type(Y).__name__
        raise RuntimeError(f"decoder: expected an output of shape ({rows}, 1, vocab_size) for a "
                           f"one-step input of {rows} rows, got {shape}")
    logits = Y[:, 0]
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return torch.log_softmax(logits, dim=-1)


# ----------------------------------------------------------------------------------------------
# the batched search
# ----------------------------------------------------------------------------------------------

def beam_search(net, src_sentences, src_vocab, tgt_vocab, num_steps, device, beam_size=4,
                alpha=0.75, batch_size=256, return_scores=False):
    """Beam search translations of many sentences (see the module's *Decoding* section).

    Sources are tokenised, truncated or padded to ``num_steps`` and encoded as by
    ``predict_seq2seq``; translations have at most ``num_steps`` tokens. Sentences go
    ``batch_size`` at a time; in each step the live hypotheses of all of them go through the
    decoder as one call. Returns a list of strings (words joined by spaces, no ``<eos>``), or of
    ``(translation, score)`` with ``return_scores=True``, ``score`` being the length-normalised
    log-likelihood ``sum(log p) / L**alpha`` (``alpha`` in ``[0, 1e300]``: see the module's
    *Decoding* section for large ones). Runs under ``torch.no_grad()``, ``net`` in eval mode.
    ``beam_size=1`` gives the greedy translations. Each step holds the running scores of
    ``batch_size * beam_size * len(tgt_vocab)`` extensions in float64: lower ``batch_size`` for
    large vocabularies.
    """
    if isinstance(src_sentences, (str, bytes)):
        raise TypeError("src_sentences: expected a list of sentences, got one string")
    if not isinstance(src_sentences, (list, tuple)):
        raise TypeError("src_sentences: expected a list of sentences, got "
                        f"{type(src_sentences).__name__}")
    for i, s in enumerate(src_sentences):
        _check_sentence(f"src_sentences[{i}]", s)
    num_steps, beam_size, alpha = _check_common(num_steps, beam_size, alpha)
    batch_size = _check_int("batch_size", batch_size)
    sentences = list(src_sentences)
    net.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(sentences), batch_size):
            out += _search_chunk(net, sentences[i:i + batch_size], src_vocab, tgt_vocab,
                                 num_steps, device, beam_size, alpha)
    return out if return_scores else [t for t, _ in out]


def _top_k(cand, k):
    """The ``k`` largest entries of every row of ``cand`` (rows, n), ``n >= k``: (indices,
    values), each (rows, k), ordered by value, descending, then by index, ascending (what a
    stable descending sort would put first), without sorting whole rows."""
    rows, n = cand.shape
    if k < n:
        vals, idx = cand.topk(k + 1, dim=1)
        # rows whose k-th and (k+1)-th values tie: which tied entries topk kept is unspecified
        tied = (vals[:, k - 1] == vals[:, k]).nonzero()[:, 0]
        idx = idx[:, :k]
        if tied.numel():
            idx = idx.clone()
            idx[tied] = _top_k_ties(cand[tied], k)
    else:
        idx = torch.arange(n, device=cand.device).expand(rows, n)
    if torch.isnan(cand.gather(1, idx)).any():
        raise RuntimeError("decoder: the log-probabilities contain NaN")
    # order the chosen entries by index, then (stably) by value
    idx = idx.sort(dim=1).values
    val = cand.gather(1, idx)
    order = torch.sort(val, dim=1, descending=True, stable=True).indices
    return idx.gather(1, order), val.gather(1, order)


def _top_k_ties(cand, k):
    """For rows where the k-th largest value repeats: the entries greater than it, then the
    lowest-index entries equal to it, k in all (in index order)."""
    kth = cand.topk(k, dim=1).values[:, -1:]
    greater = cand > kth
    equal = cand == kth
    need = k - greater.sum(dim=1, keepdim=True)
    take = greater | (equal & (equal.cumsum(dim=1) <= need))
    idx = take.nonzero()[:, 1]
    if idx.numel() != cand.shape[0] * k:
        raise RuntimeError("decoder: the log-probabilities contain NaN")
    return idx.view(cand.shape[0], k)


def _search_chunk(net, sentences, src_vocab, tgt_vocab, num_steps, device, k, alpha,
                  early_stopping=True):
    """Beam search of a list of sentences, all their hypotheses batched: a list of
    ``(translation, score)``. ``early_stopping=False`` runs every sentence to the end (for
    checking that early stopping changes nothing)."""
    n = len(sentences)
    if n == 0:
        return []
    bos, eos = tgt_vocab['<bos>'], tgt_vocab['<eos>']
    enc_X, enc_valid_len = _encode_sources(sentences, src_vocab, num_steps, device)
    enc_outputs = net.encoder(enc_X, enc_valid_len)
    state = net.decoder.init_state(enc_outputs, enc_valid_len)
    _check_state_rows(state, n)
    # k rows (beam slots) per sentence; at first only slot 0 is live
    state = select_rows(state, torch.arange(n, device=device).repeat_interleave(k))
    cum = torch.full((n, k), -math.inf, dtype=torch.float64, device=device)
    cum[:, 0] = 0.0
    hist = torch.empty((n, k, 0), dtype=torch.long, device=device)  # tokens of every slot
    X = torch.full((n * k, 1), bos, dtype=torch.long, device=device)
    active = list(range(n))  # the sentence of every row of cum / hist
    best = [None] * n  # (key, score, tokens) of the best finished candidate
    count = [0] * n  # finished candidates
    log_domain = _log_domain(num_steps, alpha)
    buf = None
    for t in range(1, num_steps + 1):
        a = len(active)
        Y, new_state = net.decoder(X, state)
        logp = _log_probs(Y, a * k)
        vocab = logp.shape[1]
        # running sums in float64, in a buffer reused across steps (a copy then an in-place
        # add: faster than a mixed-dtype add into fresh memory)
        if buf is None or buf.shape[2] != vocab:
            buf = torch.empty((n, k, vocab), dtype=torch.float64, device=device)
        cand = buf[:a]
        cand.copy_(logp.view(a, k, vocab))
        cand = cand.add_(cum.unsqueeze(2)).view(a, k * vocab)
        idx, val = _top_k(cand, k)
        parent = torch.div(idx, vocab, rounding_mode='floor')
        token = idx - parent * vocab
        hist = torch.cat((hist.gather(1, parent.unsqueeze(2).expand(-1, -1, hist.shape[2])),
                          token.unsqueeze(2)), dim=2)
        valid = torch.isfinite(val)
        ends = valid & ((token == eos) if t < num_steps else torch.ones_like(valid))
        live = valid & ~ends
        cum = torch.where(live, val, torch.full_like(val, -math.inf))
        # bookkeeping of the finished candidates on the host, in slot (rank) order
        ends_at = ends.nonzero().tolist()
        if ends_at:
            rows_at = torch.tensor([r for r, _ in ends_at], device=device)
            slots_at = torch.tensor([j for _, j in ends_at], device=device)
            scores = val[rows_at, slots_at].tolist()
            seqs = hist[rows_at, slots_at].tolist()
            for (r, _), total, seq in zip(ends_at, scores, seqs):
                s = active[r]
                key = _key(total, t, alpha, log_domain)
                count[s] += 1
                if best[s] is None or key > best[s][0]:
                    best[s] = (key, _score(total, t, alpha), seq)
        live_max = cum.max(dim=1).values.tolist()
        keep = []
        for r, s in enumerate(active):
            if live_max[r] == -math.inf:
                continue  # no live hypothesis
            if (early_stopping and count[s] >= k
                    and _key(live_max[r], num_steps, alpha, log_domain) <= best[s][0]):
                continue  # no live hypothesis can beat the best finished candidate
            keep.append(r)
        if not keep or t == num_steps:
            break
        keep_t = torch.tensor(keep, dtype=torch.long, device=device)
        rows = (keep_t.unsqueeze(1) * k + parent[keep_t]).reshape(-1)
        state = select_rows(new_state, rows)
        X = token[keep_t].reshape(-1, 1)
        cum, hist = cum[keep_t], hist[keep_t]
        active = [active[r] for r in keep]
    out = []
    for b in best:
        if b is None:  # every extension had probability 0
            out.append(('', -math.inf))
        else:
            out.append((_translation(b[2], tgt_vocab, eos), b[1]))
    return out


# ----------------------------------------------------------------------------------------------
# the straightforward version (the oracle)
# ----------------------------------------------------------------------------------------------

def reference_beam_search(net, src_sentence, src_vocab, tgt_vocab, num_steps, device,
                          beam_size=4, alpha=0.75, early_stopping=True):
    """Beam search of one sentence, written plainly: Python lists of hypotheses, one batch-1
    decoder call per live hypothesis per step, the same selection, scoring and stopping rules
    as :func:`beam_search` (see the module's *Decoding* section). Returns
    ``(translation, score)``. ``early_stopping=False`` runs the search to ``num_steps``."""
    _check_sentence("src_sentence", src_sentence)
    num_steps, beam_size, alpha = _check_common(num_steps, beam_size, alpha)
    bos, eos = tgt_vocab['<bos>'], tgt_vocab['<eos>']
    log_domain = _log_domain(num_steps, alpha)
    net.eval()
    with torch.no_grad():
        enc_X, enc_valid_len = _encode_sources([src_sentence], src_vocab, num_steps, device)
        enc_outputs = net.encoder(enc_X, enc_valid_len)
        # a live hypothesis: (tokens, running sum of log-probabilities, decoder state)
        live = [([], 0.0, net.decoder.init_state(enc_outputs, enc_valid_len))]
        finished = []  # (key, score, tokens), in the order they finished
        for t in range(1, num_steps + 1):
            extensions = []  # (running sum, hypothesis rank, token, tokens, new state)
            for rank, (tokens, total, state) in enumerate(live):
                last = tokens[-1] if tokens else bos
                X = torch.tensor([[last]], dtype=torch.long, device=device)
                Y, new_state = net.decoder(X, state)
                for token, lp in enumerate(_log_probs(Y, 1)[0].double().tolist()):
                    extensions.append((total + lp, rank, token, tokens, new_state))
            extensions.sort(key=lambda e: (-e[0], e[1], e[2]))
            next_live = []
            for total, _, token, tokens, new_state in extensions[:beam_size]:
                if total == -math.inf:
                    continue
                if token == eos or t == num_steps:
                    finished.append((_key(total, t, alpha, log_domain),
                                     _score(total, t, alpha), tokens + [token]))
                else:
                    next_live.append((tokens + [token], total, new_state))
            live = next_live
            if not live:
                break
            best_key = max(key for key, _, _ in finished) if finished else None
            if (early_stopping and len(finished) >= beam_size
                    and _key(max(total for _, total, _ in live), num_steps, alpha,
                             log_domain) <= best_key):
                break
    if not finished:
        return '', -math.inf
    best_key, best_score, best_tokens = finished[0]
    for key, score, tokens in finished[1:]:
        if key > best_key:
            best_key, best_score, best_tokens = key, score, tokens
    return _translation(best_tokens, tgt_vocab, eos), best_score
