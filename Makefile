# The project's commands. Each target creates .venv when missing (upgrading pip inside it),
# installs torch==2.13.0 (the CPU build), the package (editable, built with ninja) and the test
# dependencies, each at the version constraints.txt names, then does its job.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.seq2seq_ext-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
TEST_DEPS := ninja setuptools wheel pybind11 numpy matplotlib tqdm pytest pytest-benchmark \
             hypothesis expecttest sacrebleu

.PHONY: demo test test-all bench bench-pytest gpu gpu-dry-run cuda-check cmake-check asan peak-flops clean

$(VPY):
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip -c constraints.txt

$(STAMP): $(VPY) $(SOURCES) constraints.txt
	$(VPY) -m pip install -q torch==2.13.0 -c constraints.txt
	$(VPY) -m pip install -q $(TEST_DEPS) -c constraints.txt
	SEQ2SEQ_EXT_CUDA=$${SEQ2SEQ_EXT_CUDA:-0} $(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)  ## train on the built-in numbers corpus, translate, report BLEU, plot the loss
	$(VENV)/bin/seq2seq-ext train --checkpoint demo.pt --overwrite

test: $(STAMP)  ## the test suite (slow tests excluded)
	$(VPY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(VPY) -m pytest -q

bench: $(STAMP)  ## reference vs extension, side by side, 1 thread: ratio table
	$(VPY) benchmarks/compare.py

bench-pytest: $(STAMP)  ## the pytest-benchmark suites (reference and extension in one group each)
	$(VPY) -m pytest benchmarks/test_bench.py --benchmark-enable --benchmark-columns=median,iqr,rounds

gpu:  ## on a GPU machine, with its own python: build with CUDA, test, sanitize, GPU tables
	$(PYTHON) benchmarks/gpu.py

gpu-dry-run: $(STAMP)  ## gpu.py's CPU rehearsal: every path of the GPU run that needs no CUDA
	$(VPY) benchmarks/gpu.py --dry-run

cuda-check: $(STAMP)  ## compile every csrc/cuda/*.cu for sm_80 and sm_90 (compile only)
	PYTHON=$(VPY) bash tools/cuda_check.sh

cmake-check: $(STAMP)  ## build csrc/ with CMake against libtorch and load the result
	PYTHON=$(VPY) bash tools/cmake_check.sh

asan: $(STAMP)  ## build with -fsanitize=address,undefined into build/asan/, run the op tests + fuzz suite on it
	PYTHON=$(VPY) bash tools/asan_check.sh

peak-flops:  ## one core's float32 FMA and bf16 dot-product peak (the bound a GEMM cannot pass)
	mkdir -p build
	$(CXX) -O2 -Wno-psabi -o build/peak_flops tools/peak_flops.cpp
	taskset -c 1 build/peak_flops 2>/dev/null || build/peak_flops

clean:
	rm -rf build seq2seq_ext/*.so *.egg-info
