"""samg's Python serving API (samg.load -> SamgPipeline): output types, seeds, timings, defaults,
errors in the API's words, submit/close. Batching itself: tests/test_batching.py."""

import subprocess
import sys
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")

from samg.api import api_wording  # noqa: E402
from samg.errors import SamgError  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def digits(digits_export):
    import samg
    from samg.runtime.pipeline import Pipeline

    with samg.load(digits_export, max_batch_size=4) as pipe:
        yield pipe, Pipeline.load(digits_export)


def test_import_samg_stays_light():
    code = ("import sys, samg; samg.load; samg.SamgPipeline; "
            "heavy = [m for m in ('onnxruntime', 'torch', 'tokenizers', 'PIL') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_output_types_seeds_and_timings(digits):
    pil_image = pytest.importorskip("PIL.Image")
    pipe, reference = digits
    request = dict(guidance="samg", guidance_scale=5.0, num_inference_steps=STEPS, seed=7, num_images_per_prompt=2)
    # one request runs alone in its calls: the same computation as Pipeline.__call__, so equal exactly
    want = reference("a handwritten 4", guidance="samg", scale=5.0, steps=STEPS, seed=7, num_images=2)
    want_latents = reference("a handwritten 4", guidance="samg", scale=5.0, steps=STEPS, seed=7, num_images=2,
                             output="latents")

    as_np = pipe("a handwritten 4", output_type="np", **request)
    assert as_np.images.dtype == np.uint8 and as_np.images.shape == (2, 16, 16, 3) and as_np.frames is None
    np.testing.assert_array_equal(as_np.images, want)

    as_pil = pipe("a handwritten 4", **request)  # output_type="pil" by default
    assert [type(im) for im in as_pil.images] == [pil_image.Image] * 2
    assert all(im.size == (16, 16) and im.mode == "RGB" for im in as_pil.images)
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in as_pil.images]), want)

    as_latent = pipe("a handwritten 4", output_type="latent", **request)
    assert as_latent.images.dtype == np.float32
    np.testing.assert_array_equal(as_latent.images, want_latents)

    for out in (as_np, as_pil, as_latent):
        assert out.seeds == [7]
        (timing,) = out.timings
        assert set(timing) == {"queue", "encode", "denoise", "decode", "total"}
        assert all(v >= 0 for v in timing.values())
        assert timing["total"] >= timing["encode"] + timing["denoise"] + timing["decode"]
    assert as_latent.timings[0]["decode"] < as_np.timings[0]["denoise"]  # nothing decoded for "latent"


def test_random_seeds_are_reported_and_reproduce(digits):
    pipe, _ = digits
    out = pipe(["a handwritten 1", "a handwritten 1"], num_inference_steps=STEPS, output_type="latent")
    assert len(out.seeds) == 2 and out.seeds[0] != out.seeds[1]
    # drawn seeds fit a signed 64-bit integer (the server's INT64 `seed` output): 32 draws, each
    # above half of 2^64 by chance before that was so
    many = pipe(["a handwritten 1"] * 32, num_inference_steps=1, output_type="latent").seeds
    assert all(isinstance(s, int) and 0 <= s < 2**63 for s in out.seeds + many)
    again = pipe("a handwritten 1", num_inference_steps=STEPS, seed=out.seeds[1], output_type="latent")
    np.testing.assert_allclose(again.images, out.images[1:], rtol=1e-5, atol=1e-5)  # batched: see test_batching.py
    assert np.abs(out.images[0] - out.images[1]).max() > 0.1  # the two seeds gave different noise


def test_latents_argument_per_prompt(digits):
    pipe, reference = digits
    noise = np.random.default_rng(3).standard_normal((3, 4, 8, 8)).astype(np.float32)
    common = dict(guidance="cfg", guidance_scale=3.0, num_inference_steps=STEPS, output_type="latent")
    stacked = pipe(["a handwritten 2", "a handwritten 6"], num_images_per_prompt=[1, 2], latents=noise, **common)
    listed = pipe(["a handwritten 2", "a handwritten 6"], num_images_per_prompt=[1, 2],
                  latents=[noise[:1], noise[1:]], **common)
    want = np.concatenate([
        reference("a handwritten 2", guidance="cfg", scale=3.0, steps=STEPS, latents=noise[:1], output="latents"),
        reference("a handwritten 6", guidance="cfg", scale=3.0, steps=STEPS, num_images=2, latents=noise[1:],
                  output="latents")])
    np.testing.assert_allclose(stacked.images, want, rtol=1e-5, atol=1e-5)  # batched: see test_batching.py
    np.testing.assert_allclose(listed.images, want, rtol=1e-5, atol=1e-5)


