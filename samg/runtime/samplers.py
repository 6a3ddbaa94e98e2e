"""Samplers, k-diffusion style: plain functions `sample_x(denoise, x, sigmas, *, callback, rng)`.

`denoise(x, sigma, step)` works on the sampler variable (see schedules.py) and returns x0, or a
`samg.guidance.StepResult` whose `renoise_x0` (CFG++: the unconditional x0) sets the noise direction
the next state is re-noised along; the deterministic first-order samplers honour it, the others
refuse it. `step` is the index of sigma in `sigmas`. A first sigma of inf
(zero terminal SNR) is the limit the samplers take there: the variable holds x_VE / sigma = x_t, the
noise direction (x - x0) / sigma is x itself, and every update is its sigma -> inf limit (as diffusers'
DDIM at alpha_bar = 0). Each step checks the new latents for NaN/Inf and names the step.

One code path for every array type: `x` may be a numpy array or a torch tensor on any device (the
denoiser returns the same type); sigmas are host numbers, the updates plain arithmetic. On a device
nothing returns to the host inside the loop: euler_a's noise is drawn on the host from the run's
generator (the same sample on every device) and uploaded, and the finite check keeps its result on
the device until the loop ends (`StepCheck`).
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, Union

import numpy as np

from samg.errors import SamgError
from samg.guidance._xp import is_torch, ops_for
from samg.guidance.step import StepResult
from samg.io import nonfinite_error

Denoise = Callable[[Any, float, int], Union[Any, StepResult]]
Callback = Callable[[int, Any, Any], None]


class StepCheck:
    """A per-step check of the latents that names the first failing step, on any array type.

    `measure(x)` gives a number: for host arrays a Python number, checked at once (the error is
    raised at the failing step); for device tensors a 0-d tensor, compared on the device, where the
    first failing step and its measure are kept. `finish()` reads them after the loop, so a
    generation on a GPU synchronises once instead of once per step, and the check can be captured
    in a CUDA graph. `error(step_index, measure)` builds the SamgError; the raised error carries
    the failing step index as `.step`.
    """

    def __init__(self, measure: Callable[[Any], Any], fails: Callable[[Any], Any],
                 error: Callable[[int, float], SamgError]):
        self.measure, self.fails, self.error = measure, fails, error
        self._step = self._value = None  # device: first failing step (-1: none yet) and its measure

    def __call__(self, i: int, x) -> None:
        value = self.measure(x)
        if not is_torch(value):
            if self.fails(value):
                raise self._error(i, value)
            return
        torch = sys.modules["torch"]
        if self._step is None:
            self._step = torch.full((), -1, dtype=torch.int64, device=value.device)
            self._value = torch.zeros((), dtype=torch.float64, device=value.device)
        first = self.fails(value) & (self._step < 0)
        self._step = torch.where(first, i, self._step)
        self._value = torch.where(first, value.to(torch.float64), self._value)

    def _error(self, step: int, value) -> SamgError:
        error = self.error(step, value)
        error.step = step
        return error

    def finish(self, before: int | None = None) -> None:
        """Raise the first failure a device check kept (one read from the device); host checks have
        raised already. `before`: only a failure at an earlier step (another check failed there)."""
        if self._step is not None:
            torch = sys.modules["torch"]
            step, value = torch.stack([self._step.double(), self._value]).tolist()  # one read
            if step >= 0 and (before is None or step < before):
                raise self._error(int(step), value)


def finish_checks(checks) -> None:
    """Finish device checks together: raise the failure of the earliest step, the one a host loop
    raises (on a tie the earlier check in `checks`, the order the host loop runs them in)."""
    first: SamgError | None = None
    for check in checks:
        try:
            check.finish(before=None if first is None else first.step)
        except SamgError as failed:
            first = failed
    if first is not None:
        raise first


def finite_check(x, steps: int) -> StepCheck:
    """The samplers' check that the latents stay finite (named "latents after step i/n")."""
    size = math.prod(x.shape)
    return StepCheck(lambda v: ops_for(v).count_nonfinite(v), lambda bad: bad > 0,
                     lambda i, bad: nonfinite_error("latents", int(bad), size, f"after step {i + 1}/{steps}"))


