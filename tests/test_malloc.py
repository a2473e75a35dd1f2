"""seq2seq_ext.malloc.keep_freed_memory: glibc's thresholds raised so that freed memory is
reused instead of being faulted in again (the command line's training runs)."""
import os
import platform
import subprocess
import sys

import pytest

from seq2seq_ext import malloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# a 48 MB block (above glibc's largest dynamic mmap threshold, 32 MB) allocated and freed eight
# times; prints the page faults of the last five
_FAULTS = """
import resource, sys, torch
from seq2seq_ext import malloc
if sys.argv[1] == "keep":
    assert malloc.keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    x = torch.ones(12 << 20); del x
f0 = faults()
for _ in range(5):
    x = torch.ones(12 << 20); del x
print(faults() - f0)
"""


def _faults(mode):
    env = dict(os.environ, PYTHONPATH=ROOT)
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="needs glibc's malloc (Linux)")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    pages = 5 * (48 << 20) // 4096  # the five blocks' 4 KiB pages
    default, kept = _faults("default"), _faults("keep")
    assert default > pages // 2, default  # each block mapped afresh (huge pages cut the count)
    assert kept < pages // 20, kept  # the first block's memory serves the other five


@pytest.mark.parametrize("kwargs, name", [
    ({"mmap_threshold": 0}, "mmap_threshold"), ({"trim_threshold": -5}, "trim_threshold"),
    ({"mmap_threshold": 2 ** 31}, "mmap_threshold"), ({"trim_threshold": 1.5}, "trim_threshold"),
    ({"mmap_threshold": True}, "mmap_threshold")])
def test_bad_thresholds_raise_before_anything_is_set(kwargs, name, monkeypatch):
    import ctypes

    def refuse(*args, **kw):
        raise AssertionError("mallopt reached")

    monkeypatch.setattr(ctypes, "CDLL", refuse)
    with pytest.raises(ValueError, match=name):
        malloc.keep_freed_memory(**kwargs)


def test_off_glibc_nothing_is_set(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("", ""))
    assert malloc.keep_freed_memory() is False


def test_the_command_line_training_keeps_freed_memory(tmp_path, monkeypatch, capsys):
    from seq2seq_ext import cli
    calls = []
    monkeypatch.setattr(malloc, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.chdir(tmp_path)
    status = cli.main(["train", "--epochs", "1", "--threads", "1", "--plot", "",
                       "--num-hiddens", "8", "--embed-size", "8", "--held-out", "20",
                       "--no-progress"])
    assert not status and calls == [1]
