"""Adaptive Projected Guidance (Sadat et al., ICLR 2025), reference in denoised (x0) space.

Matches the paper's code and diffusers' ``normalized_guidance`` with
``use_original_formulation=True`` and ``guidance_scale = w − 1`` (diffusers' default formulation
adds ``w·update`` to x0_u instead, a different rule once the update is projected):

    D = x̂0_c − x̂0_u
    running = D + β·running;  D = running          (momentum β, with a state; β < 0 in the paper)
    D = D · min(1, r / ‖D‖)                         (r = norm_threshold; skipped when r <= 0)
    D_∥ = ⟨D, ĉ⟩·ĉ,  ĉ = x̂0_c / max(‖x̂0_c‖, 1e-12);  D_⊥ = D − D_∥   (float64, as diffusers)
    x̂0 = x̂0_c + (w − 1)·(D_⊥ + η·D_∥)

Norms and inner products run over all non-batch axes per sample. Stateful across steps: keep one
:class:`APGState` per generation and call :meth:`APGState.reset` before a new one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from samg.errors import SamgError
from samg.guidance._xp import check_pair


@dataclass
class APGState:
    """The momentum buffer (float32, same array type and shape as the predictions; None = empty)."""

    running: Any = None

    def reset(self) -> None:
        self.running = None


def apg(x0_u, x0_c, scale, state: APGState | None = None, *, eta=0.0, norm_threshold=15.0, momentum=-0.5):
    """APG guided x̂0 (input dtype). Without a ``state`` no momentum is applied (stateless APG)."""
    ops = check_pair(x0_u, x0_c)
    axes = tuple(range(1, x0_u.ndim))
    u32, c32 = ops.f32(x0_u), ops.f32(x0_c)
    diff = c32 - u32

    if state is not None:
        if state.running is not None and tuple(state.running.shape) != tuple(diff.shape):
            raise SamgError(
                f"APG momentum state holds shape {tuple(state.running.shape)} but the predictions are "
                f"{tuple(diff.shape)}: call state.reset() before a new generation"
            )
        state.running = diff if state.running is None else diff + float(momentum) * state.running
        diff = state.running

    if norm_threshold > 0:
        norm = ops.sqrt(ops.sum(diff * diff, axes))
        with np.errstate(divide="ignore"):  # ‖D‖ = 0 gives r/0 = inf, and min(1, inf) = 1
            diff = diff * ops.clamp_max(float(norm_threshold) / norm, 1.0)

    d64, c64 = ops.float64(diff), ops.float64(c32)
    c_hat = c64 / ops.clamp_min(ops.sqrt(ops.sum_native(c64 * c64, axes)), 1e-12)
    parallel = ops.sum_native(d64 * c_hat, axes) * c_hat
    orthogonal = d64 - parallel
    update = ops.f32(orthogonal) + float(eta) * ops.f32(parallel)
    return ops.cast(c32 + (ops.param(scale, x0_u) - 1.0) * update, x0_u.dtype)

