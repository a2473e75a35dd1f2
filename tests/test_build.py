"""The build links the C++ runtime torch runs on (tools/cxx_runtime.py): a toolchain that links
libstdc++ statically is detected, and the extension then names the shared libstdc++.so.6."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import seq2seq_ext

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import cxx_runtime  # noqa: E402

NEEDS_TOOLCHAIN = pytest.mark.skipif(
    shutil.which("g++") is None or shutil.which("readelf") is None,
    reason="needs g++ and readelf (binutils)")


@NEEDS_TOOLCHAIN
def test_probe_tells_a_static_libstdcxx_from_a_shared_one():
    assert not cxx_runtime.links_libstdcxx_statically(["g++"])
    assert cxx_runtime.links_libstdcxx_statically(["g++", "-static-libstdc++"])


def test_probe_of_a_missing_compiler_changes_nothing():
    assert not cxx_runtime.links_libstdcxx_statically(["/nonexistent/c++"])


@NEEDS_TOOLCHAIN
def test_static_toolchain_links_the_process_libstdcxx(monkeypatch):
    monkeypatch.setenv("CXX", "g++ -static-libstdc++")
    args = cxx_runtime.cxx_runtime_link_args()
    assert len(args) == 2 and Path(args[0]).name.startswith("libstdc++.so")
    assert Path(args[0]).is_file() and args[1] == "-Wl,--exclude-libs,ALL"
    monkeypatch.setenv("CXX", "g++")
    assert cxx_runtime.cxx_runtime_link_args() == []


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils)")
def test_extension_needs_the_shared_libstdcxx():
    dynamic = subprocess.run(["readelf", "-d", seq2seq_ext._C.__file__], check=True,
                             capture_output=True, text=True).stdout
    assert "[libstdc++.so.6]" in dynamic


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils)")
@pytest.mark.skipif(os.environ.get("SEQ2SEQ_EXT_DEBUG_INFO") == "1"
                    or os.environ.get("SEQ2SEQ_EXT_SANITIZE") == "1",
                    reason="this build asked for debug information")
def test_extension_is_built_without_debug_information():
    # -g0 (setup.py): debug information costs 40% of the build's time and 50 MB of library
    sections = subprocess.run(["readelf", "-S", "-W", seq2seq_ext._C.__file__], check=True,
                              capture_output=True, text=True).stdout
    assert ".debug_info" not in sections
    assert ".text" in sections
