"""Checkpoints: one file holding a model's weights, both vocabularies, the model configuration
and the training state.

File format (``FORMAT_VERSION`` 1): a ``torch.save`` zip archive whose pickle holds only plain
Python values and tensors::

    {"format": "seq2seq_ext.checkpoint", "version": 1,
     "config": {"cell", "fixed_context", "embed_size", "num_hiddens", "num_layers", "dropout",
                "num_steps"},
     "model": state_dict (CPU tensors),
     "src_vocab": vocab state, "tgt_vocab": vocab state,
     "train": {"epoch", "optimizer", "rng"} or None,
     "extra": dict of plain values,
     "sha256": hex digest of everything above}

Safety and reliability:

* Writing is atomic: the bytes go to a temporary file in the destination's directory, which is
  flushed and ``fsync``-ed, then renamed over the destination with :func:`os.replace`, and the
  directory is ``fsync``-ed. A save that fails or is killed leaves the previous file untouched.
  A killed save can leave a hidden ``.<name>.<pid>.<random>.tmp`` file beside the checkpoint; it is
  never read, and the next save into that directory removes it once its process is gone.
* Reading never executes code from the file: anything that is not a zip archive is refused
  without being unpickled (a pickle is only scanned statically, to name the code it references),
  and zip archives are read with ``torch.load(weights_only=True)``, which refuses any object
  other than tensors and plain containers.
* The ``sha256`` entry covers every value and every tensor byte, so a flipped bit anywhere in the
  data is detected, not only in the archive's structure.
* Every refusal is a :class:`CheckpointError` (a :class:`ValueError`) whose message names the
  file and the problem: missing, not a file, empty, truncated or corrupted, not a checkpoint,
  objects that are not allowed, a newer or unknown format version, missing or ill-typed entries,
  weights that do not fit the configuration.
"""
import ctypes
import errno
import hashlib
import os
import pickle
import pickletools
import random
import re
import secrets

import torch

from .data import Vocab
from .models import EncoderDecoder, Seq2SeqDecoder, Seq2SeqEncoder

__all__ = [
    "FORMAT_TAG", "FORMAT_VERSION", "MODEL_CONFIG_KEYS", "CheckpointError", "validate_config",
    "vocab_to_state", "vocab_from_state", "build_model", "capture_rng_state",
    "restore_rng_state", "save_checkpoint", "load_checkpoint", "load_model",
]

#: The value of the ``"format"`` entry of every checkpoint.
FORMAT_TAG = "seq2seq_ext.checkpoint"
#: The version of the file layout written by :func:`save_checkpoint`; files with a larger
#: version are refused.
FORMAT_VERSION = 1
#: The keys of a model configuration (see :func:`validate_config`).
MODEL_CONFIG_KEYS = ("cell", "fixed_context", "embed_size", "num_hiddens", "num_layers",
                     "dropout", "num_steps")
#: The recurrent cells a configuration may name.
CELLS = ("gru", "lstm")

