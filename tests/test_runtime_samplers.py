"""Samplers on an analytic denoiser: data x0 ~ N(mu, s0^2) per element, so the exact denoiser is
E[x0 | x] = mu + s0^2 / (s0^2 + sigma^2) * (x - mu), and the probability-flow ODE maps a start
x_T = mu + sqrt(s0^2 + sigma_max^2) * z to mu + s0 * z exactly."""

import numpy as np
import pytest

from samg.errors import SamgError
from samg.guidance.step import StepResult
from samg.contract import FlowScheduler
from samg.runtime import samplers, schedules

MU, S0 = 0.7, 0.5


def gaussian_denoise(x, sigma, step):
    return MU + S0**2 / (S0**2 + sigma**2) * (x - MU)


def karras(n, smax=80.0, smin=0.02):
    return np.concatenate([schedules.karras_sigmas(smin, smax, n), [0.0]])


def ode_error(name, steps):
    z = np.random.default_rng(0).standard_normal((64, 1, 2, 2))
    sig = karras(steps)
    x = MU + np.sqrt(S0**2 + sig[0] ** 2) * z
    out = samplers.get_sampler(name)(gaussian_denoise, x, sig)
    return np.abs(out - (MU + S0 * z)).max()


@pytest.mark.parametrize("name", ["euler", "ddim", "dpmpp_2m", "flow_euler"])
def test_deterministic_samplers_converge_to_exact_ode_solution(name):
    assert ode_error(name, 100) < 0.05
    assert ode_error(name, 100) < ode_error(name, 10) / 5


def test_dpmpp_2m_is_second_order_and_beats_euler():
    e20, e40 = ode_error("dpmpp_2m", 20), ode_error("dpmpp_2m", 40)
    assert e40 < e20 / 3  # second order: error falls ~4x when steps double (euler: ~2x)
    assert e40 < ode_error("euler", 40) / 5


def test_euler_ancestral_samples_the_data_distribution():
    def run(steps):
        rng = np.random.default_rng(1)
        sig = karras(steps)
        x = MU + np.sqrt(S0**2 + sig[0] ** 2) * rng.standard_normal((20000, 1))
        return samplers.sample_euler_ancestral(gaussian_denoise, x, sig, rng=rng)

    coarse, fine = run(30), run(300)
    assert abs(fine.mean() - MU) < 0.015 and abs(fine.std() - S0) < 0.015
    assert abs(fine.std() - S0) < abs(coarse.std() - S0) / 3  # first-order bias shrinks with steps


