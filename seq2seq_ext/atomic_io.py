"""Safe file writes: a file is replaced whole or not at all.

:func:`atomic_write` writes to a temporary file in the destination's directory, flushes and
``fsync``-s it, renames it over the destination with :func:`os.replace`, and ``fsync``-s the
directory. A write that fails or is killed leaves the previous file untouched. A killed write can
leave a hidden ``.<name>.<pid>.<random>.tmp`` file beside the destination; it is never read, and
the next write into that directory removes it once its process is gone.

:func:`make_folders` and :func:`remove_made_folders` create a file's missing folders and take
back those left empty, so that a run or download that fails writes nothing behind.
"""
import os
import re
import secrets

__all__ = ["atomic_write", "make_folders", "remove_made_folders"]



def make_folders(folder):
    """Create ``folder`` and its missing parents, one level at a time; returns the folders this
    call created, outermost first (a level another process creates meanwhile is not counted)."""
    missing = []
    folder = os.path.abspath(folder)
    while not os.path.isdir(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    made = []
    for level in reversed(missing):
        try:
            os.mkdir(level)
        except FileExistsError:
            continue
        made.append(level)
    return made


def remove_made_folders(made):
    """Remove the folders of :func:`make_folders` that are empty, innermost first; stops at the
    first that is not (something was written there)."""
    for folder in reversed(made):
        try:
            os.rmdir(folder)
        except OSError:
            break


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


def atomic_write(path, write):
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
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.filename is None:  # a failed write names nothing
            exc.filename = os.fspath(path)
        raise
    _fsync_directory(directory)
