"""Samplers, k-diffusion style: plain functions `sample_x(denoise, x, sigmas, *, callback, rng)`.

`denoise(x, sigma, step)` works on the sampler variable (see schedules.py) and returns x0, or a
`samg.guidance.StepResult` whose `renoise_x0` (CFG++: the unconditional x0) sets the noise direction
the next state is re-noised along; the deterministic first-order samplers honour it, the others
refuse it. `step` is the index of sigma in `sigmas`. A first sigma of inf
(zero terminal SNR) is the limit the samplers take there: the variable holds x_VE / sigma = x_t, the
noise direction (x - x0) / sigma is x itself, and every update is its sigma -> inf limit (as diffusers'
DDIM at alpha_bar = 0). Each step checks the new latents for NaN/Inf and names the step.
"""

from __future__ import annotations

import math
from typing import Callable, Union

import numpy as np

from samg.errors import SamgError
from samg.guidance.step import StepResult
from samg.io import check_finite

Denoise = Callable[[np.ndarray, float, int], Union[np.ndarray, StepResult]]
Callback = Callable[[int, np.ndarray, np.ndarray], None]


def _check(x: np.ndarray, i: int, n: int) -> None:
    check_finite("latents", x, f"after step {i + 1}/{n}")


def _denoised(result) -> tuple[np.ndarray, np.ndarray]:
    """(x0, the x0 whose noise direction re-noises the next state) of a denoise call."""
    if isinstance(result, StepResult):
        return result.x0, (result.x0 if result.renoise_x0 is None else result.renoise_x0)
    return result, result


def renoise_unsupported(sampler: str) -> SamgError:
    """The error for a re-noising rule (CFG++) on a sampler outside DETERMINISTIC_FIRST_ORDER."""
    return SamgError(f"cfgpp re-noises along the unconditional prediction, which {sampler} cannot: "
                     "use --sampler euler or ddim")


def _x0_only(result, sampler: str) -> np.ndarray:
    """x0 of a denoise call, for samplers that cannot re-noise along another direction."""
    x0, renoise = _denoised(result)
    if renoise is not x0:
        raise renoise_unsupported(sampler)
    return x0


def _noise_direction(x: np.ndarray, x0: np.ndarray, sigma: float) -> np.ndarray:
    """(x - x0) / sigma; at sigma = inf the variable already holds x / sigma and x0 / sigma is 0."""
    return x if math.isinf(sigma) else (x - x0) / sigma


def sample_euler(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *, callback: Callback | None = None,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """Euler (first order, deterministic). With DDIM's sigmas this is DDIM (eta 0); with flow
    sigmas and a flow denoiser it is flow-matching Euler."""
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised, renoise_x0 = _denoised(denoise(x, sigma, i))
        d = _noise_direction(x, renoise_x0, sigma)
        x = denoised + d * sigma_next  # == x + d*(sigma_next - sigma) when nothing re-noises differently
        _check(x, i, n)
        if callback is not None:
            callback(i, x, denoised)
    return x


sample_ddim = sample_euler
sample_flow_euler = sample_euler


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) for an ancestral step (k-diffusion / diffusers EulerAncestral)."""
    if not eta:
        return sigma_to, 0.0
    if math.isinf(sigma_from):  # (sigma_from^2 - sigma_to^2) / sigma_from^2 -> 1
        sigma_up = min(sigma_to, eta * sigma_to)
    else:
        sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def sample_euler_ancestral(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *, callback: Callback | None = None,
                           rng: np.random.Generator | None = None, eta: float = 1.0) -> np.ndarray:
    if rng is None:
        raise SamgError("euler_a needs a random generator: pass a seed")
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = _x0_only(denoise(x, sigma, i), "euler_a")
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if math.isinf(sigma):
            x = denoised + x * sigma_down  # the limit of the line below (x holds x_VE / sigma)
        else:
            x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + rng.standard_normal(x.shape).astype(x.dtype) * sigma_up
        _check(x, i, n)
        if callback is not None:
            callback(i, x, denoised)
    return x


def sample_dpmpp_2m(denoise: Denoise, x: np.ndarray, sigmas: np.ndarray, *, callback: Callback | None = None,
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """DPM-Solver++ 2M (midpoint form; first order on the first step, and the final step to
    sigma 0 returns x0, as diffusers' DPMSolverMultistepScheduler with final_sigmas_type "zero")."""
    n = len(sigmas) - 1
    old_denoised = None
    h_last = None
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = _x0_only(denoise(x, sigma, i), "dpmpp_2m")
        if sigma_next == 0:
            x = denoised
        else:
            t, t_next = -np.log(sigma), -np.log(sigma_next)
            h = t_next - t
            if old_denoised is None:
                d = denoised
            else:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            # at sigma = inf: x holds x_VE / sigma, h = inf, expm1(-h) = -1 (and r = inf next step)
            ratio = sigma_next if math.isinf(sigma) else sigma_next / sigma
            x = ratio * x - np.expm1(-h) * d
            h_last = h
        old_denoised = denoised
        _check(x, i, n)
        if callback is not None:
            callback(i, x, denoised)
    return x


SAMPLERS: dict[str, Callable[..., np.ndarray]] = {
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "flow_euler": sample_flow_euler,
}

# Samplers whose update can re-noise with another x0 (needed by CFG++).
DETERMINISTIC_FIRST_ORDER = ("euler", "ddim", "flow_euler")


def get_sampler(name: str) -> Callable[..., np.ndarray]:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise SamgError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}") from None


def default_sampler(prediction_type: str) -> str:
    return "flow_euler" if prediction_type == "flow" else "euler"
