"""End to end against diffusers for the families not covered by test_runtime_sd15/sdxl/digits.

Same initial latents; samg's runtime over the tiny ONNX export vs the family's own diffusers pipeline
on the tiny model saved in the export's source/ folder; plain CFG; final latents (output_type="latent").
Then the fused SAMG combine with unequal scales on both video layouts against the reference rule
(samg.guidance.samg_v1) applied to the raw export's two predictions for identical inputs.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

PROMPT, NEGATIVE, SCALE = "a red cube on a table", "blurry", 5.0
# ORT vs torch differ by ~1e-5 per denoiser call (export validation); a few steps stay well below this.
LATENT_ATOL = 2e-4


def _load(folder):
    from samg.runtime.pipeline import Pipeline

    return Pipeline.load(folder)


def _reference(folder, pipeline_class):
    pipe = getattr(diffusers, pipeline_class).from_pretrained(str(folder / "source"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _size(pipe):
    lat = pipe.export.latent
    return lat.height, lat.width, (lat.frames if lat.frames else None)


def _noise(pipe, seed):
    height, width, frames = _size(pipe)
    return np.random.default_rng(seed).standard_normal(pipe.latent_shape(1, height, width, frames)).astype(np.float32)


def _diffusers_latents(ref, noise, steps, *, scheduler=None, frames=None, **kw):
    if scheduler is not None:
        ref.scheduler = getattr(diffusers, scheduler).from_config(ref.scheduler.config)
    if frames is not None:
        kw["num_frames"] = frames
    with torch.no_grad():
        out = ref(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=SCALE,
                  latents=torch.from_numpy(noise), output_type="latent", **kw)
    return (out.frames if hasattr(out, "frames") else out.images).numpy()


@pytest.fixture(scope="module")
def sd21(tiny_export):
    folder = tiny_export("sd21", "fused")
    return _load(folder), _reference(folder, "StableDiffusionPipeline")


@pytest.mark.parametrize("sampler,scheduler", [("euler", "EulerDiscreteScheduler"), ("ddim", "DDIMScheduler"),
                                               ("dpmpp_2m", "DPMSolverMultistepScheduler")])
def test_sd21_v_prediction_matches_diffusers(sd21, sampler, scheduler):
    pipe, ref = sd21
    assert pipe.prediction_type == "v_prediction" == ref.scheduler.config.prediction_type
    height, width, _ = _size(pipe)
    noise = _noise(pipe, 1)
    expected = _diffusers_latents(ref, noise, 3, scheduler=scheduler, height=height, width=width)
    got = pipe(PROMPT, NEGATIVE, guidance="cfg", scale=SCALE, steps=3, sampler=sampler, latents=noise,
               output="latents")
    np.testing.assert_allclose(got, expected, atol=LATENT_ATOL, rtol=0, err_msg=sampler)


def test_sd35_flow_matches_diffusers(tiny_export):
    folder = tiny_export("sd35-medium", "fused")
    pipe, ref = _load(folder), _reference(folder, "StableDiffusion3Pipeline")
    assert pipe.prediction_type == "flow"
    height, width, _ = _size(pipe)
    noise = _noise(pipe, 2)
    expected = _diffusers_latents(ref, noise, 4, height=height, width=width,
                                  max_sequence_length=pipe.export.text_encoder.tokenizers[2].max_length)
    got = pipe(PROMPT, NEGATIVE, guidance="cfg", scale=SCALE, steps=4, sampler="flow_euler", latents=noise,
               output="latents")
    np.testing.assert_allclose(got, expected, atol=LATENT_ATOL, rtol=0)


@pytest.mark.parametrize("steps", [4, 5])  # CogVideoXDDIMScheduler, trailing spacing, first sigma infinite
def test_cogvideox_ddim_matches_diffusers(tiny_export, steps):
    folder = tiny_export("cogvideox", "fused")
    pipe, ref = _load(folder), _reference(folder, "CogVideoXPipeline")
    assert type(ref.scheduler).__name__ == "CogVideoXDDIMScheduler" and ref.scheduler.alphas_cumprod[-1] == 0
    height, width, frames = _size(pipe)
    noise = _noise(pipe, 3)
    expected = _diffusers_latents(ref, noise, steps, height=height, width=width, frames=frames)
    got = pipe(PROMPT, NEGATIVE, guidance="cfg", scale=SCALE, steps=steps, sampler="ddim", latents=noise,
               output="latents")
    assert got.shape == expected.shape == noise.shape  # [B, F, C, H, W]
    np.testing.assert_allclose(got, expected, atol=LATENT_ATOL, rtol=0)


def test_modelscope_ddim_matches_diffusers(tiny_export):
    folder = tiny_export("modelscope-t2v", "fused")
    pipe, ref = _load(folder), _reference(folder, "TextToVideoSDPipeline")
    height, width, frames = _size(pipe)
    noise = _noise(pipe, 4)
    expected = _diffusers_latents(ref, noise, 3, scheduler="DDIMScheduler", height=height, width=width,
                                  frames=frames)
    got = pipe(PROMPT, NEGATIVE, guidance="cfg", scale=SCALE, steps=3, sampler="ddim", latents=noise,
               output="latents")
    assert got.shape == expected.shape == noise.shape  # [B, C, F, H, W]
    np.testing.assert_allclose(got, expected, atol=LATENT_ATOL, rtol=0)


@pytest.mark.parametrize("model,channel_axis", [("cogvideox", 2), ("modelscope-t2v", 1)])
def test_fused_samg_with_unequal_scales_on_video_layouts(tiny_export, model, channel_axis):
    """The fused graph's guided output for (w_min, w_max) = (2, 9) equals samg_v1 of the raw export's
    two predictions on identical inputs, with the channel axis of the layout ([B,F,C,H,W] -> 2)."""
    from samg.guidance import samg_v1

    fused, raw = _load(tiny_export(model, "fused")), _load(tiny_export(model, "raw"))
    combine = fused.export.combine
    assert combine.channel_axis == channel_axis
    rng = np.random.default_rng(5)
    noise = _noise(fused, 5)
    batch = 2
    feeds = {"latents": rng.standard_normal((batch, *noise.shape[1:])).astype(np.float32),
             "timestep": np.array([700.0, 300.0], np.float32),
             **fused.conditioning(PROMPT, NEGATIVE, batch)}
    w_min, w_max = 2.0, 9.0
    guided = fused.runners["denoiser"].run({**feeds, "guidance_scales": np.array([[w_min, w_max]] * batch,
                                                                                 np.float32)})["guided"]
    outs = raw.runners["denoiser"].run(feeds)
    u, c = outs["pred_uncond"], outs["pred_cond"]
    attrs = {k: getattr(combine, k) for k in ("tau", "sharpness", "smooth")}
    expected = samg_v1(u, c, w_min, w_max, channel_axis=channel_axis, **attrs)
    norm = max(1.0, float(np.abs(expected).max()))
    assert np.abs(guided - expected).max() / norm < 1e-4
    # not trivially CFG: the mid scale differs, and so does the rule on the wrong channel axis
    cfg_mid = u + 0.5 * (w_min + w_max) * (c - u)
    assert np.abs(guided - cfg_mid).max() / norm > 1e-2
    wrong_axis = samg_v1(u, c, w_min, w_max, channel_axis=3 - channel_axis, **attrs)
    assert np.abs(guided - wrong_axis).max() / norm > 1e-3