def test_video_frames(tiny_export):
    import samg
    from samg.runtime.pipeline import Pipeline

    folder = tiny_export("modelscope-t2v", "fused")
    reference = Pipeline.load(folder)
    with samg.load(folder) as pipe:
        defaults = pipe.default_request()
        frames = defaults["num_frames"]
        assert frames is not None
        out = pipe("a red ball", num_inference_steps=2, seed=5, output_type="np")
        want = reference("a red ball", steps=2, seed=5)
        assert out.images is None and out.frames.shape == want.shape and out.frames.shape[1] == frames
        np.testing.assert_array_equal(out.frames, want)
        clips = pipe("a red ball", num_inference_steps=2, seed=5).frames  # PIL: one list of frames per clip
        assert len(clips) == 1 and len(clips[0]) == frames
        np.testing.assert_array_equal(np.stack([np.asarray(f) for f in clips[0]]), want[0])


def test_default_request_reads_the_export(digits):
    from samg.guidance import DEFAULT_GUIDANCE_SCALE
    from samg.runtime.pipeline import DEFAULT_STEPS

    pipe, _ = digits
    defaults = pipe.default_request()
    assert pipe.export.latent.height == 16  # the bundled samg-digits model's size
    assert defaults["guidance"] == "samg" and defaults["guidance_scale"] == DEFAULT_GUIDANCE_SCALE
    assert defaults["num_inference_steps"] == DEFAULT_STEPS and defaults["sampler"] == "euler"
    assert (defaults["height"], defaults["width"], defaults["num_frames"]) == (16, 16, None)


def test_submit_returns_a_future_and_close_refuses_more(digits_export):
    import samg

    with samg.load(digits_export) as pipe:
        future = pipe.submit(prompt="a handwritten 0", num_inference_steps=STEPS, seed=1, output_type="np")
        assert isinstance(future, Future)
        assert future.result(timeout=120).images.shape == (1, 16, 16, 3)
        with pytest.raises(SamgError, match="submit takes one prompt"):
            pipe.submit(prompt=["a", "b"])
        with pytest.raises(SamgError, match=r"seed= takes one value in submit"):
            pipe.submit(prompt="a", seed=[1, 2])
        with pytest.raises(SamgError, match="unknown keyword colour"):
            pipe.submit(prompt="a", colour="red")
    assert pipe.stats()["requests_done"] == 1
    with pytest.raises(SamgError, match="this pipeline is closed"):
        pipe.submit(prompt="a handwritten 0")


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompt=["a", "b"], guidance_scale=[1.0, 2.0, 3.0]),
     "guidance_scale= has 3 values for 2 prompts: pass one value per prompt, or a single value for all"),
    (dict(prompt="a", guidance_min=5.0, guidance_scale=3.0), "guidance_min=5.0 is above guidance_scale=3.0: swap them"),
    (dict(prompt="a", guidance="wobble"), "unknown guidance 'wobble': choose one of cfg, samg"),
    (dict(prompt="a", guidance="apg"), "guidance 'apg' cannot run on a fused export"),
    (dict(prompt="a", guidance="cfg", guidance_min=2.0), "guidance_min= applies to the spatial rules"),
    (dict(prompt="a", num_inference_steps=0), "num_inference_steps= must be an integer in 1..1000, got 0: "
                                              "e.g. num_inference_steps=30"),
    (dict(prompt="a", num_inference_steps=1001), "num_inference_steps= must be an integer in 1..1000"),
    (dict(prompt="a", guidance_scale=float("inf")), "guidance_scale= must be a finite number in 0..100, got inf"),
    (dict(prompt="a", guidance_scale="high"), "guidance_scale= must be a number, got 'high'"),
    (dict(prompt=7), "prompt= must be text or a list of texts, got int"),
    (dict(prompt=["a", 7]), "prompt[1]: prompt= must be text, got int"),
    (dict(prompt="a", seed=-1), "seed= must be an integer in 0.."),
    (dict(prompt="a", sampler=2), "sampler= must be a name (text), got int"),
    (dict(prompt="a", height=18), "height= must be a multiple of 4, got 18: e.g. height=16"),
    (dict(prompt="a", num_frames=9), "num_frames= applies to video models only"),
    (dict(prompt="a", output_type="pt"), "output_type= must be one of 'pil', 'np', 'latent', got 'pt'"),
    (dict(prompt="a", guidance_options=[{}, {}]), "guidance_options= has 2 values for 1 prompt"),
    (dict(prompt="a", guidance_options="momentum"), "guidance_options= must be a dict"),
    (dict(prompt="a", karras=True, sampler="ddim"), 'karras=True does not apply to ddim: use sampler="euler"'),
    (dict(prompt="a", num_images_per_prompt=5), "above max_batch_size 4"),
    (dict(prompt="a", latents=np.zeros((1, 4, 2, 2), np.float32)), "match height=/width="),
])
def test_bad_input_is_one_error_in_the_api_words(digits, kwargs, message):
    pipe, _ = digits
    with pytest.raises(SamgError) as err:
        pipe(**kwargs)
    text = str(err.value)
    assert message in text and "\n" not in text
    assert "--" not in text.replace("re-export with --guidance raw", "")  # no flag but `samg export`'s


