"""Tests for seq2seq_ext.checkpoint: round trips, atomic saving, and the refusal of missing,
truncated, corrupted, wrong-version, foreign and hostile files."""
import copy
import io
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

from seq2seq_ext import checkpoint as C
from seq2seq_ext.checkpoint import (FORMAT_TAG, FORMAT_VERSION, MODEL_CONFIG_KEYS,
                                    CheckpointError, build_model, capture_rng_state,
                                    load_checkpoint, load_model, restore_rng_state,
                                    save_checkpoint, validate_config, vocab_from_state,
                                    vocab_to_state)
from seq2seq_ext.data import Vocab, load_data_numbers
from seq2seq_ext.decoding import predict_seq2seq_batch
from seq2seq_ext.losses import MaskedSoftmaxCELoss
from seq2seq_ext.training import grad_clipping, make_adam, xavier_init_weights

REPO = Path(__file__).resolve().parents[1]
NUM_STEPS = 8
CONFIG = dict(cell="gru", fixed_context=False, embed_size=8, num_hiddens=16, num_layers=2,
              dropout=0.1, num_steps=NUM_STEPS)


class Hostile:
    """Unpickling this object creates ``marker`` (what a malicious checkpoint could do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _train_step(net, optimizer, batch, bos_id):
    """One teacher-forced training step (dropout active), as the training loop does it."""
    net.train()
    X, X_valid_len, Y, Y_valid_len = batch
    optimizer.zero_grad()
    bos = torch.full((Y.shape[0], 1), bos_id, dtype=Y.dtype)
    Y_hat, _ = net(X, torch.cat([bos, Y[:, :-1]], 1), X_valid_len)
    loss = MaskedSoftmaxCELoss()(Y_hat, Y, Y_valid_len)
    loss.sum().backward()
    grad_clipping(net, 1)
    optimizer.step()


@pytest.fixture(scope="module")
def trained():
    """A small model after a few Adam steps on the number-names corpus, with its data."""
    torch.manual_seed(0)
    it, src_vocab, tgt_vocab, held = load_data_numbers(16, NUM_STEPS, num_held_out=6, stop=80)
    net = build_model(CONFIG, len(src_vocab), len(tgt_vocab))
    net.apply(xavier_init_weights)
    optimizer = make_adam(net.parameters(), 0.01)
    batches = list(it)
    for batch in batches[:3]:
        _train_step(net, optimizer, batch, tgt_vocab["<bos>"])
    return dict(net=net, optimizer=optimizer, src_vocab=src_vocab, tgt_vocab=tgt_vocab,
                batch=batches[0], sources=[s for s, _ in held])


@pytest.fixture
def good(trained, tmp_path):
    """A valid checkpoint file of the trained model (with training state)."""
    path = tmp_path / "model.ckpt"
    save_checkpoint(path, trained["net"], trained["src_vocab"], trained["tgt_vocab"], CONFIG,
                    optimizer=trained["optimizer"], epoch=3, rng=capture_rng_state(),
                    extra={"note": "good"})
    return path


def _raw_payload(path):
    """The file's dict as torch.load reads it (no checks), for crafting bad files."""
    return torch.load(path, weights_only=True)


def _resign(payload):
    payload["sha256"] = C._digest(payload)
    return payload


def _refused(path, *fragments):
    """Assert that loading ``path`` raises CheckpointError naming it and every fragment."""
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    assert info.value.path == str(path)
    return message


# ---------------------------------------------------------------------------------------------
# round trip
# ---------------------------------------------------------------------------------------------

