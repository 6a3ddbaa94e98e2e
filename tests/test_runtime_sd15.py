"""End to end on a tiny SD 1.5 export (fused and raw): samg's runtime in CFG mode against diffusers'
own StableDiffusionPipeline from the export's source/ folder, SAMG mode against the reference math,
the null runner, and bad-input errors."""

import numpy as np
import pytest

from samg.errors import SamgError

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPT, NEGATIVE = "a red cube on a table", "blurry"
STEPS, SCALE = 3, 5.0
# ORT vs torch differ by ~1e-5 per denoiser call (export validation); a few steps stay well below this.
LATENT_ATOL = 2e-4


@pytest.fixture(scope="module")
def exports(tiny_export):
    return {"fused": tiny_export("sd15", "fused"), "raw": tiny_export("sd15", "raw")}


@pytest.fixture(scope="module")
def pipes(exports):
    from samg.runtime.pipeline import Pipeline

    return {k: Pipeline.load(v) for k, v in exports.items()}


@pytest.fixture(scope="module")
def reference(exports):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        str(exports["fused"] / "source"), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _noise(pipe, seed=3):
    return np.random.default_rng(seed).standard_normal(pipe.latent_shape(1, 64, 64, None)).astype(np.float32)


def _diffusers_latents(ref, scheduler_cls, noise):
    ref.scheduler = scheduler_cls.from_config(ref.scheduler.config)
    with torch.no_grad():
        out = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=SCALE,
                  latents=torch.from_numpy(noise), output_type="latent", height=64, width=64)
    return out.images.numpy()


@pytest.mark.parametrize("sampler,scheduler", [("euler", "EulerDiscreteScheduler"), ("ddim", "DDIMScheduler"),
                                               ("dpmpp_2m", "DPMSolverMultistepScheduler")])
def test_cfg_matches_diffusers_pipeline(pipes, reference, sampler, scheduler):
    noise = _noise(pipes["fused"])
    expected = _diffusers_latents(reference, getattr(diffusers, scheduler), noise)
    for kind in ("fused", "raw"):
        got = pipes[kind](PROMPT, NEGATIVE, guidance="cfg", scale=SCALE, steps=STEPS, sampler=sampler,
                          latents=noise, output="latents")
        np.testing.assert_allclose(got, expected, atol=LATENT_ATOL, err_msg=f"{kind} export, {sampler}")


def test_decoded_images_match_diffusers(pipes, reference):
    noise = _noise(pipes["fused"], seed=4)
    reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)
    with torch.no_grad():
        ref = reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=SCALE,
                        latents=torch.from_numpy(noise), output_type="np", height=64, width=64).images
    got = pipes["fused"](PROMPT, NEGATIVE, guidance="cfg", scale=SCALE, steps=STEPS, sampler="euler", latents=noise)
    assert got.dtype == np.uint8 and got.shape == ref.shape
    assert np.abs(got.astype(int) - (ref * 255).round().astype(int)).max() <= 1


def test_samg_step_is_samg_v1_of_the_two_predictions(pipes):
    """One Euler step to sigma 0 returns x0 = x - sigma * guided; guided must be samg_v1(u, c)
    of the raw export's predictions, and differ from CFG at the same scales."""
    from samg.guidance import samg_v1
    from samg.runtime import schedules

    fused, raw = pipes["fused"], pipes["raw"]
    noise = _noise(fused, seed=5)
    w_min, w_max = 2.0, 9.0
    got = fused(PROMPT, NEGATIVE, guidance="samg", w_min=w_min, w_max=w_max, steps=1, sampler="euler",
                latents=noise, output="latents")
    sched = schedules.make_schedule(fused.export.scheduler, "euler", 1)
    sigma, x = float(sched.sigmas[0]), noise * np.float32(sched.init_noise_sigma)
    feeds = {"latents": (x / np.sqrt(1 + sigma**2)).astype(np.float32),
             "timestep": np.full((1,), sched.timesteps[0], np.float32),
             **raw.conditioning(PROMPT, NEGATIVE, 1)}
    outs = raw.runners["denoiser"].run(feeds)
    u, c = outs["pred_uncond"], outs["pred_cond"]
    attrs = {k: getattr(fused.export.combine, k) for k in ("tau", "sharpness", "smooth", "channel_axis")}
    expected = x - sigma * samg_v1(u, c, w_min, w_max, **attrs)
    np.testing.assert_allclose(got, expected, atol=LATENT_ATOL * sigma)
    cfg_mid = x - sigma * (u + 0.5 * (w_min + w_max) * (c - u))
    assert np.abs(got - cfg_mid).max() > 100 * LATENT_ATOL * sigma  # SAMG is not a uniform scale
    host = raw(PROMPT, NEGATIVE, guidance="samg", w_min=w_min, w_max=w_max, steps=1, sampler="euler",
               latents=noise, output="latents")
    np.testing.assert_allclose(host, got, atol=LATENT_ATOL * sigma)  # raw + host rule == fused graph


