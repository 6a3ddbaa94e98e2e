"""The rule registry (uniform call shape, flags, parameter checks), effective scale, schedules,
and the no-torch import contract."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

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
    fused = {n for n in CLI_NAMES if get_rule(n).fused}
    assert fused == {"cfg", "samg"}
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
