"""The GPU run in one short call: build with CUDA, the CUDA tests, compute-sanitizer, the tables.

    python3 benchmarks/gpu.py --out DIR     # on a GPU machine, with its own python3 (< 8 minutes)
    python3 benchmarks/gpu.py --dry-run     # anywhere, on the CPU: every path that needs no CUDA

The run checks first that every Python module the build, the sanitizer and the tables need
imports (one line names the missing ones; a module only the tests need, such as expecttest,
fails the test phases alone) and that nvcc is there; exports CUDA_HOME when unset; builds the
extension in place with all cores (MAX_JOBS) for the architecture of the device present
(TORCH_CUDA_ARCH_LIST from its compute capability) and stops at once if the build fails. Then
each phase runs in its own process with its own time cap, and a phase that fails or runs out
of time does not stop the next one; the whole run keeps under TOTAL_BUDGET_S:

- tests: ``pytest -m "not slow" -k "cuda or test_build"`` (the CUDA cases of the op tests,
  tests/test_cuda_graphs.py, and the check that the CUDA build links the shared libstdc++),
  PYTHONPATH set to the checkout, without -x;
- sanitizer: compute-sanitizer memcheck and racecheck on one small case per op
  (SANITIZE_CASES), with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that the caching allocator does not
  hide out-of-bounds accesses (which keeps the CUDA-graph path off: tests/test_cuda_graphs.py
  checks it);
- tables: the loss, the GRU stack and the training step at the chapter's sizes and at embedding
  256 / hidden 512 / batch 128, timing the reference on cuDNN (nn.GRU), torch.compile of the
  reference, the package eager and the package with its CUDA-graph path; and the drop-in
  nn.LSTM (``seq2seq_ext.accelerate``) against cuDNN's at the large size (TABLE_CASES).

Everything printed also goes to DIR/gpu.log, and DIR/gpu.json holds every phase's status,
seconds and failures and every table row, rewritten after each event: a run cut off still
reports what it did. ``--dry-run`` exercises the argument parsing, the import check, the build
settings, the table and sanitizer code on CPU tensors at tiny sizes and the JSON writer, in a
few seconds (CI runs it).

Timing (tables): wall clock of repeated calls with the device synchronised around each round,
median of rounds, after warm-up, on random data.
"""
import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TOTAL_BUDGET_S = 465  # the whole run, start to end, leaves a margin under 8 minutes
PHASE_CAPS_S = {"build": 140, "tests": 150, "sanitizer-memcheck": 50, "sanitizer-racecheck": 40,
                "tables": 110, "tests-cli": 90}
PHASES = ("build", "tests", "sanitizer", "tables", "tests-cli")
MIN_PHASE_S = 10  # a phase with less time left than this is skipped

# module name -> pip name of what the build, the sanitizer cases and the tables import: without
# one of them the run stops before the build
REQUIRED_MODULES = {
    "torch": "torch", "numpy": "numpy", "setuptools": "setuptools", "ninja": "ninja",
    "pybind11": "pybind11", "matplotlib": "matplotlib", "tqdm": "tqdm", "sacrebleu": "sacrebleu",
}
# ... and what only the test phases import: without one of them those phases fail at once,
# naming it, and the build, the sanitizer and the tables still run
TEST_MODULES = {
    "pytest": "pytest", "pytest_benchmark": "pytest-benchmark", "hypothesis": "hypothesis",
    "expecttest": "expecttest",
}
# -v: one line per test as it ends, so that a phase cut off at its cap still names its failures
PYTEST_ARGS = ["-m", "not slow", "-v", "--tb=short", "-rfE", "-p", "no:cacheprovider"]
TEST_PHASES = {
    # the CUDA cases, tests/test_cuda_graphs.py, and the C++ runtime the CUDA build links
    "tests": ["-k", "cuda or test_build", "tests"],
    "tests-cli": ["tests/test_cli.py"],      # the commands end to end (on cuda:0), time allowing
}
# The test phases run in several processes (pytest-xdist) when it is installed: faster, and a
# test that crashes its process is reported as failed while the others go on.
TEST_WORKERS = 8
ROW_PREFIX = "GPU-ROW "  # a child's table row on stdout: GPU-ROW {json}


