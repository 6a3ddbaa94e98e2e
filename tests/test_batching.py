"""Continuous batching (samg.runtime.batching through samg.load): requests batched together give
what each gives alone through the independent path, Pipeline.__call__ (its own runner, no engine).

Exactness measured (ONNX Runtime CPU, 1 and 2 intra-op threads): per-sample denoiser outputs in a
batch of 5 are bit-identical to each sample alone, and to sub-batches, on samg-digits (fused and
raw) and a tiny SDXL export; the batched requests below matched their alone runs bit for bit.
The tests still compare with LATENT_RTOL and tie-aware images so they do not depend on that: a CPU
whose GEMM kernels block a larger batch differently may round differently in the last bit.
"""

import threading
import time
from contextlib import ExitStack

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("tokenizers")

from samg.errors import SamgError  # noqa: E402
from samg.runners.base import Runner  # noqa: E402

# float32 rounding (~1e-7 relative per op) compounded over <= 12 steps stays far below this; a wrong
# slice, layout or rule state moves latents by O(1).
LATENT_RTOL = LATENT_ATOL = 1e-5
# A pixel may differ by one level only where the exact value sits this close to a rounding boundary
# (x.5): latents within LATENT_ATOL move the VAE's output by far less than 0.01 of a level.
TIE_EPS = 0.01
# Tests that count shared calls wait generously for the other requests' steps: on a loaded CI
# machine a thread may not run for longer than the default few ms, and a call would fire early.
PATIENT_WAIT_MS = 500
# The engine tests below hold every request's slot before any step, so each call fires only once
# all of them wait (the policy: every active request has a step waiting); this max_wait is a bound
# for a broken test, never reached when it works.
HOLD_S = 60.0
JOIN_S = 120  # a request thread of these tests finishes in seconds


def alone(pipeline, prompt, *, rule, scale, w_min=None, steps, seed, sampler, num_images=1, height=None,
          negative="", options=None):
    """The request through Pipeline.__call__ alone (the CLI's keywords): final latents (square images)."""
    scales = dict(scale=scale) if w_min is None else dict(w_min=w_min, w_max=scale)
    return pipeline(prompt, negative, guidance=rule, **scales, steps=steps, seed=seed, sampler=sampler,
                    num_images=num_images, height=height, width=height, guidance_options=options, output="latents")


def assert_latents_match(got, expected):
    np.testing.assert_allclose(got, expected, rtol=LATENT_RTOL, atol=LATENT_ATOL)


def assert_images_match(got, latents, pipeline):
    """uint8 `got` against the VAE's exact output for `latents`, written out here (scale, shift,
    [-1, 1] -> 0..255): equal, or one level off where the value sits within TIE_EPS of x.5."""
    vae = pipeline.export.vae
    z = latents / np.float32(vae.scaling_factor) + np.float32(vae.shift_factor or 0.0)
    images = np.asarray(pipeline.runners["vae"].run({"latents": z})["images"], np.float32).transpose(0, 2, 3, 1)
    exact = (images / 2 + 0.5).clip(0, 1) * 255
    diff = np.abs(got.astype(np.int16) - np.round(exact).astype(np.int16))
    near_tie = np.abs(exact - np.floor(exact) - 0.5) < TIE_EPS
    assert diff.max() <= 1 and np.all((diff == 0) | near_tie)


@pytest.fixture(scope="module")
def digits(digits_export):
    from samg.runtime.pipeline import Pipeline

    return digits_export, Pipeline.load(digits_export)


# prompt, rule, guidance_scale, guidance_min, steps, seed, sampler
MIXED = [
    ("a handwritten 0", "samg", 6.0, 2.0, 4, 11, "euler"),
    ("a handwritten 1", "cfg", 4.0, None, 12, 12, "euler_a"),
    ("a handwritten 7", "samg", 5.0, None, 8, 13, "dpmpp_2m"),  # guidance_min None: (1 + 5) / 2, as the CLI
    ("a handwritten 3", "cfg", 2.5, None, 6, 14, "ddim"),
    ("a handwritten 9", "samg", 9.0, 3.0, 10, 15, "euler_a"),
]


