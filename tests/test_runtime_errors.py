"""Bad input to the Python runtime and its CLIs: bounded before anything is allocated, one line
naming the flag (exit code 2) instead of a traceback, nothing written; and no silent wrong
results (interval x schedule, several prompts to `samg encode`, huge scales or model outputs).

The limits asserted here are the decided ones, written out: guidance scales in 0..100, steps up to
the model's num_train_timesteps, 64 images and 2**24 latent elements per call, sides up to 8192
pixels, 1024 frames, seeds in 0..2**64-1, video frame rates 1..120 (1..50 for GIF)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from samg.errors import SamgError

pytest.importorskip("onnxruntime")

PROMPT, NEGATIVE = "a red cube on a table", "blurry"
LONE_SURROGATE = "\udcff"  # what Python makes of the byte 0xff in a shell argument ($'\xff')


@pytest.fixture(scope="module")
def sd15(tiny_export):
    return tiny_export("sd15", "fused")


@pytest.fixture(scope="module")
def video(tiny_export):
    return tiny_export("modelscope-t2v", "fused")


@pytest.fixture(scope="module")
def pipe(sd15):
    from samg.runtime.pipeline import Pipeline

    return Pipeline.load(sd15)


def _unloaded(folder):
    """A pipeline with no models at all: any model work would fail with a KeyError, not a SamgError."""
    from samg.contract import read_export
    from samg.runtime.pipeline import Pipeline

    return Pipeline(folder, read_export(folder), {}, [])


def _one_line_error(call, *fragments, max_traced_bytes=16 << 20):
    """Run `call`, expect a one-line SamgError holding every fragment, with at most a few MiB allocated."""
    tracemalloc.start()
    try:
        with pytest.raises(SamgError) as info:
            call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert peak < max_traced_bytes, f"{peak} bytes allocated before the error"
    return message


# -------------------------------------------------------------------------- bounds (API, no models)

@pytest.mark.parametrize("kwargs,fragments", [
    (dict(height=100000), ("--height", "1..8192", "100000")),
    (dict(width=100000), ("--width", "1..8192")),
    (dict(height=-16), ("--height",)),
    (dict(steps=10**9), ("--steps", "1..1000", "1000000000")),
    (dict(steps=1001), ("--steps", "1..1000")),
    (dict(steps=0), ("--steps",)),
    (dict(num_images=100000), ("--num-images", "1..64")),
    (dict(num_images=0), ("--num-images",)),
    # 4096 px / 8 = 512: 4 x 512 x 512 = 2**20 latent elements per image, 2**24 per call fit 16
    (dict(height=4096, width=4096, num_images=64), ("--num-images 64", "--num-images 16 or less")),
    (dict(seed=-1), ("--seed", "0..18446744073709551615")),
    (dict(seed=2**64), ("--seed",)),
    (dict(sampler="nope"), ("unknown sampler 'nope'",)),
    (dict(output="png"), ("output must be one of",)),
    (dict(prompt=LONE_SURROGATE), ("--prompt is not valid UTF-8", "0xff")),
    (dict(negative_prompt="ok" + LONE_SURROGATE), ("--negative-prompt is not valid UTF-8", "0xff")),
])
def test_request_is_refused_in_one_line_before_anything_is_allocated(sd15, kwargs, fragments):
    kwargs = {"prompt": PROMPT, "steps": 2, **kwargs}
    prompt = kwargs.pop("prompt")
    _one_line_error(lambda: _unloaded(sd15)(prompt, **kwargs), *fragments)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(guidance="apg", scale=3.0), "cannot run on a fused export"),
    (dict(sampler="flow_euler"), "flow_euler needs a flow-matching model"),
    (dict(sampler="ddim", karras=True), "--karras does not apply to ddim"),
])
def test_sampler_and_rule_mismatches_are_found_without_the_models(sd15, kwargs, fragment):
    _one_line_error(lambda: _unloaded(sd15).plan(PROMPT, steps=2, **kwargs), fragment)


def test_ddim_past_the_last_training_timestep_is_refused(sd15):
    # leading spacing, 1000 steps of ratio 1000 // 1000 = 1, steps_offset 1: timesteps 1..1000, and 1000 is
    # past the 1000 training timesteps 0..999 (was an IndexError traceback)
    _one_line_error(lambda: _unloaded(sd15).plan(PROMPT, steps=1000, sampler="ddim"), "reaches timestep 1000")


def test_karras_on_a_flow_model_is_refused_not_ignored(tiny_export):
    folder = tiny_export("sd35-medium", "fused")
    _one_line_error(lambda: _unloaded(folder).plan(PROMPT, steps=2, karras=True), "--karras does not apply to a flow")


def test_max_steps_is_the_models_num_train_timesteps(sd15):
    train = json.loads((sd15 / "samg.json").read_text())["scheduler"]["num_train_timesteps"]
    assert train == 1000
    plan = _unloaded(sd15).plan(PROMPT, steps=train)  # exactly the limit is fine
    assert plan.steps == train


@pytest.mark.parametrize("kwargs,fragments", [
    (dict(frames=100000), ("--frames", "1..1024")),
    # 1000 frames of 1024x1024: 4 x 1000 x 128 x 128 latent elements, above 2**24
    (dict(frames=1000, height=1024, width=1024), ("--height/--width/--frames", str(4 * 1000 * 128 * 128))),
])
def test_video_frames_are_bounded(video, kwargs, fragments):
    _one_line_error(lambda: _unloaded(video)(PROMPT, steps=2, **kwargs), *fragments)


# -------------------------------------------------------------------------------- guidance scales

@pytest.mark.parametrize("kwargs,flag", [
    (dict(scale=-5.0), "--scale"),
    (dict(scale=1e30), "--scale"),
    (dict(scale=100.5), "--scale"),
    (dict(scale=float("nan")), "--scale"),
    (dict(guidance="cfg", scale=float("inf")), "--scale"),
    (dict(w_min=1.0, w_max=1e30), "--w-max"),
    (dict(w_min=-1.0, w_max=3.0), "--w-min"),
])
def test_guidance_scale_outside_0_to_100_is_named(sd15, kwargs, flag):
    message = _one_line_error(lambda: _unloaded(sd15)(PROMPT, steps=2, **kwargs), flag, "0..100")
    assert "swap" not in message  # --scale -5 used to report "w-min is above w-max: swap them"


@pytest.mark.parametrize("kwargs,pair", [
    (dict(guidance="cfg", scale=100.0), (100.0, 100.0)),
    (dict(guidance="cfg", scale=0.0), (0.0, 0.0)),
    (dict(w_min=0.0, w_max=100.0), (0.0, 100.0)),
    (dict(scale=100.0), (50.5, 100.0)),  # samg: w_min = (1 + W) / 2
    # samg below W = 1: no guidance above 1 to halve, so w_min = W (was "w-min is above w-max: swap them")
    (dict(scale=0.5), (0.5, 0.5)),
    (dict(scale=0.0), (0.0, 0.0)),
])
def test_guidance_scales_within_the_limits_are_accepted(sd15, kwargs, pair):
    g = _unloaded(sd15).plan(PROMPT, **kwargs).guidance
    assert (g.w_min, g.w_max) == pair


# -------------------------------------------------------------------------------------- the CLI

def _cli(capsys, *argv):
    from samg.cli import main

    rc = main(list(argv))
    err = capsys.readouterr().err
    return rc, err


def _assert_refused(capsys, tmp_path, *argv, fragment):
    before = sorted(p.name for p in tmp_path.rglob("*"))
    rc, err = _cli(capsys, *argv)
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith("samg "), err
    assert fragment in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, nothing left behind


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading the models is where the work starts: these checks must come before it."""
    from samg.runtime.pipeline import Pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the models were loaded before the output location was checked")

    monkeypatch.setattr(Pipeline, "load", refuse)