def latent_peak(x):
    """max |x|: a Python float for host arrays, a 0-d tensor on x's device for tensors (StepCheck)."""
    return ops_for(x).peak(x)


def to_host(x) -> np.ndarray:
    """The loop's result as a numpy array (one copy from a device; host arrays as they are)."""
    return ops_for(x).to_host(x)


def host_noise(rng: np.random.Generator, like):
    """Standard normal noise shaped like `like`, drawn on the host from `rng` (so a seed gives the
    same sample on every device) and placed like it (one upload for a device tensor)."""
    return ops_for(like).upload_as(rng.standard_normal(tuple(like.shape)), like)


def _denoised(result) -> tuple[Any, Any]:
    """(x0, the x0 whose noise direction re-noises the next state) of a denoise call."""
    if isinstance(result, StepResult):
        return result.x0, (result.x0 if result.renoise_x0 is None else result.renoise_x0)
    return result, result


def renoise_unsupported(sampler: str) -> SamgError:
    """The error for a re-noising rule (CFG++) on a sampler outside DETERMINISTIC_FIRST_ORDER."""
    return SamgError(f"cfgpp re-noises along the unconditional prediction, which {sampler} cannot: "
                     "use --sampler euler or ddim")


def _x0_only(result, sampler: str):
    """x0 of a denoise call, for samplers that cannot re-noise along another direction."""
    x0, renoise = _denoised(result)
    if renoise is not x0:
        raise renoise_unsupported(sampler)
    return x0


def _noise_direction(x, x0, sigma: float):
    """(x - x0) / sigma; at sigma = inf the variable already holds x / sigma and x0 / sigma is 0."""
    return x if math.isinf(sigma) else (x - x0) / sigma


def sample_euler(denoise: Denoise, x, sigmas: np.ndarray, *, callback: Callback | None = None,
                 rng: np.random.Generator | None = None):
    """Euler (first order, deterministic). With DDIM's sigmas this is DDIM (eta 0); with flow
    sigmas and a flow denoiser it is flow-matching Euler."""
    n = len(sigmas) - 1
    check = finite_check(x, n)
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised, renoise_x0 = _denoised(denoise(x, sigma, i))
        d = _noise_direction(x, renoise_x0, sigma)
        x = denoised + d * sigma_next  # == x + d*(sigma_next - sigma) when nothing re-noises differently
        check(i, x)
        if callback is not None:
            callback(i, x, denoised)
    check.finish()
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


def sample_euler_ancestral(denoise: Denoise, x, sigmas: np.ndarray, *, callback: Callback | None = None,
                           rng: np.random.Generator | None = None, eta: float = 1.0):
    if rng is None:
        raise SamgError("euler_a needs a random generator: pass a seed")
    n = len(sigmas) - 1
    check = finite_check(x, n)
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = _x0_only(denoise(x, sigma, i), "euler_a")
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if math.isinf(sigma):
            x = denoised + x * sigma_down  # the limit of the line below (x holds x_VE / sigma)
        else:
            x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + host_noise(rng, x) * sigma_up
        check(i, x)
        if callback is not None:
            callback(i, x, denoised)
    check.finish()
    return x


def sample_dpmpp_2m(denoise: Denoise, x, sigmas: np.ndarray, *, callback: Callback | None = None,
                    rng: np.random.Generator | None = None):
    """DPM-Solver++ 2M (midpoint form; first order on the first step, and the final step to
    sigma 0 returns x0, as diffusers' DPMSolverMultistepScheduler with final_sigmas_type "zero")."""
    n = len(sigmas) - 1
    check = finite_check(x, n)
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
        check(i, x)
        if callback is not None:
            callback(i, x, denoised)
    check.finish()
    return x


SAMPLERS: dict[str, Callable[..., Any]] = {
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "flow_euler": sample_flow_euler,
}

# Samplers whose update can re-noise with another x0 (needed by CFG++).
DETERMINISTIC_FIRST_ORDER = ("euler", "ddim", "flow_euler")


def get_sampler(name: str) -> Callable[..., Any]:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise SamgError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}") from None


def default_sampler(prediction_type: str) -> str:
    return "flow_euler" if prediction_type == "flow" else "euler"