def mixed_call(pipe, cases, output_type):
    prompts, rules, scales, mins, steps, seeds, samplers_ = (list(c) for c in zip(*cases))
    return pipe(prompts, guidance=rules, guidance_scale=scales, guidance_min=mins, num_inference_steps=steps,
                seed=seeds, sampler=samplers_, output_type=output_type)


def test_mixed_batch_equals_each_alone_on_samg_digits(digits):
    import samg

    folder, reference = digits
    expected = [alone(reference, p, rule=r, scale=s, w_min=m, steps=n, seed=seed, sampler=smp)
                for p, r, s, m, n, seed, smp in MIXED]
    with samg.load(folder, max_batch_size=8, max_wait_ms=PATIENT_WAIT_MS) as pipe:
        latents = mixed_call(pipe, MIXED, "latent")
        images = mixed_call(pipe, MIXED, "np")
        stats = pipe.stats()
    for i, want in enumerate(expected):
        assert_latents_match(latents.images[i:i + 1], want)
        assert_images_match(images.images[i:i + 1], want, reference)
    assert latents.seeds == [c[5] for c in MIXED]
    # requests join as their worker threads start, so how many share the first call is up to the OS
    assert max(stats["requests_per_call"]) >= 2
    # every step of every request ran exactly once, in some call
    assert sum(k * v for k, v in stats["batch_sizes"].items()) == 2 * sum(c[4] for c in MIXED)
    assert stats["requests_done"] == 2 * len(MIXED) and stats["requests_failed"] == 0


def test_mixed_batch_equals_each_alone_on_tiny_sdxl(tiny_export):
    import samg
    from samg.runtime.pipeline import Pipeline

    folder = tiny_export("sdxl", "fused")
    reference = Pipeline.load(folder)
    cases = [("a red cube", "samg", 6.0, 2.0, 3, 21, "euler", ""),
             ("a blue ball", "cfg", 4.0, None, 5, 22, "euler_a", "blurry"),  # SDXL zeroes an empty negative only
             ("a green cone", "samg", 7.5, None, 4, 23, "dpmpp_2m", "")]
    expected = [alone(reference, p, rule=r, scale=s, w_min=m, steps=n, seed=seed, sampler=smp, negative=neg)
                for p, r, s, m, n, seed, smp, neg in cases]
    with samg.load(folder, max_wait_ms=PATIENT_WAIT_MS) as pipe:
        prompts, rules, scales, mins, steps, seeds, samplers_, negatives = (list(c) for c in zip(*cases))
        out = pipe(prompts, negative_prompt=negatives, guidance=rules, guidance_scale=scales, guidance_min=mins,
                   num_inference_steps=steps, seed=seeds, sampler=samplers_, output_type="latent")
        assert max(pipe.stats()["requests_per_call"]) >= 2
    for i, want in enumerate(expected):
        assert_latents_match(out.images[i:i + 1], want)


def test_requests_joining_midway_share_calls_and_match_alone(digits):
    import samg

    folder, reference = digits
    long_steps = 40
    expected_long = alone(reference, "a handwritten 5", rule="samg", scale=6.0, steps=long_steps, seed=31,
                          sampler="euler")
    joiners = [("a handwritten 2", "cfg", 3.0, 4, 32, "euler_a"), ("a handwritten 8", "samg", 5.0, 5, 33, "dpmpp_2m")]
    expected_joiners = [alone(reference, p, rule=r, scale=s, steps=n, seed=seed, sampler=smp)
                        for p, r, s, n, seed, smp in joiners]
    with samg.load(folder, max_wait_ms=PATIENT_WAIT_MS) as pipe:
        first = pipe.submit(prompt="a handwritten 5", guidance="samg", guidance_scale=6.0,
                            num_inference_steps=long_steps, seed=31, sampler="euler", output_type="latent")
        deadline = time.monotonic() + 60
        while pipe.stats()["denoiser_calls"] < 3:  # the long request is mid-way, alone so far
            assert time.monotonic() < deadline and not first.done()
            time.sleep(0.002)
        later = [pipe.submit(prompt=p, guidance=r, guidance_scale=s, num_inference_steps=n, seed=seed, sampler=smp,
                             output_type="latent") for p, r, s, n, seed, smp in joiners]
        results = [f.result(timeout=120) for f in later]
        joined_while_running = not first.done()
        assert_latents_match(first.result(timeout=120).images, expected_long)
        stats = pipe.stats()
    assert joined_while_running
    assert stats["requests_per_call"].get(1, 0) >= 3 and max(stats["requests_per_call"]) >= 2
    assert sum(k * v for k, v in stats["batch_sizes"].items()) == long_steps + sum(j[3] for j in joiners)
    for got, want in zip(results, expected_joiners):
        assert_latents_match(got.images, want)