def test_round_trip_restores_everything_and_continues_identically(trained, tmp_path):
    net, optimizer = trained["net"], trained["optimizer"]
    src_vocab, tgt_vocab = trained["src_vocab"], trained["tgt_vocab"]
    path = tmp_path / "sub" / "dir" / "model.ckpt"  # parent directories are created
    rng = capture_rng_state()
    save_checkpoint(path, net, src_vocab, tgt_vocab, CONFIG, optimizer=optimizer, epoch=3,
                    rng=rng, extra={"history": [(1, 2.5), (2, 1.25)], "name": "x"})
    py_next, torch_next = random.random(), torch.rand(3)

    loaded, src2, tgt2, ckpt = load_model(path)
    # weights, bit for bit, and the vocabularies and configuration
    assert loaded.state_dict().keys() == net.state_dict().keys()
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    for old, new in ((src_vocab, src2), (tgt_vocab, tgt2)):
        assert new.idx_to_token == old.idx_to_token
        assert new.token_to_idx == old.token_to_idx
        assert new.token_freqs == old.token_freqs
    assert ckpt["config"] == CONFIG and ckpt["version"] == FORMAT_VERSION
    assert ckpt["format"] == FORMAT_TAG
    assert ckpt["train"]["epoch"] == 3
    assert ckpt["extra"] == {"history": [(1, 2.5), (2, 1.25)], "name": "x"}
    assert not loaded.training
    # identical predictions
    sources = trained["sources"]
    assert predict_seq2seq_batch(loaded, sources, src2, tgt2, NUM_STEPS, "cpu") == \
        predict_seq2seq_batch(net, sources, src_vocab, tgt_vocab, NUM_STEPS, "cpu")

    # the generators come back to where they were at the save
    restore_rng_state(ckpt["train"]["rng"])
    assert random.random() == py_next
    assert torch.equal(torch.rand(3), torch_next)

    # one more training step (dropout draws from the RNG, Adam uses its moments) from the
    # original and from the checkpoint gives bitwise the same weights
    original = build_model(CONFIG, len(src_vocab), len(tgt_vocab))
    original.load_state_dict(net.state_dict())
    original_opt = make_adam(original.parameters(), 0.01)
    original_opt.load_state_dict(optimizer.state_dict())
    restore_rng_state(rng)
    _train_step(original, original_opt, trained["batch"], tgt_vocab["<bos>"])
    resumed_opt = make_adam(loaded.parameters(), 0.01)
    resumed_opt.load_state_dict(ckpt["train"]["optimizer"])
    restore_rng_state(ckpt["train"]["rng"])
    _train_step(loaded, resumed_opt, trained["batch"], tgt_vocab["<bos>"])
    for (name, a), b in zip(original.named_parameters(), loaded.parameters()):
        assert torch.equal(a, b), name
    # and the step changed the weights (so the comparison means something)
    assert not torch.equal(original.decoder.dense.weight, net.decoder.dense.weight)


def test_checkpoint_without_training_state(trained, tmp_path):
    path = tmp_path / "weights.ckpt"
    save_checkpoint(path, trained["net"], trained["src_vocab"], trained["tgt_vocab"], CONFIG)
    ckpt = load_checkpoint(path)
    assert ckpt["train"] is None and ckpt["extra"] == {}
    save_checkpoint(path, trained["net"], trained["src_vocab"], trained["tgt_vocab"], CONFIG,
                    epoch=7)
    assert load_checkpoint(path)["train"] == {"epoch": 7, "optimizer": None, "rng": None}


def test_load_checkpoint_map_location(good):
    ckpt = load_checkpoint(good, map_location="meta")
    assert all(t.device.type == "meta" for t in ckpt["model"].values())
    with pytest.raises(TypeError, match="map_location"):
        load_checkpoint(good, map_location=lambda storage, loc: storage)


def test_float64_model_comes_back_float64(trained, tmp_path):
    import copy
    net = copy.deepcopy(trained["net"]).double()
    with torch.no_grad():  # values float32 cannot hold
        for p in net.parameters():
            p.add_(1e-12)
    path = tmp_path / "f64.ckpt"
    save_checkpoint(path, net, trained["src_vocab"], trained["tgt_vocab"], CONFIG)
    loaded = load_model(path)[0]
    for (name, a), b in zip(net.state_dict().items(), loaded.state_dict().values()):
        assert b.dtype == torch.float64 and torch.equal(a, b), name