def test_load_checks_its_arguments(digits_export):
    import samg

    for kwargs, message in [(dict(max_batch_size=0), "max_batch_size= must be an integer in 1..64"),
                            (dict(max_batch_size=2.5), "max_batch_size= must be an integer"),
                            (dict(max_wait_ms=float("nan")), "max_wait_ms= must be a number of milliseconds"),
                            (dict(max_concurrent_requests=0), "max_concurrent_requests= must be a positive integer"),
                            (dict(max_queue=-1), "max_queue= must be an integer >= 0")]:
        with pytest.raises(SamgError, match=message):
            samg.load(digits_export, **kwargs)


@pytest.mark.parametrize("cli,api", [
    ("--scale must be a finite number in 0..100, got nan: e.g. --scale 7.5",
     "guidance_scale= must be a finite number in 0..100, got nan: e.g. guidance_scale=7.5"),
    ("--w-min 5.0 is above --w-max 3.0: swap them", "guidance_min=5.0 is above guidance_scale=3.0: swap them"),
    ('a prompt is required: pass --prompt "..."', 'a prompt is required: pass prompt="..."'),
    ("--frames applies to video models only: drop it", "num_frames= applies to video models only: drop it"),
    ("drop --height/--width or re-export at 64x64", "drop height=/width= or re-export at 64x64"),
    ("use --sampler euler or ddim", 'use sampler="euler" or ddim'),
    ("pass --num-images 4 or less", "pass num_images_per_prompt=4 or less"),
    ("--karras does not apply to a flow-matching model: drop --karras",
     "karras=True does not apply to a flow-matching model: drop karras=True"),
    # `samg export`'s flags are not the API's: they stay
    ("re-export with --guidance raw, or use --guidance samg, cfg or interval",
     're-export with --guidance raw, or use guidance="samg", cfg or interval'),
    ("an export made with `samg export --guidance scfg` and `--guidance scfg` here",
     'an export made with `samg export --guidance scfg` and `guidance="scfg"` here'),
    ("pass --fps 8", "pass --fps 8"),  # not a keyword of the API: unchanged
])
def test_api_wording(cli, api):
    assert api_wording(cli) == api


LONG_STEPS = 1000  # seconds of sampling on samg-digits: still running while the test acts on it


