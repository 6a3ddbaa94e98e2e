"""samg-v1 and its variants: properties from docs/guidance-op.md, checked against an independent
float64 re-derivation, scipy smoothing, torch, and the limiting cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from samg.errors import SamgError
from samg_expectation import (
    CFG_RTOL,
    energy_sum_overflow_case,
    huge_delta_case,
    scaled_delta_case,
    spec_cfg,
    spec_e_hat,
    spec_samg_v1,
    spec_scale_map,
)
from samg.guidance import (
    EPS,
    SMOOTH_WEIGHTS,
    bound_scale_map,
    cfg,
    linear_scale_map,
    quantile_scale_map,
    samg_bound,
    samg_linear,
    samg_quantile,
    samg_scale_map,
    samg_v1,
    smooth3x3,
)

torch = pytest.importorskip("torch")

FAST = settings(max_examples=25, deadline=None)

shapes_4d = st.tuples(
    st.integers(1, 3), st.integers(1, 4), st.integers(2, 7), st.integers(2, 7)
)  # B, C, H, W
scales = st.floats(0.0, 15.0, allow_nan=False, width=32)


def _pair(shape, seed, delta_scale=1.0):
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(shape).astype(np.float32)
    c = (u + delta_scale * rng.standard_normal(shape)).astype(np.float32)
    return u, c


def _run(lib, fn, u, c, *args, **kwargs):
    """fn on numpy arrays or on torch tensors, result as numpy."""
    if lib == "torch":
        return fn(torch.from_numpy(u), torch.from_numpy(c), *args, **kwargs).numpy()
    return fn(u, c, *args, **kwargs)


# ---------------------------------------------------------------- exact reductions


@FAST
@given(shape=shapes_4d, seed=st.integers(0, 2**16), w=scales, smooth=st.sampled_from([0, 3]))
def test_equal_scales_are_cfg_exactly_numpy(shape, seed, w, smooth):
    u, c = _pair(shape, seed)
    np.testing.assert_array_equal(samg_v1(u, c, w, w, smooth=smooth), cfg(u, c, w))


@FAST
@given(seed=st.integers(0, 2**16), w=scales, smooth=st.sampled_from([0, 3]))
def test_equal_scales_are_cfg_exactly_torch_and_video(seed, w, smooth):
    u, c = _pair((2, 3, 4, 5, 6), seed)
    tu, tc = torch.from_numpy(u), torch.from_numpy(c)
    for axis in (1, 2):
        out = samg_v1(tu, tc, w, w, smooth=smooth, channel_axis=axis)
        assert torch.equal(out, cfg(tu, tc, w))


@FAST
@given(shape=shapes_4d, seed=st.integers(0, 2**16), w_min=scales, w_max=scales, smooth=st.sampled_from([0, 3]))
def test_zero_delta_gives_u(shape, seed, w_min, w_max, smooth):
    u, _ = _pair(shape, seed)
    np.testing.assert_array_equal(samg_v1(u, u.copy(), w_min, w_max, smooth=smooth), u)
    w = samg_scale_map(u, u.copy(), w_min, w_max, smooth=smooth)
    assert np.all(np.isfinite(w))  # EPS keeps 0/0 out of the map


# ---------------------------------------------------------------- against the plain formula


@FAST
@given(
    shape=shapes_4d,
    seed=st.integers(0, 2**16),
    w_min=scales,
    w_max=scales,
    tau=st.floats(0.1, 3.0),
    sharpness=st.floats(0.5, 20.0),
    smooth=st.sampled_from([0, 3]),
)
def test_matches_plain_float64_formula(shape, seed, w_min, w_max, tau, sharpness, smooth):
    u, c = _pair(shape, seed)
    ref_w = spec_scale_map(u, c, w_min, w_max, tau=tau, sharpness=sharpness, smooth=smooth)
    w = samg_scale_map(u, c, w_min, w_max, tau=tau, sharpness=sharpness, smooth=smooth)
    assert w.dtype == np.float32 and w.shape == (shape[0], 1) + shape[2:]
    np.testing.assert_allclose(w, ref_w, rtol=1e-5, atol=2e-5 * (1 + max(w_min, w_max)))
    out = samg_v1(u, c, w_min, w_max, tau=tau, sharpness=sharpness, smooth=smooth)
    ref = u.astype(np.float64) + ref_w * (c.astype(np.float64) - u)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * (1 + max(w_min, w_max)))


def test_map_is_high_energy_low_scale():
    u = np.zeros((1, 2, 4, 4), np.float32)
    c = np.full_like(u, 0.1)
    c[0, :, 1, 2] = 5.0  # one high-energy location
    w = samg_scale_map(u, c, 2.0, 8.0)
    assert w[0, 0, 1, 2] == pytest.approx(2.0, abs=1e-3)
    # Ê ≈ 0 elsewhere: m = sigmoid(−4) ≈ 0.018, so w ≈ 8 − 6·0.018.
    assert np.all(np.abs(np.delete(w.ravel(), 1 * 4 + 2) - (8 - 6 / (1 + math.exp(4)))) < 0.01)


# ---------------------------------------------------------------- range: the energy of Δ / max|Δ|


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("smooth", [0, 3])
def test_huge_delta_with_equal_scales_is_cfg(lib, smooth):
    # Δ² overflows float32 here; the unscaled energy made the map NaN even though w_max − 0·m = w.
    # The reference computes u32 + w·Δ32 with w = w_max − 0·m = w exactly: CFG bit for bit.
    u, c = huge_delta_case()
    out = _run(lib, samg_v1, u, c, 7.5, 7.5, smooth=smooth)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, spec_cfg(u, c, 7.5, np.float32))
    np.testing.assert_allclose(out, spec_cfg(u, c, 7.5), rtol=CFG_RTOL)
    # Unequal scales: finite, and the spec's map (Ê = E/(mean E + ε) of Δ itself, in float64).
    out = _run(lib, samg_v1, u, c, 2.0, 8.0, smooth=smooth)
    np.testing.assert_allclose(out, spec_samg_v1(u, c, 2.0, 8.0, smooth=smooth), rtol=1e-5)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("smooth", [0, 3])
def test_energy_sum_overflow_gives_the_spec_result(lib, smooth):
    # Each location's energy is finite, the sample's sum is not: the mean became inf, Ê 0.
    u, c = energy_sum_overflow_case()
    out = _run(lib, samg_v1, u, c, 2.0, 8.0, smooth=smooth)
    expected = spec_samg_v1(u, c, 2.0, 8.0, smooth=smooth)
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    if not smooth:  # the two energy levels (1:4, about half each) get clearly different scales
        w = _run(lib, samg_scale_map, u, c, 2.0, 8.0)
        assert w.min() < 5.5 and w.max() > 7.0


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_variants_survive_an_energy_sum_overflow(lib):
    u, c = energy_sum_overflow_case()
    lo, hi = 2.0, 8.0
    energy, e_hat = spec_e_hat(u, c)
    bound = np.clip(1 + (5.0 - 1) / np.sqrt(np.maximum(e_hat, EPS)), lo, hi)
    np.testing.assert_allclose(_run(lib, bound_scale_map, u, c, lo, hi), bound, rtol=1e-5)
    e_min, e_max = e_hat.min(axis=(1, 2, 3), keepdims=True), e_hat.max(axis=(1, 2, 3), keepdims=True)
    linear = hi - (hi - lo) * (e_hat - e_min) / (e_max - e_min + EPS)
    np.testing.assert_allclose(_run(lib, linear_scale_map, u, c, lo, hi), linear, rtol=1e-5, atol=1e-5)
    # Quantile: the top q·N by energy get w_min; the high level holds about half the locations.
    flat = energy.reshape(2, -1)
    k = math.floor(0.2 * flat.shape[1] + 0.5)
    threshold = np.sort(flat, axis=1)[:, -k].reshape(2, 1, 1, 1)
    quantile = np.where(energy >= threshold, lo, hi)
    np.testing.assert_array_equal(_run(lib, quantile_scale_map, u, c, lo, hi), quantile)
    assert (quantile == lo).mean() > 0.3  # ties at the threshold (the whole high level) all get w_min


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("magnitude", [1.0, 1e-7, 1e-30, 1e19])
def test_map_is_the_spec_formula_at_every_scale_of_delta(lib, magnitude):
    # Ê = E / (mean E + ε) with the spec's absolute ε = 1e-12, on Δ itself. At |Δ| ~ 1e-7 the mean
    # energy (~1e-14) is below ε, which then sets Ê (a scale-free Ê would give Δ's map at 1); at
    # 1e-30, (ε/s)/s is +Inf in float32 and Ê = 0 (the spec's is ~1e-48); at 1e19, Δ² overflows
    # float32 and the map must stay finite.
    u, c = scaled_delta_case(magnitude)
    with np.errstate(divide="raise", over="raise", invalid="raise"):  # nor may the library warn
        w = _run(lib, samg_scale_map, u, c, 2.0, 8.0, smooth=3)
    assert np.isfinite(w).all()
    expected = spec_scale_map(u, c, 2.0, 8.0, smooth=3)
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-5)
    if magnitude == 1e-7:  # ε matters here: the map is far from the one of Δ·1e7
        assert np.abs(expected - spec_scale_map(u * 1e7, c * 1e7, 2.0, 8.0, smooth=3)).max() > 1.0


# ---------------------------------------------------------------- effective scale, by hand


def _two_level_pair(lib):
    """[1, 2, 2, 4], u = 0: Δ = 2 in both channels at 2 locations, 1 at the other 6. max|Δ| = 2, so
    E = 2 (high) and 1/2 (low), mean E = (2·2 + 6·½)/8 = 7/8: Ê = 16/7 (high), 4/7 (low)."""
    u = np.zeros((1, 2, 2, 4), np.float32)
    c = np.ones_like(u)
    c[0, :, 0, 1] = c[0, :, 1, 3] = 2.0
    return (torch.from_numpy(u), torch.from_numpy(c)) if lib == "torch" else (u, c)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_effective_scale_of_a_two_level_delta_by_hand(lib):
    from samg.guidance import effective_scale

    u, c = _two_level_pair(lib)
    hi_hat, lo_hat = 16 / 7, 4 / 7
    mean2 = lambda w_hi, w_lo: (2 * w_hi + 6 * w_lo) / 8  # noqa: E731  2 high, 6 low locations

    def eff(name, **params):
        return np.asarray(effective_scale(name, u, c, **params), np.float64)

    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    samg_w = lambda e: 8 - 6 * sigmoid(4 * (e - 1))  # noqa: E731  w_min 2, w_max 8, τ 1, k 4
    np.testing.assert_allclose(eff("samg", w_min=2.0, w_max=8.0), [mean2(samg_w(hi_hat), samg_w(lo_hat))], rtol=1e-6)
    sharp_w = lambda e: 8 - 6 * sigmoid(10 * (e - 2))  # noqa: E731  τ 2, k 10
    np.testing.assert_allclose(
        eff("samg", w_min=2.0, w_max=8.0, tau=2.0, sharpness=10.0), [mean2(sharp_w(hi_hat), sharp_w(lo_hat))], rtol=1e-6
    )
    # bound, w_ref = 5: w = 1 + 4/sqrt(Ê) = 1 + sqrt(7) (high), 1 + 2·sqrt(7) (low), inside [2, 8].
    np.testing.assert_allclose(eff("samg-bound", w_min=2.0, w_max=8.0), [mean2(1 + 7**0.5, 1 + 2 * 7**0.5)], rtol=1e-6)
    # linear: the high level is the max (w_min), the low level the min (w_max).
    np.testing.assert_allclose(eff("samg-linear", w_min=2.0, w_max=8.0), [mean2(2.0, 8.0)], rtol=1e-6)
    # quantile q = 0.25 of 8 locations: k = 2, exactly the two high ones.
    np.testing.assert_allclose(eff("samg-quantile", w_min=2.0, w_max=8.0, q=0.25), [mean2(2.0, 8.0)], rtol=1e-7)
    np.testing.assert_allclose(eff("cfg", scale=4.5), [4.5], rtol=0)


# ---------------------------------------------------------------- smoothing


def test_smoothing_weights_sum_to_one_and_match_spec():
    a, b, a2 = SMOOTH_WEIGHTS
    assert a == a2 and a + b + a2 == pytest.approx(1.0, abs=1e-15)
    assert (a, b) == pytest.approx((math.exp(-1) / (1 + 2 * math.exp(-1)), 1 / (1 + 2 * math.exp(-1))))
    assert (round(a, 4), round(b, 4)) == (0.2119, 0.5761)


@FAST
@given(h=st.integers(2, 9), w=st.integers(2, 9), seed=st.integers(0, 2**16))
def test_smoothing_matches_direct_2d_convolution_with_reflect_pad(h, w, seed):
    m = np.random.default_rng(seed).random((2, 1, h, w)).astype(np.float32)
    kernel = np.outer(SMOOTH_WEIGHTS, SMOOTH_WEIGHTS)
    padded = np.pad(m.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    direct = np.zeros(m.shape)
    for di in range(3):
        for dj in range(3):
            direct += kernel[di, dj] * padded[:, :, di : di + h, dj : dj + w]
    np.testing.assert_allclose(smooth3x3(m), direct, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        smooth3x3(torch.from_numpy(m)).numpy(), direct, rtol=1e-6, atol=1e-7
    )


def test_video_smoothing_is_per_frame():
    m = np.zeros((1, 1, 3, 5, 5), np.float32)
    m[0, 0, 1, 2, 2] = 1.0  # an impulse in frame 1 must not leak into frames 0 and 2
    out = smooth3x3(m)
    assert np.all(out[0, 0, [0, 2]] == 0)
    assert out[0, 0, 1].sum() == pytest.approx(1.0, abs=1e-6)  # interior impulse keeps its mass


def test_smoothing_needs_two_pixels():
    with pytest.raises(SamgError, match="smooth"):
        smooth3x3(np.zeros((1, 1, 1, 5), np.float32))


# ---------------------------------------------------------------- video layouts


def test_video_energy_is_normalized_over_the_whole_clip():
    u, c = _pair((1, 4, 3, 5, 5), seed=1)
    w = samg_scale_map(u, c, 2.0, 9.0)
    c_loud = c.copy()
    c_loud[:, :, 0] = u[:, :, 0] + 10.0 * (c[:, :, 0] - u[:, :, 0])  # frame 0's delta ×10
    w_loud = samg_scale_map(u, c_loud, 2.0, 9.0)
    # Frames 1 and 2 are unchanged but the clip mean rose: their energy looks lower → higher scale.
    assert np.all(w_loud[:, :, 1:] >= w[:, :, 1:]) and np.any(w_loud[:, :, 1:] > w[:, :, 1:] + 1e-3)
    # A per-frame normalization would have left frames 1..2 exactly as they were.
    per_frame = [samg_scale_map(u[:, :, f], c_loud[:, :, f], 2.0, 9.0) for f in range(3)]
    per_frame_unchanged = [samg_scale_map(u[:, :, f], c[:, :, f], 2.0, 9.0) for f in (1, 2)]
    np.testing.assert_array_equal(np.stack(per_frame, axis=2)[:, :, 1:], np.stack(per_frame_unchanged, axis=2))
    assert not np.allclose(np.stack(per_frame, axis=2)[:, :, 1:], w_loud[:, :, 1:], atol=1e-3)


@FAST
@given(seed=st.integers(0, 2**16), smooth=st.sampled_from([0, 3]))
def test_channel_axis_1_and_2_agree_after_transpose(seed, smooth):
    u, c = _pair((2, 3, 4, 5, 6), seed)  # [B, C, F, H, W]
    out_cf = samg_v1(u, c, 1.5, 7.0, smooth=smooth, channel_axis=1)
    u_fc, c_fc = u.transpose(0, 2, 1, 3, 4).copy(), c.transpose(0, 2, 1, 3, 4).copy()
    out_fc = samg_v1(u_fc, c_fc, 1.5, 7.0, smooth=smooth, channel_axis=2)
    np.testing.assert_allclose(out_fc.transpose(0, 2, 1, 3, 4), out_cf, rtol=1e-6, atol=1e-6)
    for variant in (samg_quantile, samg_bound, samg_linear):
        a = variant(u, c, 1.5, 7.0, channel_axis=1)
        b = variant(u_fc, c_fc, 1.5, 7.0, channel_axis=2).transpose(0, 2, 1, 3, 4)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_video_matches_plain_formula():
    u, c = _pair((2, 4, 3, 5, 6), seed=7)
    ref = spec_scale_map(u, c, 2.0, 7.5, smooth=3)
    np.testing.assert_allclose(samg_scale_map(u, c, 2.0, 7.5, smooth=3), ref, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- numpy vs torch, dtypes


@FAST
@given(seed=st.integers(0, 2**16), smooth=st.sampled_from([0, 3]), video=st.booleans())
def test_numpy_and_torch_agree(seed, smooth, video):
    u, c = _pair((2, 4, 3, 5, 6) if video else (2, 4, 6, 7), seed)
    tu, tc = torch.from_numpy(u), torch.from_numpy(c)
    wmin, wmax = np.array([1.0, 3.0], np.float32), np.array([6.0, 9.0], np.float32)
    np.testing.assert_allclose(
        samg_v1(tu, tc, torch.from_numpy(wmin), torch.from_numpy(wmax), smooth=smooth).numpy(),
        samg_v1(u, c, wmin, wmax, smooth=smooth),
        rtol=1e-5,
        atol=1e-5,
    )
    for variant in (samg_quantile, samg_bound, samg_linear):
        np.testing.assert_allclose(
            variant(tu, tc, wmin, wmax).numpy(), variant(u, c, wmin, wmax), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("fn", [samg_v1, samg_quantile, samg_bound, samg_linear])
def test_torch_dtype_preserved(dtype, fn):
    u, c = _pair((2, 4, 6, 6), seed=3)
    tdtype = getattr(torch, dtype)
    tu, tc = torch.from_numpy(u).to(tdtype), torch.from_numpy(c).to(tdtype)
    out = fn(tu, tc, 2.0, 7.0)
    assert out.dtype == tdtype
    # Internal math is float32: the result is the float32 result of the rounded inputs, rounded once.
    expected = fn(tu.float(), tc.float(), 2.0, 7.0).to(tdtype)
    assert torch.equal(out, expected)


def test_numpy_float16_and_float64_preserved():
    u, c = _pair((1, 2, 4, 4), seed=0)
    assert samg_v1(u.astype(np.float16), c.astype(np.float16), 2, 5).dtype == np.float16
    assert samg_v1(u.astype(np.float64), c.astype(np.float64), 2, 5).dtype == np.float64


# ---------------------------------------------------------------- non-finite inputs


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # u = Inf: numpy warns on u + w·Δ = Inf − Inf
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["u", "c"])
@pytest.mark.parametrize("fn", [samg_v1, samg_quantile, samg_bound, samg_linear])
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_non_finite_input_is_not_made_finite(bad, where, fn, lib):
    u, c = _pair((2, 3, 5, 5), seed=5)
    target = u if where == "u" else c
    target[1, 2, 3, 1] = bad
    for kwargs in ({}, {"smooth": 3}) if fn is samg_v1 else ({},):
        if lib == "torch":
            out = fn(torch.from_numpy(u), torch.from_numpy(c), 2.0, 7.0, **kwargs).numpy()
        else:
            out = fn(u, c, 2.0, 7.0, **kwargs)
        assert not np.all(np.isfinite(out[1, :, 3, 1])), (fn.__name__, kwargs)
        assert np.all(np.isfinite(out[0])), "another sample must not be affected"


@pytest.mark.filterwarnings("error")  # the Inf/Inf of an Inf Δ is intended: no warning for the user
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_non_finite_delta_makes_the_sample_nan_in_samg_v1(bad, lib):
    u, c = _pair((2, 3, 5, 5), seed=5)
    c[0, 0, 0, 0] = bad  # NaN: enters the mean energy; Inf: the scale max|Δ| is Inf, its own Δ/s NaN
    out = _run(lib, samg_v1, u, c, 2.0, 7.0)
    assert np.all(np.isnan(out[0])) and np.all(np.isfinite(out[1]))


# ---------------------------------------------------------------- per-sample scales


@FAST
@given(seed=st.integers(0, 2**16), smooth=st.sampled_from([0, 3]))
def test_per_sample_scales_equal_separate_calls(seed, smooth):
    u, c = _pair((3, 4, 5, 5), seed)
    w_min, w_max = np.array([1.0, 2.5, 4.0], np.float32), np.array([5.0, 7.5, 12.0], np.float32)
    batched = samg_v1(u, c, w_min, w_max, smooth=smooth)
    for i in range(3):
        single = samg_v1(u[i : i + 1], c[i : i + 1], float(w_min[i]), float(w_max[i]), smooth=smooth)
        np.testing.assert_array_equal(batched[i : i + 1], single)
    for variant in (samg_quantile, samg_bound, samg_linear):
        batched = variant(u, c, w_min, w_max)
        for i in range(3):
            single = variant(u[i : i + 1], c[i : i + 1], float(w_min[i]), float(w_max[i]))
            np.testing.assert_allclose(batched[i : i + 1], single, rtol=1e-6, atol=1e-6)


def test_per_sample_scale_of_wrong_length_is_a_user_error():
    u, c = _pair((3, 4, 5, 5), seed=0)
    with pytest.raises(SamgError, match="length 3"):
        samg_v1(u, c, np.ones(2), 5.0)


# ---------------------------------------------------------------- limiting cases of the variants


def test_large_sharpness_is_hard_split_at_tau():
    u, c = _pair((2, 3, 8, 8), seed=11)
    tau = 1.2
    w = samg_scale_map(u, c, 2.0, 9.0, tau=tau, sharpness=1e5)
    delta = (c - u).astype(np.float64)
    energy = (delta**2).sum(1, keepdims=True)
    e_hat = energy / energy.mean(axis=(1, 2, 3), keepdims=True)
    clear = np.abs(e_hat - tau) > 1e-3
    assert clear.sum() > 100
    np.testing.assert_array_equal(w[clear], np.where(e_hat[clear] > tau, 2.0, 9.0).astype(np.float32))


@FAST
@given(shape=shapes_4d, seed=st.integers(0, 2**16), w_min=scales, w_max=scales)
def test_quantile_extremes_are_cfg(shape, seed, w_min, w_max):
    u, c = _pair(shape, seed)
    np.testing.assert_array_equal(samg_quantile(u, c, w_min, w_max, q=0.0), cfg(u, c, w_max))
    np.testing.assert_array_equal(samg_quantile(u, c, w_min, w_max, q=1.0), cfg(u, c, w_min))


@pytest.mark.parametrize("q", [0.1, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_quantile_marks_the_top_q_locations(q, lib):
    u, c = _pair((2, 3, 10, 10), seed=2)
    if lib == "torch":
        u, c = torch.from_numpy(u), torch.from_numpy(c)
    w = quantile_scale_map(u, c, 1.0, 6.0, q=q)
    w = np.asarray(w)
    k = math.floor(q * 100 + 0.5)
    energy = ((np.asarray(c) - np.asarray(u)) ** 2).sum(1).reshape(2, -1)
    for b in range(2):
        low = w[b].ravel() == 1.0
        assert low.sum() == k
        assert energy[b][low].min() >= energy[b][~low].max()


def test_quantile_rejects_q_outside_unit_interval():
    u, c = _pair((1, 2, 4, 4), seed=0)
    with pytest.raises(SamgError, match="q must be in"):
        samg_quantile(u, c, 1.0, 5.0, q=1.5)


def test_bound_map_shape():
    u, c = _pair((2, 4, 8, 8), seed=4)
    w = bound_scale_map(u, c, 1.0, 20.0, w_ref=5.0)
    delta = (c - u).astype(np.float64)
    energy = (delta**2).sum(1, keepdims=True)
    e_hat = energy / energy.mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(w, np.clip(1 + 4.0 / np.sqrt(e_hat), 1.0, 20.0), rtol=1e-5)
    # w_ref is the scale at mean energy, and the map falls as energy rises.
    order = np.argsort(e_hat[0].ravel())
    assert np.all(np.diff(w[0].ravel()[order]) <= 1e-6)
    # Δ = 0 (Ê = 0) gives w_max, not 0·∞ = NaN; also with w_ref = 1.
    np.testing.assert_array_equal(bound_scale_map(u, u.copy(), 2.0, 9.0), np.full((2, 1, 8, 8), 9.0, np.float32))
    np.testing.assert_array_equal(samg_bound(u, u.copy(), 2.0, 9.0, w_ref=1.0), u)
    # Default w_ref is the midpoint.
    np.testing.assert_array_equal(bound_scale_map(u, c, 2.0, 8.0), bound_scale_map(u, c, 2.0, 8.0, w_ref=5.0))


def test_linear_map_reaches_both_ends():
    u, c = _pair((2, 4, 8, 8), seed=6)
    w = linear_scale_map(u, c, 2.0, 8.0)
    energy = ((c - u) ** 2).sum(1)
    for b in range(2):
        assert w[b, 0].ravel()[energy[b].argmax()] == pytest.approx(2.0, abs=1e-5)
        assert w[b, 0].ravel()[energy[b].argmin()] == pytest.approx(8.0, abs=1e-5)
    np.testing.assert_array_equal(samg_linear(u, u.copy(), 2.0, 8.0), u)  # constant energy → w_max·0


# ---------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda u, c: samg_v1(u[0], c[0], 1, 2), "5-D"),
        (lambda u, c: samg_v1(u, c, 1, 2, channel_axis=2), "channel_axis"),
        (lambda u, c: samg_v1(u, c[:, :2], 1, 2), "must match"),
        (lambda u, c: samg_v1(u, c.astype(np.float16), 1, 2), "same dtype"),
        (lambda u, c: samg_v1(u.astype(np.int32), c.astype(np.int32), 1, 2), "floating-point"),
        (lambda u, c: samg_v1(u, c, 1, 2, smooth=5), "smooth must be"),
        (lambda u, c: samg_v1(u.tolist(), c, 1, 2), "numpy arrays or torch"),
        (lambda u, c: samg_v1(torch.from_numpy(u), c, 1, 2), "different array types"),
    ],
)
def test_bad_input_is_a_one_line_samg_error(make, match):
    u, c = _pair((2, 3, 4, 4), seed=0)
    with pytest.raises(SamgError, match=match) as err:
        make(u, c)
    assert "\n" not in str(err.value)


def test_eps_constant_is_the_spec_value():
    assert EPS == 1e-12
