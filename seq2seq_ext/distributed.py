"""Data-parallel training across processes: process-group set-up from ``torchrun``'s
environment, a sharded data loader, and the ``torchrun`` command that launches
``seq2seq-ext``.

One process per device (or several on one CPU machine). :func:`seq2seq_ext.training.fit` notices
an initialised process group and wraps the model in ``DistributedDataParallel``; this module
supplies the rest::

    from seq2seq_ext import distributed
    distributed.init_from_env()                    # False when not launched by torchrun
    loader = distributed.shard_loader(train_iter.dataset, global_batch_size=64)
    fit(net, loader, lr, epochs, tgt_vocab, device)
    distributed.cleanup()

Every function also works in a plain single process (world size 1, rank 0).
"""
import os
import signal
import subprocess
import sys
import threading
import time

import torch
from torch.utils import data

from ._checks import check_int

__all__ = ["init_from_env", "launched_by_torchrun", "is_distributed", "rank", "world_size", "local_rank",
           "is_main_process", "barrier", "cleanup", "shard_loader", "all_reduce_sum",
           "default_device", "torchrun_command", "launch"]

#: Environment variables that ``torchrun`` sets for every worker.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _dist():
    return torch.distributed


def _initialised():
    return _dist().is_available() and _dist().is_initialized()


def launched_by_torchrun():
    """True when this process carries ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``)."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def local_rank():
    """This process's rank on its node (``LOCAL_RANK``; 0 outside ``torchrun``)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def default_device(device=None):
    """The device this process trains on: ``device`` when given; else ``cuda:LOCAL_RANK`` when a
    GPU is present, else the CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def init_from_env(device=None):
    """Initialise the default process group from ``torchrun``'s environment.

    The backend is ``nccl`` when the device (``device``, or :func:`default_device`) is a CUDA
    device, whose index is then set from ``LOCAL_RANK``, and ``gloo`` otherwise. Returns True
    when a process group is initialised (also when one already was), False, doing nothing,
    when the process was not launched by ``torchrun``. Raises RuntimeError when
    ``torch.distributed`` is not available in this build of PyTorch.
    """
    if _initialised():
        return True
    if not launched_by_torchrun():
        return False
    if not _dist().is_available():
        raise RuntimeError("init_from_env: this PyTorch build has no torch.distributed")
    dev = default_device(device)
    if dev.type == "cuda":
        index = local_rank() if dev.index is None else dev.index
        torch.cuda.set_device(index)
        _dist().init_process_group(backend="nccl", device_id=torch.device("cuda", index))
    else:
        _dist().init_process_group(backend="gloo")
    return True


def is_distributed():
    """True when a process group is initialised with more than one process."""
    return _initialised() and _dist().get_world_size() > 1


def rank():
    """This process's global rank (0 without a process group)."""
    return _dist().get_rank() if _initialised() else 0


def world_size():
    """The number of processes (1 without a process group)."""
    return _dist().get_world_size() if _initialised() else 1


def is_main_process():
    """True on rank 0 (and in a single process): the one that prints and writes files."""
    return rank() == 0


def barrier():
    """Wait for every process (nothing to wait for without a process group)."""
    if _initialised():
        _dist().barrier()


def cleanup():
    """Destroy the default process group if there is one.

    First a short sleep without the GIL: gloo's worker threads may still be releasing the
    work they completed, which can need the GIL while holding the group's lock, and the
    group's destructor takes that lock holding the GIL (a deadlock). Release any
    ``DistributedDataParallel`` wrapper before this (:func:`seq2seq_ext.training.fit` does),
    so that the group is destroyed here, not later by the wrapper's last reference."""
    if _initialised():
        time.sleep(0.05)
        _dist().destroy_process_group()


