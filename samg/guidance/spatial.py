"""SAMG: spatially adaptive guidance from the delta-score energy (reference, numpy and torch).

Every rule here is linear in Δ = c − u with a per-location scale map w(p):
``out = u + w(p) · Δ``, so it gives the same sample in any parametrization (eps, v, flow, x0).
The exact formulas are in docs/guidance-op.md ("Rules"); this file is their executable form and
the truth the ONNX function body, the TensorRT plugin and the CUDA kernels are tested against.

Layouts: 4-D ``[B, C, H, W]`` (channel_axis=1), 5-D ``[B, C, F, H, W]`` (channel_axis=1) or
``[B, F, C, H, W]`` (channel_axis=2, CogVideoX). A scale map has the input's rank with the channel
axis of size 1 (``[B, 1, H, W]``, ``[B, 1, F, H, W]`` or ``[B, F, 1, H, W]``) and broadcasts
against the predictions. Internal math is float32; outputs have the input dtype.
"""

from __future__ import annotations

import math

from samg.errors import SamgError
from samg.guidance._xp import check_pair, ops_for

# samg-v1's constants, defined once with the op's contract (samg.op.schema): the attribute defaults,
# the smoothing weights and ε. ε: Ê = E / (mean E + EPS) on the energy E of Δ itself (Δ = 0 gives
# Ê = 0, not 0/0); the implementations take the energy of Δ / s (s = the sample's max |Δ|) and add
# (EPS / s) / s instead: the same Ê, with nothing overflowing.
from samg.op.schema import (  # noqa: F401 (re-exported)
    DEFAULT_CHANNEL_AXIS,
    DEFAULT_SHARPNESS,
    DEFAULT_SMOOTH,
    DEFAULT_TAU,
    SMOOTH_WEIGHTS,
)
from samg.op.schema import EPSILON as EPS


# --------------------------------------------------------------------------------------------
# Building blocks


def _validate_layout(u, channel_axis: int) -> None:
    if u.ndim not in (4, 5):
        raise SamgError(
            f"SAMG rules take [B, C, H, W] or 5-D video predictions, got shape {tuple(u.shape)}: "
            "reshape the prediction to one of these layouts"
        )
    allowed = (1,) if u.ndim == 4 else (1, 2)
    if channel_axis not in allowed:
        raise SamgError(
            f"channel_axis={channel_axis} is invalid for a {u.ndim}-D prediction: use "
            + (" or ".join(map(str, allowed)))
            + " (2 only for [B, F, C, H, W] video)"
        )


def _non_batch_axes(x) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def energy_scale(ops, delta):
    """Per sample max |Δ| over every non-batch element ([B, 1, ...]), or 1 where that is 0.

    The energy is taken on Δ / energy_scale so that its squares and sums stay in float32 range
    (|Δ| up to float32's max); :func:`normalized_energy` moves ε by the same scale, so Ê is the
    spec's. Δ = 0 divides by 1, not 0. A NaN in Δ leaves the scale at 1 or NaN, an Inf makes it Inf
    (its own Δ / s is Inf/Inf = NaN): either way the sample's energy is NaN, as it would be unscaled.
    """
    peak = ops.max_abs(delta, _non_batch_axes(delta))
    return ops.where(peak > 0, peak, 1.0)


def delta_energy(u, c, channel_axis: int = 1):
    """Return (ops, u32, Δ32, E, s): float32 copies, the energy E(p) = Σ_c (Δ_c(p)/s)² (channel axis
    kept) and its per-sample scale s = :func:`energy_scale` (the sample's max |Δ|, [B, 1, ...]).

    E is the energy of the scaled Δ, so that no square or sum overflows; pass s on to
    :func:`normalized_energy`. The variants only use E's order and Ê.
    """
    ops = check_pair(u, c)
    _validate_layout(u, channel_axis)
    u32, c32 = ops.f32(u), ops.f32(c)
    delta = c32 - u32
    scale = energy_scale(ops, delta)
    scaled = ops.quiet_divide(delta, scale)  # Inf / Inf = NaN where Δ holds an Inf: intended
    energy = ops.sum(scaled * scaled, (channel_axis,))
    return ops, u32, delta, energy, scale