_TOP_KEYS = ("format", "version", "config", "model", "src_vocab", "tgt_vocab", "train", "extra")
_DIGEST_KEY = "sha256"
_TRAIN_KEYS = ("epoch", "optimizer", "rng")
_RNG_KEYS = ("torch", "cuda", "python")
_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, not a file, truncated or corrupted, not a
    checkpoint, holding objects that are not allowed, of an unknown version, or inconsistent.

    ``path`` is the file concerned (``None`` when there is none).
    """

    def __init__(self, message, path=None):
        super().__init__(message)
        self.path = path


# ---------------------------------------------------------------------------
# Model configuration
# ---------------------------------------------------------------------------

def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def validate_config(config):
    """Check a model configuration and return a plain copy of it.

    ``config`` is a dict with exactly the keys of :data:`MODEL_CONFIG_KEYS`: ``cell`` (``"gru"``
    or ``"lstm"``), ``fixed_context`` (bool), ``embed_size``, ``num_hiddens``, ``num_layers``,
    ``num_steps`` (ints >= 1) and ``dropout`` (a number in [0, 1]). The vocabulary sizes are not
    part of it: they come from the vocabularies. Raises :class:`TypeError` or
    :class:`ValueError` naming the offending key.
    """
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    missing = [k for k in MODEL_CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(f"config is missing the key(s) {missing} "
                         f"(a model configuration has {list(MODEL_CONFIG_KEYS)})")
    unknown = [k for k in config if k not in MODEL_CONFIG_KEYS]
    if unknown:
        raise ValueError(f"config has unknown key(s) {unknown} (a model configuration has "
                         f"{list(MODEL_CONFIG_KEYS)}; put anything else in extra)")
    cell = config["cell"]
    if not isinstance(cell, str) or cell not in CELLS:
        raise ValueError(f"config['cell'] must be one of {list(CELLS)}, got {cell!r}")
    if not isinstance(config["fixed_context"], bool):
        raise TypeError(f"config['fixed_context'] must be a bool, "
                        f"got {config['fixed_context']!r}")
    for key in ("embed_size", "num_hiddens", "num_layers", "num_steps"):
        value = config[key]
        if not _is_int(value):
            raise TypeError(f"config[{key!r}] must be an int, got {value!r}")
        if value < 1:
            raise ValueError(f"config[{key!r}] must be >= 1, got {value}")
    dropout = config["dropout"]
    if not (_is_int(dropout) or isinstance(dropout, float)):
        raise TypeError(f"config['dropout'] must be a number, got {dropout!r}")
    if not 0 <= dropout <= 1:
        raise ValueError(f"config['dropout'] must be in [0, 1], got {dropout}")
    return {key: config[key] for key in MODEL_CONFIG_KEYS}


def build_model(config, src_vocab_size, tgt_vocab_size):
    """Build the :class:`~seq2seq_ext.models.EncoderDecoder` a configuration describes.

    The encoder is ``Seq2SeqEncoder(src_vocab_size, embed_size, num_hiddens, num_layers,
    dropout)`` and the decoder ``Seq2SeqDecoder(tgt_vocab_size, ...)``; ``cell`` and
    ``fixed_context`` are passed as keyword arguments only when they differ from the defaults
    (``"gru"``, ``False``). The weights are freshly initialised; see :func:`load_model`.
    """
    config = validate_config(config)
    for name, size in (("src_vocab_size", src_vocab_size), ("tgt_vocab_size", tgt_vocab_size)):
        if not _is_int(size) or size < 1:
            raise ValueError(f"{name} must be an int >= 1, got {size!r}")
    enc_kwargs, dec_kwargs = {}, {}
    if config["cell"] != "gru":
        enc_kwargs["cell"] = dec_kwargs["cell"] = config["cell"]
    if config["fixed_context"]:
        dec_kwargs["fixed_context"] = True
    args = (config["embed_size"], config["num_hiddens"], config["num_layers"], config["dropout"])
    try:
        encoder = Seq2SeqEncoder(src_vocab_size, *args, **enc_kwargs)
        decoder = Seq2SeqDecoder(tgt_vocab_size, *args, **dec_kwargs)
    except TypeError as err:
        if not (enc_kwargs or dec_kwargs):
            raise
        raise ValueError(
            f"the configuration asks for {dict(enc_kwargs, **dec_kwargs)}, which this version "
            f"of seq2seq_ext.models does not support ({err})") from err
    return EncoderDecoder(encoder, decoder)


def _weights_mismatch(config, src_vocab_size, tgt_vocab_size, state_dict):
    """Describe how ``state_dict`` does not fit the model of ``config`` (``None`` if it fits).

    The model is built on the meta device, so nothing is allocated."""
    with torch.device("meta"):
        expected = build_model(config, src_vocab_size, tgt_vocab_size).state_dict()
    problems = []
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"unexpected {unexpected}")
    for key, want in expected.items():
        got = state_dict.get(key)
        if isinstance(got, torch.Tensor) and tuple(got.shape) != tuple(want.shape):
            problems.append(f"{key} has shape {tuple(got.shape)}, the configuration "
                            f"needs {tuple(want.shape)}")
    return "; ".join(problems) or None


# ---------------------------------------------------------------------------
# Vocabularies
# ---------------------------------------------------------------------------

def vocab_to_state(vocab):
    """The state of a :class:`~seq2seq_ext.data.Vocab` as plain lists and dicts.

    ``{"idx_to_token": [str], "token_to_idx": {str: int}, "token_freqs": [[str, int]]}``;
    :func:`vocab_from_state` rebuilds an identical vocabulary from it.
    """
    for attr in ("idx_to_token", "token_to_idx", "token_freqs"):
        if not hasattr(vocab, attr):
            raise TypeError(f"vocab must be a seq2seq_ext.data.Vocab (it has no {attr!r}), "
                            f"got {type(vocab).__name__}")
    state = {"idx_to_token": list(vocab.idx_to_token),
             "token_to_idx": dict(vocab.token_to_idx),
             "token_freqs": [[token, freq] for token, freq in vocab.token_freqs]}
    _check_vocab_state(state)
    return state


def _check_vocab_state(state):
    """Raise ValueError/TypeError unless ``state`` is a consistent vocabulary state."""
    if not isinstance(state, dict):
        raise TypeError(f"a vocabulary state must be a dict, got {type(state).__name__}")
    missing = [k for k in ("idx_to_token", "token_to_idx", "token_freqs") if k not in state]
    if missing:
        raise ValueError(f"the vocabulary state is missing {missing}")
    idx_to_token = state["idx_to_token"]
    if not isinstance(idx_to_token, list) or not all(isinstance(t, str) for t in idx_to_token):
        raise TypeError("idx_to_token must be a list of str")
    if not idx_to_token or idx_to_token[0] != "<unk>":
        raise ValueError("idx_to_token must start with '<unk>' (index 0 is the unknown token)")
    token_to_idx = state["token_to_idx"]
    if not isinstance(token_to_idx, dict):
        raise TypeError("token_to_idx must be a dict")
    for token, idx in token_to_idx.items():
        if not isinstance(token, str) or not _is_int(idx):
            raise TypeError(f"token_to_idx must map str to int, found {token!r}: {idx!r}")
        if not 0 <= idx < len(idx_to_token) or idx_to_token[idx] != token:
            raise ValueError(f"token_to_idx[{token!r}] = {idx} does not match idx_to_token")
    if set(token_to_idx) != set(idx_to_token):
        raise ValueError("token_to_idx and idx_to_token hold different tokens")
    freqs = state["token_freqs"]
    if not isinstance(freqs, list) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str)
            and _is_int(p[1]) and p[1] >= 0 for p in freqs):
        raise TypeError("token_freqs must be a list of [str, int >= 0] pairs")


def vocab_from_state(state):
    """Rebuild a :class:`~seq2seq_ext.data.Vocab` from :func:`vocab_to_state`'s output.

    The token->id mapping, ``idx_to_token`` and ``token_freqs`` equal the saved vocabulary's.
    Raises :class:`ValueError` / :class:`TypeError` for an inconsistent state.
    """
    _check_vocab_state(state)
    vocab = Vocab()
    vocab.idx_to_token = list(state["idx_to_token"])
    vocab.token_to_idx = dict(state["token_to_idx"])
    vocab._token_freqs = [(token, freq) for token, freq in state["token_freqs"]]
    return vocab


# ---------------------------------------------------------------------------
# Random number generator state
# ---------------------------------------------------------------------------

def capture_rng_state():
    """The state of every random number generator a training run uses.

    ``{"torch": CPU generator state (uint8 tensor), "cuda": list of per-device states, or
    None when CUDA is not initialised, "python": {"version", "state", "gauss_next"}}`` (Python's
    ``random`` state as plain ints and lists), ready for :func:`save_checkpoint`'s ``rng``.
    """
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "cuda": cuda,
            "python": {"version": version, "state": list(internal), "gauss_next": gauss_next}}


def _check_rng_state(state):
    if not isinstance(state, dict):
        raise TypeError(f"an RNG state must be a dict, got {type(state).__name__}")
    missing = [k for k in _RNG_KEYS if k not in state]
    if missing:
        raise ValueError(f"the RNG state is missing {missing}")
    if not (isinstance(state["torch"], torch.Tensor) and state["torch"].dtype == torch.uint8
            and state["torch"].dim() == 1):
        raise TypeError("rng['torch'] must be a 1-D uint8 tensor (torch.get_rng_state())")
    cuda = state["cuda"]
    if cuda is not None and not (isinstance(cuda, (list, tuple)) and all(
            isinstance(s, torch.Tensor) and s.dtype == torch.uint8 for s in cuda)):
        raise TypeError("rng['cuda'] must be None or a list of uint8 tensors")
    py = state["python"]
    if not (isinstance(py, dict) and _is_int(py.get("version"))
            and isinstance(py.get("state"), (list, tuple))
            and all(_is_int(x) for x in py["state"])
            and (py.get("gauss_next") is None or isinstance(py.get("gauss_next"), float))):
        raise TypeError("rng['python'] must be {'version': int, 'state': [int], "
                        "'gauss_next': float or None}")


def restore_rng_state(state):
    """Put back the generator states of :func:`capture_rng_state`.

    The whole state is checked before anything is changed. CUDA states are restored when CUDA
    is available (for as many devices as both the state and the machine have) and ignored
    otherwise.
    """
    _check_rng_state(state)
    py = state["python"]
    py_state = (py["version"], tuple(py["state"]), py["gauss_next"])
    torch_state = state["torch"].detach().cpu()
    random.setstate(py_state)
    torch.set_rng_state(torch_state)
    if state["cuda"] is not None and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.detach().cpu(), device)


# ---------------------------------------------------------------------------
# Plain-value checks, CPU copies and the content digest
# ---------------------------------------------------------------------------

def _check_plain(obj, where):
    """Raise TypeError unless ``obj`` is made of None/bool/int/float/str/tensors in
    dicts, lists and tuples (what ``torch.load(weights_only=True)`` reads back)."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"{where} has a key {key!r} of type {type(key).__name__}; "
                                "only str and int keys can be saved")
            _check_plain(value, f"{where}[{key!r}]")
        return
    raise TypeError(f"{where} holds a {type(obj).__module__}.{type(obj).__qualname__}; a "
                    "checkpoint holds only None, bool, int, float, str, tensors, and dicts, "
                    "lists and tuples of them")


