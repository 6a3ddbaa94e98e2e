"""The bundled samg-shapes model: diffusers' own StableDiffusionPipeline loads and runs it, samg's
export + ONNX Runtime sampler agree with that pipeline from the same initial latents, and CFG samples
reach the rates the model card states under the exact rule-based scorer (samg.bundled.shapes), with
a margin for the small sample."""

import numpy as np
import pytest

from samg.bundled import SAMG_SHAPES_DIR
from samg.bundled import shapes as S

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")
import samg.bundled.positional_unet  # noqa: E402,F401  (the UNet class model_index.json names)

if not (SAMG_SHAPES_DIR / "model_index.json").is_file():
    pytest.skip("the bundled samg-shapes model is missing: python scripts/train_shapes.py", allow_module_level=True)

PROMPT, NEGATIVE, SCALE, STEPS = "a red circle at the top left", "", 5.0, 8
LATENT_ATOL = 2e-4  # ORT vs torch differ by ~1e-6 per denoiser call on these models
# Rate check: 24 held-out one-object prompts, CFG 3, 20 Euler steps on the exported model. The card's
# figures at CFG 3 (eval.json, 100 prompts, diffusers' pipeline): colour and position 100%, count 97%,
# whole prompts 95% (97% at the best scale, CFG 2). The thresholds leave margin for 24 prompts: at a
# true 95%, 17 or fewer of 24 correct happens with probability < 0.1%; the draw is seeded. They fail
# for the first bundled model (positions at chance, 12% correct).
RATE_PROMPTS, RATE_SCALE, RATE_STEPS = 24, 3.0, 20
# Minimum counts out of RATE_PROMPTS (integers: no float comparison at the boundary).
MIN_COLOUR, MIN_POSITION, MIN_COUNT, MIN_CORRECT = 21, 21, 21, 18


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(SAMG_SHAPES_DIR))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from samg.export.exporter import ExportOptions, export

    out = tmp_path_factory.mktemp("shapes-export") / "samg-shapes"
    return export(ExportOptions(model="shapes", out=str(out), validate=False, quiet=True))


def test_diffusers_pipeline_loads_and_generates(reference):
    assert reference.vae_scale_factor == 2
    assert reference.unet.config.sample_size == S.IMAGE_SIZE // 2 and reference.unet.config.in_channels == 4
    assert reference.scheduler.__class__.__name__ == "EulerDiscreteScheduler"
    tok = reference.tokenizer
    longest = "a magenta triangle at the bottom right and a yellow square at the top left"
    ids = tok(longest, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert tok.unk_token_id not in ids and ids.count(tok.eos_token_id) == 1  # fits, not truncated
    images = reference([PROMPT, "a blue square at the bottom right"], num_inference_steps=2, guidance_scale=3.0,
                       generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, S.IMAGE_SIZE, S.IMAGE_SIZE, 3)
    assert np.isfinite(images).all() and not np.allclose(images[0], images[1])


def test_export_and_runtime_match_diffusers(export_dir, reference):
    from samg.runtime.pipeline import Pipeline

    pipe = Pipeline.load(export_dir)
    size, _, _ = pipe.validate_size(None, None, None)  # the export's own image size
    assert size == S.IMAGE_SIZE
    noise = np.random.default_rng(3).standard_normal(pipe.latent_shape(2, size, size, None)).astype(np.float32)
    with torch.no_grad():
        expected = reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=SCALE,
                             num_images_per_prompt=2, latents=torch.from_numpy(noise), output_type="latent",
                             height=size, width=size).images.numpy()
    got = pipe(PROMPT, NEGATIVE, guidance="cfg", scale=SCALE, steps=STEPS, sampler="euler", num_images=2,
               latents=noise, output="latents")
    np.testing.assert_allclose(got, expected, atol=LATENT_ATOL, rtol=0)
    # The comparison can fail: SAMG from the same noise lands far outside the tolerance.
    samg = pipe(PROMPT, NEGATIVE, guidance="samg", w_min=2.0, w_max=8.0, steps=STEPS, sampler="euler",
                num_images=2, latents=noise, output="latents")
    assert np.abs(samg - expected).max() > 50 * LATENT_ATOL


def test_cfg_samples_score_the_stated_rates(export_dir):
    from samg.runtime.pipeline import Pipeline

    pipe = Pipeline.load(export_dir)
    rng = np.random.default_rng(2024)  # held out: training scenes come from other seeds
    prompts = [S.prompt_for(S.random_scene(rng, 1).objects) for _ in range(RATE_PROMPTS)]
    scores = []
    for i, prompt in enumerate(prompts):
        (image,) = pipe(prompt, "", guidance="cfg", scale=RATE_SCALE, steps=RATE_STEPS, sampler="euler", seed=i)
        scores.append(S.score(image, prompt))
    colour = sum(bool(s.attribute_ok("colour")) for s in scores)
    position = sum(bool(s.attribute_ok("position")) for s in scores)
    count = sum(s.count_ok for s in scores)
    correct = sum(s.correct for s in scores)
    assert colour >= MIN_COLOUR and position >= MIN_POSITION and count >= MIN_COUNT, (colour, position, count)
    assert correct >= MIN_CORRECT, (correct, RATE_PROMPTS)