# ----------------------------------------------------------------------------------------------
# report: the log and the JSON file
# ----------------------------------------------------------------------------------------------

class Report:
    """Prints to stdout and DIR/gpu.log; keeps DIR/gpu.json up to date after every change."""

    def __init__(self, out_dir, argv):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.dir / "gpu.log", "a", encoding="utf-8")
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.data = {"command": argv, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                     "machine": {"python": platform.python_version(),
                                 "cpus": os.cpu_count(), "host": platform.node()},
                     "phases": {}, "tables": [], "finished": False}
        self.save()

    def elapsed(self):
        return time.monotonic() - self.t0

    def say(self, *parts, console=True):
        line = " ".join(str(p) for p in parts)
        with self.lock:
            if console:
                print(line, flush=True)
            self.log.write(line + "\n")
            self.log.flush()

    def update(self, key, value):
        with self.lock:
            self.data[key] = value
        self.save()

    def phase(self, name, **fields):
        with self.lock:
            self.data["phases"].setdefault(name, {}).update(fields)
        self.save()

    def row(self, row):
        with self.lock:
            self.data["tables"].append(row)
        self.save()

    def save(self):
        with self.lock:
            tmp = self.dir / ".gpu.json.tmp"
            tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n", encoding="utf-8")
            os.replace(tmp, self.dir / "gpu.json")

    def close(self):
        self.update("finished", True)
        self.update("seconds", round(self.elapsed(), 1))
        self.log.close()


# ----------------------------------------------------------------------------------------------
# preflight: imports, tools, build settings
# ----------------------------------------------------------------------------------------------

def missing_modules(required=REQUIRED_MODULES):
    """The pip names of the modules that cannot be found (checked without importing them)."""
    return [pip for mod, pip in required.items() if importlib.util.find_spec(mod) is None]


def missing_line(missing):
    return (f"missing Python modules: {' '.join(missing)} (install them into {sys.executable}, "
            f"e.g. {sys.executable} -m pip install --no-index --find-links WHEEL_DIR "
            f"{' '.join(missing)})")


def find_cuda_home(environ=os.environ, which=shutil.which):
    """CUDA_HOME as set, else the toolkit of the nvcc on PATH, else /usr/local/cuda if present."""
    if environ.get("CUDA_HOME"):
        return environ["CUDA_HOME"]
    nvcc = which("nvcc")
    if nvcc:
        return str(Path(nvcc).resolve().parent.parent)
    return "/usr/local/cuda" if Path("/usr/local/cuda/bin/nvcc").exists() else None


def arch_list(capability):
    """TORCH_CUDA_ARCH_LIST for a device of compute capability (major, minor): only that
    architecture (9.0 -> "9.0"; a 'a' suffix is torch's business, not needed for sm_90)."""
    major, minor = capability
    return f"{major}.{minor}"


def build_env(cuda_home, capability, jobs):
    env = dict(os.environ, SEQ2SEQ_EXT_CUDA="1", MAX_JOBS=str(jobs),
               TORCH_CUDA_ARCH_LIST=arch_list(capability))
    if cuda_home:
        env["CUDA_HOME"] = cuda_home
        env["PATH"] = f"{cuda_home}/bin{os.pathsep}{env.get('PATH', '')}"
    return env


def child_env(**extra):
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    env.setdefault("SEQ2SEQ_EXT_PLOT", "")
    return env


# ----------------------------------------------------------------------------------------------
# phases: a child process with a time cap, its output streamed to the log
# ----------------------------------------------------------------------------------------------