@pytest.fixture(scope="module")
def raw_export(tiny_export):
    from samg.runtime.pipeline import Pipeline

    folder = tiny_export("sd15", "raw")
    return folder, Pipeline.load(folder)


def test_apg_keeps_momentum_per_request_on_a_raw_export(raw_export):
    import samg

    folder, reference = raw_export
    # prompt, guidance_scale, APG momentum, steps, seed: momentum differs, so a shared or reset
    # state would change at least one result
    cases = [("a cat", 5.0, -0.5, 6, 41), ("a dog", 3.0, -0.75, 4, 42), ("a cat", 5.0, -0.5, 6, 43)]
    expected = [alone(reference, p, rule="apg", scale=s, steps=n, seed=seed, sampler="euler",
                      options={"momentum": mom}) for p, s, mom, n, seed in cases]
    with samg.load(folder, max_wait_ms=PATIENT_WAIT_MS) as pipe:
        out = pipe([c[0] for c in cases], guidance="apg", guidance_scale=[c[1] for c in cases],
                   guidance_options=[{"momentum": c[2]} for c in cases], num_inference_steps=[c[3] for c in cases],
                   seed=[c[4] for c in cases], sampler="euler", output_type="latent")
        assert max(pipe.stats()["requests_per_call"]) >= 2
    for i, want in enumerate(expected):
        assert_latents_match(out.images[i:i + 1], want)
    # the check can fail: without momentum the first request lands elsewhere
    stateless = alone(reference, "a cat", rule="apg", scale=5.0, steps=6, seed=41, sampler="euler",
                      options={"momentum": 0.0})
    assert np.abs(stateless - expected[0]).max() > 100 * LATENT_ATOL


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_a_request_going_non_finite_fails_alone(raw_export):
    import samg

    folder, reference = raw_export
    good_steps = 40
    expected = alone(reference, "a dog", rule="cfg", scale=4.0, steps=good_steps, seed=52, sampler="euler")
    with samg.load(folder, max_wait_ms=PATIENT_WAIT_MS) as pipe:
        good = pipe.submit(prompt="a dog", guidance="cfg", guidance_scale=4.0, num_inference_steps=good_steps,
                           seed=52, output_type="latent")
        deadline = time.monotonic() + 60
        while pipe.stats()["denoiser_calls"] < 1:  # the good request is sampling: the bad one joins it
            assert time.monotonic() < deadline
            time.sleep(0.001)
        # APG's momentum multiplies the running difference from the second step on: 1e39, a finite
        # number that passes every check, is beyond float32, so that step's x0 is Inf (no norm clipping).
        bad = pipe.submit(prompt="a cat", guidance="apg", guidance_scale=5.0, num_inference_steps=6, seed=51,
                          guidance_options={"momentum": 1e39, "norm_threshold": 0.0}, output_type="latent")
        with pytest.raises(SamgError, match=r"non-finite values in latents after step 2/6"):
            bad.result(timeout=120)
        assert_latents_match(good.result(timeout=120).images, expected)
        stats = pipe.stats()
        # through a call: the failing prompt is named, after the others finished
        with pytest.raises(SamgError, match=r"^prompt\[1\]: non-finite values in latents after step 2/6"):
            pipe(["a dog", "a cat"], guidance="apg", guidance_scale=5.0, num_inference_steps=6, seed=[52, 51],
                 guidance_options=[{}, {"momentum": 1e39, "norm_threshold": 0.0}], output_type="latent")
        later = pipe.stats()
    assert stats["requests_failed"] == 1 and stats["requests_done"] == 1
    assert stats["requests_per_call"].get(2, 0) >= 2  # both of the bad request's steps shared a call
    assert later["requests_failed"] == 2 and later["requests_done"] == 2 and later["in_flight"] == 0


