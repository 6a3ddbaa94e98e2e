"""benchmarks/gpu/check.sh, the prepared GPU proof, on a machine without a GPU: it parses, runs, says
SKIP with the reason for every GPU stage, exits 0 and writes its JSON summary. Its Python stages run
their CPU dry runs (the same code on the CPU, nothing measured), so a change in the APIs they use
shows here and not first on a lent GPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    # the versions the results table cites (no GPU here: no driver or GPU name to record)
    versions = summary["versions"]
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    assert versions["numpy"] == __import__("numpy").__version__
    torch = pytest.importorskip("torch")
    assert versions["torch"] == torch.__version__.split("+")[0] or versions["torch"] == torch.__version__
    assert "torch_cuda" in versions
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


def _stage_module(name: str):
    sys.path.insert(0, str(GPU_DIR))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(GPU_DIR))


def test_pytest_stage_runs_every_file_with_gpu_tests_and_the_nvrtc_tests():
    """Stage 1 names its files instead of collecting the whole suite: every test file that marks a
    test gpu must be among them (a new one would otherwise never run on the GPU)."""
    pytest_gpu = _stage_module("pytest_gpu")
    tests = GPU_DIR.parents[1] / "tests"
    marks_gpu = re.compile(r"^\s*(@pytest\.mark\.gpu\b|pytestmark\s*=.*\bpytest\.mark\.gpu\b)", re.MULTILINE)
    marked = {f"tests/{f.name}" for f in tests.glob("test_*.py") if marks_gpu.search(f.read_text())}
    assert set(pytest_gpu.GPU_TEST_FILES) == marked
    assert all((GPU_DIR.parents[1] / f).is_file() for f in pytest_gpu.NVRTC_TEST_FILES)
    assert pytest_gpu.RUNS["gpu"][:2] == ["-m", "gpu"]
    assert pytest_gpu.combined_returncode([0, 0]) == 0
    assert pytest_gpu.combined_returncode([0, 5]) == 0  # one run found nothing to run
    assert pytest_gpu.combined_returncode([5, 5]) == 5
    assert pytest_gpu.combined_returncode([1, 0]) == 1
    assert pytest_gpu.combined_returncode([0, "timeout"]) == "timeout"


def test_sdxl_e2e_verdict_fails_on_results_off_their_tolerances():
    """A fast graph replay that is wrong, or a samg loop that drifted from diffusers, is a FAIL that
    names the numbers, whatever the speed."""
    sdxl_e2e = _stage_module("sdxl_e2e")
    timed = {"ratio": 1.6, "iqr": [1.5, 1.7], "reps": 3, "resolved": True}

    def result(graph_diff, cfg_diff):
        e2e = {"rows": {"samg graph (SAMG)": {}}, "ratios": {"diffusers eager (CFG) / samg graph (SAMG)": timed},
               "notes": {}, "errors": {}}
        if graph_diff is not None:
            e2e["graph_vs_eager_max_rel_diff"] = graph_diff
        out = {"e2e": e2e, "step": {"ratios": {}, "errors": {}}}
        if cfg_diff is not None:
            out["cfg_latents_vs_diffusers_max_rel_diff"] = cfg_diff
        return out

    status, reason = sdxl_e2e.verdict(result(2e-3, 5e-3))
    assert status == "PASS" and "graph vs eager latents max rel diff 0.002 (<= 0.01)" in reason
    status, reason = sdxl_e2e.verdict(result(0.3, 5e-3))
    assert status == "FAIL" and reason.startswith("results off: graph vs eager latents max rel diff 0.3 (above 0.01)")
    status, reason = sdxl_e2e.verdict(result(2e-3, 0.08))
    assert status == "FAIL" and "samg CFG vs diffusers latents max rel diff 0.08 (above 0.02)" in reason
    status, reason = sdxl_e2e.verdict(result(float("nan"), 5e-3))
    assert status == "FAIL" and "graph vs eager latents max rel diff nan (above 0.01)" in reason
    status, reason = sdxl_e2e.verdict(result(None, 5e-3))  # the graph row ran, its comparison did not
    assert status == "FAIL" and "graph vs eager latents: not checked" in reason
    status, reason = sdxl_e2e.verdict(result(2e-3, None))
    assert status == "FAIL" and "samg CFG vs diffusers latents: not checked" in reason


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
        ("sdxl-b2", "float32"), ("sd3-2048-b16", "float32"), ("sd3-2048-b16", "float16")}
    # on the GPU the bandwidth case moves far more than an L2 cache holds (the dry run times batch 1)
    kernel_check = _stage_module("kernel_check")
    (shape, _), = kernel_check.BEYOND_L2.values()
    assert 3 * 4 * int(np.prod(shape)) > 100e6  # u, c and out in float32, bytes
    assert all(r["beyond_l2"] == (r["case"] == "sd3-2048-b16") for r in result["timing"])


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
    assert result["correctness"]["off"] == []
    assert result["unet_probe"]["conv_out_scaled_by"] == 1.0  # the tiny UNet's output is moderate already
