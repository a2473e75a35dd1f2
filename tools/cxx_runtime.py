"""The C++ runtime the extension links (used by setup.py).

A torch extension must use the libstdc++ of the process it is loaded into. A toolchain that
links libstdc++ statically by default would put a second copy of it inside the extension;
torch's libraries and the extension then share streams and locales across the two copies, and
formatting a number into a TORCH_CHECK message can crash. Such a toolchain is detected by
linking a probe, and the shared libstdc++.so.6 that torch runs on is then named on the link
line.
"""
import os
import shlex
import subprocess
import sysconfig
import tempfile


def links_libstdcxx_statically(cxx):
    """True when ``cxx -shared`` makes a shared object without a DT_NEEDED libstdc++ (a static
    libstdc++ by default); False when it needs the shared one, or when the probe cannot tell."""
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = os.path.join(tmp, "probe.cpp"), os.path.join(tmp, "probe.so")
        with open(src, "w") as f:
            f.write("#include <sstream>\n#include <string>\n"
                    "std::string probe(long n) { std::ostringstream s; s << n; return s.str(); }\n")
        try:
            subprocess.run([*cxx, "-shared", "-fPIC", src, "-o", lib], check=True,
                           capture_output=True, timeout=120)
            dynamic = subprocess.run(["readelf", "-d", lib], check=True, capture_output=True,
                                     text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return False
    return "libstdc++" not in dynamic


def process_libstdcxx():
    """The path of the libstdc++.so.6 this process (torch) has loaded, or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libstdc++.so" in line}
    except OSError:
        return None
    return min(paths) if paths else None


def cxx_runtime_link_args():
    """Extra link arguments for the extension: none with an ordinary toolchain; with one that
    links libstdc++ statically, the shared libstdc++.so.6 this process runs on (named first, so
    that every symbol it has comes from it) and --exclude-libs (whatever the static archive
    still supplies stays private to the extension)."""
    cxx = shlex.split(os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++")
    if not links_libstdcxx_statically(cxx):
        return []
    shared = process_libstdcxx()
    if shared is None:
        raise RuntimeError(
            f"the C++ compiler {cxx[0]} links libstdc++ statically, and no shared libstdc++.so.6 "
            "was found in this process to link instead: a static copy inside the extension "
            "would break torch's error messages; set CXX to a compiler with a shared libstdc++")
    return [shared, "-Wl,--exclude-libs,ALL"]