def test_max_batch_size_bounds_every_call(digits):
    import samg

    folder, reference = digits
    # prompt, images, height, seed: two sizes never share a call; 1 + 2 images fill a call of 3
    cases = [("a handwritten 1", 1, 16, 61), ("a handwritten 2", 2, 16, 62), ("a handwritten 3", 1, 8, 63),
             ("a handwritten 4", 2, 16, 64), ("a handwritten 5", 1, 8, 65), ("a handwritten 6", 1, 16, 66)]
    steps = 4
    with samg.load(folder, max_batch_size=3, max_wait_ms=PATIENT_WAIT_MS) as pipe:
        out = pipe([c[0] for c in cases], num_images_per_prompt=[c[1] for c in cases], height=[c[2] for c in cases],
                   width=[c[2] for c in cases], seed=[c[3] for c in cases], guidance="cfg", guidance_scale=3.0,
                   num_inference_steps=steps, output_type="latent")
        with pytest.raises(SamgError, match="above max_batch_size 3"):
            pipe("a handwritten 7", num_images_per_prompt=4)
        stats = pipe.stats()
    assert max(stats["batch_sizes"]) <= 3
    assert sum(k * v for k, v in stats["batch_sizes"].items()) == steps * sum(c[1] for c in cases)
    assert len(out.images) == sum(c[1] for c in cases)  # latents of two sizes: a list, one array per image
    first = 0
    for prompt, n, size, seed in cases:
        want = alone(reference, prompt, rule="cfg", scale=3.0, steps=steps, seed=seed, sampler="euler",
                     num_images=n, height=size)
        assert_latents_match(np.stack(out.images[first:first + n]), want)
        first += n


