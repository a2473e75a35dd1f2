"""Reading a checkpoint file without ever executing code from it.

Anything that is not a zip archive is refused without being unpickled (a pickle is only scanned
statically, with :mod:`pickletools`, to name the code it references), and zip archives are read
with ``torch.load(weights_only=True)``, which refuses any object other than tensors and plain
containers. Every refusal is a :class:`CheckpointError` naming the file and the problem.
"""
import os
import pickle
import pickletools
import re

import torch

__all__ = ["CheckpointError", "read_checkpoint_file"]

_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, not a file, truncated or corrupted, not a
    checkpoint, holding objects that are not allowed, of an unknown version, or inconsistent.

    ``path`` is the file concerned (``None`` when there is none).
    """

    def __init__(self, message, path=None):
        super().__init__(message)
        self.path = path


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


def read_checkpoint_file(path):
    """The object stored in checkpoint file ``path`` (tensors on the CPU), read safely; raises
    :class:`CheckpointError` when the file is missing, not a file, empty, not a zip archive (a
    bare or hostile pickle), holds objects that are not allowed, or is truncated or corrupted."""
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
    return _read_archive(path)