def run_phase(report, name, cmd, cap, env, console_filter=None):
    """Run cmd under min(cap, time left); returns the phase record (also saved in gpu.json)."""
    left = TOTAL_BUDGET_S - report.elapsed()
    timeout = min(cap, left)
    if left < MIN_PHASE_S:
        report.say(f"== {name}: skipped ({left:.0f} s left of the run's {TOTAL_BUDGET_S} s)")
        report.phase(name, status="skipped", seconds=0, failures=[], reason="no time left")
        return report.data["phases"][name]
    report.say(f"== {name} (cap {timeout:.0f} s): {' '.join(cmd)}")
    report.phase(name, status="running", cap_s=round(timeout), command=cmd)
    start = time.monotonic()
    failures = []
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)

    def pump():
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(ROW_PREFIX):
                row = json.loads(line[len(ROW_PREFIX):])
                report.row(row)
                report.say(format_row(row))
                continue
            failed = failure_of(line)
            if failed and failed not in failures:
                failures.append(failed)
            show = console_filter(line) if console_filter else True
            report.say(line, console=show)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
        status = "passed" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        stop_group(proc)
        rc, status = None, "timeout"
    reader.join(timeout=10)
    seconds = round(time.monotonic() - start, 1)
    report.phase(name, status=status, seconds=seconds, returncode=rc, failures=failures)
    report.say(f"== {name}: {status} in {seconds} s" +
               (f", {len(failures)} failure line(s)" if failures else ""))
    return report.data["phases"][name]


def stop_group(proc):
    """SIGTERM to the phase's process group (it was started in a session of its own), then
    SIGKILL after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def failure_of(line):
    """The failing test a line of pytest -v output (or of its -rfE summary) names, or None;
    pytest-xdist's lines start with the worker ("[gw3] [ 10%] FAILED tests/...")."""
    if line.startswith("[gw"):
        parts = line.split()
        for i, word in enumerate(parts[:-1]):
            if word in ("FAILED", "ERROR") and parts[i + 1].startswith("tests/"):
                return parts[i + 1]
        return None
    if line.startswith(("FAILED ", "ERROR ")):
        return line.split(" ")[1]
    if line.startswith("tests/") and (" FAILED" in line or " ERROR" in line):
        return line.split(" ")[0]
    return None


def pytest_summary_or_failure(line):
    """Console filter of the tests phase: failures, errors and pytest's summary lines."""
    return (failure_of(line) is not None or line.startswith(("SKIPPED", "="))
            or " passed" in line or " failed" in line)


# ----------------------------------------------------------------------------------------------
# the cases: tables and sanitizer
# ----------------------------------------------------------------------------------------------
# A table case is (table, size label, sizes, variants): each variant maps a column name to a
# function (sizes, device, dtype) -> a callable to time (or None: not applicable here). To time
# a new op, add its case below; the sanitizer cases are separate (one small call per op).

CHAPTER = dict(src_vocab=184, tgt_vocab=201, embed=32, hidden=32, layers=2, batch=64, steps=10)
LARGE = dict(src_vocab=4000, tgt_vocab=3882, embed=256, hidden=512, layers=2, batch=128, steps=10)
TINY = dict(src_vocab=11, tgt_vocab=13, embed=4, hidden=6, layers=2, batch=3, steps=4)


def _models(s, device, seed=0):
    import torch
    import seq2seq_ext as d2l
    from seq2seq_ext import reference as R
    torch.manual_seed(seed)
    ext = d2l.EncoderDecoder(
        d2l.Seq2SeqEncoder(s["src_vocab"], s["embed"], s["hidden"], s["layers"]),
        d2l.Seq2SeqDecoder(s["tgt_vocab"], s["embed"], s["hidden"], s["layers"])).to(device)
    ref = R.EncoderDecoder(
        R.Seq2SeqEncoder(s["src_vocab"], s["embed"], s["hidden"], s["layers"]),
        R.Seq2SeqDecoder(s["tgt_vocab"], s["embed"], s["hidden"], s["layers"])).to(device)
    ref.load_state_dict(ext.state_dict())
    return ext, ref


def _batch(s, device, seed=1):
    import torch
    g = torch.Generator().manual_seed(seed)
    B, T = s["batch"], s["steps"]
    X = torch.randint(0, s["src_vocab"], (B, T), generator=g)
    Y = torch.randint(0, s["tgt_vocab"], (B, T), generator=g)
    valid_len = torch.randint(1, T + 1, (B,), generator=g)
    return X.to(device), Y.to(device), valid_len.to(device)


def _train_step(net, loss_fn, batch):
    X, Y, valid_len = batch

    def step():
        net.zero_grad(set_to_none=True)
        out, _ = net(X, Y)
        loss_fn(out, Y, valid_len).sum().backward()
    return step


def _graph_mode(mode, fn):
    from seq2seq_ext import cuda_graphs

    def run():
        with cuda_graphs.use_mode(mode):
            fn()
    return run


