#!/usr/bin/env bash
# samg's GPU proof: one prepared run on an NVIDIA GPU host (made for a lent H200, 8 minutes).
#
#   bash benchmarks/gpu/check.sh                 # from the repository root
#   bash benchmarks/gpu/check.sh --budget 300    # seconds for the whole run (default 480)
#
# Stages, each printed as one line "STAGE <n> <name>: PASS|FAIL|SKIP - <reason>"; a failure never
# stops the run:
#   1 pytest-gpu   benchmarks/gpu/pytest_gpu.py: python -m pytest -m gpu over the test files that hold
#                  GPU tests, and the kernels' NVRTC compile tests (tests/test_tensorrt_nvrtc.py)
#   2 kernel       benchmarks/gpu/kernel_check.py: the GuidanceCombine CUDA kernel against the
#                  reference (fp32/fp16/bf16; SDXL batch 1/2/8, SD3, video; CFG, zero delta, NaN)
#                  and its time against a device-to-device copy of the same bytes
#   3 sdxl-e2e     benchmarks/gpu/sdxl_e2e.py: a full-size SDXL (random fp16 weights): per-step
#                  SAMG vs CFG, eager vs whole-loop CUDA graph, samg vs diffusers eager and compiled,
#                  end to end at 1024x1024, 30 steps
# Without a CUDA device every stage is a SKIP that says so, and the run still exits 0.
#
# Results: $OUT/gpu_check.json (the summary, the versions of the GPU, driver, CUDA, torch, CuPy, NVRTC,
# diffusers, ..., and every stage's details) and $OUT/gpu_check.log
# (everything printed); OUT defaults to benchmarks/gpu/out. Nothing here uses the network.
# Carried wheels (benchmarks/gpu/prepare_carry.sh puts them in benchmarks/gpu/.carry/whl) are
# installed into a scratch folder first, each only when its module is not found already.
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET (seconds), GPU_CHECK_WORK (scratch folder).
set -u -o pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-480}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --budget) BUDGET="$2"; shift 2 ;;
    --budget=*) BUDGET="${1#*=}"; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "check.sh: unknown argument $1 (use --budget SECONDS)" >&2; exit 2 ;;
  esac
done
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "check.sh: --budget takes whole seconds, got $BUDGET" >&2; exit 2; }

RESULTS="${OUT:-$HERE/out}"
if [[ -n "${GPU_CHECK_WORK:-}" ]]; then
  WORK="$GPU_CHECK_WORK"
else
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/samg-gpu-check.XXXXXX")"
  trap 'rm -rf "$WORK"' EXIT  # our own scratch folder only
fi
mkdir -p "$RESULTS" "$WORK"
LOG="$RESULTS/gpu_check.log"
SUMMARY="$RESULTS/gpu_check.json"
: >"$LOG"
T0=$(date +%s)
cd "$REPO" || exit 2
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 SAMG_CACHE_DIR="$WORK/samg-cache" HF_HUB_OFFLINE=1

say() { echo "$*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

say "check.sh: repo=$REPO results=$RESULTS budget=${BUDGET}s python=$(command -v "$PY" || echo "$PY") $(date -u +%FT%TZ)"

# -- carried wheels -------------------------------------------------------------------------------
SITE="$WORK/site"
mkdir -p "$SITE"
# the carried wheels whose module is not found (checked without importing it)
MISSING="$("$PY" - "$HERE"/.carry/whl/*.whl <<'PY' 2>>"$LOG"
import importlib.util, os, sys
for wheel in sys.argv[1:]:
    module = os.path.basename(wheel).split("-")[0].lower()  # distribution name -> module name
    if os.path.isfile(wheel) and importlib.util.find_spec(module) is None:
        print(wheel)
PY
)"
while IFS= read -r wheel; do
  [[ -n "$wheel" ]] || continue
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$wheel" >>"$LOG" 2>&1; then
    say "check.sh: installed $(basename "$wheel") into $SITE"
  else
    say "check.sh: could not install $(basename "$wheel") (see $LOG)"
  fi
done <<<"$MISSING"
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"

# -- is there a GPU? ------------------------------------------------------------------------------
# One line: "ok <device>" or the reason every GPU stage is skipped.
GPU="$("$PY" - <<'PY' 2>>"$LOG"
try:
    import torch
except ImportError as exc:
    print(f"no CUDA: torch does not import ({exc})")
else:
    if not torch.cuda.is_available():
        print(f"no CUDA device: torch {torch.__version__} sees none (torch.cuda.is_available() is False)")
    else:
        p = torch.cuda.get_device_properties(0)
        print(f"ok {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")
PY
)"
GPU="${GPU:-no CUDA: the probe printed nothing (see $LOG)}"
say "check.sh: ${GPU#ok }"

# -- versions the results table cites: GPU, driver, CUDA, torch, CuPy, NVRTC, diffusers, ... -------
VERSIONS="$WORK/versions.json"
"$PY" - "$VERSIONS" <<'PY' 2>>"$LOG" || echo '{}' >"$VERSIONS"
import importlib.metadata, json, platform, subprocess, sys

