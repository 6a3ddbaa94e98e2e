"""The C++ runtime (samg-run) against the Python runtime on a tiny SD 1.5 export.

Same conditioning (.npy from the Python text encoder), same seeded noise, same sampler: the final
latents agree to LATENT_RTOL of their scale. The two differ only in float rounding order (the
Python samplers mix float32 arrays and float64 scalars), amplified a little over the steps.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest


# Two tiny exports take ~45 s to build on 2 cores, hence slow.
pytestmark = [pytest.mark.native, pytest.mark.slow]

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
pytest.importorskip("diffusers")

STEPS = 3
LATENT_RTOL = 1e-4  # of max |latent|


@pytest.fixture(scope="module")
def exports(tiny_export):
    return {g: tiny_export("sd15", g) for g in ("fused", "raw")}


@pytest.fixture(scope="module")
def inputs(exports, tmp_path_factory):
    from samg.runtime.pipeline import Pipeline

    folder = tmp_path_factory.mktemp("native-inputs")
    pipe = Pipeline.load(exports["fused"])
    cond = pipe.conditioning("a red cube on a table", "blurry", batch=1)
    for name, value in cond.items():
        np.save(folder / f"{name}.npy", value.astype(np.float32))
    noise = np.random.default_rng(3).standard_normal(pipe.latent_shape(2, 64, 64, None)).astype(np.float32)
    np.save(folder / "noise.npy", noise)
    return folder, cond, noise


def _python_latents(export_dir, cond, noise, sampler, w_min, w_max, rule):
    from samg.runtime.denoiser import Guidance
    from samg.runtime.pipeline import Pipeline

    pipe = Pipeline.load(export_dir)
    batched = {k: np.repeat(v, noise.shape[0], axis=0) for k, v in cond.items()}
    return pipe.sample(batched, noise, guidance=Guidance(rule, w_min, w_max), sampler=sampler, steps=STEPS)


def _cpp_latents(samg_run, export_dir, folder, tmp_path, *args):
    out = tmp_path / "latents.npy"
    image = tmp_path / "image.png"
    result = subprocess.run([samg_run, str(export_dir), "--cond", str(folder), "--noise", str(folder / "noise.npy"),
                             "--steps", str(STEPS), "--out-latents", str(out), "--out-image", str(image), *args],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return np.load(out), image


@pytest.mark.parametrize("export_kind,sampler,rule", [
    ("fused", "euler", "samg"), ("fused", "ddim", "cfg"), ("fused", "dpmpp_2m", "samg"), ("raw", "euler", "samg"),
])
def test_cpp_runtime_matches_python_runtime(samg_run, exports, inputs, tmp_path, export_kind, sampler, rule):
    folder, cond, noise = inputs
    w_min, w_max = (3.0, 6.0) if rule == "samg" else (5.0, 5.0)
    expected = _python_latents(exports[export_kind], cond, noise, sampler, w_min, w_max, rule)
    actual, image = _cpp_latents(samg_run, exports[export_kind], folder, tmp_path, "--sampler", sampler,
                                 "--guidance", rule, "--w-min", str(w_min), "--w-max", str(w_max))
    assert actual.shape == expected.shape == noise.shape
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=0, atol=LATENT_RTOL * scale)
    # Two images (batch 2) decoded to PNG files of the export's size.
    from PIL import Image

    for n in range(2):
        with Image.open(image.with_name(f"image-{n}.png")) as png:
            assert png.size == (64, 64) and png.mode == "RGB"


def test_cpp_runtime_samg_differs_from_cfg(samg_run, exports, inputs, tmp_path):
    folder, _, _ = inputs
    samg_latents, _ = _cpp_latents(samg_run, exports["fused"], folder, tmp_path, "--w-min", "2", "--w-max", "8")
    cfg_latents, _ = _cpp_latents(samg_run, exports["fused"], folder, tmp_path, "--guidance", "cfg", "--scale", "8")
    assert not np.allclose(samg_latents, cfg_latents, atol=1e-4)


def test_cpp_runtime_errors_are_one_line(samg_run, exports, inputs, tmp_path):
    folder, _, _ = inputs
    result = subprocess.run([samg_run, str(exports["fused"]), "--cond", str(folder), "--noise",
                             str(folder / "noise.npy"), "--sampler", "heun", "--out-latents", str(tmp_path / "x.npy")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "unknown sampler 'heun'" in result.stderr
    result = subprocess.run([samg_run, str(tmp_path), "--cond", str(folder), "--noise", str(folder / "noise.npy"),
                             "--out-latents", str(tmp_path / "x.npy")], capture_output=True, text=True)
    assert result.returncode == 1 and "no samg.json" in result.stderr
