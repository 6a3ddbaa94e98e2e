"""Plain and comparison guidance rules (reference, numpy and torch): CFG, CFG-rescale, CFG-Zero*,
CFG++, guidance interval.

Every function takes ``(pred_uncond, pred_cond, ...)`` of the same shape ``[B, ...]`` and dtype,
computes in float32 and returns the input dtype. Scales are floats or per-sample vectors [B].
Scale convention: ``w = 1`` is no guidance (the output is c). Formulas: docs/guidance-op.md.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from samg.errors import SamgError
from samg.guidance._xp import check_pair, is_torch
from samg.guidance.schedules import INTERVAL_SIGMA_HI, INTERVAL_SIGMA_LO, in_guidance_interval


def _non_batch_axes(x) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def cfg(u, c, scale):
    """Classifier-free guidance ``u + w·(c − u)`` (float32 inside, input dtype out)."""
    ops = check_pair(u, c)
    u32 = ops.f32(u)
    return ops.cast(u32 + ops.param(scale, u) * (ops.f32(c) - u32), u.dtype)


def cfg_rescale(u, c, scale, phi=0.7):
    """CFG-rescale (Lin et al. 2023), as diffusers' ``rescale_noise_cfg``.

    ``x = u + w·Δ``; ``x_r = x·std(c)/std(x)`` with the unbiased std (correction 1) over all
    non-batch axes per sample; ``out = φ·x_r + (1 − φ)·x``. A sample with std(x) = 0 (constant x)
    is left as x instead of dividing by zero.
    """
    ops = check_pair(u, c)
    u32, c32 = ops.f32(u), ops.f32(c)
    x = u32 + ops.param(scale, u) * (c32 - u32)
    axes = _non_batch_axes(x)
    std_c, std_x = ops.std(c32, axes, 1), ops.std(x, axes, 1)
    positive = std_x > 0  # False for NaN too: x is then non-finite and stays so
    ratio = ops.where(positive, std_c / ops.where(positive, std_x, 1.0), 1.0)
    phi = float(phi)
    return ops.cast(phi * (x * ratio) + (1.0 - phi) * x, u.dtype)


def cfg_zero_star(u, c, scale, *, step=0, zero_init_steps=1, eps=1e-8):
    """CFG-Zero* (Fan et al. 2025) as diffusers' ``ClassifierFreeZeroStarGuidance``.

    ``s* = ⟨c, u⟩ / (‖u‖² + eps)`` per sample over all non-batch axes;
    ``out = s*·u + w·(c − s*·u)``. For ``step < zero_init_steps`` the output is zero, computed as
    ``0·c`` so a non-finite c stays non-finite (diffusers returns plain zeros). Meant for the model's
    own output (flow velocity); it is not linear in Δ, so the space matters.
    """
    ops = check_pair(u, c)
    c32 = ops.f32(c)
    if int(step) < int(zero_init_steps):
        return ops.cast(0.0 * c32, u.dtype)
    u32 = ops.f32(u)
    axes = _non_batch_axes(u32)
    s_star = ops.sum(c32 * u32, axes) / (ops.sum(u32 * u32, axes) + float(eps))
    u_scaled = u32 * s_star
    return ops.cast(u_scaled + ops.param(scale, u) * (c32 - u_scaled), u.dtype)


class CfgppOutput(NamedTuple):
    """What CFG++ hands the sampler: ``guided`` (for x̂0) and ``uncond`` (for re-noising)."""

    guided: Any
    uncond: Any


def _check_unit_interval(name: str, value) -> None:
    values = value.detach().cpu().numpy() if is_torch(value) else np.asarray(value, dtype=np.float64)
    if not np.all((values >= 0.0) & (values <= 1.0)):
        raise SamgError(f"CFG++ {name} must be in [0, 1], got {value}: typical values are 0.2 to 0.8")


def cfgpp(u, c, lam):
    """CFG++ (Chung et al., ICLR 2025), DDIM form, λ ∈ [0, 1].

    Returns ``CfgppOutput(guided=u + λ·Δ, uncond=u)``: the sampler computes x̂0 from ``guided`` and
    re-noises with ``uncond`` (see :func:`cfgpp_ddim_step`). Both are noise (eps) predictions;
    pass eps, not v or x0. ``uncond`` is ``u`` itself, not a copy.
    """
    _check_unit_interval("lambda", lam)
    return CfgppOutput(guided=cfg(u, c, lam), uncond=u)


def cfgpp_ddim_step(x, eps_u, eps_c, lam, sigma: float, sigma_next: float):
    """One deterministic CFG++ DDIM step in k-diffusion form (``x = x0 + σ·eps``).

    ``x̂0 = x − σ·(u + λΔ)``; ``x_next = x̂0 + σ_next·u``. This is the alpha-bar DDIM update
    ``x_{t−1} = √ᾱ_prev·x̂0 + √(1−ᾱ_prev)·eps_u`` written for scaled latents ``x = x_t/√ᾱ_t``
    with ``σ = √((1 − ᾱ)/ᾱ)``. Float32 inside, dtype of ``x`` out.
    """
    guided, uncond = cfgpp(eps_u, eps_c, lam)
    ops = check_pair(eps_u, eps_c)
    x32 = ops.f32(x)
    x0 = x32 - float(sigma) * ops.f32(guided)
    return ops.cast(x0 + float(sigma_next) * ops.f32(uncond), x.dtype)


def guidance_interval(u, c, scale, *, sigma, sigma_lo=INTERVAL_SIGMA_LO, sigma_hi=INTERVAL_SIGMA_HI):
    """Guidance interval (Kynkäänniemi et al., NeurIPS 2024): CFG inside ``(sigma_lo, sigma_hi]``, else c.

    ``sigma`` is the k-diffusion noise level of the step (a float, or a vector [B]). Outside the
    interval the result is ``c`` itself and ``u`` is not read (so the engine may skip it).
    Defaults are the paper's SD-XL interval; flow models (σ in [0, 1]) need their own.
    """
    ops = check_pair(u, c)
    if np.ndim(sigma) == 0 and not is_torch(sigma):
        return cfg(u, c, scale) if in_guidance_interval(sigma, sigma_lo, sigma_hi) else c
    return ops.where(in_guidance_interval(ops.param(sigma, u), sigma_lo, sigma_hi), cfg(u, c, scale), c)