def test_same_seed_same_image_and_batch(pipes):
    p = pipes["fused"]
    a = p(PROMPT, steps=2, seed=11, num_images=2)
    b = p(PROMPT, steps=2, seed=11, num_images=2)
    c = p(PROMPT, steps=2, seed=12, num_images=2)
    assert a.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_host_only_rules_run_on_raw_and_are_refused_on_fused(pipes):
    for rule, extra in [("apg", {}), ("cfgpp", {"scale": 0.6}), ("cfg-rescale", {}), ("cfg-zero-star", {})]:
        kw = {"scale": 4.0, **extra}
        img = pipes["raw"](PROMPT, guidance=rule, steps=2, sampler="euler", **kw)
        assert img.shape == (1, 64, 64, 3)
        with pytest.raises(SamgError, match="re-export with --guidance raw"):
            pipes["fused"](PROMPT, guidance=rule, steps=2, **kw)


def test_null_runner_runs_the_loop(exports):
    from samg.runtime.pipeline import Pipeline

    p = Pipeline.load(exports["fused"], backend="null")
    lat = p(PROMPT, steps=4, sampler="euler", guidance="cfg", scale=3.0, output="latents")
    # the null denoiser returns its input as the prediction (eps = x_t); the loop must stay finite
    assert lat.shape == (1, 4, 8, 8) and np.isfinite(lat).all()
    assert p(PROMPT, steps=2).shape == (1, 64, 64, 3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt=""), "prompt is required"),
    (dict(steps=0), "steps"),
    (dict(height=60), "--height must be a multiple of 16, got 60"),
    (dict(w_min=9.0, w_max=2.0), "above --w-max"),
    (dict(guidance="cfg", w_min=2.0, w_max=9.0), "takes one scale"),
    (dict(w_min=2.0), "both --w-min and --w-max"),
    (dict(frames=5), "video models only"),
    (dict(guidance="nope"), "unknown guidance"),
    (dict(sampler="flow_euler"), "flow-matching"),
    (dict(latents=np.zeros((1, 4, 4, 4), np.float32)), "latents have shape"),
])
def test_bad_input_is_a_one_line_samg_error(pipes, kwargs, match):
    kwargs = {"prompt": PROMPT, "steps": 2, **kwargs}
    with pytest.raises(SamgError, match=match) as info:
        pipes["fused"](kwargs.pop("prompt"), **kwargs)
    assert "\n" not in str(info.value)


def test_generate_cli_writes_png_atomically(exports, tmp_path):
    from samg.cli import main

    out = tmp_path / "img.png"
    assert main(["generate", str(exports["fused"]), "--prompt", PROMPT, "--steps", "2", "--num-images", "3",
                 "--quiet", "--out", str(out)]) == 0
    from PIL import Image

    assert Image.open(out).size == (128, 128)  # 3 images in a 2x2 grid
    assert [p.name for p in tmp_path.iterdir()] == ["img.png"]
    assert main(["generate", str(exports["fused"]), "--prompt", PROMPT, "--out", str(tmp_path / "a.gif")]) == 2


def test_encode_cli_writes_conditioning(exports, pipes, tmp_path):
    from samg.cli import main

    assert main(["encode", str(exports["fused"]), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
                 "--out", str(tmp_path)]) == 0
    ehs = np.load(tmp_path / "encoder_hidden_states.npy")
    np.testing.assert_array_equal(ehs, pipes["fused"].conditioning(PROMPT, NEGATIVE, 1)["encoder_hidden_states"])


def test_bench_prints_all_rows_and_ratios(exports, capsys):
    from samg.cli import main

    assert main(["bench", str(exports["fused"]), "--raw", str(exports["raw"]), "--no-diffusers", "--reps", "1",
                 "--steps", "2"]) == 0
    out = capsys.readouterr().out
    for row in ("fused SAMG graph", "raw graph + host CFG", "plain CFG", "null runner", "raw+host CFG / fused SAMG step"):
        assert row in out
    assert main(["bench", str(exports["raw"])]) == 2  # a raw export is not a valid DIR


def test_torch_reference_runner_matches_onnxruntime_in_samg_mode(exports, pipes):
    from samg.runtime.pipeline import Pipeline

    kw = dict(guidance="samg", w_min=2.0, w_max=8.0, steps=2, sampler="euler", output="latents", seed=7)
    ref = Pipeline.load(exports["fused"], backend="torch")(PROMPT, NEGATIVE, **kw)
    np.testing.assert_allclose(pipes["fused"](PROMPT, NEGATIVE, **kw), ref, atol=LATENT_ATOL)


def test_guidance_schedule_feeds_per_step_scales(pipes):
    """--schedule linear over 3 steps: gains 0, 1, 2, so the graph gets w = 1, W, 2W - 1 step by step."""
    from samg.runtime.denoiser import Guidance

    p, w = pipes["fused"], 5.0
    noise = _noise(p, seed=9)
    kw = dict(guidance="cfg", scale=w, steps=3, sampler="euler", latents=noise, output="latents")
    constant = p(PROMPT, NEGATIVE, **kw)
    assert np.array_equal(p(PROMPT, NEGATIVE, schedule="constant", **kw), constant)
    linear = p(PROMPT, NEGATIVE, schedule="linear", **kw)
    per_step = [(1.0, 1.0), (w, w), (2 * w - 1, 2 * w - 1)]
    by_hand = p.sample(p.conditioning(PROMPT, NEGATIVE, 1), noise, guidance=Guidance("cfg", w, w), sampler="euler",
                       steps=3, scale_schedule=lambda step, sigma: per_step[step])
    np.testing.assert_allclose(linear, by_hand, atol=1e-6)
    assert np.abs(linear - constant).max() > 1e-3
    with pytest.raises(SamgError, match="unknown guidance schedule"):
        p(PROMPT, NEGATIVE, schedule="wavy", **kw)
