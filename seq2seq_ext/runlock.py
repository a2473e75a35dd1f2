"""An exclusive lock on a checkpoint path for the lifetime of the run that writes it.

A training run holds ``<checkpoint>.lock`` (an advisory ``flock`` on a file beside the
checkpoint, holding the owner's pid) from before it reads its data until it exits. A second run
aimed at the same checkpoint fails at once with :class:`RunLockError` naming the holder's pid,
instead of training to the end and overwriting the first run's file. The kernel drops the lock
when the holder dies, however it dies, so a stale ``.lock`` file left by ``SIGKILL`` never
blocks a later run.

On systems without ``fcntl`` (Windows) the lock is a no-op.
"""
import os
import time

from .atomic_io import make_folders, remove_made_folders

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux
    fcntl = None

__all__ = ['RunLock', 'RunLockError', 'lock_path']

# How long a run refused the lock waits for the holder's pid to appear in the file (written
# right after the holder locks it), so that the error can name it.
_NAME_WAIT_S = 1.0


class RunLockError(RuntimeError):
    """Another process holds the lock on this checkpoint path."""


def lock_path(path):
    """The lock file that guards checkpoint ``path``: ``<path>.lock``."""
    return os.fspath(path) + '.lock'


def _holder(fd):
    """The pid written by the lock's holder, or ``None`` if it cannot be read yet."""
    try:
        text = os.pread(fd, 64, 0).decode('ascii', 'replace').strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class RunLock:
    """``with RunLock(path):`` holds the lock on checkpoint ``path`` or raises
    :class:`RunLockError` at once (never waits)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.lock_file = lock_path(self.path)
        self._fd = None
        self._made = []  # the folders acquire() created, deepest last

    def acquire(self):
        if fcntl is None or self._fd is not None:
            return self
        # the checkpoint's folder may not exist yet (the first save creates it too)
        self._made = make_folders(os.path.dirname(os.path.abspath(self.lock_file)))
        while True:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # the holder writes its pid just after it takes the lock: give it a moment
                pid, deadline = _holder(fd), time.monotonic() + _NAME_WAIT_S
                while pid is None and time.monotonic() < deadline:
                    time.sleep(0.01)
                    pid = _holder(fd)
                os.close(fd)
                who = f'pid {pid}' if pid is not None else 'another process'
                raise RunLockError(
                    f'{self.path} is in use by another training run ({who}, lock file '
                    f'{self.lock_file}); wait for it to end or choose another --checkpoint'
                ) from None
            except BaseException:
                os.close(fd)
                raise
            # The previous holder may have removed the file between our open and our lock:
            # then we locked an orphan inode; start again on the file now at the path.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.lock_file))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f'{os.getpid()}\n'.encode('ascii'), 0)
        self._fd = fd
        return self

    def release(self):
        """Remove the lock file and drop the lock (idempotent), and the folders :meth:`acquire`
        created where nothing else was written in them."""
        if self._fd is None:
            return
        try:
            os.unlink(self.lock_file)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
        # a run that wrote nothing (refused, or failed before its first save) leaves no folders
        remove_made_folders(self._made)
        self._made = []

    @property
    def held(self):
        return self._fd is not None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