@pytest.mark.parametrize("extra,fragment", [
    (("--seed", "-1"), "--seed"),
    (("--seed", str(2**64)), "--seed"),
    (("--steps", "1001"), "--steps"),
    (("--height", "100000"), "--height"),
    (("--num-images", "100000"), "--num-images"),
    (("--scale", "-5"), "--scale must be a finite number in 0..100"),
    (("--scale", "1e30"), "--scale"),
    (("--negative-prompt", "x" + LONE_SURROGATE), "--negative-prompt is not valid UTF-8"),
])
def test_generate_refuses_bad_flags_before_loading_models(sd15, tmp_path, capsys, no_model_loading, extra, fragment):
    _assert_refused(capsys, tmp_path, "generate", str(sd15), "--prompt", PROMPT, "--quiet",
                    "--out", str(tmp_path / "img.png"), *extra, fragment=fragment)


def test_guidance_parameters_are_checked_before_loading_models(tiny_export, tmp_path, capsys, no_model_loading):
    raw = tiny_export("sd15", "raw")
    # CFG++ takes the scale as its λ in [0, 1]: the default scale 7.5 is refused before any model loads
    _assert_refused(capsys, tmp_path, "generate", str(raw), "--prompt", PROMPT, "--guidance", "cfgpp", "--quiet",
                    "--out", str(tmp_path / "img.png"), fragment="CFG++ lambda must be in [0, 1], got 7.5")
    _one_line_error(lambda: _unloaded(raw).plan(PROMPT, guidance="cfg", guidance_options={"nope": 1}),
                    "guidance 'cfg' has no parameter nope")


