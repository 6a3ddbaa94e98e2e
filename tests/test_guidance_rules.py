"""CFG, CFG-rescale, APG, CFG++, guidance interval, CFG-Zero*: against diffusers' guiders where one
exists, and against their defining properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from samg.errors import SamgError
from samg.guidance import (
    APGState,
    apg,
    cfg,
    cfg_rescale,
    cfg_zero_star,
    cfgpp,
    cfgpp_ddim_step,
    get_rule,
    guidance_interval,
    in_guidance_interval,
    rule_names,
)

torch = pytest.importorskip("torch")
guiders = pytest.importorskip("diffusers.guiders")
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer  # noqa: E402
from diffusers.guiders.guider_utils import rescale_noise_cfg  # noqa: E402

FAST = settings(max_examples=20, deadline=None)


def _pair(shape, seed, lib="numpy"):
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(shape).astype(np.float32)
    c = (u + rng.standard_normal(shape)).astype(np.float32)
    if lib == "torch":
        return torch.from_numpy(u), torch.from_numpy(c)
    return u, c


def _default_params(name):
    """Concrete parameters for every rule (REQUIRED ones filled in)."""
    return {
        "cfg": {"scale": 4.0},
        "samg": {"w_min": 2.0, "w_max": 7.0, "smooth": 3},
        "samg-quantile": {"w_min": 2.0, "w_max": 7.0},
        "samg-bound": {"w_min": 2.0, "w_max": 7.0},
        "samg-linear": {"w_min": 2.0, "w_max": 7.0},
        "cfg-rescale": {"scale": 4.0},
        "apg": {"scale": 4.0, "norm_threshold": 5.0},
        "cfgpp": {"lam": 0.6},
        "interval": {"scale": 4.0},
        "cfg-zero-star": {"scale": 4.0},
    }[name]


def _call(name, u, c, step=3, sigma=1.0):
    rule = get_rule(name)
    out = rule(u, c, step=step, sigma=sigma, state=rule.new_state(), **_default_params(name))
    return out.guided if rule.returns_uncond else out


# ---------------------------------------------------------------- CFG and CFG-rescale vs diffusers


@FAST
@given(seed=st.integers(0, 2**16), w=st.floats(0.0, 15.0), phi=st.floats(0.0, 1.0))
def test_cfg_and_rescale_match_diffusers(seed, w, phi):
    u, c = _pair((2, 4, 6, 6), seed, "torch")
    expected_cfg = guiders.ClassifierFreeGuidance(guidance_scale=w).forward(c, u).pred
    torch.testing.assert_close(cfg(u, c, w), expected_cfg, rtol=1e-6, atol=1e-5)
    expected = rescale_noise_cfg(u + w * (c - u), c, phi)
    torch.testing.assert_close(cfg_rescale(u, c, w, phi), expected, rtol=1e-5, atol=1e-5)


def test_cfg_scale_one_is_c_and_zero_is_u():
    u, c = _pair((2, 3, 4, 4), seed=0)
    np.testing.assert_allclose(cfg(u, c, 1.0), c, atol=1e-6)
    np.testing.assert_array_equal(cfg(u, c, 0.0), u)


def test_cfg_rescale_matches_target_std_and_handles_constant_output():
    u, c = _pair((2, 3, 8, 8), seed=1)
    out = cfg_rescale(u, c, 7.0, phi=1.0)
    np.testing.assert_allclose(out.reshape(2, -1).std(1, ddof=1), c.reshape(2, -1).std(1, ddof=1), rtol=1e-5)
    flat = np.ones((1, 2, 3, 3), np.float32)
    np.testing.assert_array_equal(cfg_rescale(flat, flat, 5.0), flat)  # std(x) = 0: left as x, no NaN


# ---------------------------------------------------------------- APG vs diffusers


@pytest.mark.parametrize("momentum", [None, -0.5, -0.75])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("norm_threshold", [0.0, 2.5, 15.0])
def test_apg_matches_diffusers_over_steps(momentum, eta, norm_threshold):
    w = 5.0
    # The paper's formula is diffusers' "original formulation" with guidance_scale = w − 1.
    guider = guiders.AdaptiveProjectedGuidance(
        guidance_scale=w - 1.0,
        adaptive_projected_guidance_momentum=momentum,
        adaptive_projected_guidance_rescale=norm_threshold,
        eta=eta,
        use_original_formulation=True,
    )
    state = APGState() if momentum is not None else None
    for step in range(4):
        guider.set_state(step, 4, torch.tensor(999 - 250 * step))
        if step == 0 and momentum is not None:
            guider.momentum_buffer = MomentumBuffer(momentum)  # what guider.prepare_inputs does at step 0
        x0_u, x0_c = _pair((2, 4, 6, 6), seed=10 + step, lib="torch")
        expected = guider.forward(x0_c, x0_u).pred
        got = apg(x0_u, x0_c, w, state, eta=eta, norm_threshold=norm_threshold, momentum=momentum or 0.0)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_apg_without_projection_effects_is_cfg():
    u, c = _pair((2, 3, 5, 5), seed=2)
    # η = 1 keeps both parts (D∥ + D⊥ = D) and r = 0 disables clipping: c + (w−1)·D = u + w·D.
    np.testing.assert_allclose(apg(u, c, 6.0, None, eta=1.0, norm_threshold=0.0), cfg(u, c, 6.0), atol=1e-5)


def test_apg_numpy_and_torch_agree_and_state_accumulates():
    s_np, s_t = APGState(), APGState()
    for step in range(3):
        u, c = _pair((2, 3, 5, 5), seed=20 + step)
        got_np = apg(u, c, 4.0, s_np, momentum=-0.5, norm_threshold=3.0)
        got_t = apg(torch.from_numpy(u), torch.from_numpy(c), 4.0, s_t, momentum=-0.5, norm_threshold=3.0)
        np.testing.assert_allclose(got_t.numpy(), got_np, rtol=1e-5, atol=1e-5)
    assert s_np.running is not None
    with pytest.raises(SamgError, match="reset"):
        apg(*_pair((1, 3, 5, 5), seed=0), 4.0, s_np)
    s_np.reset()
    assert s_np.running is None


# ---------------------------------------------------------------- CFG-Zero* vs diffusers


@pytest.mark.parametrize("zero_init_steps", [0, 1, 2])
def test_cfg_zero_star_matches_diffusers_over_steps(zero_init_steps):
    w = 4.5
    guider = guiders.ClassifierFreeZeroStarGuidance(guidance_scale=w, zero_init_steps=zero_init_steps)
    for step in range(4):
        guider.set_state(step, 4, torch.tensor(1.0 - step / 4))
        u, c = _pair((2, 4, 6, 6), seed=30 + step, lib="torch")
        expected = guider.forward(c, u).pred
        got = cfg_zero_star(u, c, w, step=step, zero_init_steps=zero_init_steps)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        if step < zero_init_steps:
            assert torch.all(got == 0)


def test_cfg_zero_star_optimal_scale():
    u, c = _pair((2, 3, 4, 4), seed=3)
    c_parallel = 0.7 * u  # c a multiple of u: s* = 0.7 and c − s*·u = 0, so out = c for any w
    np.testing.assert_allclose(cfg_zero_star(u, c_parallel, 9.0, step=5), c_parallel, atol=1e-5)


# ---------------------------------------------------------------- CFG++


def test_cfgpp_returns_guided_and_uncond():
    u, c = _pair((2, 3, 4, 4), seed=4)
    out = cfgpp(u, c, 0.4)
    np.testing.assert_array_equal(out.guided, cfg(u, c, 0.4))
    assert out.uncond is u
    for bad in (-0.1, 1.5, np.array([0.2, 2.0])):
        with pytest.raises(SamgError, match="\\[0, 1\\]"):
            cfgpp(u, c, bad)


def test_cfgpp_ddim_step_equals_alpha_bar_form():
    x_t, _ = _pair((2, 3, 4, 4), seed=5)
    eps_u, eps_c = _pair((2, 3, 4, 4), seed=6)
    lam, abar_t, abar_prev = 0.6, 0.3, 0.55
    # DDIM (η = 0) in ᾱ form with CFG++: x̂0 from the guided eps, re-noise with eps_u.
    eps_g = eps_u + lam * (eps_c - eps_u)
    x0 = (x_t - np.sqrt(1 - abar_t) * eps_g) / np.sqrt(abar_t)
    x_prev = np.sqrt(abar_prev) * x0 + np.sqrt(1 - abar_prev) * eps_u
    sigma, sigma_next = np.sqrt((1 - abar_t) / abar_t), np.sqrt((1 - abar_prev) / abar_prev)
    got = cfgpp_ddim_step(x_t / np.sqrt(abar_t), eps_u, eps_c, lam, sigma, sigma_next)
    np.testing.assert_allclose(got * np.sqrt(abar_prev), x_prev, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- guidance interval


def test_interval_bounds_are_open_below_closed_above():
    u, c = _pair((2, 3, 4, 4), seed=7)
    assert guidance_interval(u, c, 5.0, sigma=0.28) is c
    np.testing.assert_array_equal(guidance_interval(u, c, 5.0, sigma=5.42), cfg(u, c, 5.0))
    assert guidance_interval(u, c, 5.0, sigma=10.0) is c
    assert in_guidance_interval(1.0, 0.28, 5.42) and not in_guidance_interval(0.28, 0.28, 5.42)
    per_sample = guidance_interval(u, c, 5.0, sigma=np.array([1.0, 20.0]), sigma_lo=0.5, sigma_hi=2.0)
    np.testing.assert_array_equal(per_sample[0], cfg(u, c, 5.0)[0])
    np.testing.assert_array_equal(per_sample[1], c[1])
    tu, tc = torch.from_numpy(u), torch.from_numpy(c)
    t_out = guidance_interval(tu, tc, 5.0, sigma=torch.tensor([1.0, 20.0]), sigma_lo=0.5, sigma_hi=2.0)
    np.testing.assert_array_equal(t_out.numpy(), per_sample)


# ---------------------------------------------------------------- every rule: numpy/torch, dtype, NaN


@pytest.mark.parametrize("name", rule_names())
def test_every_rule_numpy_and_torch_agree(name):
    u, c = _pair((2, 4, 6, 6), seed=8)
    got_t = _call(name, torch.from_numpy(u), torch.from_numpy(c))
    np.testing.assert_allclose(got_t.numpy(), _call(name, u, c), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", rule_names())
def test_every_rule_preserves_torch_dtype(name, dtype):
    tdtype = getattr(torch, dtype)
    u, c = _pair((2, 4, 6, 6), seed=9, lib="torch")
    u, c = u.to(tdtype), c.to(tdtype)
    out = _call(name, u, c)
    assert out.dtype == tdtype
    reference = _call(name, u.float(), c.float())
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=5e-2)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("name", rule_names())
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_every_rule_keeps_non_finite_input_non_finite(name, bad, lib):
    u, c = _pair((2, 3, 5, 5), seed=12)
    c[1, 1, 2, 3] = bad
    if lib == "torch":
        u, c = torch.from_numpy(u), torch.from_numpy(c)
    for step in (0, 3):  # step 0: CFG-Zero*'s zero-init branch
        out = np.asarray(_call(name, u, c, step=step))
        assert not np.all(np.isfinite(out[1, :, 2, 3])), (name, step)
