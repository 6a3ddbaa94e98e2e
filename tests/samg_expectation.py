"""samg-v1 written out plainly in float64 from docs/guidance-op.md, for tests of every implementation.

Independent of the library: its own float64 arithmetic, scipy for the smoothing. Also the two
overflow cases of issue 9 (a Δ whose squares overflow float32, one whose per-sample energy sum does).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.ndimage

SPEC_EPS = 1e-12
_SIDE = math.exp(-1.0) / (1.0 + 2.0 * math.exp(-1.0))
SPEC_SMOOTH_WEIGHTS = (_SIDE, 1.0 - 2.0 * _SIDE, _SIDE)


def spec_scale_map(u, c, w_min, w_max, *, tau=1.0, sharpness=4.0, smooth=0, channel_axis=1):
    """w(p) in float64: Δ scaled by the sample's max |Δ| (1 when Δ = 0), E = Σ_c Δ̃², Ê = E/(mean E + ε),
    m = sigmoid(k(Ê − τ)) (smoothed 3×3 over H, W with mirror padding), w = w_max − (w_max − w_min)·m."""
    delta = np.asarray(c, np.float64) - np.asarray(u, np.float64)
    non_batch = tuple(range(1, delta.ndim))
    peak = np.abs(delta).max(axis=non_batch, keepdims=True)
    scaled = delta / np.where(peak > 0, peak, 1.0)
    energy = (scaled**2).sum(axis=channel_axis, keepdims=True)
    e_hat = energy / (energy.mean(axis=non_batch, keepdims=True) + SPEC_EPS)
    m = 1.0 / (1.0 + np.exp(-sharpness * (e_hat - tau)))
    if smooth:
        kernel = np.outer(SPEC_SMOOTH_WEIGHTS, SPEC_SMOOTH_WEIGHTS).reshape((1,) * (m.ndim - 2) + (3, 3))
        m = scipy.ndimage.correlate(m, kernel, mode="mirror")  # scipy "mirror" = reflect w/o edge repeat
    ones = (1,) * (delta.ndim - 1)
    w_min = np.asarray(w_min, np.float64).reshape((-1,) + ones)
    w_max = np.asarray(w_max, np.float64).reshape((-1,) + ones)
    return w_max - (w_max - w_min) * m


def spec_samg_v1(u, c, w_min, w_max, **attributes):
    """u + w(p)·Δ in float64."""
    w = spec_scale_map(u, c, w_min, w_max, **attributes)
    u64 = np.asarray(u, np.float64)
    return u64 + w * (np.asarray(c, np.float64) - u64)


def huge_delta_case(shape=(2, 4, 6, 5), seed=0):
    """Finite float32 u, c with |Δ| around 1e19: Δ² overflows float32 (3.4e38), u + 7.5·Δ does not."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(shape).astype(np.float32)
    c = (rng.standard_normal(shape) * 1e19).astype(np.float32)
    with np.errstate(over="ignore"):
        assert np.isinf(np.square(c - u)).any() and np.isfinite(c - u).all()
    return u, c


def energy_sum_overflow_case(shape=(2, 4, 16, 16), seed=0):
    """|Δ| of 1e18 or 2e18 (random sign, the level varying over space): every per-location energy
    (≤ 4·C·1e36) is finite in float32 but the per-sample sum (≥ N·C·1e36) is not. The expected
    normalized energies are 0.4 and 1.6 (levels 1:4, half each) when the two levels split evenly."""
    rng = np.random.default_rng(seed)
    batch, channels = shape[:2]
    level = np.where(rng.random((batch, 1) + shape[2:]) < 0.5, 1e18, 2e18)
    sign = np.where(rng.random(shape) < 0.5, -1.0, 1.0)
    u = rng.standard_normal(shape).astype(np.float32)
    c = (u + sign * level).astype(np.float32)
    delta = c - u
    with np.errstate(over="ignore"):
        assert np.isfinite(np.square(delta).sum(axis=1, dtype=np.float32)).all()
        assert np.isinf(np.square(delta).sum(axis=tuple(range(1, len(shape))), dtype=np.float32)).all()
    return u, c
