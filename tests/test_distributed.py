"""Data-parallel training: seq2seq_ext.distributed and fit under DistributedDataParallel.

The end-to-end test launches two CPU processes with ``torchrun --standalone`` (gloo) running
tests/dist_worker.py, which trains through fit on shard_loader's shards, and compares them with
one process trained on the same global batches.
"""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seq2seq_ext import distributed

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
sys.path.insert(0, str(WORKER.parent))
import dist_worker  # noqa: E402

#: DDP sums each rank's half-batch gradient and all-reduces, one process sums the whole batch:
#: the same arithmetic in another order. After 12 Adam / 48 SGD steps the parameters differ by
#: at most ~4e-7 (a few float32 ulps of the parameters, whose magnitudes are <= ~1); Adam's
#: normalisation amplifies rounding a little, so the bound is set at 5e-6 absolute.
PARAM_TOL = dict(rtol=1e-5, atol=5e-6)
#: The per-epoch losses are float64 sums of float32 per-sequence losses.
LOSS_TOL = dict(rtol=1e-6, atol=0)


def _gloo_available():
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


needs_gloo = pytest.mark.skipif(not _gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")


# ----------------------------------------------------------------------------------------------
# two processes under torchrun
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    """Run the worker on 2 ranks; return {rank: saved results}."""
    out = tmp_path_factory.mktemp("ddp")
    # torchrun_command's launcher flags, with the worker script in place of the CLI module
    cmd = distributed.torchrun_command(2, [])
    assert cmd[-3:] == ["-m", "seq2seq_ext.cli", "--"]
    cmd = cmd[:-3] + [str(WORKER), "--", str(out)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout}\n{proc.stderr}"
    return {r: torch.load(out / f"rank{r}.pt") for r in (0, 1)}


@needs_gloo
@pytest.mark.parametrize("attempt", range(3))
def test_a_failing_rank_ends_the_run(tmp_path, attempt):
    """Rank 1 raises in the middle of an epoch while rank 0 waits in DDP's all-reduce: rank 1
    reports its error on one line and exits at once (freeing the exception used to deadlock
    in gloo's teardown about every other time), so torchrun stops rank 0 and the run fails
    within seconds instead of hanging."""
    cmd = distributed.torchrun_command(2, [])
    cmd = cmd[:-3] + [str(ROOT / "tests" / "dist_failing_worker.py"), "--", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        # torchrun stops its workers (their own sessions) on SIGTERM; then kill what is left
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        pytest.fail("the run did not end within 90 s of rank 1's failure")
    assert proc.returncode != 0
    assert "seq2seq-ext: error: RuntimeError: simulated failure on rank 1" in err


@needs_gloo
def test_ranks_see_two_processes_and_half_batches(two_rank_results):
    for r, res in two_rank_results.items():
        assert res["world_size"] == 2 and res["rank"] == r
        for config, (batch, *_) in dist_worker.CONFIGS.items():
            assert res[config]["local_batch"] == batch // 2
            assert res[config]["batches"] == dist_worker.NUM_EXAMPLES // batch


@needs_gloo
@pytest.mark.parametrize("config", list(dist_worker.CONFIGS))
def test_ranks_end_with_identical_parameters(two_rank_results, config):
    """Rank 1 starts from other weights: DDP's broadcast of rank 0's and the averaged gradients
    keep the ranks bitwise equal."""
    p0, p1 = (two_rank_results[r][config]["params"] for r in (0, 1))
    assert p0.keys() == p1.keys()
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k


@needs_gloo
@pytest.mark.parametrize("config", list(dist_worker.CONFIGS))
def test_two_ranks_match_one_process_on_the_global_batches(two_rank_results, config):
    """Every rank reports the global loss, and the parameters equal those of one process
    trained on the same global batches (``sgd`` fails if the summed loss is not multiplied by
    the world size: DDP would then halve the gradient)."""
    torch.set_num_threads(1)
    losses, params = dist_worker.train_single(config)
    for r in (0, 1):
        res = two_rank_results[r][config]
        assert len(res["losses"]) == dist_worker.EPOCHS
        torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(losses),
                                   **LOSS_TOL)
        for k, v in params.items():
            torch.testing.assert_close(res["params"][k], v, **PARAM_TOL, msg=k)
    # training moved the parameters well beyond the tolerance
    _, _, start = dist_worker.build()
    assert any((params[k] - v).abs().max() > 1e-2 for k, v in start.state_dict().items())


# ----------------------------------------------------------------------------------------------
# one process
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def no_torchrun_env(monkeypatch):
    for name in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


def test_single_process_defaults(no_torchrun_env):
    assert not distributed.launched_by_torchrun()
    assert distributed.init_from_env() is False
    assert not distributed.is_distributed()
    assert distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.is_main_process()
    distributed.barrier()
    distributed.cleanup()
    t = torch.tensor([1.5, 2.0])
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1.5, 2.0]
    with pytest.raises(TypeError, match="tensor"):
        distributed.all_reduce_sum([1.0])