def step_reference(s, device, dtype, compiled=False, dry=False):
    from seq2seq_ext import reference as R
    _, ref = _models(s, device)
    step = _train_step(ref, R.MaskedSoftmaxCELoss(), _batch(s, device))
    if compiled:
        import torch
        # the dry run exercises the path through Dynamo only (no inductor compile)
        step = torch.compile(step, backend="eager" if dry else "inductor")
    return step


def step_package(s, device, dtype, mode="eager", dry=False):
    import seq2seq_ext as d2l
    if mode == "graph" and device == "cpu":
        return None
    ext, _ = _models(s, device)
    return _graph_mode(mode, _train_step(ext, d2l.MaskedSoftmaxCELoss(), _batch(s, device)))


def _gru_stack(s, device, seed=2):
    import torch
    torch.manual_seed(seed)
    rnn = torch.nn.GRU(s["embed"], s["hidden"], s["layers"]).to(device)
    x = torch.randn(s["steps"], s["batch"], s["embed"], device=device, requires_grad=True)
    h0 = torch.zeros(s["layers"], s["batch"], s["hidden"], device=device)
    return rnn, x, h0


def gru_reference(s, device, dtype, compiled=False, dry=False):
    rnn, x, h0 = _gru_stack(s, device)

    def run():
        out, h = rnn(x, h0)
        (out.sum() + h.sum()).backward()
    if compiled:
        import torch
        return torch.compile(run, backend="eager" if dry else "inductor")
    return run


def gru_package(s, device, dtype, mode="eager", dry=False):
    from seq2seq_ext import ops
    if mode == "graph" and device == "cpu":
        return None
    rnn, x, h0 = _gru_stack(s, device)

    def run():
        out, h = ops.gru(x, h0, rnn._flat_weights)
        (out.sum() + h.sum()).backward()
    return _graph_mode(mode, run)


def _lstm_stack(s, device, seed=4):
    import torch
    torch.manual_seed(seed)
    rnn = torch.nn.LSTM(s["embed"], s["hidden"], s["layers"], batch_first=True).to(device)
    x = torch.randn(s["batch"], s["steps"], s["embed"], device=device, requires_grad=True)
    return rnn, x


def lstm_reference(s, device, dtype, compiled=False, dry=False):
    """nn.LSTM (cuDNN on the GPU), batch first, forward and backward."""
    rnn, x = _lstm_stack(s, device)

    def run():
        out, (h, c) = rnn(x)
        (out.sum() + h.sum() + c.sum()).backward()
    return run


def lstm_package(s, device, dtype, mode="eager", dry=False):
    """The drop-in seq2seq_ext.nn.LSTM (the rnn_stack op) with the same parameters."""
    import seq2seq_ext
    if mode == "graph":
        return None  # rnn_stack has no graph path of its own
    rnn, x = _lstm_stack(s, device)
    rnn = seq2seq_ext.accelerate(rnn)

    def run():
        out, (h, c) = rnn(x)
        (out.sum() + h.sum() + c.sum()).backward()
    return run


def _ce_inputs(s, device, dtype):
    import torch
    B, T, V = s["batch"], s["steps"], s["tgt_vocab"]
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(B, T, V, generator=g).to(device, dtype).requires_grad_()
    label = torch.randint(0, V, (B, T), generator=g).to(device)
    valid_len = torch.randint(1, T + 1, (B,), generator=g).to(device)
    return pred, label, valid_len


def ce_reference(s, device, dtype, compiled=False, dry=False):
    from seq2seq_ext import reference as R
    pred, label, valid_len = _ce_inputs(s, device, dtype)
    loss = R.MaskedSoftmaxCELoss()

    def run():
        pred.grad = None
        loss(pred, label, valid_len).sum().backward()
    if compiled:
        import torch
        return torch.compile(run, backend="eager" if dry else "inductor")
    return run


def ce_package(s, device, dtype, mode="eager", dry=False):
    import seq2seq_ext as d2l
    if mode == "graph":
        return None  # the loss is one launch per pass: no graph path
    pred, label, valid_len = _ce_inputs(s, device, dtype)
    loss = d2l.MaskedSoftmaxCELoss()

    def run():
        pred.grad = None
        loss(pred, label, valid_len).sum().backward()
    return run


