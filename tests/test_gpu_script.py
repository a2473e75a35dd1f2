"""benchmarks/gpu.py's logic that needs no GPU: the build settings, the import check, the phase
runner's time caps and the report written as the run goes. (CI runs the whole script with
``--dry-run``; these tests pin the pieces a dry run cannot: a phase that runs out of time, a
missing module, the architecture taken from the device.)"""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("gpu_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_settings(gpu):
    assert gpu.arch_list((9, 0)) == "9.0" and gpu.arch_list((8, 6)) == "8.6"
    env = gpu.build_env("/opt/cuda", (9, 0), 16)
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0" and env["MAX_JOBS"] == "16"
    assert env["SEQ2SEQ_EXT_CUDA"] == "1" and env["CUDA_HOME"] == "/opt/cuda"
    assert env["PATH"].startswith("/opt/cuda/bin")
    assert gpu.find_cuda_home({"CUDA_HOME": "/x"}, lambda name: None) == "/x"
    assert gpu.find_cuda_home({}, lambda name: "/opt/cuda-13/bin/nvcc") == "/opt/cuda-13"


def test_missing_modules_are_named_in_one_line(gpu):
    missing = gpu.missing_modules({"json": "json", "no_such_module_xyz": "no-such-wheel"})
    assert missing == ["no-such-wheel"]
    line = gpu.missing_line(missing)
    assert "\n" not in line and "no-such-wheel" in line


def test_a_missing_test_module_fails_the_test_phase_alone(gpu, tmp_path, monkeypatch):
    # a module only the tests import (expecttest, for opcheck) is not a reason to lose the
    # build, the sanitizer and the tables: the test phase fails at once, naming it
    assert not set(gpu.TEST_MODULES) & set(gpu.REQUIRED_MODULES)
    assert "expecttest" in gpu.TEST_MODULES and "torch" in gpu.REQUIRED_MODULES
    report = gpu.Report(tmp_path, ["gpu.py"])
    monkeypatch.setattr(gpu, "TEST_MODULES", {"no_such_module_xyz": "no-such-wheel"})
    ran = []
    monkeypatch.setattr(gpu, "run_phase", lambda *a, **k: ran.append(a) or {"status": "passed"})
    assert gpu.run_tests(report, "tests") is True and ran == []
    phase = json.loads((tmp_path / "gpu.json").read_text())["phases"]["tests"]
    assert phase["status"] == "failed" and "no-such-wheel" in phase["failures"][0]
    monkeypatch.setattr(gpu, "TEST_MODULES", {"json": "json"})
    assert gpu.run_tests(report, "tests") is False and len(ran) == 1
    report.close()


def test_phase_cut_at_its_cap_is_reported_and_the_json_kept(gpu, tmp_path, monkeypatch):
    report = gpu.Report(tmp_path, ["gpu.py"])
    code = ("import json, sys, time; print('FAILED tests/x.py::t'); "
            f"print({gpu.ROW_PREFIX!r} + json.dumps({{'table': 't', 'size': 's', "
            "'dtype': 'float32', 'seconds': {'package eager': 0.001}, 'errors': {}}), "
            "flush=True); time.sleep(60)")
    phase = gpu.run_phase(report, "slow", [sys.executable, "-c", code], 2, None)
    assert phase["status"] == "timeout" and phase["seconds"] < 30
    assert phase["failures"] == ["tests/x.py::t"]
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["phases"]["slow"]["status"] == "timeout"
    assert data["tables"][0]["seconds"] == {"package eager": 0.001}  # the row came through
    assert "FAILED tests/x.py::t" in (tmp_path / "gpu.log").read_text()
    # a phase with less than MIN_PHASE_S left of the run's budget is skipped
    monkeypatch.setattr(gpu, "TOTAL_BUDGET_S", report.elapsed() + 1)
    assert gpu.run_phase(report, "late", [sys.executable, "-c", "pass"], 60, None)["status"] \
        == "skipped"
    monkeypatch.setattr(gpu, "TOTAL_BUDGET_S", 10_000)
    assert gpu.run_phase(report, "quick", [sys.executable, "-c", "pass"], 60, None)["status"] == "passed"
    report.close()
    assert json.loads((tmp_path / "gpu.json").read_text())["finished"] is True


def test_pytest_failures_are_read_from_verbose_lines_and_the_summary(gpu):
    assert gpu.failure_of("tests/test_a.py::test_b[cuda] FAILED    [ 10%]") == \
        "tests/test_a.py::test_b[cuda]"
    assert gpu.failure_of("FAILED tests/test_a.py::test_b[cuda] - AssertionError") == \
        "tests/test_a.py::test_b[cuda]"
    assert gpu.failure_of("ERROR tests/test_a.py::test_c - RuntimeError") == \
        "tests/test_a.py::test_c"
    assert gpu.failure_of("tests/test_a.py::test_b[cuda] PASSED    [ 10%]") is None
    # pytest-xdist's verbose lines
    assert gpu.failure_of("[gw3] [ 10%] FAILED tests/test_a.py::test_b[cuda] ") == \
        "tests/test_a.py::test_b[cuda]"
    assert gpu.failure_of("[gw0] [ 11%] PASSED tests/test_a.py::test_c[cuda] ") is None


def test_tests_run_in_worker_processes_when_xdist_is_installed(gpu):
    assert gpu.pytest_workers(cpus=16, have_xdist=True) == ["-n", str(gpu.TEST_WORKERS)]
    assert gpu.pytest_workers(cpus=2, have_xdist=True) == ["-n", "2"]
    assert gpu.pytest_workers(cpus=16, have_xdist=False) == []


def test_arguments(gpu):
    args = gpu.parse_args(["--dry-run", "--out", "d", "--skip", "tests", "sanitizer"])
    assert args.dry_run and args.out == "d" and args.skip == ["tests", "sanitizer"]
    with pytest.raises(SystemExit):
        gpu.parse_args(["--skip", "everything"])


def test_tables_compute_in_full_float32(gpu):
    import torch
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True  # cuDNN's own default
    gpu.full_float32()
    assert not torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cudnn.allow_tf32


def test_variants_are_timed_interleaved(gpu):
    order = []
    fns = {name: (lambda name: lambda: order.append(name))(name) for name in "abc"}
    seconds = gpu.timer("cpu", calls=1, rounds=3, warmup=1)(fns)
    assert sorted(seconds) == ["a", "b", "c"]
    assert "".join(order) == "abc" + "abc" + "cba" + "abc"


def test_compiled_reference_is_timed_beside_the_baseline_again(gpu, monkeypatch):
    made = []
    variants = {name: (lambda name: lambda s, d, t, dry: made.append(name) or (lambda: None))(name)
                for name in ("reference", gpu.COMPILED, "package eager")}
    monkeypatch.setattr(gpu, "dry_run_cases", lambda dry: [("t", "tiny", {}, "float32", variants)])
    rows = []
    gpu.run_tables("cpu", True, rows.append)
    assert [sorted(r["seconds"]) for r in rows] == [
        ["package eager", "reference"], ["reference", gpu.COMPILED]]
    assert all(r["baseline"] == "reference" and not r["errors"] for r in rows)