def test_generate_refuses_an_output_that_is_a_folder(sd15, tmp_path, capsys, no_model_loading):
    folder = tmp_path / "img.png"
    folder.mkdir()
    _assert_refused(capsys, tmp_path, "generate", str(sd15), "--prompt", PROMPT, "--out", str(folder),
                    fragment="is a folder")


def test_generate_refuses_an_output_under_a_file(sd15, tmp_path, capsys, no_model_loading):
    (tmp_path / "notes.txt").write_text("mine")
    _assert_refused(capsys, tmp_path, "generate", str(sd15), "--prompt", PROMPT,
                    "--out", str(tmp_path / "notes.txt" / "img.png"), fragment="is a file, not a folder")
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc takes no new files on Linux only")
def test_generate_refuses_an_unwritable_output_folder(sd15, tmp_path, capsys, no_model_loading):
    # /proc refuses new files even to root, where a chmod-ed folder would not
    _assert_refused(capsys, tmp_path, "generate", str(sd15), "--prompt", PROMPT, "--out", "/proc/samg-test.png",
                    fragment="cannot write to /proc")


@pytest.mark.parametrize("out,fps,fragment", [
    ("clip.gif", "0", "--fps must be an integer in 1..50"),
    ("clip.gif", "-3", "--fps"),
    ("clip.gif", "60", "1..50 for .gif"),
    ("clip.mp4", "100000", "1..120 for .mp4"),
])
def test_generate_refuses_bad_fps_before_loading_models(video, tmp_path, capsys, no_model_loading, out, fps, fragment):
    _assert_refused(capsys, tmp_path, "generate", str(video), "--prompt", PROMPT, "--out", str(tmp_path / out),
                    "--fps", fps, fragment=fragment)


def test_generate_refuses_a_prompt_that_is_not_utf8_from_the_shell(sd15, tmp_path):
    """The real path: a non-UTF-8 byte in argv, as `samg generate --prompt $'\\xff'` passes it."""
    out = tmp_path / "img.png"
    proc = subprocess.run([sys.executable, "-m", "samg.cli", "generate", str(sd15).encode(), b"--prompt", b"cat \xff",
                           b"--steps", b"1", b"--quiet", b"--out", str(out).encode()],
                          capture_output=True, timeout=120)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and "--prompt is not valid UTF-8 text (byte 0xff at character 4)" in err, err
    assert not out.exists()


# -------------------------------------------------------------------------- silent wrong results

class RecordingRunner:
    """Stands in for the exported denoiser: runs it and keeps what the loop fed it."""

    def __init__(self, runner, scale_output: float = 1.0, from_call: int = 0):
        self.runner, self.fed, self.scale_output, self.from_call = runner, [], scale_output, from_call
        self.input_names, self.output_names = runner.input_names, runner.output_names

    def run(self, feeds):
        self.fed.append({k: np.array(v) for k, v in feeds.items()})
        outs = self.runner.run(feeds)
        if len(self.fed) > self.from_call:
            outs = {k: np.asarray(v) * np.float32(self.scale_output) for k, v in outs.items()}
        return outs


@pytest.fixture
def recording(pipe):
    original = pipe.runners["denoiser"]
    pipe.runners["denoiser"] = RecordingRunner(original)
    yield pipe.runners["denoiser"]
    pipe.runners["denoiser"] = original