def _wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def test_busy_past_max_queue_and_cancelled_requests_stop(digits_export):
    """One worker, max_queue=1: a long request runs, one waits, the next is refused at once; the
    long one stops at its next step once is_cancelled() is true, and the queued one then runs."""
    import samg
    from samg.api import PipelineBusy
    from samg.runtime.batching import RequestCancelled

    gone = threading.Event()
    with samg.load(digits_export, max_concurrent_requests=1, max_queue=1) as pipe:
        long = pipe.submit(prompt="a handwritten 1", num_inference_steps=LONG_STEPS, is_cancelled=gone.is_set,
                           output_type="latent")
        _wait_for(lambda: pipe.stats()["denoiser_calls"] >= 2, "the long request to sample")
        queued = pipe.submit(prompt="a handwritten 2", num_inference_steps=STEPS, seed=3, output_type="latent")
        with pytest.raises(PipelineBusy, match=r"^busy: 1 requests already wait for a worker, 1 more would pass "
                                               r"max_queue=1: retry later"):
            pipe.submit(prompt="a handwritten 3", num_inference_steps=STEPS)
        with pytest.raises(PipelineBusy):  # a call's prompts go all together or not at all
            pipe(["a handwritten 4", "a handwritten 5"], num_inference_steps=STEPS)
        gone.set()
        with pytest.raises(RequestCancelled, match="the request was cancelled"):
            long.result(timeout=120)
        assert queued.result(timeout=120).seeds == [3]
        stats = pipe.stats()
    assert stats["requests_cancelled"] == 1 and stats["requests_failed"] == 0 and stats["requests_done"] == 1
    assert stats["denoiser_calls"] < LONG_STEPS  # it did not run to the end
    # a request cancelled before a worker takes it never samples
    with samg.load(digits_export) as pipe:
        with pytest.raises(RequestCancelled, match="before it started"):
            pipe.submit(prompt="a handwritten 6", is_cancelled=lambda: True).result(timeout=120)
        assert pipe.stats()["denoiser_calls"] == 0


def test_submit_many_checks_every_request_before_any_starts(digits):
    pipe, _ = digits
    before = pipe.stats()["requests_done"] + pipe.stats()["requests_failed"]
    with pytest.raises(SamgError, match=r"^request\[1\]: num_inference_steps= must be an integer in 1\.\.1000"):
        pipe.submit_many([dict(prompt="a handwritten 1", num_inference_steps=STEPS),
                          dict(prompt="a handwritten 2", num_inference_steps=0)])
    with pytest.raises(SamgError, match="is_cancelled= must be a callable"):
        pipe.submit(prompt="a", is_cancelled=True)
    time.sleep(0.2)
    stats = pipe.stats()
    assert stats["requests_done"] + stats["requests_failed"] == before and stats["in_flight"] == 0


def test_tensorrt_max_batch_size_is_checked_against_the_engine_profile(digits_export, tmp_path):
    """The engine's build record says its largest latents batch: a larger max_batch_size is refused
    at load, before TensorRT is touched (no GPU needed), by samg.load and by samg serve."""
    import hashlib
    import shutil

    import samg
    from samg.contract import ENGINES_DIR, EngineRecord, write_engine_record

    folder = tmp_path / "export"
    shutil.copytree(digits_export, folder)
    engine = folder / ENGINES_DIR / "denoiser.engine"
    engine.parent.mkdir()
    engine.write_bytes(b"not a real engine")
    write_engine_record(engine, EngineRecord(
        key="0123abcd", component="denoiser", onnx_sha256=("sha256:" + "0" * 64,), trt_flavour="tensorrt",
        trt_version="10.9.0", compute_capability="sm_90", precision="fp16", combine="plugin",
        profiles={"latents": {"min": (1, 4, 4, 4), "opt": (2, 4, 4, 4), "max": (4, 4, 4, 4)}},
        inputs=("latents",), outputs=("guided",), plugins=(), engine_bytes=17,
        engine_sha256="sha256:" + hashlib.sha256(b"not a real engine").hexdigest()))
    with pytest.raises(SamgError, match=r"max_batch_size=8 is above the 4 latents the denoiser's TensorRT engine "
                                        r"takes \(its profile\): load with max_batch_size=4"):
        samg.load(folder, backend="tensorrt", device="cuda", max_batch_size=8)
    done = subprocess.run([sys.executable, "-m", "samg", "serve", str(folder), "--backend", "tensorrt", "--device", "cuda",
                           "--max-batch-size", "8"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--max-batch-size 8 is above the 4 latents" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
