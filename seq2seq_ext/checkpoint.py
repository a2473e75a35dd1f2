"""The checkpoint file format: one file holding a model's weights, both vocabularies, the model
configuration and the training state.

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

* Writing is atomic (:mod:`seq2seq_ext.atomic_io`): a save that fails or is killed leaves the
  previous file untouched.
* Reading never executes code from the file (:mod:`seq2seq_ext.safe_load`).
* The ``sha256`` entry covers every value and every tensor byte, so a flipped bit anywhere in the
  data is detected, not only in the archive's structure.
* Every refusal is a :class:`CheckpointError` (a :class:`ValueError`) whose message names the
  file and the problem: missing, not a file, empty, truncated or corrupted, not a checkpoint,
  objects that are not allowed, a newer or unknown format version, missing or ill-typed entries,
  weights that do not fit the configuration.

The model configuration is :class:`seq2seq_ext.config.ModelConfig`; the random number generators'
state is :mod:`seq2seq_ext.train_state`'s. Their names are re-exported here.
"""
import ctypes
import errno
import hashlib
import io
import operator
import os

import torch

from .atomic_io import atomic_write
from .config import CELLS, MODEL_CONFIG_KEYS, build_model, validate_config
from .data import Vocab
from .safe_load import CheckpointError, read_checkpoint_file
from .train_state import capture_rng_state, check_rng_state, restore_rng_state
from .utils import checked_device

__all__ = [
    "FORMAT_TAG", "FORMAT_VERSION", "MODEL_CONFIG_KEYS", "CELLS", "CheckpointError",
    "validate_config", "vocab_to_state", "vocab_from_state", "build_model", "capture_rng_state",
    "restore_rng_state", "save_checkpoint", "load_checkpoint", "load_model",
]

#: The value of the ``"format"`` entry of every checkpoint.
FORMAT_TAG = "seq2seq_ext.checkpoint"
#: The version of the file layout written by :func:`save_checkpoint`; files with a larger
#: version are refused.
FORMAT_VERSION = 1

_TOP_KEYS = ("format", "version", "config", "model", "src_vocab", "tgt_vocab", "train", "extra")
_DIGEST_KEY = "sha256"
_TRAIN_KEYS = ("epoch", "optimizer", "rng")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


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
    state = _plain_copy(state, "vocab")  # numpy counts, str subclasses: as plain values
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
# Plain-value checks, CPU copies and the content digest
# ---------------------------------------------------------------------------

def _plain_copy(obj, where):
    """A copy of the container tree ``obj`` that ``torch.load(weights_only=True)`` reads back:
    tensors detached on the CPU; numbers and strings of a subclass (numpy's ``float64``, an
    ``IntEnum``) and numpy scalars as the plain Python value; dict, list and tuple subclasses
    as the plain container. Raises TypeError naming the place of anything else."""
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, int):
        return int.__int__(obj)
    if isinstance(obj, float):
        return float.__float__(obj)
    if isinstance(obj, str):
        return str.__str__(obj)
    if type(obj).__module__ == "numpy" and getattr(obj, "shape", None) == ():
        value = obj.item()  # a numpy scalar
        if isinstance(value, (bool, int, float, str)):
            return value
    if isinstance(obj, (list, tuple)):
        items = [_plain_copy(item, f"{where}[{i}]") for i, item in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"{where} has a key {key!r} of type {type(key).__name__}; "
                                "only str and int keys can be saved")
            out[_plain_copy(key, where)] = _plain_copy(value, f"{where}[{key!r}]")
        return out
    raise TypeError(f"{where} holds a {type(obj).__module__}.{type(obj).__qualname__}; a "
                    "checkpoint holds only None, bool, int, float, str, tensors, and dicts, "
                    "lists and tuples of them")


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
    config = _plain_copy(validate_config(config), "config")
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
    if epoch is not None:  # an int, or an integer that stands for one (numpy's int64)
        try:
            index = None if isinstance(epoch, bool) else operator.index(epoch)
        except TypeError:
            index = None
        if index is None or index < 0:
            raise ValueError(f"epoch must be None or an int >= 0, got {epoch!r}")
        epoch = index
    if optimizer is not None and not callable(getattr(optimizer, "state_dict", None)):
        raise TypeError(f"optimizer must have a state_dict() method, got "
                        f"{type(optimizer).__name__}")
    if rng is not None:
        check_rng_state(rng)
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
    extra = _plain_copy(extra, "extra")
    train = None
    if optimizer is not None or epoch is not None or rng is not None:
        opt_state = (None if optimizer is None else
                     _plain_copy(optimizer.state_dict(), "optimizer.state_dict()"))
        train = {"epoch": epoch, "optimizer": opt_state,
                 "rng": None if rng is None else _plain_copy(rng, "rng")}
    payload = {"format": FORMAT_TAG, "version": FORMAT_VERSION, "config": config,
               "model": model_state, "src_vocab": src_state, "tgt_vocab": tgt_state,
               "train": train, "extra": extra}
    payload[_DIGEST_KEY] = _digest(payload)
    # serialised in memory first, so that a failed write (a full disk) reaches atomic_write as
    # the OSError it is, not wrapped in the zip writer's RuntimeError
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))
    return path


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

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
                check_rng_state(train["rng"])
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
    obj = read_checkpoint_file(path)
    _validate_payload(obj, path)
    if device.type != "cpu":
        obj = _to_device(obj, device)
    return obj


def load_model(path, device="cpu"):
    """Load a checkpoint and rebuild its model: ``(net, src_vocab, tgt_vocab, checkpoint)``.

    ``net`` is built by :func:`build_model` from the saved configuration and vocabulary sizes,
    its weights are loaded strictly (in their dtype, when they share one), and it is moved to
    ``device`` in eval mode. ``checkpoint``
    is :func:`load_checkpoint`'s dict (its tensors on the CPU). Raises :class:`CheckpointError`
    for an unusable file, and when the weights do not fit the configuration; ValueError naming
    ``device`` for a device that cannot be used here.
    """
    if device is not None:  # (None: left on the CPU, as net.to(None) does)
        device = checked_device(device)  # before the file is read
    ckpt = load_checkpoint(path)
    path = os.fspath(path)
    src_vocab = vocab_from_state(ckpt["src_vocab"])
    tgt_vocab = vocab_from_state(ckpt["tgt_vocab"])
    try:
        net = build_model(ckpt["config"], len(src_vocab), len(tgt_vocab))
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path!r} cannot be rebuilt: {err}", path) from err
    # the weights' floating dtype when they share one (a float64 model comes back float64)
    dtypes = {t.dtype for t in ckpt["model"].values()
              if isinstance(t, torch.Tensor) and t.is_floating_point()}
    if len(dtypes) == 1:
        net.to(dtypes.pop())
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
