"""The C++ runtime (samg-run) against the Python runtime on the bundled real model, samg-digits.

Same inputs end to end: the conditioning comes from `samg encode` (Python text encoder, written as
.npy), both sides start from the same seeded standard normal noise, and the Python side runs the
public `Pipeline.__call__(..., latents=noise, output="latents")`. Final latents agree to
LATENT_RTOL of their largest magnitude (measured: ~1e-6; the two differ only in float rounding
order), and the decoded PNGs to within PIXEL_TOLERANCE levels of 255.
"""

from __future__ import annotations

import argparse
import json
import subprocess

import numpy as np
import pytest


pytestmark = pytest.mark.native

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
pytest.importorskip("diffusers")

PROMPT, NEGATIVE = "a handwritten 7", ""
STEPS = 8
BATCH = 2
LATENT_RTOL = 1e-4  # of max |latent|
PIXEL_TOLERANCE = 1  # levels of 255: rounding at a .5 boundary may differ
SCALES = {"samg": (2.0, 5.0), "cfg": (4.0, 4.0)}


@pytest.fixture(scope="module")
def pipeline(digits_export):
    from samg.runtime.pipeline import Pipeline

    return Pipeline.load(digits_export)


@pytest.fixture(scope="module")
def inputs(digits_export, pipeline, tmp_path_factory):
    from samg.runtime import encode_cli

    folder = tmp_path_factory.mktemp("native-digits-inputs")
    encode_cli.run(argparse.Namespace(export_dir=str(digits_export), prompt=PROMPT, negative_prompt=NEGATIVE,
                                      backend="onnxruntime", out=str(folder)))
    shape = pipeline.latent_shape(BATCH, 16, 16, None)
    noise = np.random.default_rng(7).standard_normal(shape, dtype=np.float32)
    np.save(folder / "noise.npy", noise)
    return folder, noise


def _cpp(samg_run, export_dir, folder, out_dir, rule, sampler):
    w_min, w_max = SCALES[rule]
    result = subprocess.run(
        [samg_run, str(export_dir), "--cond", str(folder), "--noise", str(folder / "noise.npy"), "--steps", str(STEPS),
         "--sampler", sampler, "--guidance", rule, "--w-min", str(w_min), "--w-max", str(w_max), "--timing",
         "--out-latents", str(out_dir / "latents.npy"), "--out-image", str(out_dir / "image.png")],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return np.load(out_dir / "latents.npy"), json.loads(result.stdout)


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize("rule", ["samg", "cfg"])
def test_cpp_matches_python_on_samg_digits(samg_run, digits_export, pipeline, inputs, tmp_path, rule, sampler):
    from PIL import Image

    folder, noise = inputs
    w_min, w_max = SCALES[rule]
    expected = pipeline(PROMPT, NEGATIVE, guidance=rule, w_min=w_min, w_max=w_max, steps=STEPS, sampler=sampler,
                        num_images=BATCH, latents=noise, output="latents")
    actual, timing = _cpp(samg_run, digits_export, folder, tmp_path, rule, sampler)

    assert actual.shape == expected.shape == (BATCH, 4, 8, 8)
    scale = float(np.abs(expected).max())
    assert scale > 0.1  # a real sample, not a collapsed one
    np.testing.assert_allclose(actual, expected, rtol=0, atol=LATENT_RTOL * scale)
    # The tolerance tells guidance settings apart: another scale lands far outside it.
    other = pipeline(PROMPT, NEGATIVE, guidance=rule, w_min=w_min + 1, w_max=w_max + 1, steps=STEPS, sampler=sampler,
                     num_images=BATCH, latents=noise, output="latents")
    assert np.abs(actual - other).max() > 100 * LATENT_RTOL * scale

    expected_images = pipeline.decode(expected)
    for n in range(BATCH):
        with Image.open(tmp_path / f"image-{n}.png") as png:
            assert png.size == (16, 16) and png.mode == "RGB"
            pixels = np.asarray(png).astype(np.int16)
        assert np.abs(pixels - expected_images[n].astype(np.int16)).max() <= PIXEL_TOLERANCE
        assert pixels.std() > 10  # a digit on a background, not a flat image

    (run,) = timing["runs"]
    assert run["denoiser_calls"] == STEPS and 0 < run["denoiser_run_s"] <= run["loop_s"]