def all_reduce_sum(tensor):
    """Sum ``tensor`` over all processes, in place, and return it (unchanged in a single
    process)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor: expected a torch.Tensor, got {type(tensor).__name__}")
    if _initialised() and _dist().get_world_size() > 1:
        _dist().all_reduce(tensor, op=_dist().ReduceOp.SUM)
    return tensor


def shard_loader(dataset, global_batch_size, shuffle=True, seed=0):
    """A ``DataLoader`` over this process's shard of ``dataset``.

    A ``DistributedSampler`` (``shuffle`` and ``seed`` as given; :func:`fit
    <seq2seq_ext.training.fit>` calls its ``set_epoch`` so each epoch reshuffles) gives rank
    ``r`` the examples ``r, r + W, r + 2W, ...`` of each epoch's order, and every rank takes
    batches of ``global_batch_size // W`` examples (``W``: the world size), so the ranks' ``k``-th
    batches together form one global batch of ``global_batch_size``. When ``len(dataset)`` is not
    a multiple of ``W`` the sampler repeats examples from the start to even the shards out.
    Raises ValueError when ``global_batch_size`` is not a positive multiple of ``W``.
    """
    if isinstance(dataset, data.DataLoader):
        raise TypeError("dataset: expected a Dataset, got a DataLoader (pass loader.dataset)")
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int):
        raise TypeError("global_batch_size: expected an int, got "
                        f"{type(global_batch_size).__name__}")
    world = world_size()
    if global_batch_size <= 0 or global_batch_size % world:
        raise ValueError(f"global_batch_size: expected a positive multiple of the world size "
                         f"{world}, got {global_batch_size}")
    sampler = data.DistributedSampler(dataset, num_replicas=world, rank=rank(),
                                      shuffle=shuffle, seed=seed)
    return data.DataLoader(dataset, batch_size=global_batch_size // world, sampler=sampler)


def torchrun_command(nproc, args, nnodes=1, node_rank=0, master_addr=None, master_port=None):
    """The command that runs ``seq2seq-ext ARGS`` in ``nproc`` processes per node under
    ``torchrun``: ``[python, "-m", "torch.distributed.run", ..., "-m", "seq2seq_ext.cli", "--",
    *args]`` (``torchrun`` removes the ``--``, which keeps it from parsing ``args`` itself).

    One node (``nnodes=1``) uses ``--standalone`` (a local rendezvous on a free port). Several
    nodes need ``master_addr`` (the address of node 0, reachable from every node) and run the same
    command on each node with its own ``node_rank``; ``master_port`` defaults to torchrun's
    (29500).
    """
    nproc, nnodes = check_int("nproc", nproc), check_int("nnodes", nnodes)
    if not 0 <= check_int("node_rank", node_rank, None) < nnodes:
        raise ValueError(f"node_rank: expected a value in [0, nnodes={nnodes}), got {node_rank}")
    if isinstance(args, str):
        raise TypeError("args: expected a list of command-line arguments, got a string")
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1:
        cmd += ["--standalone", "--nnodes=1"]
        if master_addr is not None or master_port is not None:
            raise ValueError("master_addr/master_port: not used on one node (--standalone "
                             "picks a free local port); give nnodes > 1")
    else:
        if not master_addr:
            raise ValueError("master_addr: required when nnodes > 1 (the address of node 0)")
        cmd += [f"--nnodes={nnodes}", f"--node-rank={node_rank}",
                f"--master-addr={master_addr}"]
        if master_port is not None:
            if check_int("master_port", master_port) > 65535:
                raise ValueError(f"master_port: expected a port in [1, 65535], got {master_port}")
            cmd.append(f"--master-port={master_port}")
    # "--" ends torchrun's own options: without it torchrun's parser reads the CLI's options
    # too ("--nproc" is an ambiguous prefix of "--nproc-per-node"); torchrun drops it
    cmd += [f"--nproc-per-node={nproc}", "-m", "seq2seq_ext.cli", "--",
            *[str(a) for a in args]]
    return cmd


def launch(nproc, args, **kw):
    """Run :func:`torchrun_command` ``(nproc, args, **kw)`` and return its exit code.

    A SIGTERM sent to this process (``kill``, a scheduler, ``docker stop``) is passed on to
    ``torchrun``, which stops its workers with it (each saves its last epoch) and exits; this
    process waits for it, instead of ending alone and leaving them running, and returns 143."""
    proc = subprocess.Popen(torchrun_command(nproc, args, **kw))
    previous, terminated = None, []

    def forward(signum, frame):
        terminated.append(signum)
        proc.send_signal(signum)
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, forward)
    try:
        code = proc.wait()
        # torchrun ends a stopped run with 1: the run ended by SIGTERM, as a single process's
        return 128 + signal.SIGTERM if terminated and code != 0 else code
    except BaseException:  # Ctrl-C: torchrun has it too (the terminal's process group)
        try:
            proc.wait(timeout=60)
        except BaseException:
            proc.kill()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
