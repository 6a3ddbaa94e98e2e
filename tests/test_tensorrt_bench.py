"""`samg bench --backend tensorrt`: DIR's engines are required, the raw variant's are built like
DIR's. Building runs on the CPU (TensorRT-RTX builds ahead of time); running needs a GPU, so the
CLI run is followed up to the point where the engines are opened."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from samg.build.loader import available_flavours

pytestmark = pytest.mark.tensorrt
if not available_flavours():
    pytest.skip("TensorRT / TensorRT-RTX is not importable (pip install tensorrt-rtx-cu13)", allow_module_level=True)

from samg import bench  # noqa: E402
from samg.build.engine import BuildOptions, build_export  # noqa: E402
from samg.contract import read_export  # noqa: E402
from samg.errors import SamgError  # noqa: E402


@pytest.fixture(scope="module")
def fused_copy(tiny_export, tmp_path_factory):
    """A private copy of the tiny SD 1.5 fused export (the shared one is read-only) and its cache folder."""
    root = tmp_path_factory.mktemp("bench-trt")
    folder = root / "sd15"
    shutil.copytree(tiny_export("sd15"), folder)
    return folder, root / "cache"


def _bench(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "samg", "bench", *argv], capture_output=True, text=True,
                          timeout=600, env=env)


def test_bench_refuses_a_dir_without_engines_or_a_cpu_device(fused_copy):
    folder, _ = fused_copy
    if (folder / "engines").exists():
        pytest.skip("engines already built by another test in this module")
    result = _bench(str(folder), "--backend", "tensorrt", "--device", "cuda")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"samg bench: error: DIR {folder} has no TensorRT engine for text_encoder, denoiser, vae_decoder: run "
        f"`samg build {folder}` first (samg bench --backend tensorrt runs its engines)")
    result = _bench(str(folder), "--backend", "tensorrt")
    assert result.returncode == 2 and result.stderr.strip().endswith("--backend tensorrt runs on the GPU: add --device cuda")


def test_raw_engines_are_built_like_the_fused_ones(fused_copy, tmp_path):
    folder, cache = fused_copy
    fused = {r.component: r.record for r in build_export(folder, BuildOptions(cache_dir=cache, quiet=True))}
    export_info = read_export(folder)
    record = bench._engine_record(folder, "DIR")
    assert record == fused["denoiser"]
    raw_dir = bench._export_raw(folder, export_info, tmp_path)
    assert read_export(raw_dir).dtype == export_info.dtype and not read_export(raw_dir).fused
    raw = {r.component: r.record for r in bench.build_raw_engines(raw_dir, export_info, record)}
    assert set(raw) == set(fused)
    for component, made in raw.items():
        assert (made.trt_flavour, made.trt_version, made.precision) == (
            fused[component].trt_flavour, fused[component].trt_version, fused[component].precision)
    # the raw denoiser has no guidance_scales and no combine; every shared input has DIR's profile
    assert raw["denoiser"].combine == "none" and "guidance_scales" not in raw["denoiser"].profiles
    shared = {name: p for name, p in fused["denoiser"].profiles.items() if name != "guidance_scales"}
    assert raw["denoiser"].profiles == shared
    for component in ("text_encoder", "vae_decoder"):
        assert raw[component].profiles == fused[component].profiles


@pytest.mark.slow
def test_cli_builds_the_raw_engines_then_stops_where_a_gpu_is_needed(fused_copy):
    folder, cache = fused_copy
    build_export(folder, BuildOptions(cache_dir=cache, quiet=True))
    env = {**os.environ, "SAMG_CACHE_DIR": str(cache.parent / "samg-cache")}
    result = _bench(str(folder), "--backend", "tensorrt", "--device", "cuda", "--no-diffusers", "--reps", "1",
                    "--steps", "1", env=env)
    if result.returncode == 0:
        pytest.skip("a GPU, TensorRT and CuPy are all here: the bench ran (tests/test_tensorrt_gpu.py covers it)")
    assert "building the raw variant's TensorRT engines like DIR's" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and last.startswith("samg bench: error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_engine_record_check_names_the_flag(tmp_path):
    with pytest.raises(SamgError, match=r"--raw .* has no TensorRT engine for text_encoder, denoiser, vae_decoder"):
        bench._engine_record(tmp_path, "--raw")
