"""The exclusive lock a training run holds on its checkpoint path (``seq2seq_ext.runlock``)."""
import os
import subprocess
import sys

import pytest

from seq2seq_ext.runlock import RunLock, RunLockError, lock_path

pytestmark = pytest.mark.skipif(sys.platform == 'win32', reason='flock is POSIX only')


def test_a_second_holder_fails_at_once_naming_the_first(tmp_path):
    path = tmp_path / 'run.pt'
    with RunLock(path) as lock:
        assert lock.held
        assert open(lock_path(path)).read().strip() == str(os.getpid())
        with pytest.raises(RunLockError) as err:
            RunLock(path).acquire()
        assert f'pid {os.getpid()}' in str(err.value) and str(path) in str(err.value)
    # released: the lock file is gone and the path can be locked again
    assert not os.path.exists(lock_path(path))
    with RunLock(path):
        pass


def test_a_holder_yet_to_write_its_pid_is_still_named(tmp_path):
    """Between the holder's flock and its pid's write, a second run waits for the pid (briefly)
    rather than failing without naming the holder."""
    import fcntl
    import threading
    path = tmp_path / 'run.pt'
    fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # locked, nothing written yet
        writer = threading.Timer(0.2, lambda: os.pwrite(fd, b'4242\n', 0))
        writer.start()
        with pytest.raises(RunLockError, match='pid 4242'):
            RunLock(path).acquire()
        writer.join()
    finally:
        os.close(fd)


def test_the_lock_is_held_against_another_process(tmp_path):
    path = tmp_path / 'run.pt'
    probe = ('import sys\nfrom seq2seq_ext.runlock import RunLock, RunLockError\n'
             'try:\n    RunLock(sys.argv[1]).acquire()\nexcept RunLockError as e:\n'
             '    print(e)\n    sys.exit(3)\n')
    with RunLock(path):
        proc = subprocess.run([sys.executable, '-c', probe, str(path)], capture_output=True,
                              text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert f'pid {os.getpid()}' in proc.stdout
    proc = subprocess.run([sys.executable, '-c', probe, str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_stale_lock_file_of_a_dead_process_does_not_block(tmp_path):
    path = tmp_path / 'run.pt'
    # what SIGKILL leaves behind: the file with a pid, but no lock held on it
    with open(lock_path(path), 'w') as f:
        f.write('999999999\n')
    with RunLock(path):
        assert open(lock_path(path)).read().strip() == str(os.getpid())
    assert not os.path.exists(lock_path(path))


def test_release_is_idempotent_and_a_failed_acquire_changes_nothing(tmp_path):
    path = tmp_path / 'run.pt'
    first = RunLock(path).acquire()
    second = RunLock(path)
    with pytest.raises(RunLockError):
        second.acquire()
    assert not second.held
    second.release()  # never held: nothing happens, the first holder keeps its file
    assert os.path.exists(lock_path(path))
    first.release()
    first.release()
    assert not os.path.exists(lock_path(path))


def test_a_checkpoint_in_a_directory_yet_to_exist(tmp_path):
    """The lock sits beside the checkpoint, whose directory the first save would create: the
    lock creates it too."""
    path = tmp_path / 'runs' / 'exp1' / 'model.pt'
    with RunLock(path):
        assert (tmp_path / 'runs' / 'exp1').is_dir()


def test_the_folders_it_made_go_with_it_unless_the_run_wrote_there(tmp_path):
    """A run refused or failed before its first save leaves no folders behind; one that saved
    keeps its folder, and a folder that existed before is never removed."""
    (tmp_path / 'runs').mkdir()
    with RunLock(tmp_path / 'runs' / 'a' / 'b' / 'model.pt'):
        assert (tmp_path / 'runs' / 'a' / 'b').is_dir()
    assert sorted(os.listdir(tmp_path)) == ['runs'] and os.listdir(tmp_path / 'runs') == []
    with RunLock(tmp_path / 'runs' / 'a' / 'b' / 'model.pt'):
        (tmp_path / 'runs' / 'a' / 'b' / 'model.pt').write_bytes(b'saved')
    assert os.listdir(tmp_path / 'runs' / 'a' / 'b') == ['model.pt']


def test_a_failed_write_names_the_file(tmp_path):
    """An OSError from the writer (a full disk gives one without a file name) is reported with
    the destination's name, and the destination and the directory are left as they were."""
    import errno

    from seq2seq_ext.atomic_io import atomic_write
    path = tmp_path / 'model.pt'
    path.write_bytes(b'before')

    def full(f):
        f.write(b'partial')
        raise OSError(errno.ENOSPC, 'No space left on device')
    with pytest.raises(OSError) as info:
        atomic_write(path, full)
    assert info.value.filename == str(path) and info.value.errno == errno.ENOSPC
    assert path.read_bytes() == b'before' and sorted(tmp_path.iterdir()) == [path]
