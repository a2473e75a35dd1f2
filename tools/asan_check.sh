#!/usr/bin/env bash
# Builds seq2seq_ext._C with -fsanitize=address,undefined in a separate directory (build/asan/)
# and runs the op tests and the fuzz suite against that build, with the sanitizer runtime
# preloaded into the (uninstrumented) Python interpreter. The in-place library
# seq2seq_ext/_C*.so is never touched.
#
# Environment:
#   PYTHON                 the interpreter with torch and the test dependencies (default .venv/bin/python)
#   SEQ2SEQ_EXT_BUILD_LOCK a lock file taken (flock) around the compilation, when set, so that
#                          concurrent builds on a shared machine run one after the other
#   ASAN_TESTS             the test files to run (default: the op tests in tests/ops, the
#                          decoder, prediction and model-parity tests that run the ops, the
#                          decoder variants and tests/test_fuzz.py)
#   PYTEST_ARGS            extra pytest arguments (default: -q -m "not slow")
#
# Exit status: that of pytest; a sanitizer report aborts the interpreter (non-zero status) and is
# printed on stderr.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
case "$PY" in /*) ;; */*) PY="$ROOT/$PY" ;; *) PY="$(command -v "$PY")" ;; esac
BUILD="$ROOT/build/asan"
TESTS="${ASAN_TESTS:-tests/ops tests/test_decoder_stepper.py tests/test_decoder_fast_path.py tests/test_predict.py tests/test_model_parity.py tests/test_variants.py tests/test_fuzz.py}"
PYTEST_ARGS="${PYTEST_ARGS:--q -m 'not slow'}"

echo "== sanitized build in $BUILD"
mkdir -p "$BUILD"
# Copy setup.py, csrc/ and seq2seq_ext/ into build/asan/, rewriting only the files whose content
# changed (and removing the ones gone), so that a rebuild compiles only what changed.
"$PY" - "$ROOT" "$BUILD" <<'EOF'
import filecmp, os, shutil, sys
root, build = sys.argv[1], sys.argv[2]
def sync(src, dst):
    if os.path.isfile(src):
        if not (os.path.isfile(dst) and filecmp.cmp(src, dst, shallow=False)):
            shutil.copyfile(src, dst)
        return
    os.makedirs(dst, exist_ok=True)
    names = [n for n in os.listdir(src) if n != "__pycache__" and not n.endswith(".so")]
    for n in set(os.listdir(dst)) - set(names):
        if n != "__pycache__" and not n.endswith(".so"):
            p = os.path.join(dst, n)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    for n in names:
        sync(os.path.join(src, n), os.path.join(dst, n))
for name in ("setup.py", "csrc", "seq2seq_ext", "tools"):
    sync(os.path.join(root, name), os.path.join(build, name))
EOF
find "$BUILD/seq2seq_ext" -name __pycache__ -type d -prune -exec rm -rf {} +

LOCK=()
if [ -n "${SEQ2SEQ_EXT_BUILD_LOCK:-}" ]; then LOCK=(flock "$SEQ2SEQ_EXT_BUILD_LOCK"); fi
(cd "$BUILD" && SEQ2SEQ_EXT_SANITIZE=1 SEQ2SEQ_EXT_CUDA=0 "${LOCK[@]}" "$PY" setup.py -q build_ext --inplace)

SO="$(ls "$BUILD"/seq2seq_ext/_C*.so)"
if ! nm -D "$SO" | grep __asan_ >/dev/null; then
  echo "error: $SO is not instrumented (it references no __asan_ symbol)" >&2
  exit 2
fi

CXX_FOR_RUNTIME="${CXX:-g++}"
ASAN_RT="$("$CXX_FOR_RUNTIME" -print-file-name=libasan.so)"
UBSAN_RT="$("$CXX_FOR_RUNTIME" -print-file-name=libubsan.so)"
if [ ! -e "$ASAN_RT" ] || [ ! -e "$UBSAN_RT" ]; then
  echo "error: sanitizer runtimes not found ($CXX_FOR_RUNTIME -print-file-name=libasan.so / libubsan.so)" >&2
  exit 2
fi

# detect_leaks=0: CPython keeps its interned objects and module state until exit by design.
# allocator_may_return_null=1: an impossible allocation (a test asks for one) becomes the
# allocator's ordinary failure, which PyTorch turns into an exception, instead of an abort.
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:abort_on_error=1:detect_odr_violation=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"

eval "ARGS=($PYTEST_ARGS)"
for t in $TESTS; do ARGS+=("$ROOT/$t"); done
echo "== running ${TESTS} against $SO"
echo "   LD_PRELOAD=$ASAN_RT:$UBSAN_RT ASAN_OPTIONS=$ASAN_OPTIONS UBSAN_OPTIONS=$UBSAN_OPTIONS"
# From build/asan the sanitized package shadows the checkout's (the working directory comes
# first on sys.path); the pytest process checks that before it runs anything.
cd "$BUILD"
LD_PRELOAD="$ASAN_RT:$UBSAN_RT" "$PY" -c '
import sys
import pytest
import seq2seq_ext._C as C
build = sys.argv[1]
if not C.__file__.startswith(build + "/"):
    sys.exit(f"the sanitized library is not the one imported: {C.__file__}")
print("sanitized library:", C.__file__, flush=True)
sys.exit(pytest.main(sys.argv[2:]))
' "$BUILD" -p no:cacheprovider --rootdir="$ROOT" -c "$ROOT/pyproject.toml" "${ARGS[@]}"
