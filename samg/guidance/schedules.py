"""Per-step guidance schedules: pure functions of (step, num_steps, sigma).

A schedule returns a *gain* g ≥ 0 and a scale w becomes ``1 + (w − 1)·g`` at that step, so
g = 1 keeps w, g = 0 turns guidance off (w = 1 gives c). For SAMG both ends move together:
``(w_min, w_max) → (1 + (w_min − 1)·g, 1 + (w_max − 1)·g)`` (see :func:`scheduled`).

Progress ``s = step / (num_steps − 1)`` runs from 0 (first, noisiest step) to 1 (last); a single
step has s = 1/2. ``linear`` and ``cosine`` average to g = 1 over the steps (s is symmetric about
1/2), so the mean scale over a run equals the constant schedule's.

- ``constant``: g = 1
- ``linear``:   g = 2·s          (increasing; ``reverse=True``: g = 2·(1 − s))
- ``cosine``:   g = 1 − cos(π·s) (increasing; ``reverse=True``: g = 1 + cos(π·s))
- ``interval``: g = 1 if ``sigma_lo < sigma <= sigma_hi`` else 0 (needs sigma)
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from samg.errors import SamgError
from samg.guidance._xp import is_torch

# Default sigma range of the guidance interval (Kynkäänniemi et al. 2024, for SD-style sigmas):
# guidance is on for INTERVAL_SIGMA_LO < sigma <= INTERVAL_SIGMA_HI.
INTERVAL_SIGMA_LO = 0.28
INTERVAL_SIGMA_HI = 5.42


def progress(step: int, num_steps: int) -> float:
    """s in [0, 1] for step index 0..num_steps-1 (1/2 for a single step)."""
    if num_steps < 1 or not 0 <= step < num_steps:
        raise SamgError(f"step {step} is outside 0..{num_steps - 1}: pass a step index below num_steps")
    return 0.5 if num_steps == 1 else step / (num_steps - 1)


def constant(step: int, num_steps: int, sigma: float | None = None) -> float:
    progress(step, num_steps)  # validates the step
    return 1.0


def linear(step: int, num_steps: int, sigma: float | None = None, *, reverse: bool = False) -> float:
    s = progress(step, num_steps)
    return 2.0 * (1.0 - s if reverse else s)


def cosine(step: int, num_steps: int, sigma: float | None = None, *, reverse: bool = False) -> float:
    s = progress(step, num_steps)
    return 1.0 + math.cos(math.pi * s) if reverse else 1.0 - math.cos(math.pi * s)


def in_guidance_interval(sigma, sigma_lo: float, sigma_hi: float):
    """``sigma_lo < sigma <= sigma_hi``: a bool for a float sigma, elementwise for an array or tensor
    (the one test of the guidance interval: the interval rule, its scale map and this schedule)."""
    if np.ndim(sigma) == 0 and not is_torch(sigma):
        return bool(float(sigma_lo) < float(sigma) <= float(sigma_hi))
    return (sigma > float(sigma_lo)) & (sigma <= float(sigma_hi))


def interval(
    step: int, num_steps: int, sigma: float | None = None, *, sigma_lo: float = INTERVAL_SIGMA_LO,
    sigma_hi: float = INTERVAL_SIGMA_HI,
) -> float:
    progress(step, num_steps)
    if sigma is None:
        raise SamgError("the interval schedule needs the step's sigma: pass sigma=")
    return 1.0 if in_guidance_interval(sigma, sigma_lo, sigma_hi) else 0.0


SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": constant,
    "linear": linear,
    "cosine": cosine,
    "interval": interval,
}


def get_schedule(name: str) -> Callable[..., float]:
    try:
        return SCHEDULES[name]
    except KeyError:
        raise SamgError(f"unknown guidance schedule {name!r}: choose one of {', '.join(SCHEDULES)}") from None


def apply_gain(scale: float, gain: float) -> float:
    """``1 + (scale − 1)·gain``."""
    return 1.0 + (float(scale) - 1.0) * float(gain)


def step_scales(scales, gain: float):
    """A scale (a float) or a (w_min, w_max) pair under a step's gain: ``1 + (w − 1)·gain`` each.
    The one place per-step gains meet the scales (schedules, and the interval rule's gate)."""
    if isinstance(scales, (tuple, list)):
        return tuple(apply_gain(w, gain) for w in scales)
    return apply_gain(scales, gain)


def scheduled(name: str, scales, step: int, num_steps: int, sigma: float | None = None, **params):
    """The scale (a float) or the (w_min, w_max) pair to use at this step under schedule `name`."""
    return step_scales(scales, get_schedule(name)(step, num_steps, sigma, **params))
