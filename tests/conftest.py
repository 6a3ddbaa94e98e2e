"""Shared pytest fixtures.

`tiny_export` (session scope): a function `tiny_export(name, guidance="fused", **options)` that
runs `samg export --tiny` for model `name` (a samg.models.specs name: sd15, sd21, sdxl,
sd35-medium, cogvideox, modelscope-t2v, digits) once per test session and returns the export
folder (pathlib.Path). Same arguments -> same cached folder, so every test file can reuse one
export. The folder holds samg.json, denoiser.onnx, text_encoder.onnx, vae_decoder.onnx,
tokenizer*/tokenizer.json and source/ (the tiny diffusers pipeline, loadable with
`<PipelineClass>.from_pretrained(folder / "source")`). Exports are validated (ONNX Runtime vs
torch) unless you pass validate=False. Treat the folders as read-only: they are shared.

Example:
    def test_something(tiny_export):
        folder = tiny_export("sd15", "raw")

`digits_export` (session scope): the bundled samg-digits model exported once (fused, not
validated: validation is the export tests' job). `samg_run` (session scope): the path of the C++
runtime, built on first use (skips with the build command when cmake/c++ are missing).
`run_training_smoke`: a function `run_training_smoke(script, out)` that runs a training script's
`--smoke` mode into `out` in a subprocess and asserts it finished ("done", exit 0).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Tests never download: a test that expects a hub load to fail must fail the same way on a machine
# with network access. Set before huggingface_hub is imported (it reads the variable at import),
# and inherited by the subprocesses tests start.
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("onnxruntime")
    from samg.export.exporter import ExportOptions, export

    root = tmp_path_factory.mktemp("tiny-exports")
    cache = {}

    def make(name: str, guidance: str = "fused", **options):
        key = (name, guidance, tuple(sorted(options.items())))
        if key not in cache:
            suffix = "-".join(f"{k}{v}" for k, v in sorted(options.items()))
            out = root / f"{name}-{guidance}{'-' + suffix if suffix else ''}"
            options.setdefault("quiet", True)
            cache[key] = export(ExportOptions(model=name, out=str(out), tiny=True, guidance=guidance, **options))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def digits_export(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("onnxruntime")
    from samg.bundled import SAMG_DIGITS_DIR
    from samg.export.exporter import ExportOptions, export

    if not (SAMG_DIGITS_DIR / "model_index.json").is_file():
        pytest.skip("the bundled samg-digits model is missing: python scripts/train_digits.py")
    out = tmp_path_factory.mktemp("digits-export") / "samg-digits"
    return export(ExportOptions(model="digits", out=str(out), validate=False, quiet=True))


@pytest.fixture
def run_training_smoke():
    def run(script, out) -> None:
        result = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "done" in result.stdout

    return run


@pytest.fixture(scope="session")
def samg_run() -> str:
    import samg.native

    if samg.native.missing_build_tools():
        pytest.skip(f"cmake/c++ missing: install them and run {samg.native.BUILD_COMMAND}")
    path = samg.native.runtime_executable(build_if_missing=True)
    assert path is not None
    return path
