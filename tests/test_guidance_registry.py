"""The rule registry (uniform call shape, flags, parameter checks), effective scale, schedules,
and the no-torch import contract."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from samg.contract import GuidanceCombineAttrs
from samg.errors import SamgError
from samg.guidance import (
    MAX_GUIDANCE_SCALE,
    REQUIRED,
    check_scale,
    SCHEDULES,
    cfg,
    effective_scale,
    get_rule,
    get_schedule,
    rule_names,
    samg_v1,
    scheduled,
)

CLI_NAMES = ["cfg", "samg", "samg-quantile", "samg-bound", "samg-linear", "cfg-rescale", "apg", "cfgpp",
             "interval", "cfg-zero-star"]


def _pair(shape=(2, 4, 6, 6), seed=0):
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(shape).astype(np.float32)
    return u, (u + rng.standard_normal(shape)).astype(np.float32)


def test_import_does_not_pull_torch():
    code = "import sys, samg.guidance as g; g.get_rule('samg'); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_names_and_flags():
    assert rule_names() == CLI_NAMES
    # What a fused graph runs: the one list the contract and the runtime use too.
    fused = {n for n in CLI_NAMES if get_rule(n).fused}
    assert fused == {"cfg", "samg", "interval"} == set(GuidanceCombineAttrs.rules)
    assert all(get_rule(n).needs_raw == (n not in fused) for n in CLI_NAMES)
    assert {n for n in CLI_NAMES if get_rule(n).needs_state} == {"apg"}
    assert {n for n in CLI_NAMES if get_rule(n).needs_sigma} == {"interval"}
    assert {n for n in CLI_NAMES if get_rule(n).needs_step} == {"cfg-zero-star"}
    assert {n for n in CLI_NAMES if get_rule(n).returns_uncond} == {"cfgpp"}
    assert get_rule("apg").space == "x0" and get_rule("cfgpp").space == "eps"
    # The fused rule's attributes are exactly the op's, with the op's defaults.
    samg = get_rule("samg").params
    assert {k: v for k, v in samg.items() if v is not REQUIRED} == {
        "tau": 1.0, "sharpness": 4.0, "smooth": 0, "channel_axis": 1}


def test_rule_call_passes_context_only_where_declared():
    u, c = _pair()
    # The runtime may pass step/sigma/state to every rule; rules that do not read them ignore them.
    out = get_rule("samg")(u, c, step=2, sigma=3.0, state=None, w_min=2.0, w_max=6.0, smooth=3)
    np.testing.assert_array_equal(out, samg_v1(u, c, 2.0, 6.0, smooth=3))
    np.testing.assert_array_equal(get_rule("cfg")(u, c, scale=3.0), cfg(u, c, 3.0))
    assert get_rule("interval")(u, c, sigma=100.0, scale=3.0) is c
    rule = get_rule("apg")
    state = rule.new_state()
    rule(u, c, state=state, scale=3.0)
    assert state.running is not None
    assert get_rule("cfg").new_state() is None


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda u, c: get_rule("nope"), "unknown guidance"),
        (lambda u, c: get_rule("cfg")(u, c), "needs scale"),
        (lambda u, c: get_rule("cfg")(u, c, scale=2.0, tau=1.0), "no parameter tau"),
        (lambda u, c: get_rule("interval")(u, c, scale=2.0), "sigma"),
        (lambda u, c: get_rule("cfg-zero-star")(u, c, scale=2.0), "step"),
        (lambda u, c: get_rule("apg")(u, c, scale=2.0), "new_state"),
        (lambda u, c: effective_scale("apg", u, c, scale=2.0), "no scale map"),
    ],
)
def test_registry_user_errors(call, match):
    u, c = _pair()
    with pytest.raises(SamgError, match=match):
        call(u, c)


def test_effective_scale():
    u, c = _pair()
    np.testing.assert_array_equal(effective_scale("cfg", u, c, scale=4.0), [4.0, 4.0])
    np.testing.assert_array_equal(effective_scale("cfg", u, c, scale=np.array([2.0, 5.0])), [2.0, 5.0])
    eff = effective_scale("samg", u, c, w_min=2.0, w_max=8.0)
    # Values by hand: test_guidance_samg.py::test_effective_scale_of_a_two_level_delta_by_hand.
    assert eff.shape == (2,) and np.all((eff > 2.0) & (eff < 8.0))
    for name in ("samg-quantile", "samg-bound", "samg-linear"):
        eff = effective_scale(name, u, c, w_min=2.0, w_max=8.0)
        assert np.all((eff >= 2.0) & (eff <= 8.0)), name
    # quantile q = 0.25 on 36 locations: 9 at w_min, 27 at w_max.
    np.testing.assert_allclose(effective_scale("samg-quantile", u, c, w_min=2.0, w_max=8.0, q=0.25),
                               [(9 * 2 + 27 * 8) / 36] * 2, rtol=1e-6)
    assert list(effective_scale("interval", u, c, sigma=1.0, scale=6.0)) == [6.0, 6.0]
    assert list(effective_scale("interval", u, c, sigma=99.0, scale=6.0)) == [1.0, 1.0]
    torch = pytest.importorskip("torch")
    t_eff = effective_scale("samg", torch.from_numpy(u), torch.from_numpy(c), w_min=2.0, w_max=8.0)
    assert isinstance(t_eff, torch.Tensor) and t_eff.shape == (2,)


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("num_steps", [1, 2, 7, 50])
@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("reverse", [False, True])
def test_schedules_keep_the_mean_scale(name, num_steps, reverse):
    params = {} if name == "constant" else {"reverse": reverse}
    gains = [get_schedule(name)(i, num_steps, None, **params) for i in range(num_steps)]
    assert np.mean(gains) == pytest.approx(1.0, abs=1e-12)
    assert min(gains) >= 0.0
    scales = [scheduled(name, 7.5, i, num_steps, **params) for i in range(num_steps)]
    assert np.mean(scales) == pytest.approx(7.5)


def test_schedule_endpoints_and_pairs():
    assert get_schedule("linear")(0, 11) == 0.0 and get_schedule("linear")(10, 11) == 2.0
    assert get_schedule("linear")(0, 11, reverse=True) == 2.0
    assert get_schedule("cosine")(0, 11) == pytest.approx(0.0) and get_schedule("cosine")(10, 11) == pytest.approx(2.0)
    assert get_schedule("cosine")(5, 11) == pytest.approx(1.0)
    assert scheduled("linear", (3.0, 9.0), 0, 11) == (1.0, 1.0)  # gain 0: no guidance
    assert scheduled("linear", (3.0, 9.0), 10, 11) == (5.0, 17.0)
    assert scheduled("interval", 5.0, 3, 10, sigma=1.0) == 5.0
    assert scheduled("interval", (2.0, 5.0), 3, 10, sigma=0.1) == (1.0, 1.0)
    assert set(SCHEDULES) == {"constant", "linear", "cosine", "interval"}


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: get_schedule("wobbly"), "unknown guidance schedule"),
        (lambda: scheduled("linear", 5.0, 10, 10), "outside"),
        (lambda: scheduled("interval", 5.0, 1, 10), "sigma"),
    ],
)
def test_schedule_user_errors(call, match):
    with pytest.raises(SamgError, match=match):
        call()


def test_guidance_scale_bound_is_0_to_100_inclusive():
    assert MAX_GUIDANCE_SCALE == 100.0  # the decided bound, shared with the C++ runtime
    for w in (0, 0.0, 1.0, 7.5, 100, 100.0):
        assert check_scale("--scale", w) == float(w)
    for bad in (-1e-9, -5.0, 100.0001, 1e30, float("nan"), float("inf"), float("-inf"), "abc", None):
        with pytest.raises(SamgError, match="--scale") as info:
            check_scale("--scale", bad)
        assert "\n" not in str(info.value)
    with pytest.raises(SamgError, match=r"^--w-max must be a finite number in 0\.\.100, got -2"):
        check_scale("--w-max", -2)


# ---------------------------------------------------------------- the one dispatch (rule.apply)


def _step(prediction_type="epsilon", sigma=2.0, step=3, seed=1):
    from samg.guidance import StepInputs

    u, c = _pair(seed=seed)
    x = np.random.default_rng(seed + 10).standard_normal(u.shape).astype(np.float32) * 3
    return StepInputs(u, c, x, sigma, step, prediction_type)


def test_step_inputs_need_the_prediction_type():
    from samg.guidance import StepInputs

    u, c = _pair()
    with pytest.raises(TypeError, match="prediction_type"):
        StepInputs(u, c, u, 1.0, 0)  # no silent epsilon for a v_prediction or flow model


def test_apply_linear_rule_returns_x0_of_the_guided_prediction():
    s = _step()
    result = get_rule("cfg").apply(s, None, scale=4.0)
    # eps model, k-diffusion variable: x0 = x − σ·(u + w·Δ), written out here
    want = s.x.astype(np.float64) - 2.0 * (s.pred_uncond + 4.0 * (s.pred_cond.astype(np.float64) - s.pred_uncond))
    np.testing.assert_allclose(result.x0, want, rtol=1e-5, atol=1e-5)
    assert result.renoise_x0 is None
    # v-prediction: x0 = x/(1+σ²) − σ/√(1+σ²)·v
    v = _step("v_prediction", sigma=0.5)
    guided = v.pred_uncond + 4.0 * (v.pred_cond.astype(np.float64) - v.pred_uncond)
    want_v = v.x / 1.25 - 0.5 / np.sqrt(1.25) * guided
    np.testing.assert_allclose(get_rule("cfg").apply(v, None, scale=4.0).x0, want_v, rtol=1e-5, atol=1e-5)


def test_apply_cfgpp_renoises_along_the_unconditional_x0():
    s = _step()
    result = get_rule("cfgpp").apply(s, None, lam=0.6)
    x, u, c = (a.astype(np.float64) for a in (s.x, s.pred_uncond, s.pred_cond))
    np.testing.assert_allclose(result.x0, x - 2.0 * (u + 0.6 * (c - u)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.renoise_x0, x - 2.0 * u, rtol=1e-5, atol=1e-5)


def test_apply_apg_combines_in_x0_space_and_keeps_momentum_in_its_state():
    from samg.guidance import apg

    s = _step()
    x0_u, x0_c = s.x - 2.0 * s.pred_uncond, s.x - 2.0 * s.pred_cond
    rule = get_rule("apg")
    state = rule.new_state()
    options = dict(momentum=0.5, norm_threshold=0.0)  # no clip: a clip would hide the momentum's length
    first = rule.apply(s, state, scale=3.0, **options)
    np.testing.assert_allclose(first.x0, apg(x0_u, x0_c, 3.0, **options), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.running, x0_c - x0_u, rtol=1e-5, atol=1e-5)
    second = rule.apply(s, state, scale=3.0, **options)  # running = D + 0.5·D
    np.testing.assert_allclose(state.running, 1.5 * (x0_c - x0_u), rtol=1e-5, atol=1e-5)
    assert not np.allclose(second.x0, first.x0)


def test_apply_passes_the_step_index_and_sigma():
    s = _step(step=0)
    zero = get_rule("cfg-zero-star").apply(s, None, scale=3.0)  # step < zero_init_steps: prediction 0
    np.testing.assert_allclose(zero.x0, s.x, rtol=1e-6)
    outside = get_rule("interval").apply(_step(sigma=50.0), None, scale=3.0)  # σ above the interval: c
    far = _step(sigma=50.0)
    np.testing.assert_allclose(outside.x0, far.x - 50.0 * far.pred_cond, rtol=1e-5, atol=1e-4)


def test_gate_and_step_scales_compose_interval_and_schedule():
    from samg.guidance import INTERVAL_SIGMA_HI, INTERVAL_SIGMA_LO, step_scales

    rule = get_rule("interval")
    assert rule.gate(1.0, scale=5.0) == 1.0 and rule.gate(INTERVAL_SIGMA_HI + 1, scale=5.0) == 0.0
    assert rule.gate(INTERVAL_SIGMA_LO, scale=5.0) == 0.0  # (lo, hi]: lo itself is outside
    assert rule.gate(0.1, scale=5.0, sigma_lo=0.05, sigma_hi=0.2) == 1.0
    assert get_rule("samg").gate(1e9, w_min=2.0, w_max=6.0) == 1.0
    # gain = schedule gain × gate: 1 + (w − 1)·g
    assert step_scales((3.0, 9.0), 0.5 * 1.0) == (2.0, 5.0)
    assert step_scales(5.0, 0.5 * 0.0) == 1.0


def test_step_applied_scales_are_the_plain_and_energy_weighted_means_of_the_map():
    s = _step()
    mean, weighted = get_rule("samg").step_applied_scales(s, w_min=2.0, w_max=8.0)
    w = np.asarray(get_rule("samg").scale_map(s.pred_uncond, s.pred_cond, 2.0, 8.0), np.float64)
    energy = ((s.pred_cond.astype(np.float64) - s.pred_uncond) ** 2).sum(1, keepdims=True)
    assert mean == pytest.approx(w.mean()) and weighted == pytest.approx((w * energy).sum() / energy.sum())
    assert get_rule("cfg").step_applied_scales(s, scale=4.0) == pytest.approx((4.0, 4.0))
    assert get_rule("apg").step_applied_scales(s, scale=4.0) is None
