"""scripts/train_shapes.py: its learning-rate schedule, argument checks, and smoke mode end to end."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_shapes.py"

pytest.importorskip("torch")
pytest.importorskip("diffusers")


def load_script():
    spec = importlib.util.spec_from_file_location("train_shapes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lr_schedule_warms_up_holds_then_cools_down():
    lr_factor = load_script().lr_factor
    # 6500 steps, last 30% cooling: the decay starts at step 4550 and reaches 0.1 at the end.
    assert lr_factor(0, 6500, 0.3) == pytest.approx(1 / 200)
    assert lr_factor(99, 6500, 0.3) == pytest.approx(100 / 200)
    assert lr_factor(199, 6500, 0.3) == 1.0
    assert lr_factor(4549, 6500, 0.3) == 1.0
    assert lr_factor(4550 + 975, 6500, 0.3) == pytest.approx(1 - 0.9 * 0.5)  # half way down
    assert lr_factor(6500, 6500, 0.3) == pytest.approx(0.1)
    assert lr_factor(5691, 6500, 0.3) == pytest.approx(1 - 0.9 * 1141 / 1950)  # where the bundled run stopped
    # No cool-down: constant after warm-up, whatever the step.
    assert lr_factor(10_000, 6500, 0.0) == 1.0
    # A short run whose cool-down starts inside the warm-up keeps the warm-up (the smaller factor wins).
    factors = [lr_factor(s, 100, 0.3) for s in range(100)]
    assert all(f <= (s + 1) / 200 + 1e-12 for s, f in enumerate(factors))
    assert factors[-1] == pytest.approx(min(100 / 200, 1 - 0.9 * 29 / 30))


@pytest.mark.parametrize("value", ["1.5", "-0.2", "1"])
def test_bad_cooldown_is_one_clear_line(value):
    result = subprocess.run([sys.executable, str(SCRIPT), "--lr-cooldown", value, "--smoke"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"--lr-cooldown {float(value)} is outside [0, 1)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_smoke_mode_trains_saves_and_reloads(tmp_path, run_training_smoke):
    out = tmp_path / "shapes"
    run_training_smoke(SCRIPT, out)
    import samg.bundled.positional_unet  # noqa: F401  (the UNet class model_index.json names)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out)
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)
    training = json.loads((out / "training.json").read_text())
    assert training["unet_steps"] == 3
    # Smoke runs 3 steps of warm-up: the factor reached is (2 + 1) / 200.
    assert training["final_lr_factor"] == pytest.approx(3 / 200, abs=1e-4)
    assert json.loads((out / "eval.json").read_text())["results"]