def test_vocab_state_is_plain_and_round_trips():
    tokens = [["b", "a", "c"], ["a", "b", "d"], ["a", "é"]]
    for vocab in (Vocab(tokens, min_freq=2, reserved_tokens=["<pad>", "<bos>", "<eos>"]),
                  Vocab(tokens), Vocab()):
        state = vocab_to_state(vocab)
        assert type(state["idx_to_token"]) is list and type(state["token_to_idx"]) is dict
        assert all(type(p) is list for p in state["token_freqs"])
        back = vocab_from_state(state)
        assert back.idx_to_token == vocab.idx_to_token
        assert back.token_to_idx == vocab.token_to_idx
        assert back.token_freqs == vocab.token_freqs
        assert back[["a", "b", "never seen"]] == vocab[["a", "b", "never seen"]]
    with pytest.raises(ValueError, match="<unk>"):
        vocab_from_state({"idx_to_token": ["a"], "token_to_idx": {"a": 0}, "token_freqs": []})
    with pytest.raises(ValueError, match="does not match"):
        vocab_from_state({"idx_to_token": ["<unk>", "a"], "token_to_idx": {"<unk>": 0, "a": 0},
                          "token_freqs": []})
    with pytest.raises(TypeError, match="Vocab"):
        vocab_to_state(["<unk>", "a"])


def test_rng_state_round_trip_and_bad_state_changes_nothing():
    state = capture_rng_state()
    assert set(state) == {"torch", "cuda", "python"}
    assert type(state["python"]["state"]) is list
    draws = (random.random(), torch.rand(2))
    restore_rng_state(state)
    assert random.random() == draws[0] and torch.equal(torch.rand(2), draws[1])
    restore_rng_state(state)
    bad = dict(state, python={"version": 3, "state": "oops", "gauss_next": None})
    with pytest.raises(TypeError, match="python"):
        restore_rng_state(bad)
    # the torch generator was not touched by the refused call
    assert torch.equal(torch.rand(2), draws[1])


# ---------------------------------------------------------------------------------------------
# configuration and model building
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, error, fragment", [
    (lambda c: c.pop("num_layers"), ValueError, "missing"),
    (lambda c: c.update(lr=0.1), ValueError, "unknown"),
    (lambda c: c.update(cell="rnn"), ValueError, "cell"),
    (lambda c: c.update(fixed_context=1), TypeError, "fixed_context"),
    (lambda c: c.update(embed_size=True), TypeError, "embed_size"),
    (lambda c: c.update(num_hiddens=0), ValueError, "num_hiddens"),
    (lambda c: c.update(dropout=1.5), ValueError, "dropout"),
    (lambda c: c.update(num_steps="8"), TypeError, "num_steps"),
])
def test_validate_config_names_the_bad_key(change, error, fragment):
    config = dict(CONFIG)
    change(config)
    with pytest.raises(error, match=fragment):
        validate_config(config)
    assert validate_config(CONFIG) == CONFIG and tuple(CONFIG) == MODEL_CONFIG_KEYS


def test_build_model_passes_cell_and_fixed_context_only_when_not_default(monkeypatch):
    calls = []

    def recorder(name):
        def make(*args, **kwargs):
            calls.append((name, args, kwargs))
            return torch.nn.Identity()
        return make

    from seq2seq_ext import models  # build_model (seq2seq_ext.config) makes these
    monkeypatch.setattr(models, "Seq2SeqEncoder", recorder("enc"))
    monkeypatch.setattr(models, "Seq2SeqDecoder", recorder("dec"))
    build_model(CONFIG, 11, 13)
    assert calls == [("enc", (11, 8, 16, 2, 0.1), {}), ("dec", (13, 8, 16, 2, 0.1), {})]
    calls.clear()
    build_model(dict(CONFIG, cell="lstm", fixed_context=True), 11, 13)
    assert calls[0][2] == {"cell": "lstm"}
    assert calls[1][2] == {"cell": "lstm", "fixed_context": True}

    def old_style(vocab_size, embed_size, num_hiddens, num_layers, dropout=0):
        return torch.nn.Identity()

    monkeypatch.setattr(models, "Seq2SeqEncoder", old_style)
    with pytest.raises(ValueError, match="does not support"):
        build_model(dict(CONFIG, cell="lstm"), 11, 13)
    with pytest.raises(ValueError, match="src_vocab_size"):
        build_model(CONFIG, 0, 13)


