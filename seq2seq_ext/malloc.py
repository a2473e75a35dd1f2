"""Freed memory kept in the process for reuse (glibc's malloc), for training runs.

A training step at embed 256 / hidden 512 / batch 128 allocates and frees about 100 MB of large
buffers a step: logits, the loss gradient, the layers' gate gradients and saved activations.
By default glibc's malloc serves a block above its mmap threshold from a fresh mapping and
returns it to the OS when it is freed, and it gives freed memory at the top of its heap back to
the OS once more than its trim threshold is free. The threshold rises with the largest block
freed, up to 32 MB, with the trim threshold at twice it. Memory given back is faulted in again
at the next step's first touch, a page at a time. In the KVM guests this project measures on, a
fault costs about 1.7 us: 0.4 ms per MB.

Measured on the large `fit` step (GRU, 1 thread, Intel Xeon KVM guest; `benchmarks/RESULTS.md`),
16 steps a process:
- by default (three processes), 20 to 3,000 faults a step; the median step 387-399 ms, and a
  tail of slow steps that lifts one process's mean to 419 ms;
- with both thresholds raised (five processes), under 200 faults a step; the median 377-391 ms,
  each mean within 5 ms of its median.
The medians of `benchmarks/padding_skip.py` moved within this machine's noise (391-401 ms with
the memory kept, 392-393 ms without, two processes each): what goes is the faults and the tail.

Raising the trim threshold alone is worse (35,000 faults and 447 ms a step): setting either
threshold turns glibc's dynamic mmap threshold off, so every block above 128 KiB is then mapped
afresh.

:func:`keep_freed_memory` sets both, so freed blocks stay in the process and serve the next
step's. The peak resident memory is about the same (598-611 MB against 592-599 MB in those
runs), and the memory stays at that peak between runs. It is process-wide, so the
package calls it only in the command line's ``train``. A program calling :func:`fit` can call it
first, or start with ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set in the
environment.
"""
import ctypes
import platform

__all__ = ["keep_freed_memory"]

# glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold=256 << 20, trim_threshold=1 << 30):
    """Set glibc's ``mallopt`` thresholds so freed memory stays in the process. Blocks up to
    ``mmap_threshold`` bytes are taken from the heap instead of a fresh mapping. Up to
    ``trim_threshold`` bytes of free memory at the heap's top stay there instead of going back
    to the OS. Returns True when both were set. glibc releases that cap the mmap threshold at
    32 MiB (half their largest heap) refuse a larger one: it is then set to 32 MiB. Off glibc
    (macOS, musl, Windows) it does nothing and returns False. When the mmap threshold cannot be
    set, the trim threshold is left alone too: set alone, it would turn glibc's rising mmap
    threshold off and map every block above 128 KiB afresh."""
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2 ** 31:
            raise ValueError(f"{name}: expected a positive int below 2**31 (bytes), got {value!r}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if not (mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
            or mallopt(_M_MMAP_THRESHOLD, min(mmap_threshold, 32 << 20))):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
