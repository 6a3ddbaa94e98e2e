"""One sampling step as a host-side guidance rule sees it, and what the rule hands back.

The runtime's denoiser and the quality benchmarks build a :class:`StepInputs` from the model's two
predictions and call ``GuidanceRule.apply(step, state, **params)`` (samg.guidance.registry); the
rule moves the predictions into the space it needs and returns a :class:`StepResult` in x0 form,
which the samplers (samg.runtime.samplers) consume directly.

Predictions are in the model's own parametrization (``prediction_type``) and ``x`` is the
k-diffusion sampler variable (``x = x0 + sigma·eps``; for flow models ``x = (1 − sigma)·x0 +
sigma·noise``):

- epsilon:      x0 = x − sigma·eps
- v_prediction: x0 = x / (1 + sigma²) − sigma / sqrt(1 + sigma²) · v
- flow:         x0 = x − sigma·v
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from samg.contract import PREDICTION_TYPES
from samg.errors import SamgError


def x0_from_prediction(prediction_type: str, prediction, x, sigma: float):
    """The denoised estimate x0 in the sampler variable from a model prediction (module doc)."""
    if np.isinf(sigma):  # alpha_bar = 0 (zero terminal SNR): x holds x_t, which is pure noise
        if prediction_type != "v_prediction":
            raise SamgError(f"this schedule starts at zero SNR (infinite sigma), where a {prediction_type} "
                            "model cannot predict x0: use a v_prediction model or a schedule without "
                            "rescale_betas_zero_snr")
        return -prediction  # x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v at alpha_bar = 0, as diffusers' DDIM
    if prediction_type in ("epsilon", "flow"):
        return x - sigma * prediction
    if prediction_type == "v_prediction":
        return x / (1.0 + sigma**2) - (sigma / np.sqrt(1.0 + sigma**2)) * prediction
    raise SamgError(f"unknown prediction_type {prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}")


@dataclass(frozen=True)
class StepInputs:
    """The step's two model predictions (same shape as ``x``), the sampler variable, sigma, index and
    the model's parametrization (PREDICTION_TYPES; no default: a wrong one gives a wrong x0 silently)."""

    pred_uncond: Any
    pred_cond: Any
    x: Any
    sigma: float
    step: int
    prediction_type: str

    def to_x0(self, prediction):
        return x0_from_prediction(self.prediction_type, prediction, self.x, self.sigma)


@dataclass(frozen=True)
class StepResult:
    """A step's guided denoised estimate ``x0``; ``renoise_x0`` is the x0 whose noise direction
    ``(x − renoise_x0) / sigma`` the sampler re-noises along (CFG++: the unconditional one), None
    when that is ``x0`` itself."""

    x0: Any
    renoise_x0: Any = None


def applied_scales(scale_map, pred_uncond, pred_cond, channel_axis: int = 1) -> tuple[float, float]:
    """(mean_p w(p), mean of w(p) weighted by the delta energy |c − u|²(p)) over the whole batch.

    The second is the scale applied where guidance acts at all: where Δ = 0 the scale changes
    nothing, yet it counts in the plain mean."""
    w = np.asarray(scale_map, np.float64)
    delta = np.asarray(pred_cond, np.float64) - np.asarray(pred_uncond, np.float64)
    energy = (delta * delta).sum(channel_axis, keepdims=True)
    return float(w.mean()), float((w * energy).sum() / max(float(energy.sum()), 1e-30))