# ---------------------------------------------------------------------------------------------
# saving: checks first, atomic replacement
# ---------------------------------------------------------------------------------------------

def _listing(directory):
    return sorted(os.listdir(directory))


def test_subclassed_and_numpy_values_are_saved_as_plain_ones(trained, tmp_path):
    """Values a plain-value check passes but ``torch.load(weights_only=True)`` would refuse (a
    numpy float64 from a learning-rate sweep, an IntEnum, a str subclass, numpy scalars, a
    namedtuple) are written as the plain values they stand for, and the file loads."""
    import collections
    import enum

    import numpy as np

    class Mode(enum.IntEnum):
        FAST = 2

    class Tag(str):
        pass

    Pair = collections.namedtuple("Pair", "a b")
    net = trained["net"]
    tgt_vocab = copy.copy(trained["tgt_vocab"])  # counts from numpy
    tgt_vocab._token_freqs = [(t, np.int64(f)) for t, f in tgt_vocab.token_freqs]
    optimizer = torch.optim.Adam(net.parameters(), lr=np.logspace(-3, -1, 3)[1])
    extra = {"bleu": np.float64(0.25), "mode": Mode.FAST, "tag": Tag("x"),
             "count": np.int64(7), "flag": np.bool_(True), "pair": Pair(1, np.float32(0.5)),
             Tag("key"): collections.OrderedDict(b=[np.int32(3)])}
    path = tmp_path / "plain.ckpt"
    save_checkpoint(path, net, trained["src_vocab"], tgt_vocab,
                    dict(CONFIG, dropout=np.linspace(0, 0.2, 3)[1]), optimizer=optimizer,
                    epoch=np.int64(2), extra=extra)
    ckpt = load_checkpoint(path)
    assert ckpt["extra"] == {"bleu": 0.25, "mode": 2, "tag": "x", "count": 7, "flag": True,
                             "pair": (1, 0.5), "key": {"b": [3]}}
    assert type(ckpt["extra"]["mode"]) is int and type(ckpt["extra"]["tag"]) is str
    assert type(ckpt["config"]["dropout"]) is float and ckpt["config"]["dropout"] == 0.1
    assert ckpt["train"]["epoch"] == 2
    assert type(ckpt["train"]["optimizer"]["param_groups"][0]["lr"]) is float
    assert all(type(f) is int for _, f in ckpt["tgt_vocab"]["token_freqs"])


def test_save_refuses_bad_arguments_before_touching_the_file(trained, good):
    before = good.read_bytes()
    args = (trained["net"], trained["src_vocab"], trained["tgt_vocab"])
    with pytest.raises(ValueError, match="do not fit"):
        save_checkpoint(good, *args, dict(CONFIG, num_hiddens=32))
    with pytest.raises(ValueError, match="do not fit"):  # vocabularies swapped
        save_checkpoint(good, args[0], args[2], args[1], CONFIG)
    with pytest.raises(TypeError, match=r"extra\['bad'\]"):
        save_checkpoint(good, *args, CONFIG, extra={"bad": object()})
    with pytest.raises(ValueError, match="epoch"):
        save_checkpoint(good, *args, CONFIG, epoch=-1)
    with pytest.raises(ValueError, match="cell"):
        save_checkpoint(good, *args, dict(CONFIG, cell="rnn"))
    with pytest.raises(TypeError, match="net"):
        save_checkpoint(good, "not a model", *args[1:], CONFIG)
    with pytest.raises(IsADirectoryError):
        save_checkpoint(good.parent, *args, CONFIG)
    assert good.read_bytes() == before
    assert _listing(good.parent) == [good.name]


