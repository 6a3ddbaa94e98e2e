"""benchmarks/gpu/check.sh, the prepared GPU proof, on a machine without a GPU: it parses, runs, says
SKIP with the reason for every GPU stage, exits 0 and writes its JSON summary. Its Python stages run
their CPU dry runs (the same code on the CPU, nothing measured), so a change in the APIs they use
shows here and not first on a lent GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

GPU_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"
CHECK = GPU_DIR / "check.sh"
STAGES = ["pytest-gpu", "kernel", "sdxl-e2e"]


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def test_check_script_parses():
    result = subprocess.run(["bash", "-n", str(CHECK)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_without_a_gpu_every_stage_skips_with_its_reason(tmp_path):
    if _has_cuda():
        pytest.skip("this machine has a CUDA GPU: check.sh would run its stages for real")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "GPU_CHECK_WORK": str(tmp_path / "work")}
    result = subprocess.run(["bash", str(CHECK), "--budget", "60"], capture_output=True, text=True, env=env,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("STAGE ")]
    assert [line.split(":")[0] for line in lines] == [f"STAGE {n} {name}" for n, name in enumerate(STAGES, 1)]
    for line in lines:
        assert ": SKIP - no CUDA" in line, line
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert summary["status"] == {name: "SKIP" for name in STAGES}
    assert all(summary["stages"][name]["reason"].startswith("no CUDA") for name in STAGES)
    assert summary["budget_seconds"] == 60
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert all(line in log for line in lines)


def test_bad_budget_is_refused_in_one_line(tmp_path):
    result = subprocess.run(["bash", str(CHECK), "--budget", "soon"], capture_output=True, text=True,
                            env={**os.environ, "OUT": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.strip() == "check.sh: --budget takes whole seconds, got soon"


def test_pytest_stage_verdicts(tmp_path):
    sys.path.insert(0, str(GPU_DIR))
    try:
        import pytest_gpu
    finally:
        sys.path.remove(str(GPU_DIR))
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_ok" time="0.5"/>'
        '<testcase classname="tests.test_a" name="test_skip" time="0"><skipped message="no GPU here"/></testcase>'
        '<testcase classname="tests.test_b" name="test_bad" time="1"><failure message="assert 1 == 2">tb</failure></testcase>'
        "</testsuite></testsuites>")
    cases = pytest_gpu.cases_of(junit)
    assert [c["outcome"] for c in cases] == ["passed", "skipped", "failure"]
    status, reason = pytest_gpu.verdict(1, cases)
    assert status == "FAIL" and "first: tests.test_b::test_bad: assert 1 == 2" in reason
    assert pytest_gpu.verdict(0, cases[:2]) == ("PASS", "1 passed, 0 failed, 0 errors, 1 skipped")
    status, reason = pytest_gpu.verdict(0, cases[1:2])
    assert status == "SKIP" and "no GPU here" in reason


def _dry_run(script: str, tmp_path) -> dict:
    stage_json = tmp_path / f"{script}.json"
    env = {**os.environ, "STAGE_JSON": str(stage_json), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(GPU_DIR / script), "--cpu-dry-run"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(stage_json.read_text())


def test_kernel_check_dry_run_meets_its_own_tolerances(tmp_path):
    """The reference rule in place of the kernels passes every check: the cases, the float64
    reference and the tolerances agree with each other, so a kernel that fails on the GPU is off."""
    pytest.importorskip("torch")
    pytest.importorskip("scipy")
    result = _dry_run("kernel_check.py", tmp_path)
    assert result["status"] == "PASS", result["reason"]
    correctness, properties = result["correctness"], result["properties"]
    assert {(r["case"], r["dtype"]) for r in correctness} >= {
        (case, dtype) for case in ("sdxl-b1", "sdxl-b2", "sdxl-b8", "sd3-b2", "video-BFCHW", "video-BCFHW")
        for dtype in ("float32", "float16", "bfloat16")}
    assert all(r["ok"] for r in correctness + properties)
    assert {r["property"] for r in properties} == {"equal scales are CFG", "zero delta gives u exactly",
                                                   "a NaN poisons only its own sample"}
    assert {(r["case"], r["dtype"]) for r in result["timing"]} == {
        ("sdxl-b2", "float16"), ("sdxl-b8", "float16"), ("sd3-b2", "bfloat16"), ("video-BFCHW", "float16"),
        ("sdxl-b2", "float32")}


@pytest.mark.slow
def test_sdxl_e2e_dry_run_and_samg_cfg_equals_diffusers(tmp_path):
    """The tiny SDXL through both paths: samg's CFG loop ends on diffusers' own latents."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    result = _dry_run("sdxl_e2e.py", tmp_path)
    assert result["status"] == "PASS", result["reason"]
    assert set(result["step"]["rows"]) == {"samg eager", "cfg eager", "cfg-raw eager"}
    assert set(result["e2e"]["rows"]) == {"diffusers eager (CFG)", "samg eager (SAMG)"}
    assert result["e2e"]["notes"]["samg graph (SAMG)"].startswith("SKIP: CPU dry run")
    assert "diffusers eager (CFG) / samg eager (SAMG)" in result["e2e"]["ratios"]
    # float32 on the CPU: the same Euler steps and CFG in float32 arithmetic
    assert result["cfg_latents_vs_diffusers_max_rel_diff"] < 1e-4