def test_shard_loader_single_process():
    dataset = torch.utils.data.TensorDataset(torch.arange(10))
    loader = distributed.shard_loader(dataset, 4, shuffle=False)
    assert [b[0].tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    shuffled = distributed.shard_loader(dataset, 4, shuffle=True, seed=5)
    shuffled.sampler.set_epoch(0)
    first = torch.cat([b[0] for b in shuffled])
    shuffled.sampler.set_epoch(1)
    second = torch.cat([b[0] for b in shuffled])
    assert sorted(first.tolist()) == list(range(10)) == sorted(second.tolist())
    assert not torch.equal(first, second)  # set_epoch reshuffles


def test_shard_loader_bad_arguments():
    dataset = torch.utils.data.TensorDataset(torch.arange(10))
    with pytest.raises(ValueError, match="global_batch_size"):
        distributed.shard_loader(dataset, 0)
    with pytest.raises(TypeError, match="global_batch_size"):
        distributed.shard_loader(dataset, 4.0)
    with pytest.raises(TypeError, match="dataset"):
        distributed.shard_loader(torch.utils.data.DataLoader(dataset), 4)


def test_torchrun_command_one_node():
    cmd = distributed.torchrun_command(2, ["train", "--epochs", 3])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc-per-node=2" in cmd
    i = cmd.index("-m", 3)
    assert cmd[i:] == ["-m", "seq2seq_ext.cli", "--", "train", "--epochs", "3"]
    assert all(a.startswith("--") for a in cmd[3:i])


def test_torchrun_command_several_nodes():
    cmd = distributed.torchrun_command(4, ["train"], nnodes=2, node_rank=1,
                                       master_addr="10.0.0.1", master_port=29600)
    assert "--standalone" not in cmd
    for flag in ("--nnodes=2", "--node-rank=1", "--master-addr=10.0.0.1",
                 "--master-port=29600", "--nproc-per-node=4"):
        assert flag in cmd
    assert cmd[-4:] == ["-m", "seq2seq_ext.cli", "--", "train"]


@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(nproc=0, args=[]), ValueError, "nproc"),
    (dict(nproc=1.5, args=[]), TypeError, "nproc"),
    (dict(nproc=2, args="train"), TypeError, "args"),
    (dict(nproc=2, args=[], nnodes=2), ValueError, "master_addr"),
    (dict(nproc=2, args=[], nnodes=2, node_rank=2, master_addr="h"), ValueError, "node_rank"),
    (dict(nproc=2, args=[], nnodes=0), ValueError, "nnodes"),
    (dict(nproc=2, args=[], master_addr="h"), ValueError, "master_addr"),
    (dict(nproc=2, args=[], nnodes=2, master_addr="h", master_port="x"), TypeError,
     "master_port"),
    (dict(nproc=2, args=[], nnodes=2, master_addr="h", master_port=70000), ValueError,
     "master_port"),
    (dict(nproc=2, args=[], nnodes=2, master_addr="h", master_port=0), ValueError,
     "master_port"),
])
def test_torchrun_command_bad_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        distributed.torchrun_command(**kwargs)


def test_launch_returns_the_exit_code(monkeypatch):
    seen = {}

    def fake_command(nproc, args, **kw):
        seen.update(nproc=nproc, args=args, kw=kw)
        return [sys.executable, "-c", "raise SystemExit(3)"]

    monkeypatch.setattr(distributed, "torchrun_command", fake_command)
    assert distributed.launch(2, ["train"], nnodes=1) == 3
    assert seen == dict(nproc=2, args=["train"], kw=dict(nnodes=1))


@needs_gloo
@pytest.mark.slow
def test_launch_runs_the_cli_under_torchrun(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.chdir(ROOT)
    assert distributed.launch(1, ["--help"]) == 0
    assert distributed.launch(1, ["no-such-command"]) != 0
    # the CLI's own --nproc reaches the CLI (torchrun would reject it as an ambiguous prefix)
    assert distributed.launch(1, ["train", "--nproc", "0"]) != 0
