"""samg's runtime on a tiny SDXL export against diffusers' StableDiffusionXLPipeline: two text
encoders, pooled embeddings, in-graph time ids and zeroed negative conditioning for an empty
negative prompt all have to line up for the latents to agree."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPT, STEPS, SCALE, SIZE = "a red cube on a table", 3, 5.0, 64
LATENT_ATOL = 2e-4  # ORT vs torch differ by ~1e-5 per denoiser call


@pytest.fixture(scope="module")
def export_dir(tiny_export):
    return tiny_export("sdxl", "fused")


@pytest.fixture(scope="module")
def reference(export_dir):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(export_dir / "source"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("negative", ["", "blurry"])
def test_cfg_matches_diffusers_sdxl(export_dir, reference, negative):
    from samg.runtime.pipeline import Pipeline

    pipe = Pipeline.load(export_dir)
    assert pipe.export.text_encoder.force_zeros_for_empty_prompt is True
    noise = np.random.default_rng(0).standard_normal(pipe.latent_shape(1, SIZE, SIZE, None)).astype(np.float32)
    with torch.no_grad():
        expected = reference(PROMPT, negative_prompt=negative or None, num_inference_steps=STEPS,
                             guidance_scale=SCALE, latents=torch.from_numpy(noise), output_type="latent",
                             height=SIZE, width=SIZE).images.numpy()
    got = pipe(PROMPT, negative, guidance="cfg", scale=SCALE, steps=STEPS, sampler="euler", latents=noise,
               output="latents")
    np.testing.assert_allclose(got, expected, atol=LATENT_ATOL, rtol=0)
