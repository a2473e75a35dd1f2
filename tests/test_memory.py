"""Memory stays flat over long runs: repeated op calls (forward and backward), decoding 100,000
sentences with ``predict_seq2seq_batch`` and training for many epochs grow the process's resident
memory by less than a stated bound once warmed up.

Resident memory is read from ``/proc/self/status`` (``VmRSS``; Linux only, the tests skip
elsewhere). Before each reading the garbage collector runs and glibc is asked to return freed
memory to the system, so that only memory still referenced (a leak) counts. Each measurement runs
in a new interpreter with one thread (``_in_a_new_process``): in the test session's own process
the heap that earlier tests left behind (freed blocks glibc keeps, arenas it grows) moves the
resident set by several MiB, a leak or not. Each test also checks that a leak of what one call
allocates would exceed its bound (the bound is not vacuous).
"""
import ctypes
import ctypes.util
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import seq2seq_ext
from seq2seq_ext import ops
from seq2seq_ext.data import english_number, load_data_numbers
from seq2seq_ext.training import fit

STATUS = "/proc/self/status"
pytestmark = pytest.mark.skipif(not os.path.exists(STATUS),
                                reason="resident memory is read from /proc/self/status (Linux)")
MIB = 1 << 20
HERE = Path(__file__).resolve().parent


