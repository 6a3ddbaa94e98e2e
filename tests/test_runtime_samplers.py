"""Samplers on an analytic denoiser: data x0 ~ N(mu, s0^2) per element, so the exact denoiser is
E[x0 | x] = mu + s0^2 / (s0^2 + sigma^2) * (x - mu), and the probability-flow ODE maps a start
x_T = mu + sqrt(s0^2 + sigma_max^2) * z to mu + s0 * z exactly."""

import numpy as np
import pytest

from samg.errors import SamgError
from samg.runtime import samplers, schedules

MU, S0 = 0.7, 0.5


def gaussian_denoise(x, sigma):
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
    def denoise(x, s):
        var = (1 - s) ** 2 * S0**2 + s**2
        return MU + (1 - s) * S0**2 / var * (x - (1 - s) * MU)

    sched = schedules.flow_schedule({"kind": "flow", "shift": 3.0}, 200)
    z = np.random.default_rng(2).standard_normal((32, 4))
    out = samplers.sample_flow_euler(denoise, z, sched.sigmas)
    np.testing.assert_allclose(out, MU + S0 * z, atol=0.02)


def test_non_finite_latents_name_the_step():
    def bad(x, sigma):
        return x * np.nan if sigma < 5 else gaussian_denoise(x, sigma)

    with pytest.raises(SamgError, match=r"latents after step \d+/6"):
        samplers.sample_euler(bad, np.zeros((1, 2)), karras(6))


def test_renoise_x0_changes_only_the_noise_direction():
    # A denoiser exposing renoise_x0 (CFG++) : x_next = x0 + sigma_next * (x - renoise_x0) / sigma.
    class Pp:
        renoise_x0 = None

        def __call__(self, x, sigma):
            self.renoise_x0 = np.zeros_like(x)
            return np.full_like(x, 2.0)

    x = np.ones((1, 1))
    out = samplers.sample_euler(Pp(), x, np.array([1.0, 0.5]))
    np.testing.assert_allclose(out, 2.0 + 0.5 * (1.0 - 0.0) / 1.0)


def test_unknown_sampler():
    with pytest.raises(SamgError, match="unknown sampler"):
        samplers.get_sampler("lms")