def test_many_threads_calling_at_once(digits):
    import samg

    folder, reference = digits
    threads, per_thread, steps = 8, 2, 4
    seeds = {(t, k): 100 + 10 * t + k for t in range(threads) for k in range(per_thread)}
    results, errors = {}, []

    def client(t, pipe):
        try:
            for k in range(per_thread):
                rule = "samg" if (t + k) % 2 else "cfg"
                out = pipe(f"a handwritten {t}", guidance=rule, guidance_scale=4.0, num_inference_steps=steps,
                           seed=seeds[t, k], output_type="np")
                results[t, k] = (rule, out.images)
        except BaseException as exc:  # reported below: a failure in a thread must fail the test
            errors.append(exc)

    pipe = samg.load(folder, max_batch_size=4)
    try:
        workers = [threading.Thread(target=client, args=(t, pipe)) for t in range(threads)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 300
        for w in workers:
            w.join(timeout=max(0.0, deadline - time.monotonic()))
        assert not any(w.is_alive() for w in workers), "a client hung"
        stats = pipe.stats()
    finally:
        pipe.close(timeout=30)  # bounded: a hung request fails instead of hanging the test
    assert not errors and len(results) == threads * per_thread
    assert max(stats["batch_sizes"]) <= 4
    assert stats["requests_done"] == threads * per_thread and stats["in_flight"] == 0 and stats["queue_depth"] == 0
    for (t, k), (rule, images) in results.items():
        want = alone(reference, f"a handwritten {t}", rule=rule, scale=4.0, steps=steps, seed=seeds[t, k],
                     sampler="euler")
        assert_images_match(images, want, reference)


# -- the engine directly: layout, failures, close ----------------------------------------------------
def test_combine_feeds_and_split_outputs_by_hand():
    from samg.runtime.batching import _step, combine_feeds, split_outputs

    def feeds(latent_rows, negative_rows, prompt_rows):
        return {"latents": np.array(latent_rows, np.float32)[:, None],
                "timestep": np.array(latent_rows, np.float32),
                "encoder_hidden_states": np.array(negative_rows + prompt_rows, np.float32)[:, None, None]}

    # request A: 2 images, request B: 1 image; conditioning labelled -k (negative) / +k (prompt)
    a, b = _step(feeds([10, 11], [-1, -2], [1, 2])), _step(feeds([20], [-3], [3]))
    call = combine_feeds([a, b])
    assert call["latents"][:, 0].tolist() == [10, 11, 20] and call["timestep"].tolist() == [10, 11, 20]
    assert call["encoder_hidden_states"].ravel().tolist() == [-1, -2, -3, 1, 2, 3]  # uncond-first for the call
    out_a, out_b = split_outputs({"guided": np.array([[100], [101], [200]])}, [2, 1])
    assert out_a["guided"].ravel().tolist() == [100, 101] and out_b["guided"].ravel().tolist() == [200]
    with pytest.raises(RuntimeError, match=r"output 'guided' with shape \[2, 1\] for a call of 3 images"):
        split_outputs({"guided": np.array([[100], [101]])}, [2, 1])
    with pytest.raises(RuntimeError, match="returned float32, not a dict of outputs"):
        split_outputs(np.float32(0), [2, 1])


class SpoiledCall(Runner):
    """The real denoiser runner; call number `on_call` (1-based) gives `spoil(its real outputs)`."""

    def __init__(self, runner, on_call: int, spoil):
        self.runner, self.on_call, self.spoil = runner, on_call, spoil
        self.input_names, self.output_names = runner.input_names, runner.output_names
        self.calls = 0

    def run(self, feeds):
        outputs = self.runner.run(feeds)
        self.calls += 1
        return self.spoil(outputs) if self.calls == self.on_call else outputs


def _raise(outputs):
    raise RuntimeError("injected fault")


SPOILS = {  # spoiled output -> the words every request of that call fails with
    "raises": (_raise, "the batched denoiser call failed: RuntimeError: injected fault"),
    "truncated": (lambda outputs: {k: v[:-1] for k, v in outputs.items()}, "returned output 'guided' with shape [5, "),
    "scalar": (lambda outputs: np.float32(0), "returned float32, not a dict of outputs"),
}


def run_held_together(pipeline, engine, cases, steps):
    """Each case (prompt, negative, images, seed, rule, scale) sampled through its own request of
    `engine`, all slots taken before any step: every call holds one step of each. Returns final
    latents or the exception, per case."""
    results = [None] * len(cases)

    def sample(i, runner):
        prompt, negative, images, seed, rule, scale = cases[i]
        try:
            r = pipeline.plan(prompt, negative, guidance=rule, scale=scale, steps=steps, seed=seed, num_images=images,
                              sampler="euler", output="latents")
            results[i] = pipeline.sample(pipeline.conditioning(r.prompt, r.negative_prompt, r.num_images),
                                         pipeline.initial_noise(r), guidance=r.guidance, sampler=r.sampler,
                                         steps=r.steps, rng=np.random.default_rng(r.seed), runner=runner)
        except Exception as exc:  # noqa: BLE001 -- the test checks which
            results[i] = exc

    with ExitStack() as stack:
        runners = [stack.enter_context(engine.request()) for _ in cases]
        threads = [threading.Thread(target=sample, args=(i, r)) for i, r in enumerate(runners)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(JOIN_S)
        assert not any(t.is_alive() for t in threads)
    return results


# prompt, negative prompt, images, seed, rule, scale: several images each, every negative different
HELD = [("a handwritten 3", "a handwritten 8", 2, 71, "samg", 6.0), ("a handwritten 5", "", 1, 72, "cfg", 3.0),
        ("a handwritten 0", "a handwritten 6", 3, 73, "samg", 4.0)]


@pytest.mark.parametrize("guidance", ["fused", "scfg"])
def test_requests_held_together_share_every_call_and_match_alone(digits, tiny_export, guidance):
    """Multi-image requests with different negatives in ONE call each step (made certain, not left
    to the OS); each equals Pipeline.__call__ alone. S-CFG graphs hold 2B-row attention inside."""
    from samg.runtime.batching import BatchingEngine
    from samg.runtime.pipeline import Pipeline

    reference = digits[1] if guidance == "fused" else Pipeline.load(tiny_export("digits", "scfg"))
    cases = HELD if guidance == "fused" else [c[:4] + ("scfg", c[5]) for c in HELD]
    steps = 4
    engine = BatchingEngine(reference.runners["denoiser"], max_batch_size=8, max_wait_s=HOLD_S)
    try:
        results = run_held_together(reference, engine, cases, steps)
        stats = engine.stats()
    finally:
        engine.close(timeout=10)
    assert stats["requests_per_call"] == {3: steps} and stats["batch_sizes"] == {6: steps}
    for (prompt, negative, images, seed, rule, scale), got in zip(cases, results):
        assert isinstance(got, np.ndarray), got
        assert_latents_match(got, alone(reference, prompt, rule=rule, scale=scale, steps=steps, seed=seed,
                                        sampler="euler", num_images=images, negative=negative))


@pytest.mark.parametrize("spoil", list(SPOILS))
def test_a_failed_shared_call_fails_every_request_in_it_and_the_engine_goes_on(digits, spoil):
    from samg.runtime.batching import BatchingEngine

    _, reference = digits
    spoil_fn, words = SPOILS[spoil]
    runner = SpoiledCall(reference.runners["denoiser"], on_call=2, spoil=spoil_fn)
    engine = BatchingEngine(runner, max_batch_size=8, max_wait_s=HOLD_S)
    try:
        failed = run_held_together(reference, engine, HELD, steps=4)
        # the scheduler lives on: a request after the failed call runs normally
        after, = run_held_together(reference, engine, HELD[1:2], steps=4)
    finally:
        start = time.monotonic()
        engine.close(timeout=10)
        assert time.monotonic() - start < 10
    for exc in failed:
        assert isinstance(exc, RuntimeError) and words in str(exc), exc
    assert engine.stats()["requests_per_call"] == {3: 2, 1: 4}  # the failed call was the last of the three
    prompt, negative, images, seed, rule, scale = HELD[1]
    assert_latents_match(after, alone(reference, prompt, rule=rule, scale=scale, steps=4, seed=seed, sampler="euler",
                                      num_images=images, negative=negative))


def test_close_is_bounded_and_fails_the_steps_still_to_run(digits):
    from samg.runtime.batching import BatchingEngine

    _, reference = digits
    engine = BatchingEngine(reference.runners["denoiser"], max_batch_size=8, max_wait_s=HOLD_S)
    r = reference.plan("a handwritten 1", steps=2, output="latents")
    feeds = {"latents": reference.initial_noise(r), "timestep": np.array([999.0], np.float32),
             "guidance_scales": np.array([[2.0, 4.0]], np.float32),
             **reference.conditioning(r.prompt, r.negative_prompt, 1)}
    outcome = []
    with engine.request() as runner, engine.request():  # the second never steps: the first's step waits
        waiter = threading.Thread(target=lambda: outcome.append(_try(runner.run, feeds)))
        waiter.start()
        deadline = time.monotonic() + JOIN_S
        while engine.stats()["waiting_steps"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        start = time.monotonic()
        engine.close(timeout=0.5)
        assert time.monotonic() - start < 5
        waiter.join(JOIN_S)
        assert isinstance(outcome[0], SamgError) and "closed before this request finished" in str(outcome[0])
        with pytest.raises(SamgError, match="closed before this request finished"):
            runner.run(feeds)
    with pytest.raises(SamgError, match="this pipeline is closed"):
        with engine.request():
            pass


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 -- returned for the test to check
        return exc


def test_a_spoiled_call_through_samg_load_fails_its_requests_and_close_returns(digits):
    from samg.api import SamgPipeline
    from samg.runtime.pipeline import Pipeline

    folder, reference = digits
    served = Pipeline.load(folder)
    served.runners["denoiser"] = SpoiledCall(served.runners["denoiser"], on_call=1, spoil=SPOILS["truncated"][0])
    pipe = SamgPipeline(served, max_batch_size=8)
    try:
        with pytest.raises(RuntimeError, match=r"returned output 'guided' with shape \[1, "):
            pipe("a handwritten 4", num_images_per_prompt=2, num_inference_steps=3, seed=5, output_type="latent")
        out = pipe("a handwritten 4", num_inference_steps=3, seed=5, guidance="cfg", guidance_scale=3.0,
                   output_type="latent")
    finally:
        start = time.monotonic()
        pipe.close(timeout=10)
        assert time.monotonic() - start < 10
    assert_latents_match(out.images, alone(reference, "a handwritten 4", rule="cfg", scale=3.0, steps=3, seed=5,
                                           sampler="euler"))
    assert pipe.stats()["requests_failed"] == 1 and pipe.stats()["requests_done"] == 1