def _in_a_new_process(name, *args, timeout=900):
    """``name(*args)``, a function of this file, run in a new interpreter with one torch thread;
    returns its result (through JSON)."""
    code = ("import json, sys, torch\n"
            "torch.set_num_threads(1)\n"
            "sys.path.insert(0, sys.argv[1])\n"
            "import test_memory\n"
            "result = getattr(test_memory, sys.argv[2])(*json.loads(sys.argv[3]))\n"
            "print(json.dumps(result))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code, str(HERE), name, json.dumps(args)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, f"{name} failed in its process:\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _libc():
    try:
        name = ctypes.util.find_library("c")
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_LIBC = _libc()


def rss_bytes():
    """The resident set size of this process, in bytes, after a garbage collection and a
    ``malloc_trim`` (where glibc provides it)."""
    gc.collect()
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
    with open(STATUS) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")




def _growth(step, warmup, iterations):
    """Resident memory growth (bytes) over ``iterations`` calls of ``step`` after ``warmup``."""
    for i in range(warmup):
        step(i)
    before = rss_bytes()
    for i in range(iterations):
        step(warmup + i)
    return rss_bytes() - before


# ----------------------------------------------------------------------------------------------
# every op, forward and backward
# ----------------------------------------------------------------------------------------------

def _op_workload(seed=0):
    """One call of every op (with the autograd graphs of the differentiable ones) on tensors
    of a few dozen KiB; returns the step function and the bytes of its outputs per call."""
    g = torch.Generator().manual_seed(seed)
    B, T, V, H, L, E, I = 16, 12, 50, 24, 2, 8, 20
    pred = torch.randn(B, T, V, generator=g)
    label = torch.randint(0, V, (B, T), generator=g)
    valid_len = torch.randint(0, T + 1, (B,), generator=g)
    X = torch.randn(B, T, 8, generator=g)
    x = torch.randn(T, B, I, generator=g)
    h0 = torch.randn(B, H, generator=g)
    w_ih, w_hh = torch.randn(3 * H, I, generator=g) * 0.3, torch.randn(3 * H, H, generator=g) * 0.3
    b_ih, b_hh = torch.randn(3 * H, generator=g), torch.randn(3 * H, generator=g)
    dec = seq2seq_ext.Seq2SeqDecoder(V, E, H, L).eval()
    weights = [p.detach() for p in dec.rnn._flat_weights]
    emb_proj = (dec.embedding.weight @ weights[0][:, :E].t() + weights[2]).detach()
    dw, db = dec.dense.weight.detach(), dec.dense.bias.detach()
    state = torch.rand(L, B, H, generator=g) - 0.5
    token = torch.randint(0, V, (B,), generator=g)
    stepper = ops.decoder_stepper(dec.embedding.weight, dec.rnn._flat_weights, dec.dense.weight,
                                  dec.dense.bias)
    lstm = seq2seq_ext.Seq2SeqDecoder(V, E, H, L, cell="lstm").eval()
    lstm_w = [p.detach() for p in lstm.rnn._flat_weights]
    lstm_proj = (lstm.embedding.weight @ lstm_w[0][:, :E].t() + lstm_w[2]).detach()
    lstm_dw, lstm_db = lstm.dense.weight.detach(), lstm.dense.bias.detach()
    lstm_stepper = ops.decoder_stepper(lstm.embedding.weight, lstm.rnn._flat_weights,
                                       lstm.dense.weight, lstm.dense.bias)
    cell = torch.rand(L, B, H, generator=g) - 0.5

    def step(i):
        p = pred.clone().requires_grad_()
        ops.masked_softmax_ce(p, label, valid_len).sum().backward()
        Xg = X.clone().requires_grad_()
        ops.sequence_mask(Xg, valid_len, -1.0).sum().backward()
        ops.sequence_mask_(X.clone(), valid_len, 0.5)
        params = [t.clone().requires_grad_() for t in (x, h0, w_ih, w_hh, b_ih, b_hh)]
        out, h_n = ops.gru_layer(*params)
        (out.sum() + h_n.sum()).backward()
        with torch.no_grad():
            ops.gru_layer(x, h0, w_ih, w_hh, b_ih, b_hh)
            ops.gru_decode_step(token, state, emb_proj, None, weights, dw, db)
            stepper.step(token, state)
            ops.greedy_decode(state, emb_proj, None, weights, dw, db, 1, 2, 10)
            ops.lstm_decode_step(token, state, cell, lstm_proj, None, lstm_w, lstm_dw, lstm_db)
            lstm_stepper.lstm_step(token, state, cell)

    per_call = 4 * (2 * pred.numel() + 3 * X.numel() + 2 * x.numel() + 4 * T * B * H
                    + 4 * B * V) + 8 * B * 10
    return step, per_call


def _op_growth(iterations):
    """(growth over ``iterations`` calls of every op after 50, the output bytes per call)."""
    step, per_call = _op_workload()
    return _growth(step, warmup=50, iterations=iterations), per_call


def test_op_calls_keep_memory_flat():
    """1,000 calls of every op, forward and backward, after a warm-up: resident memory grows by
    less than 4 MiB, where keeping one call's outputs alive would cost about 200 MiB."""
    iterations, bound = 1000, 4 * MIB
    growth, per_call = _in_a_new_process("_op_growth", iterations)
    assert per_call * iterations > 10 * bound
    assert growth < bound, f"resident memory grew by {growth / MIB:.1f} MiB"


# ----------------------------------------------------------------------------------------------
# decoding and training
# ----------------------------------------------------------------------------------------------

def _numbers_model(src_vocab, tgt_vocab, seed=0):
    torch.manual_seed(seed)
    enc = seq2seq_ext.Seq2SeqEncoder(len(src_vocab), 16, 32, 2)
    dec = seq2seq_ext.Seq2SeqDecoder(len(tgt_vocab), 16, 32, 2)
    return seq2seq_ext.EncoderDecoder(enc, dec).eval()


def _decode_growth(total, chunk=1000, warmup_chunks=5, num_steps=12):
    """Decode ``total`` sentences (the number names 0..999 over and over) ``chunk`` at a time
    with predict_seq2seq_batch, keeping no result; returns (growth in bytes after the warm-up
    chunks, the op's output bytes per chunk, sentences decoded)."""
    _, src_vocab, tgt_vocab, _ = load_data_numbers(64, num_steps)
    net = _numbers_model(src_vocab, tgt_vocab)
    names = [english_number(n) for n in range(1000)]
    decoded = [0]

    def step(i):
        sentences = [names[(i * chunk + k) % 1000] for k in range(chunk)]
        out = seq2seq_ext.predict_seq2seq_batch(net, sentences, src_vocab, tgt_vocab, num_steps,
                                                "cpu", batch_size=chunk)
        assert len(out) == chunk
        decoded[0] += chunk

    growth = _growth(step, warmup_chunks, total // chunk - warmup_chunks)
    # tokens (chunk, num_steps) + lengths, int64, and the encoder state handed to the op
    per_chunk = 8 * chunk * (num_steps + 1) + 4 * 2 * chunk * 32
    return growth, per_chunk, decoded[0]


def test_decoding_100k_sentences_keeps_memory_flat():
    """predict_seq2seq_batch over 100,000 sentences: under 4 MiB of growth after the first
    5,000, where one chunk's leaked outputs would add up to over 30 MiB."""
    bound = 4 * MIB
    growth, per_chunk, decoded = _in_a_new_process("_decode_growth", 100_000)
    assert decoded == 100_000
    assert per_chunk * (100 - 5) > 5 * bound
    assert growth < bound, f"resident memory grew by {growth / MIB:.1f} MiB"


def _training_growth(epochs, warmup=3):
    """Fit on the numbers corpus, reading RSS after each epoch; returns (growth after ``warmup``
    epochs, the bytes of one epoch's logits: what keeping each batch's logits alive would
    leak)."""
    train_iter, src_vocab, tgt_vocab, _ = load_data_numbers(64, 10)
    torch.manual_seed(0)
    net = seq2seq_ext.EncoderDecoder(seq2seq_ext.Seq2SeqEncoder(len(src_vocab), 16, 32, 2),
                                     seq2seq_ext.Seq2SeqDecoder(len(tgt_vocab), 16, 32, 2))
    rss = []
    fit(net, train_iter, 0.005, epochs, tgt_vocab, "cpu",
        on_epoch=lambda epoch, loss, speed: rss.append(rss_bytes()), plot=False)
    assert len(rss) == epochs
    return rss[-1] - rss[warmup - 1], len(train_iter) * 64 * 10 * len(tgt_vocab) * 4


def test_training_epochs_keep_memory_flat():
    """10 epochs of fit: under 4 MiB of growth after the third, where keeping each batch's
    logits (64 x 10 x vocab floats) alive would exceed it."""
    bound = 4 * MIB
    growth, logits_per_epoch = _in_a_new_process("_training_growth", 10)
    assert logits_per_epoch * 7 > bound
    assert growth < bound, f"resident memory grew by {growth / MIB:.1f} MiB"


@pytest.mark.slow
def test_long_runs_keep_memory_flat():
    """The long version: 1,000,000 decoded sentences and 100 epochs, with the same bounds."""
    growth, _, decoded = _in_a_new_process("_decode_growth", 1_000_000, 1000, 20, timeout=3600)
    assert decoded == 1_000_000
    assert growth < 4 * MIB, f"decoding: resident memory grew by {growth / MIB:.1f} MiB"
    growth, _ = _in_a_new_process("_training_growth", 100, 5, timeout=3600)
    assert growth < 4 * MIB, f"training: resident memory grew by {growth / MIB:.1f} MiB"


# ----------------------------------------------------------------------------------------------
# deferred weight gradients
# ----------------------------------------------------------------------------------------------

def _stopped_backwards_growth(iterations):
    """Growth over ``iterations`` batches whose backward stops (after 10 such batches)."""
    torch.manual_seed(0)
    hidden, batch, steps = 256, 64, 10  # W_ih and W_hh (768, 256): deferred by default
    gru = seq2seq_ext.nn.GRU(hidden, hidden)
    x = torch.randn(steps, batch, hidden)

    class BadBatch(Exception):
        pass

    def stop(grad):
        raise BadBatch()

    def batch_loss():
        h, outs = torch.zeros(1, batch, hidden), []
        for t in range(steps):
            out, h = gru(x[t:t + 1], h)
            if t == steps // 2:
                out.register_hook(stop)  # the backward stops half way through the steps
            outs.append(out)
        return torch.cat(outs).square().mean()

    loss = None

    def step(i):
        nonlocal loss
        loss = batch_loss()  # the previous batch's graph alive until here
        with pytest.raises(BadBatch):
            loss.backward()
        gru.zero_grad()

    assert ops.deferred_grads() == "auto"
    return _growth(step, warmup=10, iterations=iterations)


def test_backwards_that_stop_leave_no_rows_behind():
    """A loop that skips a batch whose backward raises (a check in a hook) keeps the previous
    graph alive while the next forward runs, so the deferred sums of the one-step calls are the
    same from batch to batch (no optimizer step changed the matrices); the rows each stopped
    backward handed over are dropped when it ends. 100 such batches: resident memory grows by
    less than 16 MiB, where keeping their rows would cost about 220 MiB."""
    growth = _in_a_new_process("_stopped_backwards_growth", 100)
    assert growth < 16 * MIB, f"resident memory grew by {growth / MIB:.1f} MiB"


# ----------------------------------------------------------------------------------------------
# activation checkpointing
# ----------------------------------------------------------------------------------------------

CKPT = dict(steps=8, batch=32, input_size=64, hidden=256)


def _checkpointed_growth(cell, iterations):
    """Growth over ``iterations`` backwards of a loop of one-step calls of the drop-in layer
    (and one call over the whole sequence) inside torch.utils.checkpoint's non-reentrant
    recomputation, which stops recomputing by raising from its pack hook (after 5 backwards)."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    module = (seq2seq_ext.nn.GRU if cell == "gru" else seq2seq_ext.nn.LSTM)(CKPT["input_size"],
                                                                            CKPT["hidden"])
    x = torch.randn(CKPT["steps"], CKPT["batch"], CKPT["input_size"], requires_grad=True)

    def loop(x):
        state, outs = None, []
        for t in range(x.shape[0]):
            out, state = module(x[t:t + 1], state)
            outs.append(out)
        return torch.cat(outs) + module(x)[0]

    def step(i):
        checkpoint(loop, x, use_reentrant=False).square().mean().backward()

    return _growth(step, warmup=5, iterations=iterations)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_checkpointed_calls_keep_memory_flat(cell):
    """50 backwards through non-reentrant checkpointing: resident memory grows by less than
    4 MiB, where keeping each backward's recomputed graph (its saved gate values alone: 5 x
    hidden floats a row for the GRU, a step) would cost over 60 MiB."""
    iterations, bound = 50, 4 * MIB
    saved_per_backward = 2 * CKPT["steps"] * CKPT["batch"] * 5 * CKPT["hidden"] * 4
    assert saved_per_backward * iterations > 10 * bound
    growth = _in_a_new_process("_checkpointed_growth", cell, iterations)
    assert growth < bound, f"resident memory grew by {growth / MIB:.1f} MiB"
