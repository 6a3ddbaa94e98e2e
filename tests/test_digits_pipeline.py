"""The bundled samg-digits model loads with diffusers' own StableDiffusionPipeline and generates."""

import json

import numpy as np
import pytest

from samg.bundled import SAMG_DIGITS_DIR
from samg.bundled import data as digits_data

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def pipe():
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(SAMG_DIGITS_DIR)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_generates_default_size_images(pipe):
    import torch

    out = pipe(
        ["a handwritten 7", "the digit three"], num_inference_steps=2, guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).images
    assert out.shape == (2, digits_data.IMAGE_SIZE, digits_data.IMAGE_SIZE, 3)
    assert np.isfinite(out).all() and 0.0 <= out.min() and out.max() <= 1.0
    assert not np.allclose(out[0], out[1])  # the prompt reaches the image


def test_pipeline_facts_the_export_relies_on(pipe):
    assert pipe.vae_scale_factor == 2
    assert pipe.unet.config.sample_size == 8 and pipe.unet.config.in_channels == 4
    assert pipe.scheduler.__class__.__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.tokenizer.model_max_length == 8 and pipe.tokenizer.pad_token_id == 0
    ids = pipe.tokenizer(["a bold 7", ""], padding="max_length", max_length=8).input_ids
    bos, eos = pipe.tokenizer.bos_token_id, pipe.tokenizer.eos_token_id
    assert ids[1] == [bos, eos] + [0] * 6
    assert ids[0][0] == bos and ids[0][4] == eos and pipe.tokenizer.unk_token_id not in ids[0]
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on the trained VAE, not SD's


def test_folder_is_small_and_records_its_split():
    sizes = sum(p.stat().st_size for p in SAMG_DIGITS_DIR.rglob("*") if p.is_file())
    assert sizes < 10 * 2**20
    index = json.loads((SAMG_DIGITS_DIR / "model_index.json").read_text())
    assert index["tokenizer"] == ["transformers", "PreTrainedTokenizerFast"]
    assert index["safety_checker"] == [None, None]
    training = json.loads((SAMG_DIGITS_DIR / "training.json").read_text())
    split = digits_data.load_split()
    assert training["split"]["test_indices"] == split.test_indices.tolist()
    assert (SAMG_DIGITS_DIR / "README.md").exists()
