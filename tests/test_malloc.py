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
    default, kept = _faults("default"), _faults("keep")
    # each block mapped afresh: 61,440 faults in 4 KiB pages, 120 where every block gets huge
    # pages (transparent huge pages "always")
    assert default >= 100, default
    assert kept * 10 <= default, (kept, default)  # the memory of the first blocks serves them


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


class _Mallopt:
    """A stand-in for glibc's mallopt: refuses mmap thresholds above `cap` (None: refuses all)."""

    def __init__(self, cap):
        self.cap, self.calls = cap, []

    def __call__(self, param, value):
        self.calls.append((param, value))
        if param == malloc._M_MMAP_THRESHOLD:
            return int(self.cap is not None and value <= self.cap)
        return 1


@pytest.mark.parametrize("cap, result, calls", [
    (32 << 20, True, [(-3, 256 << 20), (-3, 32 << 20), (-1, 1 << 30)]),  # an older glibc's cap
    (None, False, [(-3, 256 << 20), (-3, 32 << 20)]),  # never the trim threshold alone
])
def test_a_refused_mmap_threshold(cap, result, calls, monkeypatch):
    import ctypes
    fake = _Mallopt(cap)
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("glibc", "2.17"))
    monkeypatch.setattr(ctypes, "CDLL", lambda name: type("Libc", (), {"mallopt": fake})())
    assert malloc.keep_freed_memory() is result
    assert fake.calls == calls
