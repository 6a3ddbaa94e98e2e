"""The C++ runtime's noise schedules against diffusers' schedulers, its SHA-256 against FIPS 180-4,
and samg-run on a tiny CogVideoX export (zero terminal SNR: first sigma infinite) against the
Python runtime.

`samg-schedule SCHEDULER.json SAMPLER STEPS` prints the C++ schedule for a samg.json `scheduler`
section; `samg-sha256 FILE` the hash samg-run checks exports with (both built with samg-run).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.native

# CogVideoX-2b's scheduler_config.json as samg export writes it (samg/models/specs.py).
COGVIDEOX_SCHEDULER = {
    "kind": "discrete", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "timestep_spacing": "trailing", "steps_offset": 0,
    "rescale_betas_zero_snr": True, "snr_shift_scale": 3.0, "set_alpha_to_one": True, "clip_sample": False,
}
# An SD 1.5-style scheduler (the bundled samg-digits model's).
SD_SCHEDULER = {
    "kind": "discrete", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "timestep_spacing": "leading", "steps_offset": 1,
}
DIFFUSERS_ONLY = ("kind",)


def _tool(samg_run, name):
    path = Path(samg_run).parent / name
    assert path.is_file(), f"{path} missing: bash scripts/build_native.sh"
    return str(path)


def _cpp_schedule(samg_run, tmp_path, scheduler, sampler, steps, *extra):
    config = tmp_path / "scheduler.json"
    config.write_text(json.dumps(scheduler))
    return subprocess.run([_tool(samg_run, "samg-schedule"), str(config), sampler, str(steps), *extra],
                          capture_output=True, text=True, timeout=60)


def _schedule(samg_run, tmp_path, scheduler, sampler, steps):
    result = _cpp_schedule(samg_run, tmp_path, scheduler, sampler, steps)
    assert result.returncode == 0, result.stderr
    return {k: np.asarray(v, np.float64) if isinstance(v, list) else v for k, v in json.loads(result.stdout).items()}


def _diffusers(cls, scheduler):
    import diffusers

    return getattr(diffusers, cls)(**{k: v for k, v in scheduler.items() if k not in DIFFUSERS_ONLY})


# -- SHA-256 -----------------------------------------------------------------------------------------

FIPS_180_4 = [  # (message, digest): the examples of FIPS 180-4 / its SHA-256 example document
    (b"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
    (b"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
    (b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
     "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"),
    (b"abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu",
     "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1"),
    (b"a" * 1_000_000, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"),
]


def test_sha256_gives_the_fips_180_4_digests(samg_run, tmp_path):
    files = []
    for i, (message, _) in enumerate(FIPS_180_4):
        files.append(tmp_path / f"m{i}")
        files[-1].write_bytes(message)
    result = subprocess.run([_tool(samg_run, "samg-sha256"), *map(str, files)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()] == [digest for _, digest in FIPS_180_4]


def test_sha256_at_block_boundaries_and_across_read_chunks(samg_run, tmp_path):
    """Padding edge cases (55/56/63/64/65 bytes) and a file larger than the 1 MiB read chunk, against hashlib."""
    data = np.random.default_rng(0).integers(0, 256, (1 << 20) + 77, dtype=np.uint8).tobytes()
    sizes = [1, 55, 56, 57, 63, 64, 65, 119, 120, 128, len(data)]
    files = []
    for size in sizes:
        files.append(tmp_path / f"s{size}")
        files[-1].write_bytes(data[:size])
    result = subprocess.run([_tool(samg_run, "samg-sha256"), *map(str, files)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()] == [hashlib.sha256(data[:n]).hexdigest() for n in sizes]


# -- CogVideoX's schedule against diffusers' CogVideoXDDIMScheduler ---------------------------------

def test_cogvideox_alphas_cumprod_match_diffusers(samg_run, tmp_path):
    pytest.importorskip("diffusers")
    cpp = _schedule(samg_run, tmp_path, COGVIDEOX_SCHEDULER, "ddim", 50)
    expected = _diffusers("CogVideoXDDIMScheduler", COGVIDEOX_SCHEDULER).alphas_cumprod.double().numpy()
    np.testing.assert_allclose(cpp["alphas_cumprod"], expected, rtol=1e-12, atol=1e-15)
    assert cpp["alphas_cumprod"][-1] == 0.0  # zero terminal SNR, exactly (not diffusers' other 2**-24 trick)
    assert np.all(np.diff(cpp["alphas_cumprod"]) < 0)


@pytest.mark.parametrize("steps", [4, 5, 50])
def test_cogvideox_ddim_timesteps_and_sigmas_match_diffusers(samg_run, tmp_path, steps):
    """DDIM's model timesteps are diffusers' set_timesteps(steps); sigma_i = sqrt((1 - a_t) / a_t) of
    diffusers' alphas_cumprod at them, infinite at t = 999, and the last step lands on t - 1000 // steps
    (alpha 1: sigma 0 when that is below 0). The starting noise is not scaled (sigma is infinite)."""
    pytest.importorskip("diffusers")
    reference = _diffusers("CogVideoXDDIMScheduler", COGVIDEOX_SCHEDULER)
    reference.set_timesteps(steps)
    ts = reference.timesteps.numpy().astype(np.int64)
    ac = reference.alphas_cumprod.double().numpy()
    prev = ts[-1] - 1000 // steps
    final = ac[prev] if prev >= 0 else 1.0
    with np.errstate(divide="ignore"):
        expected = np.sqrt((1 - np.append(ac[ts], final)) / np.append(ac[ts], final))
    cpp = _schedule(samg_run, tmp_path, COGVIDEOX_SCHEDULER, "ddim", steps)
    np.testing.assert_array_equal(cpp["timesteps"], ts)
    assert np.isinf(cpp["sigmas"][0]) and np.isinf(expected[0])
    np.testing.assert_allclose(cpp["sigmas"][1:], expected[1:], rtol=1e-12)
    assert cpp["init_noise_sigma"] == 1.0
    if steps == 4:  # the number: sigma at t = 749 is 9.50 (samg's old rescale-the-betas gave 5.40)
        assert ts[1] == 749 and abs(cpp["sigmas"][1] - 9.497) < 1e-3


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_cogvideox_schedule_for_the_other_samplers_starts_at_infinity(samg_run, tmp_path, sampler):
    """Euler and DPM++ 2M on trailing spacing take the same integer timesteps, so the same sigmas."""
    cpp = _schedule(samg_run, tmp_path, COGVIDEOX_SCHEDULER, sampler, 4)
    np.testing.assert_array_equal(cpp["timesteps"], [999, 749, 499, 249])
    ac = cpp["alphas_cumprod"]
    with np.errstate(divide="ignore"):
        expected = np.sqrt((1 - ac[[999, 749, 499, 249]]) / ac[[999, 749, 499, 249]])
    np.testing.assert_array_equal(cpp["sigmas"][:-1], expected)
    assert cpp["sigmas"][-1] == 0.0 and cpp["init_noise_sigma"] == 1.0


def test_karras_on_zero_terminal_snr_is_one_line(samg_run, tmp_path):
    result = _cpp_schedule(samg_run, tmp_path, COGVIDEOX_SCHEDULER, "euler", 4, "--karras")
    assert result.returncode == 2
    assert "largest is infinite (zero terminal SNR): drop --karras" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- the ordinary (float32) schedules against diffusers ----------------------------------------------

@pytest.mark.parametrize("sampler,cls", [("euler", "EulerDiscreteScheduler"), ("ddim", "DDIMScheduler"),
                                         ("dpmpp_2m", "DPMSolverMultistepScheduler")])
def test_sd_schedules_match_diffusers(samg_run, tmp_path, sampler, cls):
    pytest.importorskip("diffusers")
    steps = 20
    reference = _diffusers(cls, SD_SCHEDULER)
    reference.set_timesteps(steps)
    cpp = _schedule(samg_run, tmp_path, SD_SCHEDULER, sampler, steps)
    np.testing.assert_array_equal(cpp["timesteps"], reference.timesteps.numpy())
    # torch's float32 cumprod rounds differently from a running product (1-2 ulp over 1000 steps), and
    # small sigmas sqrt(1 - a) amplify that: hence the relative tolerances below
    np.testing.assert_allclose(cpp["alphas_cumprod"], reference.alphas_cumprod.numpy(), rtol=1e-5, atol=0)
    if sampler == "ddim":  # DDIM has no sigma table: sigma of alpha_bar at each timestep, then at the final step's target
        ac = reference.alphas_cumprod.double().numpy()
        prev = int(reference.timesteps[-1]) - 1000 // steps
        targets = np.append(ac[reference.timesteps.numpy()], ac[prev] if prev >= 0 else float(reference.final_alpha_cumprod))
        expected = np.sqrt((1 - targets) / targets)
        np.testing.assert_allclose(cpp["sigmas"], expected, rtol=1e-4)
    else:  # diffusers keeps its sigmas in float32
        np.testing.assert_allclose(cpp["sigmas"], reference.sigmas.numpy(), rtol=1e-4, atol=0)
        assert cpp["sigmas"][-1] == 0.0
    # samg's sampler variable is x_t sqrt(1 + sigma^2): unit noise scaled by diffusers' init_noise_sigma for
    # Euler (leading spacing: sqrt(sigma_max^2 + 1)), by sqrt(1 + sigma_0^2) where diffusers samples x_t (DDIM, DPM)
    start = float(reference.init_noise_sigma) if sampler == "euler" else float(np.sqrt(1 + cpp["sigmas"][0] ** 2))
    assert abs(cpp["init_noise_sigma"] - start) <= 1e-5 * start


# -- samg-run on a tiny CogVideoX export -------------------------------------------------------------

COG_STEPS = 4
# Of max |latent|. The tiny random model's guidance is weak (one unit of scale moves the latents by
# ~1e-3 of their size), so the tolerance is tighter than tests/test_native_digits.py's: ~15x the
# measured C++/Python difference (1.2e-6: float rounding order only).
COG_LATENT_RTOL = 2e-5


@pytest.fixture(scope="module")
def cogvideox(tiny_export, tmp_path_factory):
    import argparse

    from samg.runtime import encode_cli

    export = tiny_export("cogvideox", "fused")
    cond = tmp_path_factory.mktemp("cog-cond")
    encode_cli.run(argparse.Namespace(export_dir=str(export), prompt="a cat", negative_prompt="", backend="onnxruntime",
                                      out=str(cond)))
    return export, cond


@pytest.mark.slow  # the tiny CogVideoX export (shared with other tests) takes ~40 s on 2 cores
@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_samg_run_samples_cogvideox_as_the_python_runtime(samg_run, cogvideox, tmp_path, sampler):
    """Same seed, same --scale 6 (SAMG 3.5..6) and sampler: samg-run's final video latents [B, F, C, h, w]
    equal `samg generate`'s (Pipeline.__call__) within LATENT_RTOL; before, samg-run refused the export."""
    from samg.runtime.pipeline import Pipeline

    export, cond = cogvideox
    out = tmp_path / "latents.npy"
    result = subprocess.run([samg_run, str(export), "--cond", str(cond), "--seed", "3", "--steps", str(COG_STEPS),
                             "--sampler", sampler, "--scale", "6", "--out-latents", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    pipe = Pipeline.load(export)
    expected = pipe("a cat", "", guidance="samg", scale=6.0, steps=COG_STEPS, sampler=sampler, seed=3, output="latents")
    actual = np.load(out)
    assert actual.shape == expected.shape and actual.ndim == 5
    scale = float(np.abs(expected).max())
    assert scale > 0.1
    np.testing.assert_allclose(actual, expected, rtol=0, atol=COG_LATENT_RTOL * scale)
    other = pipe("a cat", "", guidance="samg", w_min=4.5, w_max=7.0, steps=COG_STEPS, sampler=sampler, seed=3,
                 output="latents")
    assert np.abs(actual - other).max() > 10 * COG_LATENT_RTOL * scale  # the tolerance tells scales apart