def _to_cpu(obj):
    """A copy of the container tree with every tensor detached and on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {key: _to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(item) for item in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(item) for item in obj)
    return obj


def _to_device(obj, device):
    """A copy of the container tree with every tensor moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {key: _to_device(value, device) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_to_device(item, device) for item in obj]
    if isinstance(obj, tuple):
        return tuple(_to_device(item, device) for item in obj)
    return obj


def _tensor_bytes(tensor):
    """The raw bytes of a CPU tensor's elements, in row-major order."""
    t = tensor.detach().cpu().contiguous()
    nbytes = t.numel() * t.element_size()
    return ctypes.string_at(t.data_ptr(), nbytes) if nbytes else b""


def _digest(payload):
    """SHA-256 over the checkpoint's entries (all of ``_TOP_KEYS``, in that order): types,
    lengths, values, tensor dtypes, shapes and element bytes."""
    h = hashlib.sha256()

    def chunk(tag, data=b""):
        h.update(tag + str(len(data)).encode() + b":" + data)

    def feed(obj):
        if obj is None:
            chunk(b"N")
        elif isinstance(obj, bool):
            chunk(b"B", b"1" if obj else b"0")
        elif isinstance(obj, int):
            chunk(b"I", str(obj).encode())
        elif isinstance(obj, float):
            chunk(b"F", obj.hex().encode())
        elif isinstance(obj, str):
            chunk(b"S", obj.encode("utf-8", "surrogatepass"))
        elif isinstance(obj, torch.Tensor):
            chunk(b"T", f"{obj.dtype}{tuple(obj.shape)}".encode())
            chunk(b"D", _tensor_bytes(obj))
        elif isinstance(obj, (list, tuple)):
            chunk(b"L" if isinstance(obj, list) else b"U", str(len(obj)).encode())
            for item in obj:
                feed(item)
        elif isinstance(obj, dict):
            chunk(b"M", str(len(obj)).encode())
            for key, value in obj.items():
                feed(key)
                feed(value)
        else:
            raise TypeError(f"cannot checksum a {type(obj).__name__}")

    for key in _TOP_KEYS:
        feed(key)
        feed(payload[key])
    return h.hexdigest()