def normalized_energy(ops, energy, scale):
    """Ê(p) = E(p) / (mean E + (EPS / s) / s): per sample, over every non-batch location (whole clip
    for video). With E the energy of Δ / s this is the spec's E₀ / (mean E₀ + EPS) for the energy
    E₀ = s²·E of Δ itself, up to rounding.

    (EPS / s) / s in float32 never forms s² (which underflows for s < 1e-23): it is +Inf only for
    s < 5.4e-26, where the spec's Ê is below C·3e-39 and Ê = E / Inf = 0 is that value; it underflows
    to 0 only for s > 3e16, where it is below 1e-45 against a mean of at least 1/N.
    """
    eps_scaled = ops.quiet_divide(ops.quiet_divide(ops.param(EPS, scale), scale), scale)
    return energy / (ops.mean(energy, _non_batch_axes(energy)) + eps_scaled)


def _along(axis: int, sl: slice):
    """Index tuple selecting `sl` on axis -1 or -2 and everything elsewhere."""
    return (Ellipsis, sl) if axis == -1 else (Ellipsis, sl, slice(None))


def _smooth_axis(ops, x, axis: int):
    n = x.shape[axis]
    # Reflect padding (mirror without repeating the edge): x[-1] := x[1], x[n] := x[n-2].
    before = ops.concat([x[_along(axis, slice(1, 2))], x[_along(axis, slice(0, n - 1))]], axis)
    after = ops.concat([x[_along(axis, slice(1, n))], x[_along(axis, slice(n - 2, n - 1))]], axis)
    a, b, _ = SMOOTH_WEIGHTS
    return a * before + b * x + a * after


def smooth3x3(m):
    """Separable 3×3 smoothing of a map over its last two axes (H then W), reflect padding.

    Each output is ``a·x[i-1] + b·x[i] + a·x[i+1]`` with (a, b, a) = SMOOTH_WEIGHTS, first along H,
    then along W; this equals the 2-D kernel outer(w, w). Per frame for video (F is not smoothed).
    H and W must both be at least 2 (reflect padding needs a neighbour).
    """
    ops = ops_for(m)
    if m.ndim < 2 or m.shape[-1] < 2 or m.shape[-2] < 2:
        raise SamgError(
            f"smoothing needs H and W of at least 2, got a map of shape {tuple(m.shape)}: use smooth=0"
        )
    return _smooth_axis(ops, _smooth_axis(ops, m, -2), -1)


def _check_smooth(smooth: int) -> None:
    if smooth not in (0, 3) or isinstance(smooth, bool):
        raise SamgError(f"smooth must be 0 (off) or 3 (3x3 kernel), got {smooth!r}")


def _combine(ops, u, u32, delta, w):
    """out = u + w·Δ in float32, returned in the input dtype."""
    return ops.cast(u32 + w * delta, u.dtype)


def _scales(ops, u, w_min, w_max):
    return ops.param(w_min, u), ops.param(w_max, u)


# --------------------------------------------------------------------------------------------
# samg-v1 (the default, the op samg::GuidanceCombine)


def samg_scale_map(u, c, w_min, w_max, *, tau=DEFAULT_TAU, sharpness=DEFAULT_SHARPNESS, smooth=DEFAULT_SMOOTH,
                   channel_axis=DEFAULT_CHANNEL_AXIS):
    """The samg-v1 scale map w(p), float32, input rank with the channel axis of size 1.

    ``m = sigmoid(sharpness·(Ê − tau))`` (optionally smoothed), ``w = w_max − (w_max − w_min)·m``.
    """
    _check_smooth(smooth)
    ops, _, _, energy, scale = delta_energy(u, c, channel_axis)
    return _samg_map_from_energy(ops, u, energy, scale, w_min, w_max, tau, sharpness, smooth)


def _samg_map_from_energy(ops, u, energy, scale, w_min, w_max, tau, sharpness, smooth):
    membership = ops.sigmoid(float(sharpness) * (normalized_energy(ops, energy, scale) - float(tau)))
    if smooth:
        membership = smooth3x3(membership)
    lo, hi = _scales(ops, u, w_min, w_max)
    return hi - (hi - lo) * membership


def samg_v1(u, c, w_min, w_max, *, tau=DEFAULT_TAU, sharpness=DEFAULT_SHARPNESS, smooth=DEFAULT_SMOOTH,
            channel_axis=DEFAULT_CHANNEL_AXIS):
    """SAMG v1: ``u + w(p)·Δ`` with w(p) from :func:`samg_scale_map`. Same dtype as ``u``.

    ``w_min``/``w_max``: floats or per-sample vectors [B]. ``w_min == w_max == w`` is CFG exactly.
    A NaN or Inf in Δ makes that sample's whole output NaN (through the energy's scale and mean);
    other samples are not affected. Finite inputs give a finite output wherever c − u and u + w·Δ
    are finite in float32 (u = −2e38, c = 2e38 has no finite Δ).
    """
    _check_smooth(smooth)
    ops, u32, delta, energy, scale = delta_energy(u, c, channel_axis)
    w = _samg_map_from_energy(ops, u, energy, scale, w_min, w_max, tau, sharpness, smooth)
    return _combine(ops, u, u32, delta, w)