def _variants(reference, package, reference_name="reference (cuDNN)"):
    """The columns of a case; the first is the baseline of the ratios."""
    return {
        reference_name: lambda s, d, t, dry: reference(s, d, t, dry=dry),
        "torch.compile(reference)": lambda s, d, t, dry: reference(s, d, t, compiled=True,
                                                                    dry=dry),
        "package eager": lambda s, d, t, dry: package(s, d, t, mode="eager", dry=dry),
        "package graph": lambda s, d, t, dry: package(s, d, t, mode="graph", dry=dry),
    }


TABLE_CASES = [
    # (table, size label, sizes, dtype name, variants)
    ("GRU stack fwd+bwd", "chapter", CHAPTER, "float32", _variants(gru_reference, gru_package)),
    ("GRU stack fwd+bwd", "e256 h512 b128", LARGE, "float32",
     _variants(gru_reference, gru_package)),
    ("training step (fwd + loss + bwd)", "chapter", CHAPTER, "float32",
     _variants(step_reference, step_package)),
    ("training step (fwd + loss + bwd)", "e256 h512 b128", LARGE, "float32",
     _variants(step_reference, step_package)),
    # the drop-in layers (issue 15): seq2seq_ext.accelerate's nn.LSTM against cuDNN's
    ("nn.LSTM drop-in (2 layers, batch first) fwd+bwd", "e256 h512 b128", LARGE, "float32",
     {k: v for k, v in _variants(lstm_reference, lstm_package).items()
      if k in ("reference (cuDNN)", "package eager")}),
    ("masked CE fwd+bwd", "chapter", CHAPTER, "float32", _variants(ce_reference, ce_package, "reference")),
    ("masked CE fwd+bwd", "b128 t30 v10000", dict(batch=128, steps=30, tgt_vocab=10000),
     "float32", _variants(ce_reference, ce_package, "reference")),
    ("masked CE fwd+bwd", "b128 t30 v10000", dict(batch=128, steps=30, tgt_vocab=10000),
     "bfloat16", _variants(ce_reference, ce_package, "reference")),
]


def timer(device, calls, rounds, warmup):
    """measure(fns): the median seconds per call of each function of the dict ``fns``, their
    rounds interleaved (``seq2seq_ext.bench.common.interleaved``: the order reverses every other
    round), the device synchronised around each round of ``calls`` calls."""
    import torch
    from seq2seq_ext.bench import common

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()

    def measure(fns):
        # warm-up rounds compile, measure the graph rule and capture graphs
        return common.interleaved(fns, rounds, warmup, number=calls, sync=sync)
    return measure


def full_float32():
    """TF32 off for matmuls and for cuDNN (whose default is on): the reference's cuDNN layers
    and the package's GEMMs then both compute in float32."""
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


COMPILED = "torch.compile(reference)"


def run_tables(device, dry, emit):
    """Time every case's variants, interleaved; emit(row) after each case. The compiled
    reference (slow to compile) is timed in a second pass, interleaved with the baseline again,
    so that a cut-off run has the other columns of every case and each ratio compares times of
    one pass. A variant that raises is reported with its error and the others still run."""
    full_float32()
    measure = timer(device, calls=1 if dry else 10, rounds=1 if dry else 5,
                    warmup=1)  # a round of `calls` calls
    for compiled_pass in (False, True):
        for table, label, sizes, dtype_name, variants in dry_run_cases(dry):
            baseline = next(iter(variants))
            chosen = {k: v for k, v in variants.items()
                      if (k == COMPILED) == compiled_pass or (compiled_pass and k == baseline)}
            row = time_case(table, "tiny (dry run)" if dry else label,
                            TINY if dry else dict(TINY, **sizes), dtype_name, chosen, device,
                            dry, measure)
            row["baseline"] = baseline
            emit(row)


def dry_run_cases(dry):
    """TABLE_CASES; in a dry run, one case per (table, dtype): the sizes do not change the code
    that runs."""
    if not dry:
        return TABLE_CASES
    seen, cases = set(), []
    for case in TABLE_CASES:
        if (case[0], case[3]) not in seen:
            seen.add((case[0], case[3]))
            cases.append(case)
    return cases