def test_save_that_fails_midway_leaves_the_previous_file(trained, good, monkeypatch):
    before = good.read_bytes()
    real_save = torch.save

    def failing_save(obj, f):
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[:1000])  # part of the new file is on disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(good, trained["net"], trained["src_vocab"], trained["tgt_vocab"],
                        CONFIG, epoch=9)
    assert good.read_bytes() == before
    assert _listing(good.parent) == [good.name]  # the temporary file is gone
    assert load_checkpoint(good)["train"]["epoch"] == 3


def test_saved_file_permissions_follow_the_umask(trained, tmp_path):
    path = tmp_path / "perm.ckpt"
    save_checkpoint(path, trained["net"], trained["src_vocab"], trained["tgt_vocab"], CONFIG)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


_CHILD = textwrap.dedent("""
    import io, os, sys, time
    import torch
    from seq2seq_ext import checkpoint as C
    path, ready, mode = sys.argv[1:4]
    net, src_vocab, tgt_vocab, ckpt = C.load_model(path)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)

    def stall():
        open(ready, "w").close()
        time.sleep(120)

    if mode == "during-write":  # half of the file written into the temporary file
        real_atomic_write = C.atomic_write
        def half_then_stall(path, write):
            def partial(f):
                buf = io.BytesIO()
                write(buf)
                data = buf.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                stall()
            return real_atomic_write(path, partial)
        C.atomic_write = half_then_stall
    else:  # before-rename: the whole new file is written, fsync is under way
        def slow_fsync(fd):
            stall()
        os.fsync = slow_fsync
    C.save_checkpoint(path, net, src_vocab, tgt_vocab, ckpt["config"], epoch=99)
""")


