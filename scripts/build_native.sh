#!/usr/bin/env bash
# Builds samg's native parts: the ONNX Runtime custom-op library (plugins/build/libsamg_ort.so),
# the C++ runtime (runtime/cpp/build/samg-run) and, when nvcc is present, the CUDA kernel objects.
#
#   scripts/build_native.sh [--no-cuda] [--no-runtime] [--verbose]
#
# Idempotent: make rebuilds only what changed. No download: ORT's C/C++ headers (1.21; its
# versioned C API runs on newer onnxruntime libraries) and nlohmann/json are kept in third_party/
# (see third_party/README.md); the library is the onnxruntime wheel's (pip install onnxruntime).
# To build against other headers, point ORT_INCLUDE_DIR at a folder with onnxruntime_cxx_api.h
# and NLOHMANN_JSON_INCLUDE_DIR at a folder holding nlohmann/json.hpp.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PLUGINS_BUILD="$ROOT/plugins/build"
RUNTIME_BUILD="$ROOT/runtime/cpp/build"
BUILD_CUDA=auto
BUILD_RUNTIME=1
VERBOSE=0
for arg in "$@"; do
  case "$arg" in
    --no-cuda) BUILD_CUDA=0 ;;
    --cuda) BUILD_CUDA=1 ;;
    --no-runtime) BUILD_RUNTIME=0 ;;
    --verbose|-v) VERBOSE=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "build_native.sh: unknown option '$arg' (use --no-cuda, --cuda, --no-runtime, --verbose)" >&2; exit 2 ;;
  esac
done

fail() { echo "build_native.sh: $*" >&2; exit 1; }
LOG="$PLUGINS_BUILD/build_native.log"
mkdir -p "$PLUGINS_BUILD"
: >"$LOG"
# Runs a step quietly; on failure shows the end of its output.
step() {
  local what="$1"; shift
  if [[ $VERBOSE == 1 ]]; then
    "$@" 2>&1 | tee -a "$LOG" || fail "$what failed (log: $LOG)"
  elif ! "$@" >>"$LOG" 2>&1; then
    tail -n 40 "$LOG" >&2
    fail "$what failed (full log: $LOG)"
  fi
}

for tool in cmake c++; do
  command -v "$tool" >/dev/null || fail "$tool not found: install it (Debian: apt-get install cmake g++ make)"
done
GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)

# One build at a time (tests in several processes may ask together).
exec 9>"$PLUGINS_BUILD/.lock"
flock 9

ORT_INC="${ORT_INCLUDE_DIR:-$ROOT/third_party/onnxruntime/include}"
JSON_INC="${NLOHMANN_JSON_INCLUDE_DIR:-$ROOT/third_party/nlohmann_json/include}"
[[ -f "$ORT_INC/onnxruntime_cxx_api.h" ]] ||
  fail "$ORT_INC/onnxruntime_cxx_api.h is missing: restore third_party/ from the repository or set ORT_INCLUDE_DIR"
[[ -f "$JSON_INC/nlohmann/json.hpp" ]] ||
  fail "$JSON_INC/nlohmann/json.hpp is missing: restore third_party/ from the repository or set NLOHMANN_JSON_INCLUDE_DIR"

# Configure + build one CMake project quietly.
cmake_build() {
  local name="$1" src="$2" out="$3"; shift 3
  step "cmake configure ($name)" cmake -S "$src" -B "$out" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release "$@"
  step "build ($name)" cmake --build "$out" --parallel "$(nproc 2>/dev/null || echo 2)"
}

CUDA_FLAG=OFF
NVCC="$(command -v nvcc || true)"
[[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]] && NVCC=/usr/local/cuda/bin/nvcc
if [[ $BUILD_CUDA == 1 && -z "$NVCC" ]]; then fail "--cuda given but nvcc was not found (install the CUDA toolkit)"; fi
if [[ $BUILD_CUDA != 0 && -n "$NVCC" ]]; then CUDA_FLAG=ON; fi
cmake_build plugins "$ROOT/plugins" "$PLUGINS_BUILD" -DORT_INCLUDE_DIR="$ORT_INC" \
  -DSAMG_BUILD_CUDA="$CUDA_FLAG" ${NVCC:+-DCMAKE_CUDA_COMPILER="$NVCC"}
echo "built $PLUGINS_BUILD/libsamg_ort.so"
[[ $CUDA_FLAG == ON ]] && echo "built $PLUGINS_BUILD/libsamg_combine_cuda.a (sm_80, sm_89, sm_90)"

if [[ $BUILD_RUNTIME == 1 ]]; then
  PYTHON="${PYTHON:-python3}"
  ORT_LIB="${ORT_LIBRARY:-$("$PYTHON" - <<'PY' 2>/dev/null || true
import glob, os, onnxruntime
libs = sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))
print(libs[0] if libs else "")
PY
)}"
  [[ -f "$ORT_LIB" ]] ||
    fail "libonnxruntime.so not found: pip install onnxruntime (the runtime links the wheel's library), or set ORT_LIBRARY=/path/to/libonnxruntime.so.X"
  cmake_build runtime "$ROOT/runtime/cpp" "$RUNTIME_BUILD" -DORT_INCLUDE_DIR="$ORT_INC" \
    -DORT_LIBRARY="$ORT_LIB" -DNLOHMANN_JSON_INCLUDE_DIR="$JSON_INC" -DSAMG_PLUGINS_DIR="$ROOT/plugins"
  echo "built $RUNTIME_BUILD/samg-run"
fi