# ---------------------------------------------------------------------------
# Atomic writing
# ---------------------------------------------------------------------------

def _temp_pattern(base):
    return re.compile(r"^\." + re.escape(base) + r"\.(\d+)\.[0-9a-f]{16}\.tmp$")


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _remove_stale_temps(directory, base):
    """Delete temporary files that killed saves of ``base`` left (their process is gone)."""
    if os.name != "posix":
        return
    pattern = _temp_pattern(base)
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        match = pattern.match(name)
        if match and int(match.group(1)) != os.getpid() and not _process_alive(
                int(match.group(1))):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass


def _fsync_directory(directory):
    """Make a rename inside ``directory`` durable (best effort where directories cannot be
    opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path, write):
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it and rename it onto
    ``path``. On any exception the temporary file is removed and ``path`` is left as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    os.makedirs(directory, exist_ok=True)
    _remove_stale_temps(directory, base)
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_directory(directory)


# ---------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------

def save_checkpoint(path, net, src_vocab, tgt_vocab, config, *, optimizer=None, epoch=None,
                    rng=None, extra=None):
    """Write a checkpoint of ``net`` to ``path``, atomically; return the path.

    ``net`` is the model (or any object whose ``state_dict()`` is the model's, e.g. a copy
    taken earlier); ``src_vocab`` / ``tgt_vocab`` are its vocabularies.

    ``config`` is the model configuration (:func:`validate_config`); ``optimizer`` (its
    ``state_dict()`` is saved), ``epoch`` (int >= 0, e.g. the number of epochs done) and ``rng``
    (:func:`capture_rng_state`) form the training state, stored as ``"train"`` (``None`` when all
    three are ``None``); ``extra`` is a dict of plain values (str, int, float, bool, None, tensors,
    in dicts/lists/tuples). Tensors are saved on the CPU. Parent directories are created.

    Everything is checked before the file is touched: the configuration, the vocabularies, that
    the weights fit the model the configuration describes (so the file always loads), and that
    ``extra`` holds only plain values. The write goes to a temporary file that is fsync-ed and
    renamed onto ``path``; on any failure the previous file at ``path`` is left untouched.
    """
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}") from None
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "cannot save a checkpoint over a directory", path)
    if not callable(getattr(net, "state_dict", None)):
        raise TypeError(f"net must be a torch.nn.Module (or have a state_dict() method), got "
                        f"{type(net).__name__}")
    config = validate_config(config)
    src_state = vocab_to_state(src_vocab)
    tgt_state = vocab_to_state(tgt_vocab)
    model_state = net.state_dict()
    if not isinstance(model_state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model_state.items()):
        raise TypeError("net.state_dict() must be a dict of str to tensors")
    model_state = {key: value.detach().cpu() for key, value in model_state.items()}
    problem = _weights_mismatch(config, len(src_state["idx_to_token"]),
                                len(tgt_state["idx_to_token"]), model_state)
    if problem:
        raise ValueError(f"net's weights do not fit config {config} with vocabularies of sizes "
                         f"{len(src_state['idx_to_token'])} and "
                         f"{len(tgt_state['idx_to_token'])}: {problem}")
    if epoch is not None and (not _is_int(epoch) or epoch < 0):
        raise ValueError(f"epoch must be None or an int >= 0, got {epoch!r}")
    if optimizer is not None and not callable(getattr(optimizer, "state_dict", None)):
        raise TypeError(f"optimizer must have a state_dict() method, got "
                        f"{type(optimizer).__name__}")
    if rng is not None:
        _check_rng_state(rng)
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
    _check_plain(extra, "extra")
    train = None
    if optimizer is not None or epoch is not None or rng is not None:
        opt_state = None if optimizer is None else _to_cpu(optimizer.state_dict())
        if opt_state is not None:
            _check_plain(opt_state, "optimizer.state_dict()")
        train = {"epoch": epoch, "optimizer": opt_state,
                 "rng": None if rng is None else _to_cpu(rng)}
    payload = {"format": FORMAT_TAG, "version": FORMAT_VERSION, "config": config,
               "model": model_state, "src_vocab": src_state, "tgt_vocab": tgt_state,
               "train": train, "extra": _to_cpu(extra)}
    payload[_DIGEST_KEY] = _digest(payload)
    _atomic_write(path, lambda f: torch.save(payload, f))
    return path


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX",
                 "BUILD", "EXT1", "EXT2", "EXT4"}
_STRING_OPCODES = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
                   "BINSTRING", "SHORT_BINSTRING"}


def _describe_non_zip(path):
    """Why a file that is not a zip archive is refused. A pickle is only parsed with
    :mod:`pickletools` (which never executes anything) to name the code it references."""
    names, calls = [], False
    strings = []
    try:
        with open(path, "rb") as f:
            for opcode, arg, _ in pickletools.genops(f):
                if opcode.name in _STRING_OPCODES:
                    strings.append(arg if isinstance(arg, str) else repr(arg))
                    strings = strings[-2:]
                elif opcode.name == "GLOBAL" or opcode.name == "INST":
                    names.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) == 2:
                    names.append(".".join(strings))
                if opcode.name in _CODE_OPCODES:
                    calls = True
                if opcode.name == "STOP":
                    break
    except Exception:  # not a well-formed pickle either
        return ("is not a seq2seq_ext checkpoint: it is truncated or corrupted (a checkpoint is "
                "a zip archive; this file does not start like one)")
    if names or calls:
        shown = ", ".join(dict.fromkeys(names)) or "object constructors"
        return (f"contains objects that are not allowed in a checkpoint (a pickle referencing "
                f"{shown}); it was refused and nothing in it was executed")
    return ("is not a seq2seq_ext checkpoint: it is a bare pickle, not the zip archive that "
            "save_checkpoint writes")


_DISALLOWED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_DISALLOWED = re.compile(r"unsupported global|not an allowed global|unsupported class|"
                         r"is blocked", re.IGNORECASE)


def _short_reason(err):
    """The first sentence of an exception's message (library messages can be long)."""
    text = (str(err).strip().splitlines() or [""])[0]
    if len(text) > 120 and ". " in text:
        text = text.split(". ")[0]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _read_archive(path):
    """``torch.load(path, weights_only=True)`` to the CPU, with every failure turned into a
    CheckpointError that says what is wrong."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except pickle.UnpicklingError as err:
        detail = f"{err} {err.__context__ or ''}"
        if _DISALLOWED.search(detail):
            named = _DISALLOWED_GLOBAL.search(detail)
            what = named.group(1) if named else "an object that is not a tensor or a plain value"
            raise CheckpointError(
                f"checkpoint {path!r} contains objects that are not allowed ({what}); "
                "it was refused with torch.load(weights_only=True) and nothing in it was "
                "executed", path) from err
        raise CheckpointError(
            f"checkpoint {path!r} is corrupted: its data could not be read safely "
            f"({_short_reason(err.__context__ or err)}); nothing in it was executed",
            path) from err
    except Exception as err:  # miniz, seek, decoding and key errors of a damaged archive
        raise CheckpointError(
            f"checkpoint {path!r} is truncated or corrupted and cannot be read "
            f"({_short_reason(err)})", path) from err


def _validate_payload(obj, path):
    """Check the loaded object's layout; raise CheckpointError naming the first problem."""
    def fail(message):
        raise CheckpointError(f"checkpoint {path!r} {message}", path)

    if not isinstance(obj, dict):
        fail(f"is not a seq2seq_ext checkpoint: it holds a {type(obj).__name__}, not a dict")
    if "format" not in obj:
        fail("is not a seq2seq_ext checkpoint: it has no 'format' entry (a bare state_dict "
             "saved with torch.save?)")
    if obj["format"] != FORMAT_TAG:
        fail(f"is not a seq2seq_ext checkpoint: its format tag is {obj['format']!r}, "
             f"expected {FORMAT_TAG!r}")
    version = obj.get("version")
    if not _is_int(version):
        fail(f"has an invalid format version {version!r} (expected an int)")
    if version > FORMAT_VERSION:
        fail(f"has format version {version}, newer than this seq2seq_ext reads "
             f"(up to {FORMAT_VERSION}): upgrade seq2seq_ext to load it")
    if version < 1:
        fail(f"has an unknown format version {version} (this seq2seq_ext reads "
             f"1 to {FORMAT_VERSION})")
    missing = [k for k in _TOP_KEYS + (_DIGEST_KEY,) if k not in obj]
    if missing:
        fail(f"is incomplete: the entries {missing} are missing")
    try:
        digest = _digest(obj)
    except TypeError as err:
        fail(f"holds an entry of an unexpected type ({err})")
    if obj[_DIGEST_KEY] != digest:
        fail("is corrupted: its content does not match the checksum stored in it")
    try:
        validate_config(obj["config"])
    except (TypeError, ValueError) as err:
        fail(f"has an invalid model configuration: {err}")
    for key in ("src_vocab", "tgt_vocab"):
        try:
            _check_vocab_state(obj[key])
        except (TypeError, ValueError) as err:
            fail(f"has an invalid {key}: {err}")
    model = obj["model"]
    if not isinstance(model, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        fail("has an invalid 'model' entry: expected a dict of str to tensors")
    train = obj["train"]
    if train is not None:
        if not isinstance(train, dict) or any(k not in train for k in _TRAIN_KEYS):
            fail(f"has an invalid 'train' entry: expected None or a dict with {list(_TRAIN_KEYS)}")
        epoch = train["epoch"]
        if epoch is not None and (not _is_int(epoch) or epoch < 0):
            fail(f"has an invalid train['epoch'] {epoch!r}")
        if train["optimizer"] is not None and not isinstance(train["optimizer"], dict):
            fail("has an invalid train['optimizer']: expected None or a state dict")
        if train["rng"] is not None:
            try:
                _check_rng_state(train["rng"])
            except (TypeError, ValueError) as err:
                fail(f"has an invalid train['rng']: {err}")
    if not isinstance(obj["extra"], dict):
        fail("has an invalid 'extra' entry: expected a dict")


def load_checkpoint(path, map_location="cpu"):
    """Read and validate a checkpoint written by :func:`save_checkpoint`; return its dict.

    The file is read with ``torch.load(weights_only=True)``; nothing in it is executed. The
    dict has the layout described in this module's docstring, with ``"src_vocab"`` and
    ``"tgt_vocab"`` as vocabulary states (:func:`vocab_from_state`). ``map_location`` (a str
    or :class:`torch.device`) is where the tensors are put after the checks.

    Raises :class:`CheckpointError`, naming the path, when the file is missing, not a file,
    empty, truncated or corrupted (including any byte of the data, through the stored SHA-256),
    not a seq2seq_ext checkpoint, holding objects that are not allowed, of a newer or unknown
    format version, or with missing or ill-typed entries.
    """
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}") from None
    if not isinstance(map_location, (str, torch.device)):
        raise TypeError(f"map_location must be a str or torch.device, got "
                        f"{type(map_location).__name__}")
    device = torch.device(map_location)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} not found: no such file", path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} is not a file (a directory?)", path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(_ZIP_MAGIC))
    except OSError as err:
        raise CheckpointError(f"checkpoint {path!r} cannot be read: {err}", path) from err
    if not head:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes): truncated, or an "
                              "interrupted copy", path)
    if head != _ZIP_MAGIC:
        raise CheckpointError(f"checkpoint {path!r} {_describe_non_zip(path)}", path)
    obj = _read_archive(path)
    _validate_payload(obj, path)
    if device.type != "cpu":
        obj = _to_device(obj, device)
    return obj


def load_model(path, device="cpu"):
    """Load a checkpoint and rebuild its model: ``(net, src_vocab, tgt_vocab, checkpoint)``.

    ``net`` is built by :func:`build_model` from the saved configuration and vocabulary sizes,
    its weights are loaded strictly, and it is moved to ``device`` in eval mode. ``checkpoint``
    is :func:`load_checkpoint`'s dict (its tensors on the CPU). Raises :class:`CheckpointError`
    for an unusable file, and when the weights do not fit the configuration.
    """
    ckpt = load_checkpoint(path)
    path = os.fspath(path)
    src_vocab = vocab_from_state(ckpt["src_vocab"])
    tgt_vocab = vocab_from_state(ckpt["tgt_vocab"])
    try:
        net = build_model(ckpt["config"], len(src_vocab), len(tgt_vocab))
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path!r} cannot be rebuilt: {err}", path) from err
    try:
        net.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint {path!r}: the weights do not fit the model configuration "
            f"{ckpt['config']} (vocabulary sizes {len(src_vocab)}, {len(tgt_vocab)}): {err}",
            path) from err
    net.to(device)
    net.eval()
    return net, src_vocab, tgt_vocab, ckpt