versions = {"python": platform.python_version()}
for dist in ("numpy", "torch", "diffusers", "transformers", "huggingface-hub", "safetensors", "onnxruntime",
             "onnxruntime-gpu", "tensorrt-rtx-cu13", "nvidia-cuda-nvrtc", "nvidia-cuda-runtime"):
    try:
        versions[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass  # not installed: absent from the record
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20)
    if smi.returncode == 0 and smi.stdout.strip():
        name, driver = [part.strip() for part in smi.stdout.splitlines()[0].split(",", 1)]
        versions.update(gpu=name, driver=driver)
except (OSError, subprocess.SubprocessError, ValueError):
    pass
try:
    import torch

    versions["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        versions.setdefault("gpu", torch.cuda.get_device_name(0))
        versions["cudnn"] = torch.backends.cudnn.version()
except Exception as exc:  # noqa: BLE001 - a record, not a check
    versions["torch_error"] = f"{type(exc).__name__}: {exc}"[:200]
try:
    import cupy

    versions["cupy"] = cupy.__version__
    versions["nvrtc"] = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
    versions["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
    versions["cuda_driver_api"] = cupy.cuda.runtime.driverGetVersion()  # the CUDA version the driver supports
except Exception as exc:  # noqa: BLE001 - no CuPy, or no driver: what was read is kept
    versions.setdefault("cupy_error", f"{type(exc).__name__}: {exc}"[:200])
json.dump(versions, open(sys.argv[1], "w"), default=str)
PY
say "check.sh: versions $(cat "$VERSIONS")"

# -- stages ---------------------------------------------------------------------------------------
declare -a NAMES=()
write_stage() {  # write_stage NAME STATUS REASON: a stage's JSON when the stage wrote none itself
  "$PY" - "$WORK/stage_$1.json" "$2" "$3" <<'PY' 2>>"$LOG" || true
import json, sys
json.dump({"status": sys.argv[2], "reason": sys.argv[3]}, open(sys.argv[1], "w"))
PY
}

run_stage() {  # run_stage N NAME MAX_SECONDS CMD...: runs CMD with STAGE_JSON and STAGE_DEADLINE set
  local n="$1" name="$2" max="$3"; shift 3
  NAMES+=("$name")
  local json="$WORK/stage_$name.json"
  rm -f "$json"
  local limit=$(( max < $(left) - 10 ? max : $(left) - 10 ))
  if [[ "$GPU" != ok* ]]; then
    write_stage "$name" SKIP "$GPU"
  elif (( limit < 20 )); then
    write_stage "$name" SKIP "no time left in the ${BUDGET}s budget"
  else
    say "---- stage $n $name: up to ${limit}s ($(left)s of the budget left)"
    local t rc=0
    t=$(date +%s)
    STAGE_JSON="$json" STAGE_DEADLINE=$(( $(date +%s) + limit - 5 )) timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
    if [[ ! -s "$json" ]]; then
      if (( rc == 124 || rc == 137 )); then write_stage "$name" FAIL "timed out after ${limit}s without a result"
      else write_stage "$name" FAIL "exited with status $rc without a result (see gpu_check.log)"; fi
    elif (( rc == 124 || rc == 137 )); then
      "$PY" - "$json" "$limit" <<'PY' 2>>"$LOG" || true
import json, sys
d = json.load(open(sys.argv[1]))
d["reason"] = f"timed out after {sys.argv[2]}s; partial: {d.get('reason', '')}"
d["status"] = "FAIL" if d.get("status") != "SKIP" else "SKIP"
json.dump(d, open(sys.argv[1], "w"))
PY
    fi
    say "     stage $n took $(( $(date +%s) - t ))s (exit status $rc)"
  fi
  local line
  line="$("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d.get("status","FAIL"), "-", " ".join(str(d.get("reason","")).split())[:400])' "$json" 2>>"$LOG" || echo "FAIL - unreadable stage result")"
  say "STAGE $n $name: $line"
}

run_stage 1 pytest-gpu 120 "$PY" "$HERE/pytest_gpu.py"
run_stage 2 kernel 90 "$PY" "$HERE/kernel_check.py"
run_stage 3 sdxl-e2e 400 "$PY" "$HERE/sdxl_e2e.py"

# -- summary --------------------------------------------------------------------------------------
"$PY" - "$WORK" "$SUMMARY" "$GPU" "$BUDGET" "$(( $(date +%s) - T0 ))" "${NAMES[@]}" <<'PY' 2>>"$LOG" || say "check.sh: could not write $SUMMARY"
import json, os, platform, sys, time
work, summary, gpu, budget, took, names = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6:]
try:
    versions = json.load(open(os.path.join(work, "versions.json")))
except (OSError, ValueError) as exc:
    versions = {"error": f"unreadable versions record: {exc}"}
stages = {}
for name in names:
    try:
        stages[name] = json.load(open(os.path.join(work, f"stage_{name}.json")))
    except (OSError, ValueError) as exc:
        stages[name] = {"status": "FAIL", "reason": f"unreadable stage result: {exc}"}
result = {"generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
          "gpu": gpu.removeprefix("ok "), "versions": versions, "budget_seconds": budget, "seconds": took,
          "status": {name: stages[name].get("status") for name in names}, "stages": stages}
temp = summary + ".tmp"
with open(temp, "w") as f:
    json.dump(result, f, indent=1, default=str)
os.replace(temp, summary)
PY
say "check.sh: done in $(( $(date +%s) - T0 ))s; summary in $SUMMARY"
exit 0
