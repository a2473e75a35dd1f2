"""tools/peak_flops.cpp, the core's arithmetic peak that RESULTS.md compares GEMM rates with:
it builds, reports a rate for each instruction set the CPU has, and the rates are real numbers
(a bf16 dot product does twice a float32 FMA's work per lane, so its rate is at least the
float32 one wherever both run)."""
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _flags():
    text = pathlib.Path("/proc/cpuinfo").read_text() if pathlib.Path("/proc/cpuinfo").exists() else ""
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build tools/peak_flops.cpp")
def test_peak_flops_reports_each_instruction_set(tmp_path):
    exe = tmp_path / "peak_flops"
    subprocess.run(["g++", "-O2", "-Wno-psabi", "-o", str(exe), str(ROOT / "tools/peak_flops.cpp")],
                   check=True)
    out = subprocess.run([str(exe), "200000"], check=True, capture_output=True, text=True).stdout
    rates = {name: float(v) for name, v in re.findall(r"(float32 AVX2 FMA|float32 AVX-512 FMA|"
                                                      r"bf16 AVX512-BF16 dot product) ([0-9.]+)",
                                                      out)}
    flags = _flags()
    expected = {"float32 AVX2 FMA": {"avx2", "fma"}, "float32 AVX-512 FMA": {"avx512f"},
                "bf16 AVX512-BF16 dot product": {"avx512_bf16"}}
    for name, needs in expected.items():
        assert (name in rates) == (needs <= flags), (name, out)
    assert all(r > 0.1 for r in rates.values()), out
    if "bf16 AVX512-BF16 dot product" in rates:
        # half a float32 FMA's rate would mean the loop measured latency or memory, not the units
        assert rates["bf16 AVX512-BF16 dot product"] > 0.8 * rates["float32 AVX-512 FMA"], out
