"""scripts/train_digits.py: the tokenizer it builds, and its smoke mode end to end."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_digits.py"


def load_script():
    spec = importlib.util.spec_from_file_location("train_digits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tokenizer_knows_every_training_word():
    pytest.importorskip("transformers")
    import numpy as np

    from samg.bundled import data as digits_data

    train = load_script()
    tokenizer = train.build_tokenizer()
    rng = np.random.default_rng(0)
    for digit in range(10):
        for style in ("", "thin", "bold"):
            prompt = digits_data.prompt_for(digit, style, rng)
            ids = tokenizer(prompt, padding="max_length", max_length=train.MAX_TOKENS, truncation=True).input_ids
            assert tokenizer.unk_token_id not in ids, prompt
            assert ids[-1] in (tokenizer.pad_token_id, tokenizer.eos_token_id)
    # Casing and unknown words: normalised and mapped to <unk>, never an error.
    assert tokenizer("A Bold 7").input_ids == tokenizer("a bold 7").input_ids
    assert tokenizer.unk_token_id in tokenizer("a purple 7").input_ids


@pytest.mark.slow
def test_smoke_mode_trains_saves_and_reloads(tmp_path, run_training_smoke):
    pytest.importorskip("diffusers")
    out = tmp_path / "digits"
    run_training_smoke(SCRIPT, out)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out)
    image = pipe("a 3", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3)
    training = json.loads((out / "training.json").read_text())
    assert training["unet_steps"] == 3 and training["vae_scaling_factor"] > 0
