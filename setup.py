"""Build seq2seq_ext._C: each op's schema and entry (csrc/*.cpp, with the _C module in
csrc/python_module.cpp), the CPU kernels (csrc/cpu/*.cpp) and, when a CUDA build is possible,
the CUDA kernels (csrc/cuda/*.cu).

SEQ2SEQ_EXT_CUDA=1 forces the CUDA kernels in (the build fails if it cannot make them),
SEQ2SEQ_EXT_CUDA=0 leaves them out; unset, they are built when torch has CUDA and nvcc is found.
SEQ2SEQ_EXT_CPU_ISA=avx512|avx2|generic picks the SIMD level of the CPU kernels; unset, the best
of AVX-512 (f, bw, vl, dq) and AVX2+FMA that the building machine has is used (an extension is
built where it runs, like -march=native).
SEQ2SEQ_EXT_SANITIZE=1 builds with -fsanitize=address,undefined (CPU only).
SEQ2SEQ_EXT_DEBUG_INFO=1 keeps debug information (-g, which Python's own flags add); by default the
C++ sources are compiled with -g0, which takes 40% less time and leaves a library of 1.6 MB
instead of 53 (its symbols stay, so profilers still name functions).

The extension links the shared C++ runtime that torch runs on, whatever the compiler's default
(tools/cxx_runtime.py).
"""
import glob
import os
import sys

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
from cxx_runtime import cxx_runtime_link_args  # noqa: E402


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda():
    flag = os.environ.get("SEQ2SEQ_EXT_CUDA", "").strip().lower()
    if flag in ("0", "off", "false", "no"):
        return False
    possible = __import__("torch").version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if flag in ("1", "on", "true", "yes"):
        if not possible:
            raise RuntimeError(
                "SEQ2SEQ_EXT_CUDA=1 but a CUDA build is not possible: torch "
                f"{__import__('torch').__version__} (CUDA {__import__('torch').version.cuda}), "
                f"CUDA_HOME={cpp_extension.CUDA_HOME}")
        return True
    return possible


def _cpu_isa_flags():
    isa = os.environ.get("SEQ2SEQ_EXT_CPU_ISA", "").strip().lower()
    if not isa:
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((line for line in f if line.startswith("flags")), "").split()
        except OSError:
            flags = []
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= set(flags):
            isa = "avx512"
        elif {"avx2", "fma"} <= set(flags):
            isa = "avx2"
        else:
            isa = "generic"
    if isa == "avx512":
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if isa == "avx2":
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    if isa != "generic":
        raise RuntimeError(
            f"SEQ2SEQ_EXT_CPU_ISA must be 'avx512', 'avx2' or 'generic', got {isa!r}")
    return []


def _extension():
    sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-std=c++20"] + _cpu_isa_flags()
    if os.environ.get("SEQ2SEQ_EXT_DEBUG_INFO") != "1":
        cxx.append("-g0")
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
    define_macros = []
    extra_link = cxx_runtime_link_args()
    if os.environ.get("SEQ2SEQ_EXT_SANITIZE") == "1":
        cxx = ["-O1", "-g", "-std=c++20"] + _cpu_isa_flags() + ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
        extra_link += ["-fsanitize=address,undefined"]
    if _want_cuda():
        sources += _rel("csrc/cuda/*.cu")
        define_macros.append(("SEQ2SEQ_EXT_WITH_CUDA", None))
        return cpp_extension.CUDAExtension(
            "seq2seq_ext._C", sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=extra_link)
    return cpp_extension.CppExtension(
        "seq2seq_ext._C", sources, define_macros=define_macros,
        extra_compile_args={"cxx": cxx}, extra_link_args=extra_link)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