def time_case(table, label, s, dtype_name, variants, device, dry, measure):
    """One row: the variants' functions made (a variant that raises is reported with its
    error), then timed together by ``measure``."""
    import torch
    dtype = getattr(torch, dtype_name)
    row = {"table": table, "size": label, "dtype": dtype_name, "device": device,
           "seconds": {}, "errors": {}}
    fns = {}
    for name, make in variants.items():
        try:
            fn = make(s, device, dtype, dry)
            if fn is not None:
                fn()  # a variant that fails does so here, before the timed rounds
                fns[name] = fn
        except Exception as exc:  # reported in the row; the other variants still run
            row["errors"][name] = f"{type(exc).__name__}: {exc}"[:500]
    try:
        row["seconds"] = measure(fns)
    except Exception as exc:
        row["errors"]["timing"] = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        if device != "cpu":
            torch.cuda.empty_cache()
    return row


def format_row(row):
    secs = row.get("seconds", {})
    name0 = row.get("baseline")
    base = secs.get(name0)
    cells = []
    for name, t in secs.items():
        ratio = f" ({base / t:.2f}x)" if base and t and name != name0 else ""
        cells.append(f"{name} {t * 1e3:.3f} ms{ratio}")
    for name, err in row.get("errors", {}).items():
        cells.append(f"{name} ERROR {err[:120]}")
    return f"| {row['table']} | {row['size']} | {row['dtype']} | " + " | ".join(cells) + " |"


def _sanitize_ce(device):
    import torch
    from seq2seq_ext import ops
    pred = torch.randn(3, 5, 37, device=device, requires_grad=True)
    label = torch.randint(0, 37, (3, 5), device=device)
    valid_len = torch.tensor([5, 2, 0], device=device)
    ops.masked_softmax_ce(pred, label, valid_len).sum().backward()
    ops.masked_softmax_ce(pred.detach().transpose(1, 2).contiguous().transpose(1, 2),
                          label.int(), valid_len.float())
    return pred.grad


def _sanitize_mask(device):
    import torch
    from seq2seq_ext import ops
    X = torch.randn(4, 6, 3, device=device)
    valid_len = torch.tensor([0, 2, 6, 9], device=device)
    ops.sequence_mask_(X, valid_len, -1)
    return ops.sequence_mask(X.transpose(0, 1).contiguous().transpose(0, 1), valid_len, 0)


def _sanitize_layer(device):
    import torch
    from seq2seq_ext import ops
    rnn = torch.nn.GRU(5, 7, 2).to(device)
    x = torch.randn(6, 3, 5, device=device, requires_grad=True)
    h0 = torch.randn(2, 3, 7, device=device)
    out, h = ops.gru(x, h0, rnn._flat_weights)
    (out.sum() + h.sum()).backward()
    return x.grad


def _sanitize_decode(device, cell):
    import torch
    import seq2seq_ext as d2l
    from seq2seq_ext import ops
    from seq2seq_ext.models import fused_decoder_args
    dec = d2l.Seq2SeqDecoder(9, 4, 6, 2, cell=cell).to(device).eval()
    token = torch.tensor([1, 8, 0], device=device)
    h = torch.randn(2, 3, 6, device=device)
    args = fused_decoder_args(dec)
    with torch.no_grad():
        if cell == "lstm":
            return ops.lstm_decode_step(token, h, torch.randn_like(h), *args)
        ops.gru_decode_step(token, h, *args)
        return ops.greedy_decode(h, *args, 1, 2, 5)


def _sanitize_stack_both(device):
    return [_sanitize_stack(device, cell) for cell in ("gru", "lstm")]


def _sanitize_stack(device, cell):
    import torch
    from seq2seq_ext import ops
    rnn = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(5, 7, 2).to(device)
    x = torch.randn(6, 3, 5, device=device, requires_grad=True)
    h0 = torch.randn(2, 3, 7, device=device, requires_grad=True)
    c0 = torch.randn(2, 3, 7, device=device) if cell == "lstm" else None
    mask = (torch.rand(1, 6, 3, 7, device=device) > 0.3).float() / 0.7
    out, h_n, c_n = ops.rnn_stack(cell, x, h0, c0, rnn._flat_weights, mask)
    (out.sum() + h_n.sum() + (c_n.sum() if c_n is not None else 0)).backward()
    return x.grad


