#!/usr/bin/env bash
# Compile-only check of the CUDA kernels: every csrc/cuda/*.cu is compiled with nvcc for sm_80
# and sm_90 against the installed torch's headers. Needs no GPU and works with the CPU torch
# wheel, which ships the c10/ATen CUDA headers but not the generated
# c10/cuda/impl/cuda_cmake_macros.h; an empty stand-in for that one header is written to a
# build directory of this repository (never into torch's own directory).
#
# Environment: NVCC (default /usr/local/bin/nvcc), PYTHON (default python3),
#              CUDA_CHECK_JOBS (parallel compiles, default 2),
#              CUDA_CHECK_ARCHS (the SM versions to compile for, default "80 90").
# Exit status: 0 when every file compiles (or there is nothing to compile), 1 otherwise.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-/usr/local/bin/nvcc}"
PYTHON="${PYTHON:-python3}"
JOBS="${CUDA_CHECK_JOBS:-2}"

shopt -s nullglob
sources=("$ROOT"/csrc/cuda/*.cu)
shopt -u nullglob
if [ "${#sources[@]}" -eq 0 ]; then
  echo "cuda_check: no .cu files under csrc/cuda; nothing to compile"
  exit 0
fi

if [ ! -x "$NVCC" ] && ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "cuda_check: nvcc not found at '$NVCC' (set NVCC)" >&2
  exit 1
fi

if ! torch_includes="$("$PYTHON" -c \
    "from torch.utils.cpp_extension import include_paths; print(' '.join(include_paths()))")"; then
  echo "cuda_check: could not get torch's include paths from $PYTHON" >&2
  exit 1
fi
abi="$("$PYTHON" -c "import torch; print(int(torch.compiled_with_cxx11_abi()))")"

BUILD="$ROOT/build/cuda-check"
STANDIN="$BUILD/include"
mkdir -p "$STANDIN/c10/cuda/impl" "$BUILD/logs"
if [ ! -f "$STANDIN/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  printf '%s\n' '#pragma once' \
    '// Empty stand-in for the header that a CUDA build of torch generates; compile checks only.' \
    > "$STANDIN/c10/cuda/impl/cuda_cmake_macros.h"
fi

flags=(-std=c++20 -O2 -c -o /dev/null
  --expt-relaxed-constexpr
  # the defines torch.utils.cpp_extension adds to every nvcc command (COMMON_NVCC_FLAGS)
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
  "-D_GLIBCXX_USE_CXX11_ABI=$abi" -DSEQ2SEQ_EXT_WITH_CUDA
  -I"$ROOT/csrc" -I"$STANDIN")
for dir in $torch_includes; do
  flags+=(-isystem "$dir")
done
ARCHS="${CUDA_CHECK_ARCHS:-80 90}"
for arch in $ARCHS; do
  flags+=(-gencode "arch=compute_$arch,code=sm_$arch")
done

# Compile one file; its log goes to build/cuda-check/logs/<name>.log, its status to <name>.rc.
compile_one() {
  local src="$1" name
  name="$(basename "$src" .cu)"
  if "$NVCC" "${flags[@]}" "$src" >"$BUILD/logs/$name.log" 2>&1; then
    echo 0 >"$BUILD/logs/$name.rc"
  else
    echo 1 >"$BUILD/logs/$name.rc"
  fi
}

rm -f "$BUILD"/logs/*.rc
running=0
for src in "${sources[@]}"; do
  compile_one "$src" &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait

failed=0
for src in "${sources[@]}"; do
  name="$(basename "$src" .cu)"
  rel="${src#"$ROOT"/}"
  if [ "$(cat "$BUILD/logs/$name.rc" 2>/dev/null || echo 1)" = 0 ]; then
    echo "$rel: OK"
  else
    echo "$rel: FAIL"
    sed 's/^/    /' "$BUILD/logs/$name.log"
    failed=1
  fi
done

if [ "$failed" -ne 0 ]; then
  echo "cuda_check: some CUDA sources failed to compile (sm_80, sm_90)" >&2
  exit 1
fi
echo "cuda_check: all ${#sources[@]} CUDA sources compile for $(printf "sm_%s " $ARCHS | sed "s/ $//")"
