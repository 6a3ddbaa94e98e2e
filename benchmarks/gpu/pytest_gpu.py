"""Stage 1 of benchmarks/gpu/check.sh: the GPU tests and the kernels' NVRTC compile tests,
summarized into $STAGE_JSON.

Two pytest runs over named files (collecting the whole suite would import every test module on an
image this project never ran on, where one ImportError would stop the stage before any GPU test):
  gpu    python -m pytest -m gpu GPU_TEST_FILES
  nvrtc  python -m pytest NVRTC_TEST_FILES   (no GPU needed, but libnvrtc, which the GPU host has)
both with --continue-on-collection-errors, so a module that does not import costs only its own tests.

PASS: both runs succeeded and at least one GPU test ran; SKIP: every GPU test skipped (their reasons
are listed); FAIL otherwise, naming the first failure. Every case's outcome is in the JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The test files holding tests marked gpu, and the kernels' compile tests that need libnvrtc only.
GPU_TEST_FILES = ("tests/test_device_loop.py", "tests/test_native_cuda.py", "tests/test_tensorrt_gpu.py")
NVRTC_TEST_FILES = ("tests/test_tensorrt_nvrtc.py",)
RUNS = {"gpu": ["-m", "gpu", *GPU_TEST_FILES], "nvrtc": list(NVRTC_TEST_FILES)}


def cases_of(junit: Path) -> list[dict]:
    """Each test case of a JUnit XML report: id, outcome (passed/failure/error/skipped), message."""
    cases = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, message = child.tag, (child.get("message") or child.text or "")
                break
        cases.append({"id": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), **({"message": message[:400]} if message else {})})
    return cases


def verdict(returncode, cases: list[dict]) -> tuple[str, str]:
    counts = Counter(c["outcome"] for c in cases)
    ran = counts["passed"] + counts["failure"] + counts["error"]
    tally = f"{counts['passed']} passed, {counts['failure']} failed, {counts['error']} errors, {counts['skipped']} skipped"
    if returncode == 0 and ran:
        return "PASS", tally
    if returncode in (0, 5) and not ran:
        reasons = sorted({c.get("message", "")[:120] for c in cases if c["outcome"] == "skipped"})
        return "SKIP", f"no GPU test ran ({tally}): " + "; ".join(reasons[:4])
    first = next((c for c in cases if c["outcome"] in ("failure", "error")), None)
    where = f"; first: {first['id']}: {first.get('message', '')[:200]}" if first else ""
    return "FAIL", f"pytest exit status {returncode}; {tally}{where}"


def combined_returncode(returncodes: list) -> int | str:
    """One pytest exit status for several runs: the first failing one ("timeout" included), else 0
    when any run ran tests, else 5 (no tests collected)."""
    failing = [code for code in returncodes if code not in (0, 5)]
    if failing:
        return failing[0]
    return 0 if 0 in returncodes else 5


def main() -> dict:
    deadline = float(os.environ.get("STAGE_DEADLINE", time.time() + 140))
    started = time.time()
    outputs, returncodes, cases, commands = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, selection in RUNS.items():
            junit = Path(tmp) / f"junit-{name}.xml"
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
                       "--continue-on-collection-errors", f"--junitxml={junit}", *selection]
            commands.append(" ".join(command[1:]))
            try:
                done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                      timeout=max(10.0, deadline - time.time()))
                output, returncode = done.stdout + done.stderr, done.returncode
            except subprocess.TimeoutExpired as exc:
                output = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
                returncode = "timeout"
            print(f"---- pytest run {name}: exit status {returncode}\n{output[-20000:]}")
            outputs.append(output)
            returncodes.append(returncode)
            cases += [{**case, "run": name} for case in (cases_of(junit) if junit.is_file() else [])]
            if returncode == "timeout":
                break
    returncode = combined_returncode(returncodes)
    status, reason = verdict(returncode, cases)
    gpu_cases = [c for c in cases if c["run"] == "gpu"]
    if status == "PASS" and all(c["outcome"] == "skipped" for c in gpu_cases):  # only the NVRTC tests ran
        status, reason = verdict(5, gpu_cases)
        reason += f" (NVRTC compile tests: {verdict(0, [c for c in cases if c['run'] != 'gpu'])[1]})"
    if returncode == "timeout":
        status, reason = "FAIL", f"pytest timed out; {reason}"
    tail = "\n".join(output[-1500:] for output in outputs)
    return {"status": status, "reason": reason, "commands": commands, "returncodes": returncodes,
            "seconds": round(time.time() - started, 1), "cases": cases, "tail": tail}


if __name__ == "__main__":
    result = main()
    with open(os.environ.get("STAGE_JSON", "stage_pytest-gpu.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(result["status"], "-", result["reason"])