def test_euler_ancestral_is_reproducible_from_the_seed():
    sig = karras(4)
    x = np.ones((2, 3))
    a = samplers.sample_euler_ancestral(gaussian_denoise, x, sig, rng=np.random.default_rng(5))
    b = samplers.sample_euler_ancestral(gaussian_denoise, x, sig, rng=np.random.default_rng(5))
    c = samplers.sample_euler_ancestral(gaussian_denoise, x, sig, rng=np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_flow_euler_on_exact_flow_field():
    # flow: x = (1 - s) x0 + s n with x0 ~ N(MU, S0^2); the exact x0 denoiser is linear in x.
    def denoise(x, s, step):
        var = (1 - s) ** 2 * S0**2 + s**2
        return MU + (1 - s) * S0**2 / var * (x - (1 - s) * MU)

    sched = schedules.flow_schedule(FlowScheduler(shift=3.0), 200)
    z = np.random.default_rng(2).standard_normal((32, 4))
    out = samplers.sample_flow_euler(denoise, z, sched.sigmas)
    np.testing.assert_allclose(out, MU + S0 * z, atol=0.02)


def test_non_finite_latents_name_the_step():
    def bad(x, sigma, step):
        return x * np.nan if sigma < 5 else gaussian_denoise(x, sigma, step)

    with pytest.raises(SamgError, match=r"latents after step \d+/6"):
        samplers.sample_euler(bad, np.zeros((1, 2)), karras(6))


def test_renoise_x0_changes_only_the_noise_direction():
    # A step result carrying renoise_x0 (CFG++): x_next = x0 + sigma_next * (x - renoise_x0) / sigma.
    def pp(x, sigma, step):
        return StepResult(np.full_like(x, 2.0), renoise_x0=np.zeros_like(x))

    x = np.ones((1, 1))
    out = samplers.sample_euler(pp, x, np.array([1.0, 0.5]))
    np.testing.assert_allclose(out, 2.0 + 0.5 * (1.0 - 0.0) / 1.0)


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m"])
def test_samplers_that_cannot_renoise_refuse_a_renoise_x0(name):
    def pp(x, sigma, step):
        return StepResult(np.full_like(x, 2.0), renoise_x0=np.zeros_like(x))

    with pytest.raises(SamgError, match="cfgpp re-noises"):
        samplers.get_sampler(name)(pp, np.ones((1, 1)), np.array([1.0, 0.5]), rng=np.random.default_rng(0))


def test_samplers_pass_the_step_index():
    seen = []

    def denoise(x, sigma, step):
        seen.append((step, sigma))
        return gaussian_denoise(x, sigma, step)

    sig = karras(5)
    for name in ("euler", "euler_a", "dpmpp_2m"):
        seen.clear()
        samplers.get_sampler(name)(denoise, np.ones((1, 2)), sig, rng=np.random.default_rng(0))
        assert seen == [(i, float(s)) for i, s in enumerate(sig[:-1])], name


def test_unknown_sampler():
    with pytest.raises(SamgError, match="unknown sampler"):
        samplers.get_sampler("lms")


# Zero terminal SNR (alpha_bar_T = 0, sigma = inf): the variable holds x_t there, and one step must be
# diffusers' DDIM step at alpha_bar = 0, written out here in VP form from the DDIM paper:
#   x0 = sqrt(a) x_t - sqrt(1 - a) v = -v,  x_prev = sqrt(1 - a_prev) * x_t + sqrt(a_prev) * x0.
def _first_step_at_zero_snr(sampler, a_prev, **kw):
    from samg.guidance.step import x0_from_prediction
    from samg.runtime.denoiser import _model_input_scale

    x_t = np.random.default_rng(3).standard_normal((2, 3))
    v = np.random.default_rng(4).standard_normal((2, 3))
    seen = []

    def denoise(x, sigma, step):
        seen.append(x * _model_input_scale("v_prediction", sigma))  # what the model would be fed
        return x0_from_prediction("v_prediction", v, x, sigma)

    sigma_prev = np.sqrt((1 - a_prev) / a_prev)
    out = samplers.get_sampler(sampler)(denoise, x_t.copy(), np.array([np.inf, sigma_prev]), **kw)
    expected_vp = np.sqrt(1 - a_prev) * x_t + np.sqrt(a_prev) * (-v)
    return seen[0], x_t, out / np.sqrt(1 + sigma_prev**2), expected_vp


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m"])
def test_infinite_first_sigma_is_the_ddim_step_at_zero_alpha_bar(sampler):
    fed, x_t, got_vp, expected_vp = _first_step_at_zero_snr(sampler, a_prev=0.3)
    np.testing.assert_array_equal(fed, x_t)  # the model sees x_t itself, not x * 0
    np.testing.assert_allclose(got_vp, expected_vp, rtol=1e-12, atol=1e-12)


def test_infinite_first_sigma_ancestral_adds_noise_only_and_stays_finite():
    # euler_a at sigma_from = inf: sigma_up -> sigma_next, sigma_down -> 0: the step lands on x0 + fresh noise
    fed, x_t, got_vp, _ = _first_step_at_zero_snr("euler_a", a_prev=0.3, rng=np.random.default_rng(0))
    assert np.isfinite(got_vp).all()
    noise = np.random.default_rng(0).standard_normal((2, 3))
    v = np.random.default_rng(4).standard_normal((2, 3))
    sigma_prev = np.sqrt(0.7 / 0.3)
    np.testing.assert_allclose(got_vp * np.sqrt(1 + sigma_prev**2), -v + sigma_prev * noise, rtol=1e-12)


def test_infinite_sigma_with_an_epsilon_model_is_refused():
    from samg.guidance.step import x0_from_prediction

    with pytest.raises(SamgError, match="v_prediction"):
        x0_from_prediction("epsilon", np.zeros(2), np.zeros(2), np.inf)
