"""Stage 1 of benchmarks/gpu/check.sh: `python -m pytest -m gpu`, summarized into $STAGE_JSON.

PASS: the run succeeded and at least one test ran; SKIP: every selected test skipped (their reasons
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


def main() -> dict:
    deadline = float(os.environ.get("STAGE_DEADLINE", time.time() + 140))
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfEs",
                   f"--junitxml={junit}"]
        started = time.time()
        try:
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                  timeout=max(10.0, deadline - time.time()))
            output, returncode = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as exc:
            output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            returncode = "timeout"
        print(output[-20000:])
        cases = cases_of(junit) if junit.is_file() else []
    status, reason = verdict(returncode, cases)
    if returncode == "timeout":
        status, reason = "FAIL", f"pytest timed out; {reason}"
    return {"status": status, "reason": reason, "command": " ".join(command[1:]), "returncode": returncode,
            "seconds": round(time.time() - started, 1), "cases": cases, "tail": output[-3000:]}


if __name__ == "__main__":
    result = main()
    with open(os.environ.get("STAGE_JSON", "stage_pytest-gpu.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(result["status"], "-", result["reason"])