# --------------------------------------------------------------------------------------------
# Variants (benchmark side by side; not in the fused op)


def _quantile_count(q: float, n: int) -> int:
    if not 0.0 <= float(q) <= 1.0:
        raise SamgError(f"quantile q must be in [0, 1], got {q}")
    return int(math.floor(float(q) * n + 0.5))  # round half up: q=0 → none, q=1 → all


def quantile_scale_map(u, c, w_min, w_max, *, q=0.2, channel_axis=1):
    """Hard two-level map: the top ``k = floor(q·N + 0.5)`` locations by energy get w_min, the rest w_max.

    N counts every non-batch location (whole clip for video). Ties at the threshold all get w_min
    (a location is "top" when E(p) ≥ the k-th largest E of its sample).
    """
    ops, _, _, energy, _ = delta_energy(u, c, channel_axis)
    lo, hi = _scales(ops, u, w_min, w_max)
    batch = energy.shape[0]
    flat = energy.reshape(batch, -1)
    k = _quantile_count(q, flat.shape[1])
    if k == 0:
        return ops.broadcast(hi, energy)
    threshold = ops.kth_largest(flat, k).reshape((batch,) + (1,) * (energy.ndim - 1))
    return ops.where(energy >= threshold, ops.broadcast(lo, energy), ops.broadcast(hi, energy))


def samg_quantile(u, c, w_min, w_max, *, q=0.2, channel_axis=1):
    """Hard split by per-sample quantile: ``u + w(p)·Δ`` with :func:`quantile_scale_map`."""
    ops, u32, delta, _, _ = delta_energy(u, c, channel_axis)
    w = quantile_scale_map(u, c, w_min, w_max, q=q, channel_axis=channel_axis)
    return _combine(ops, u, u32, delta, w)


def bound_scale_map(u, c, w_min, w_max, *, w_ref=None, channel_axis=1):
    """``w = clip(1 + (w_ref − 1)·max(Ê, EPS)^(-1/2), w_min, w_max)``; w_ref defaults to (w_min + w_max)/2.

    w_ref is the scale at mean energy (Ê = 1). Ê is floored at EPS so Δ = 0 gives w_max (not
    0·∞). clip is ``min(max(x, w_min), w_max)``.
    """
    ops, _, _, energy, scale = delta_energy(u, c, channel_axis)
    lo, hi = _scales(ops, u, w_min, w_max)
    ref = (lo + hi) * 0.5 if w_ref is None else ops.param(w_ref, u)
    inv_sqrt = 1.0 / ops.sqrt(ops.clamp_min(normalized_energy(ops, energy, scale), EPS))
    return ops.minimum(ops.maximum(1.0 + (ref - 1.0) * inv_sqrt, lo), hi)


def samg_bound(u, c, w_min, w_max, *, w_ref=None, channel_axis=1):
    """Curvature-bound shape: ``u + w(p)·Δ`` with :func:`bound_scale_map`."""
    ops, u32, delta, _, _ = delta_energy(u, c, channel_axis)
    w = bound_scale_map(u, c, w_min, w_max, w_ref=w_ref, channel_axis=channel_axis)
    return _combine(ops, u, u32, delta, w)


def linear_scale_map(u, c, w_min, w_max, *, channel_axis=1):
    """``w = w_max − (w_max − w_min)·(Ê − min Ê)/(max Ê − min Ê + EPS)``, min/max per sample."""
    ops, _, _, energy, scale = delta_energy(u, c, channel_axis)
    lo, hi = _scales(ops, u, w_min, w_max)
    e_hat = normalized_energy(ops, energy, scale)
    axes = _non_batch_axes(e_hat)
    e_min, e_max = ops.amin(e_hat, axes), ops.amax(e_hat, axes)
    return hi - (hi - lo) * ((e_hat - e_min) / (e_max - e_min + EPS))


def samg_linear(u, c, w_min, w_max, *, channel_axis=1):
    """Linear in min-max-normalized energy: ``u + w(p)·Δ`` with :func:`linear_scale_map`."""
    ops, u32, delta, _, _ = delta_energy(u, c, channel_axis)
    w = linear_scale_map(u, c, w_min, w_max, channel_axis=channel_axis)
    return _combine(ops, u, u32, delta, w)