_FULL_DISK_CHILD = textwrap.dedent("""
    import errno, resource, signal, sys
    from seq2seq_ext import checkpoint as C
    src, dst = sys.argv[1:3]
    net, src_vocab, tgt_vocab, ckpt = C.load_model(src)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    try:
        C.save_checkpoint(dst, net, src_vocab, tgt_vocab, ckpt["config"])
    except OSError as e:
        print(e.errno == errno.EFBIG, e.filename == dst, type(e).__name__)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX only")
def test_a_save_that_cannot_be_written_names_the_file(good, tmp_path):
    """A write that fails (here: past a file-size limit, as a full disk fails) reaches the
    caller as the OSError it is, naming the checkpoint, and leaves nothing behind."""
    dst = tmp_path / "big" / "run.pt"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, str(good), str(dst)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["True", "True", "OSError"], proc.stdout + proc.stderr
    assert list(dst.parent.iterdir()) == []


@pytest.mark.parametrize("mode", ["during-write", "before-rename"])
def test_save_killed_with_sigkill_leaves_the_previous_checkpoint(trained, good, tmp_path, mode):
    before = good.read_bytes()
    ready = tmp_path / "ready"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(good), str(ready), mode],
                             env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "the child never reached the save"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()

    # the checkpoint is the previous one, byte for byte, and it loads
    assert good.read_bytes() == before
    ckpt = load_checkpoint(good)
    assert ckpt["train"]["epoch"] == 3
    for key, value in trained["net"].state_dict().items():
        assert torch.equal(ckpt["model"][key], value)
    # the only other file is the killed save's hidden temporary, which nothing reads
    stray = [n for n in _listing(good.parent) if n not in (good.name, "ready")]
    assert len(stray) == 1 and re.fullmatch(r"\.model\.ckpt\.\d+\.[0-9a-f]{16}\.tmp", stray[0])
    assert (good.parent / stray[0]).stat().st_size > 0  # the child was killed mid-save
    # the next save removes it (its process is gone)
    save_checkpoint(good, trained["net"], trained["src_vocab"], trained["tgt_vocab"], CONFIG)
    assert [n for n in _listing(good.parent) if n != "ready"] == [good.name]
    assert load_checkpoint(good)["train"] is None


# ---------------------------------------------------------------------------------------------
# loading: every bad file is refused with a message that names the problem
# ---------------------------------------------------------------------------------------------

def test_missing_file_and_directory(tmp_path):
    _refused(tmp_path / "nope.ckpt", "not found")
    _refused(tmp_path, "not a file")
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.ckpt")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.ckpt"
    path.write_bytes(b"")
    _refused(path, "empty")


def test_truncated_files_are_refused(good, tmp_path):
    data = good.read_bytes()
    path = tmp_path / "cut.ckpt"
    for cut in (1, 3, 4, 10, 100, len(data) // 4, len(data) // 2, len(data) - 100,
                len(data) - 22, len(data) - 1):
        path.write_bytes(data[:cut])
        _refused(path, "truncated or corrupted")


def test_flipped_bytes_in_the_tensor_data_fail_the_checksum(good, tmp_path):
    data = good.read_bytes()
    with zipfile.ZipFile(good) as zf:
        entries = [i for i in zf.infolist() if re.search(r"/data/\d+$", i.filename)]
    assert entries
    path = tmp_path / "flip.ckpt"
    for info in entries[:6]:
        with open(good, "rb") as f:  # the data starts after the local header
            f.seek(info.header_offset + 26)
            name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        start = info.header_offset + 30 + name_len + extra_len
        offset = start + info.file_size // 2
        corrupt = bytearray(data)
        corrupt[offset] ^= 0x01  # one bit of one weight
        path.write_bytes(bytes(corrupt))
        _refused(path, "corrupted", "checksum")


def test_every_single_byte_corruption_is_refused_or_harmless(good, tmp_path):
    data = good.read_bytes()
    original = load_checkpoint(good)
    path = tmp_path / "flip.ckpt"
    rng = random.Random(1234)
    refused = 0
    for offset in sorted(rng.sample(range(len(data)), 80)):
        corrupt = bytearray(data)
        corrupt[offset] ^= 0xFF
        path.write_bytes(bytes(corrupt))
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as err:
            assert str(path) in str(err)
            refused += 1
            continue
        # a flip in padding or in metadata torch does not use: the content is intact
        assert ckpt["config"] == original["config"], offset
        for key, value in original["model"].items():
            assert torch.equal(ckpt["model"][key], value), (offset, key)
    assert refused > 40


def test_load_model_refuses_a_device_it_cannot_use_naming_it(good):
    bad = ["gpu", "cuda:0" if not torch.cuda.is_available() else "cuda:99"]
    for device in bad:
        for path in (good, good.with_name("missing.ckpt")):  # the device first
            with pytest.raises(ValueError, match=f"device: '{device}' cannot be used here"):
                load_model(path, device=device)
    assert next(load_model(good, device=None)[0].parameters()).device.type == "cpu"


def test_wrong_version_is_refused(good, tmp_path):
    path = tmp_path / "v.ckpt"
    for version, fragment in ((FORMAT_VERSION + 1, "newer"), (0, "unknown format version"),
                              ("1", "invalid format version")):
        payload = _raw_payload(good)
        payload["version"] = version
        torch.save(payload, path)
        _refused(path, fragment)


def test_wrong_format_tag_and_foreign_files_are_refused(trained, good, tmp_path):
    path = tmp_path / "f.ckpt"
    payload = _raw_payload(good)
    payload["format"] = "someone.else"
    torch.save(payload, path)
    _refused(path, "format tag", "someone.else")
    torch.save(trained["net"].state_dict(), path)  # the common "torch.save(state_dict)" file
    _refused(path, "not a seq2seq_ext checkpoint", "'format'")
    torch.save([1, 2, 3], path)
    _refused(path, "not a seq2seq_ext checkpoint", "list")
    path.write_bytes(b"just some text, not a checkpoint\n")
    _refused(path, "truncated or corrupted")
    path.write_bytes(pickle.dumps({"format": FORMAT_TAG}))
    _refused(path, "bare pickle")


def test_content_that_does_not_match_its_checksum_is_refused(good, tmp_path):
    path = tmp_path / "c.ckpt"
    payload = _raw_payload(good)
    key = next(iter(payload["model"]))
    payload["model"][key] = payload["model"][key] + 1e-3
    torch.save(payload, path)
    _refused(path, "does not match the checksum")
    payload = _raw_payload(good)
    payload["extra"]["note"] = "edited"
    torch.save(payload, path)
    _refused(path, "does not match the checksum")


@pytest.mark.parametrize("change, fragments", [
    (lambda p: p.pop("tgt_vocab"), ("missing", "tgt_vocab")),
    (lambda p: p.pop("sha256"), ("missing", "sha256")),
    (lambda p: p["config"].update(cell="rnn"), ("invalid model configuration", "cell")),
    (lambda p: p["config"].pop("num_layers"), ("invalid model configuration", "num_layers")),
    (lambda p: p["config"].update(dropout="0.1"), ("invalid model configuration", "dropout")),
    (lambda p: p["src_vocab"].update(idx_to_token="abc"), ("invalid src_vocab", "idx_to_token")),
    (lambda p: p["tgt_vocab"].pop("token_to_idx"), ("invalid tgt_vocab", "token_to_idx")),
    (lambda p: p.update(model=[1, 2]), ("invalid 'model'",)),
    (lambda p: p["train"].update(epoch=-2), ("train['epoch']",)),
    (lambda p: p["train"]["rng"].update(torch=[1, 2]), ("train['rng']",)),
    (lambda p: p.update(extra=[1]), ("invalid 'extra'",)),
])
def test_missing_entries_and_wrong_types_are_refused(good, tmp_path, change, fragments):
    payload = _raw_payload(good)
    change(payload)
    if "sha256" in payload and all(k in payload for k in C._TOP_KEYS):
        _resign(payload)  # a consistent checksum: the layout check itself must refuse it
    path = tmp_path / "bad.ckpt"
    torch.save(payload, path)
    _refused(path, *fragments)


def test_weights_that_do_not_fit_the_configuration(good, tmp_path):
    payload = _raw_payload(good)
    payload["config"]["num_hiddens"] = 32
    path = tmp_path / "misfit.ckpt"
    torch.save(_resign(payload), path)
    assert load_checkpoint(path)["config"]["num_hiddens"] == 32  # the layout is fine
    with pytest.raises(CheckpointError, match="do not fit the model configuration") as info:
        load_model(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_hostile_pickle_is_refused_and_never_executed(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps(Hostile(marker), protocol=protocol))
    message = _refused(path, "not allowed", "nothing in it was executed")
    assert "open" in message
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_model(path)
    assert not marker.exists()
    # the file really is hostile: a plain pickle.load runs its code
    with open(path, "rb") as f:
        pickle.load(f).close()
    assert marker.exists()


def test_hostile_object_inside_a_checkpoint_archive_is_refused(good, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = _raw_payload(good)
    payload["extra"]["payload"] = Hostile(marker)
    torch.save(payload, path)
    message = _refused(path, "not allowed", "nothing in it was executed")
    assert "open" in message
    assert not marker.exists()
    # the d2l-style "torch.save(vocab)" file holds a class instance: refused as well
    torch.save({"format": FORMAT_TAG, "vocab": Vocab([["a"]])}, path)
    _refused(path, "not allowed", "Vocab")
    assert not marker.exists()