SANITIZE_CASES = {
    "masked_softmax_ce (forward, backward; strided, int32 labels, float lengths)": _sanitize_ce,
    "sequence_mask, sequence_mask_": _sanitize_mask,
    # graphs need the caching allocator, which the sanitizer phase turns off: the graph mode
    # runs its eager fallback there (the graph path is checked by tests/test_cuda_graphs.py)
    "gru_layer (forward, backward; eager)": _sanitize_layer,
    "rnn_stack (GRU, LSTM; dropout mask, c0, backward)": _sanitize_stack_both,
    "gru_decode_step, greedy_decode": lambda device: _sanitize_decode(device, "gru"),
    "lstm_decode_step": lambda device: _sanitize_decode(device, "lstm"),
}


def run_sanitize_cases(device):
    import torch
    for name, case in SANITIZE_CASES.items():
        case(device)
        if device != "cpu":
            torch.cuda.synchronize()
        print(f"sanitize case ok: {name}", flush=True)


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(
        description="The GPU run: build with CUDA, CUDA tests, compute-sanitizer, tables "
                    "(or --dry-run on the CPU).")
    p.add_argument("--out", default=None,
                   help="directory for gpu.log and gpu.json (default: build/gpu, or a temporary "
                        "directory with --dry-run)")
    p.add_argument("--dry-run", action="store_true",
                   help="run every path that needs no CUDA, on the CPU at tiny sizes")
    p.add_argument("--skip", nargs="*", default=[], choices=PHASES,
                   help="phases to leave out")
    # internal: the phases' child processes
    p.add_argument("--child", choices=["tables", "sanitize"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child_main(args):
    device = "cpu" if args.dry_run else "cuda"
    if args.child == "tables":
        run_tables(device, args.dry_run,
                   lambda row: print(ROW_PREFIX + json.dumps(row), flush=True))
    else:
        run_sanitize_cases(device)
    return 0


def dry_run(report):
    """The CPU rehearsal: every step of the real run that needs no CUDA."""
    missing = missing_modules({**REQUIRED_MODULES, **TEST_MODULES})
    report.say("imports: " + (missing_line(missing) if missing else "all present"))
    report.phase("preflight", status="failed" if missing else "passed", seconds=0,
                 failures=[missing_line(missing)] if missing else [])
    env = build_env(find_cuda_home(), (9, 0), os.cpu_count() or 1)
    report.say(f"build settings (for a capability 9.0 device): CUDA_HOME={env.get('CUDA_HOME')} "
               f"TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']} MAX_JOBS={env['MAX_JOBS']}")
    for name in TEST_PHASES:
        report.say(f"{name} command: " + " ".join(test_command(name)))
    py = [sys.executable, str(Path(__file__).resolve()), "--dry-run"]
    ok = not missing
    for name, child in (("sanitizer", "sanitize"), ("tables", "tables")):
        phase = run_phase(report, name, py + ["--child", child], 120, child_env())
        ok = ok and phase["status"] == "passed"
    errors = [f"{r['table']}: {k}: {v}" for r in report.data["tables"]
              for k, v in r["errors"].items()]
    for e in errors:
        report.say("table error: " + e)
    ok = ok and not errors and len(report.data["tables"]) == 2 * len(dry_run_cases(True))
    json.loads((report.dir / "gpu.json").read_text())  # the file is complete JSON
    report.say(f"dry run: {'ok' if ok else 'FAILED'} in {report.elapsed():.1f} s "
               f"(log and JSON in {report.dir})")
    return 0 if ok else 1


def gpu_run(report, skip):
    missing = missing_modules()
    if missing:
        report.say(missing_line(missing))
        report.phase("preflight", status="failed", seconds=0, failures=[missing_line(missing)])
        return 2
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
    nvcc = Path(cuda_home or "/nonexistent") / "bin" / "nvcc"
    if not nvcc.exists():
        report.say(f"nvcc not found (CUDA_HOME={cuda_home}); set CUDA_HOME")
        report.phase("preflight", status="failed", seconds=0, failures=["nvcc not found"])
        return 2
    import torch
    if not torch.cuda.is_available():
        report.say(f"torch {torch.__version__} sees no CUDA device")
        report.phase("preflight", status="failed", seconds=0, failures=["no CUDA device"])
        return 2
    capability = torch.cuda.get_device_capability()
    machine = dict(report.data["machine"], device=torch.cuda.get_device_name(),
                   capability=f"{capability[0]}.{capability[1]}", torch=torch.__version__,
                   cuda=torch.version.cuda, cuda_home=cuda_home)
    report.update("machine", machine)
    report.phase("preflight", status="passed", seconds=round(report.elapsed(), 1), failures=[])
    report.say(f"# {machine['device']} (sm {machine['capability']}), torch {torch.__version__}, "
               f"CUDA {torch.version.cuda}, python {platform.python_version()}, "
               f"{os.cpu_count()} CPUs")
    env = build_env(cuda_home, capability, os.cpu_count() or 1)
    if "build" not in skip:
        phase = run_phase(report, "build", [sys.executable, "setup.py", "build_ext", "--inplace"],
                          PHASE_CAPS_S["build"], env, console_filter=lambda line: "error" in line)
        if phase["status"] != "passed":
            report.say("the build failed: stopping (see gpu.log)")
            return 1
    rc = 0
    if "tests" not in skip:
        rc |= run_tests(report, "tests")
    if "sanitizer" not in skip:
        sanitizer = shutil.which("compute-sanitizer") or str(
            Path(cuda_home) / "bin" / "compute-sanitizer")
        if not Path(sanitizer).exists():
            report.say("compute-sanitizer not found: sanitizer phase skipped")
            report.phase("sanitizer", status="skipped", seconds=0, failures=[],
                         reason="compute-sanitizer not found")
        else:
            env = child_env(PYTORCH_NO_CUDA_MEMORY_CACHING="1", SEQ2SEQ_EXT_CUDA_GRAPHS="auto")
            for tool in ("memcheck", "racecheck"):
                phase = run_phase(
                    report, f"sanitizer-{tool}",
                    [sanitizer, "--tool", tool, "--error-exitcode", "1", sys.executable,
                     str(Path(__file__).resolve()), "--child", "sanitize"],
                    PHASE_CAPS_S[f"sanitizer-{tool}"], env)
                rc |= phase["status"] != "passed"
    if "tables" not in skip:
        phase = run_phase(report, "tables",
                          [sys.executable, str(Path(__file__).resolve()), "--child", "tables"],
                          PHASE_CAPS_S["tables"], child_env())
        rc |= phase["status"] != "passed"
    if "tests-cli" not in skip:
        rc |= run_tests(report, "tests-cli")
    return int(rc)


def pytest_workers(cpus=os.cpu_count(), have_xdist=None):
    """pytest-xdist's arguments for the test phases, or none when it is not installed."""
    if have_xdist is None:
        have_xdist = importlib.util.find_spec("xdist") is not None
    return ["-n", str(max(1, min(TEST_WORKERS, cpus or 1)))] if have_xdist else []


def test_command(name):
    return [sys.executable, "-m", "pytest", *PYTEST_ARGS, *pytest_workers(), *TEST_PHASES[name]]


def run_tests(report, name):
    missing = missing_modules(TEST_MODULES)
    if missing:
        report.say(f"{name}: not run: " + missing_line(missing))
        report.phase(name, status="failed", seconds=0, failures=[missing_line(missing)])
        return True
    phase = run_phase(report, name, test_command(name),
                      PHASE_CAPS_S[name], child_env(), console_filter=pytest_summary_or_failure)
    return phase["status"] != "passed"


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        return child_main(args)
    out = args.out or (tempfile.mkdtemp(prefix="gpu-dry-run-") if args.dry_run
                       else str(ROOT / "build" / "gpu"))
    report = Report(out, sys.argv if argv is None else argv)
    try:
        return dry_run(report) if args.dry_run else gpu_run(report, set(args.skip))
    finally:
        report.say(f"total {report.elapsed():.1f} s; gpu.json and gpu.log in {report.dir}")
        report.close()


if __name__ == "__main__":
    sys.exit(main())
