"""Stateful and re-noising rules in the real sampling loop: the runtime's Denoiser and samplers over
a closed-form "model", against the loop written out here from docs/guidance-op.md.

- APG: the momentum buffer carries across the steps of one generation, in x0 space
  (running = D + β·running, norm clip r, parallel/orthogonal split against x̂0_c).
- CFG++: x̂0 from u + λΔ, and the next state re-noised along the unconditional eps u.
"""

from pathlib import Path

import numpy as np
import pytest

from samg import contract
from samg.runtime import samplers, schedules
from samg.runtime.denoiser import Guidance, GuidedDenoiser

SD = contract.DiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)
SHAPE = (2, 3, 4, 4)
STEPS = 6


def model_predictions(x_in, t):
    """The stand-in model: (uncond, cond) predictions as closed-form functions of its input and t.
    Nonlinear in x_in, so Δ (and its direction) changes from step to step."""
    x_in = np.asarray(x_in, np.float64)
    grid = np.arange(np.prod(SHAPE[1:]), dtype=np.float64).reshape(SHAPE[1:]) / 10.0
    uncond = 0.7 * x_in + 0.1 * np.sin(grid + t / 300.0)
    cond = uncond + 0.4 * np.tanh(2.0 * x_in) + 0.3 * np.cos(3.0 * grid) * (1.0 + t / 1000.0)
    return uncond, cond


class ClosedFormRunner:
    """A Runner (run(feeds) -> outputs) over `model_predictions`: stands in for an exported raw model."""

    input_names = ["latents", "timestep", "encoder_hidden_states"]
    output_names = ["pred_uncond", "pred_cond"]

    def __init__(self):
        self.calls = 0

    def run(self, feeds):
        self.calls += 1
        t = float(feeds["timestep"][0])
        assert np.all(feeds["timestep"] == t)
        u, c = model_predictions(feeds["latents"], t)
        return {"pred_uncond": u.astype(np.float32), "pred_cond": c.astype(np.float32)}


def _start(sched):
    return (np.random.default_rng(0).standard_normal(SHAPE) * sched.init_noise_sigma).astype(np.float32)


def _run_runtime(sched, prediction_type, guidance):
    runner = ClosedFormRunner()
    den = GuidedDenoiser(runner, prediction_type=prediction_type, schedule=sched,
                   conditioning={"encoder_hidden_states": np.zeros((2 * SHAPE[0], 1, 1), np.float32)},
                   guidance=guidance)
    out = samplers.sample_euler(den, _start(sched), sched.sigmas)
    assert runner.calls == STEPS
    return np.asarray(out, np.float64)


# ------------------------------------------------------------------ the spec's loops, in float64


def _x0(prediction_type, out, x, sigma):
    """x̂0 in the sampler variable (docs: epsilon x − σ·eps; v x/(1+σ²) − σ/√(1+σ²)·v)."""
    if prediction_type == "epsilon":
        return x - sigma * out
    return x / (1 + sigma**2) - sigma / np.sqrt(1 + sigma**2) * out


def _per_sample_sum(values):
    """Σ over every non-batch axis, shaped [B, 1, 1, 1]."""
    return values.reshape(values.shape[0], -1).sum(1).reshape(-1, *([1] * (values.ndim - 1)))


def _norm(values):
    return np.sqrt(_per_sample_sum(values**2))


def spec_apg_loop(sched, prediction_type, w, *, eta, norm_threshold, momentum, momentum_space="x0",
                  initial_running=None, return_running=False):
    """Euler over APG as the spec writes it. momentum_space="eps" (or "none") is the wrong loop a
    broken runtime would run, and `initial_running` (a buffer left by an earlier generation) the
    leak of a reused one: used only to show that the tests tell them apart. With return_running,
    returns (x, the final momentum buffer)."""
    x = _start(sched).astype(np.float64)
    running = initial_running
    sigmas = [float(s) for s in sched.sigmas]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        u, c = model_predictions(x / np.sqrt(1 + sigma**2), sched.timestep_for(sigma))
        x0_u, x0_c = _x0(prediction_type, u, x, sigma), _x0(prediction_type, c, x, sigma)
        d = x0_c - x0_u
        if momentum_space == "x0":
            running = d if running is None else d + momentum * running
            d = running
        elif momentum_space == "eps":  # momentum on the raw prediction difference, mapped to x0 after
            raw = c - u
            running = raw if running is None else raw + momentum * running
            d = _x0(prediction_type, running, 0.0, sigma) - _x0(prediction_type, 0.0, 0.0, sigma)
        if norm_threshold > 0:
            d = d * np.minimum(1.0, norm_threshold / _norm(d))
        c_hat = x0_c / np.maximum(_norm(x0_c), 1e-12)
        parallel = _per_sample_sum(d * c_hat) * c_hat
        x0 = x0_c + (w - 1) * ((d - parallel) + eta * parallel)
        x = x0 + (x - x0) / sigma * sigma_next  # Euler
    return (x, running) if return_running else x