def test_interval_guidance_and_cosine_schedule_compose_on_a_fused_export(pipe, sd15, recording):
    """gain = cosine gain x interval indicator; the graph gets 1 + (W - 1)·gain at each step."""
    diffusers = pytest.importorskip("diffusers")
    steps, w, lo, hi = 8, 5.0, 0.28, 5.42  # the interval's published default range
    pipe(PROMPT, NEGATIVE, guidance="interval", scale=w, schedule="cosine", steps=steps, sampler="euler",
         output="latents")
    # sigmas from diffusers' own Euler scheduler for this model, independent of samg's schedules
    euler = diffusers.EulerDiscreteScheduler.from_pretrained(str(sd15 / "source"), subfolder="scheduler")
    euler.set_timesteps(steps)
    sigmas = euler.sigmas.numpy()[:-1].astype(np.float64)
    assert min(np.abs(sigmas - lo).min(), np.abs(sigmas - hi).min()) > 1e-2  # no sigma on an interval edge
    expected = []
    for i, sigma in enumerate(sigmas):
        cosine_gain = 1.0 - math.cos(math.pi * i / (steps - 1))
        inside = 1.0 if lo < sigma <= hi else 0.0
        expected.append(1.0 + (w - 1.0) * cosine_gain * inside)
    # the case that was wrong: outside the interval with a non-zero schedule gain (the last step)
    assert any(e == 1.0 and i > 0 and not lo < s <= hi for i, (e, s) in enumerate(zip(expected, sigmas)))
    fed = np.array([f["guidance_scales"] for f in recording.fed])  # [steps, B, 2]
    assert fed.shape == (steps, 1, 2)
    np.testing.assert_allclose(fed[:, 0, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(fed[:, 0, 1], expected, rtol=1e-6)


def test_huge_model_outputs_stop_sampling_with_the_step_named(pipe, recording):
    recording.scale_output, recording.from_call = 1e30, 1  # finite in float32, but absurd from the 2nd call
    with pytest.raises(SamgError, match=r"after step 2/3") as info:
        pipe(PROMPT, NEGATIVE, guidance="cfg", scale=5.0, steps=3, sampler="euler")
    assert "\n" not in str(info.value)


def test_the_strongest_allowed_scale_still_samples(pipe):
    images = pipe(PROMPT, NEGATIVE, guidance="cfg", scale=100.0, steps=3, sampler="euler")
    assert images.shape == (1, 64, 64, 3)


def test_encode_writes_conditioning_for_every_prompt_in_order(sd15, tmp_path, capsys):
    """N prompts -> [2N, L, D]: the N negatives, then the N prompts, as diffusers' encode_prompt gives them."""
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    prompts = ["a red cube", "a blue ball on the grass", "a cat"]
    rc, err = _cli(capsys, "encode", str(sd15), *[a for p in prompts for a in ("--prompt", p)],
                   "--negative-prompt", NEGATIVE, "--out", str(tmp_path))
    assert rc == 0, err
    got = np.load(tmp_path / "encoder_hidden_states.npy")
    reference = diffusers.StableDiffusionPipeline.from_pretrained(
        str(sd15 / "source"), safety_checker=None, requires_safety_checker=False)
    with torch.no_grad():
        positive, negative = reference.encode_prompt(prompts, "cpu", 1, True, negative_prompt=[NEGATIVE] * 3)
    expected = np.concatenate([negative.numpy(), positive.numpy()])
    assert got.shape == expected.shape == (6, 77, 32)
    np.testing.assert_allclose(got, expected, atol=1e-4)  # ORT vs torch
    assert np.abs(got[3] - got[4]).max() > 1e-2  # the prompts really differ row by row


def test_encode_refuses_mismatched_negative_prompts_and_a_file_as_output(sd15, tmp_path, capsys):
    _assert_refused(capsys, tmp_path, "encode", str(sd15), "--prompt", "a", "--prompt", "b",
                    "--negative-prompt", "x", "--negative-prompt", "y", "--negative-prompt", "z",
                    "--out", str(tmp_path / "cond"), fragment="2 --prompt and 3 --negative-prompt")
    (tmp_path / "cond").write_text("mine")
    _assert_refused(capsys, tmp_path, "encode", str(sd15), "--prompt", "a", "--out", str(tmp_path / "cond"),
                    fragment="is a file")
    _assert_refused(capsys, tmp_path, "encode", str(sd15), "--prompt", LONE_SURROGATE, "--out", str(tmp_path / "c2"),
                    fragment="--prompt is not valid UTF-8")


# ------------------------------------------------- manifest fields the loaded graphs contradict

def _edited_copy(export, tmp_path, edit):
    """A copy of `export` whose samg.json is changed by `edit(manifest_dict)` (samg.json is not hashed)."""
    import shutil

    folder = tmp_path / "edited"
    shutil.copytree(export, folder)
    manifest = json.loads((folder / "samg.json").read_text())
    edit(manifest)
    (folder / "samg.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("edit,fragments", [
    (lambda m: m["text_encoder"]["tokenizers"][0].update(pad_id=10**12),
     ("pad_id 1000000000000 for tokenizer/tokenizer.json is not a token of its vocabulary",)),
    (lambda m: m["text_encoder"].update(outputs=["nope"]),
     ("text_encoder.outputs names 'nope', not an output of text_encoder.onnx (it has encoder_hidden_states)",)),
    (lambda m: m["text_encoder"]["tokenizers"][0].update(input="bogus"),
     ("text_encoder.tokenizers[0].input 'bogus' is not an input of text_encoder.onnx (it has input_ids)",)),
])
def test_manifest_names_the_graph_does_not_have_are_one_line_at_load(sd15, tmp_path, edit, fragments):
    from samg.runtime.pipeline import Pipeline

    folder = _edited_copy(sd15, tmp_path, edit)
    _one_line_error(lambda: Pipeline.load(folder), *fragments, "re-export", max_traced_bytes=1 << 30)


# ------------------------------------------------------------------ messages name the right thing

def test_a_width_off_the_grid_names_width_not_height(sd15):
    multiple = json.loads((sd15 / "samg.json").read_text())["latent"]["size_multiple"]
    message = _one_line_error(lambda: _unloaded(sd15).validate_size(None, 7, None),
                              f"--width must be a multiple of {multiple}, got 7: e.g. --width {multiple}")
    assert "--height" not in message


def test_frames_out_of_range_on_a_static_export_suggests_its_own_count(tiny_export):
    cog = tiny_export("cogvideox", "fused")
    latent = json.loads((cog / "samg.json").read_text())["latent"]
    assert latent["dynamic_frames"] is False
    pipe = _unloaded(cog)
    _one_line_error(lambda: pipe.validate_size(None, None, 0), f"e.g. --frames {latent['frames']}")
    assert pipe.validate_size(None, None, latent["frames"])[2] == latent["frames"]  # the suggestion is accepted


def test_generate_with_an_empty_out_says_it_is_empty(sd15, tmp_path, capsys, no_model_loading):
    _assert_refused(capsys, tmp_path, "generate", str(sd15), "--prompt", PROMPT, "--out", "",
                    fragment="--out is empty: pass a file path such as --out image.png")


@pytest.mark.parametrize("beta_start,fragment", [
    (0.0, "gives a training step without noise (a beta of 0, so sigma 0): beta_start and beta_end must be above 0"),
    (0.999, "leaves no signal before the last training step"),
])
def test_corrupt_betas_name_the_scheduler_fields(sd15, tmp_path, capsys, beta_start, fragment):
    """Not a numpy warning, not the guidance scale, not a zero-SNR rescale the manifest does not set."""
    import warnings

    folder = _edited_copy(sd15, tmp_path, lambda m: m["scheduler"].update(beta_start=beta_start))
    assert not json.loads((folder / "samg.json").read_text())["scheduler"].get("rescale_betas_zero_snr")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, err = _cli(capsys, "generate", str(folder), "--prompt", PROMPT, "--steps", "2", "--quiet",
                       "--out", str(tmp_path / "img.png"))
    assert rc == 2 and err.count("\n") == 1, err
    assert f"scheduler (beta_start {beta_start:g}," in err and fragment in err, err
    assert "guidance" not in err and "rescale_betas_zero_snr" not in err, err
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    assert not (tmp_path / "img.png").exists()
