"""samg-v1 written out plainly in float64 from docs/guidance-op.md, for tests of every implementation.

Independent of the library: its own float64 arithmetic on Δ itself (the spec's formula, unscaled;
float64 holds the square of any float32), scipy for the smoothing. Also the cases of issue 9: a Δ
whose squares overflow float32, one whose per-sample energy sum does, and Δ at tiny scales.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.ndimage

SPEC_EPS = 1e-12
_SIDE = math.exp(-1.0) / (1.0 + 2.0 * math.exp(-1.0))
SPEC_SMOOTH_WEIGHTS = (_SIDE, 1.0 - 2.0 * _SIDE, _SIDE)


def spec_energy(u, c, channel_axis=1):
    """E(p) = Σ_c Δ_c(p)² of Δ = c − u itself, in float64 (no overflow for any float32 Δ), channel axis kept."""
    delta = np.asarray(c, np.float64) - np.asarray(u, np.float64)
    return (delta**2).sum(axis=channel_axis, keepdims=True)


def spec_e_hat(u, c, channel_axis=1):
    """(E, Ê) in float64: Ê = E / (mean E + ε), the mean per sample over every non-batch location."""
    energy = spec_energy(u, c, channel_axis)
    non_batch = tuple(range(1, energy.ndim))
    return energy, energy / (energy.mean(axis=non_batch, keepdims=True) + SPEC_EPS)


def spec_scale_map(u, c, w_min, w_max, *, tau=1.0, sharpness=4.0, smooth=0, channel_axis=1):
    """w(p) in float64: m = sigmoid(k(Ê − τ)) (smoothed 3×3 over H, W with mirror padding),
    w = w_max − (w_max − w_min)·m, with Ê from :func:`spec_e_hat`."""
    _, e_hat = spec_e_hat(u, c, channel_axis)
    m = 1.0 / (1.0 + np.exp(-sharpness * (e_hat - tau)))
    if smooth:
        kernel = np.outer(SPEC_SMOOTH_WEIGHTS, SPEC_SMOOTH_WEIGHTS).reshape((1,) * (m.ndim - 2) + (3, 3))
        m = scipy.ndimage.correlate(m, kernel, mode="mirror")  # scipy "mirror" = reflect w/o edge repeat
    ones = (1,) * (e_hat.ndim - 1)
    w_min = np.asarray(w_min, np.float64).reshape((-1,) + ones)
    w_max = np.asarray(w_max, np.float64).reshape((-1,) + ones)
    return w_max - (w_max - w_min) * m


def spec_samg_v1(u, c, w_min, w_max, **attributes):
    """u + w(p)·Δ in float64."""
    w = spec_scale_map(u, c, w_min, w_max, **attributes)
    u64 = np.asarray(u, np.float64)
    return u64 + w * (np.asarray(c, np.float64) - u64)


#: |got − exact| ≤ CFG_RTOL·|exact| for float32 u + w·(c − u) against :func:`spec_cfg` in float64 when
#: |u| ≪ |w·Δ| (no cancellation): at most three float32 roundings (c − u, w·Δ, + u; a fused
#: multiply-add makes one fewer), each within 2^-24 relative.
CFG_RTOL = 2.0**-22


def spec_cfg(u, c, w, dtype=np.float64):
    """Plain CFG u + w·(c − u), w a float or one per sample. In float32 (dtype=np.float32) it is the
    spec's combine rounded step by step, c − u, then w·Δ, then + u: what equal scales give bit for
    bit where nothing fuses the multiply-add."""
    u, c = np.asarray(u, dtype), np.asarray(c, dtype)
    w = np.asarray(w, dtype).reshape((-1,) + (1,) * (u.ndim - 1))
    return u + w * (c - u)


def scaled_delta_case(magnitude, shape=(2, 3, 6, 7), seed=9):
    """Float32 u and Δ both of size about `magnitude`: at 1e-7 the energy (~1e-14) is below ε, so
    ε shapes Ê; at 1e-30, (ε/s)/s overflows float32 (Ê is then 0, as the spec's ~1e-48 is)."""
    rng = np.random.default_rng(seed)
    u = (magnitude * rng.standard_normal(shape)).astype(np.float32)
    c = (u + magnitude * rng.standard_normal(shape) * rng.uniform(0.2, 2.0, shape)).astype(np.float32)
    return u, c


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