def spec_cfgpp_loop(sched, lam, *, renoise="uncond"):
    """DDIM/Euler with CFG++ (eps model): x̂0 = x − σ(u + λΔ), x_next = x̂0 + σ_next·u.
    renoise="guided" is plain CFG at λ (re-noise with u + λΔ), to show the test tells them apart."""
    x = _start(sched).astype(np.float64)
    sigmas = [float(s) for s in sched.sigmas]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        u, c = model_predictions(x / np.sqrt(1 + sigma**2), sched.timestep_for(sigma))
        guided = u + lam * (c - u)
        x0 = x - sigma * guided
        x = x0 + sigma_next * (u if renoise == "uncond" else guided)
    return x


def _assert_close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _far_apart(a, b):
    return np.abs(a - b).max() > 100 * 1e-4 * np.abs(b).max()


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("momentum, norm_threshold, eta", [(-0.5, 0.0, 0.0), (0.6, 2.0, 0.3)])
def test_apg_momentum_carries_across_steps_in_x0_space(prediction_type, momentum, norm_threshold, eta):
    sched = schedules.make_schedule(SD, "euler", STEPS)
    w = 5.0
    options = dict(eta=eta, norm_threshold=norm_threshold, momentum=momentum)
    got = _run_runtime(sched, prediction_type, Guidance("apg", w, w, options=options))
    want = spec_apg_loop(sched, prediction_type, w, **options)
    _assert_close(got, want)
    # The comparison can fail: without momentum, or with it on the raw predictions, the result differs.
    for wrong in ("none", "eps"):
        assert _far_apart(spec_apg_loop(sched, prediction_type, w, momentum_space=wrong, **options), want), wrong


def test_apg_norm_clip_is_active_in_the_clipped_case():
    # The (0.6, 2.0) case above must exercise the clip, or it would test nothing about r.
    sched = schedules.make_schedule(SD, "euler", STEPS)
    clipped = spec_apg_loop(sched, "epsilon", 5.0, eta=0.3, norm_threshold=2.0, momentum=0.6)
    unclipped = spec_apg_loop(sched, "epsilon", 5.0, eta=0.3, norm_threshold=0.0, momentum=0.6)
    assert _far_apart(clipped, unclipped)


def test_one_pipeline_starts_every_generation_with_empty_momentum():
    # A service reuses one Pipeline: each sample() must start APG's momentum afresh. Both of its
    # generations equal the spec's loop from an empty buffer; a second generation that carried the
    # first one's buffer would not (shown at the end, so the test can fail).
    from samg.runtime.pipeline import Pipeline

    runner = ClosedFormRunner()
    # a raw export (combine None) of the closed-form model; only what sample() reads matters
    export = contract.Export(
        model="closed-form", family="closed-form", source=contract.Source("hub"), prediction_type="epsilon",
        latent=contract.Latent("BCHW", SHAPE[1], 8, 1, 8 * SHAPE[2], 8 * SHAPE[3], None, False), scheduler=SD,
        denoiser=contract.DenoiserGraph("denoiser.onnx"), text_encoder=contract.TextEncoderGraph(None),
        vae=contract.VaeDecoderGraph(None), combine=None, host_rule_attrs=contract.GuidanceCombineAttrs())
    pipeline = Pipeline(Path("unused-export"), export, {"denoiser": runner}, [])
    conditioning = {"encoder_hidden_states": np.zeros((2 * SHAPE[0], 1, 1), np.float32)}
    options = dict(eta=0.0, norm_threshold=0.0, momentum=-0.5)
    guidance = Guidance("apg", 5.0, 5.0, options=options)
    noise = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)  # as _start, before σ_max
    first, second = (pipeline.sample(conditioning, noise, guidance=guidance, sampler="euler", steps=STEPS)
                     for _ in range(2))
    assert runner.calls == 2 * STEPS
    sched = schedules.make_schedule(SD, "euler", STEPS)
    want, left_over = spec_apg_loop(sched, "epsilon", 5.0, **options, return_running=True)
    _assert_close(np.asarray(first, np.float64), want)
    _assert_close(np.asarray(second, np.float64), want)
    assert _far_apart(spec_apg_loop(sched, "epsilon", 5.0, **options, initial_running=left_over), want)


@pytest.mark.parametrize("lam", [0.3, 0.8])
def test_cfgpp_renoises_along_the_unconditional_prediction(lam):
    sched = schedules.make_schedule(SD, "ddim", STEPS)
    got = _run_runtime(sched, "epsilon", Guidance("cfgpp", lam, lam))
    want = spec_cfgpp_loop(sched, lam)
    _assert_close(got, want)
    assert _far_apart(spec_cfgpp_loop(sched, lam, renoise="guided"), want)  # the test can fail
