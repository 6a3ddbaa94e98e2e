"""samg's numpy schedules against diffusers' schedulers (diffusers is imported in tests only)."""

import numpy as np
import pytest

from samg.errors import SamgError
from samg.contract import scheduler_recipe as recipe
from samg.runtime import schedules

diffusers = pytest.importorskip("diffusers")

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            timestep_spacing="leading", steps_offset=1, rescale_betas_zero_snr=False)
CONFIGS = [
    SD15,
    dict(SD15, timestep_spacing="trailing", steps_offset=0, rescale_betas_zero_snr=True),
    dict(SD15, beta_schedule="linear", beta_start=0.0001, beta_end=0.02, timestep_spacing="linspace"),
]


def _diffusers_kwargs(cfg):
    return {k: v for k, v in cfg.items() if k != "kind"}


@pytest.mark.parametrize("cfg", CONFIGS)
# Karras spacing needs two sigmas, so it starts at 3 steps.
@pytest.mark.parametrize("steps,karras", [(1, False), (3, False), (7, False), (25, False), (3, True), (7, True), (25, True)])
def test_euler_matches_diffusers(cfg, steps, karras):
    ref = diffusers.EulerDiscreteScheduler(**_diffusers_kwargs(cfg), use_karras_sigmas=karras)
    ref.set_timesteps(steps)
    ours = schedules.euler_schedule(recipe(cfg), steps, karras=karras)
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-4, atol=1e-3)
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=2e-5)


@pytest.mark.parametrize("cfg", [SD15, dict(SD15, set_alpha_to_one=False)])
@pytest.mark.parametrize("steps", [1, 4, 30])
def test_ddim_timesteps_and_alphas_match_diffusers(cfg, steps):
    ref = diffusers.DDIMScheduler(**_diffusers_kwargs(cfg), clip_sample=False)
    ref.set_timesteps(steps)
    ours = schedules.ddim_schedule(recipe(cfg), steps)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    ac = ref.alphas_cumprod.double().numpy()
    t = ref.timesteps.numpy()
    np.testing.assert_allclose(ours.sigmas[:-1], np.sqrt((1 - ac[t]) / ac[t]), rtol=2e-5)
    final = float(ref.final_alpha_cumprod)
    np.testing.assert_allclose(ours.sigmas[-1], np.sqrt((1 - final) / final), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("steps", [2, 5, 20])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_dpmpp_matches_diffusers(steps, karras, spacing):
    cfg = dict(SD15, timestep_spacing=spacing)
    ref = diffusers.DPMSolverMultistepScheduler(**_diffusers_kwargs(cfg), use_karras_sigmas=karras)
    ref.set_timesteps(steps)
    ours = schedules.dpm_schedule(recipe(cfg), steps, karras=karras)
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), atol=1e-3)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_flow_matches_diffusers(shift, steps):
    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(steps)
    ours = schedules.flow_schedule(recipe({"kind": "flow", "shift": shift, "num_train_timesteps": 1000}), steps)
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-5, atol=1e-3)


def test_sigma_to_t_inverts_training_sigmas():
    full = schedules.train_sigmas(schedules.alphas_cumprod(recipe(SD15)))
    t = np.array([0.0, 10.0, 500.0, 999.0, 123.25])
    sig = np.exp(np.interp(t, np.arange(1000), np.log(full)))
    np.testing.assert_allclose(schedules.sigma_to_t(sig, np.log(full)), t, atol=1e-6)


def test_zero_snr_ends_at_near_zero_alpha():
    ac = schedules.alphas_cumprod(recipe(dict(SD15, rescale_betas_zero_snr=True)))
    assert ac[-1] == 2.0**-24 and np.all(np.diff(ac) < 0)


def test_bad_requests_raise_samg_error():
    with pytest.raises(SamgError, match="steps"):
        schedules.make_schedule(recipe(SD15), "euler", 0)
    with pytest.raises(SamgError, match="flow_euler"):
        schedules.make_schedule(recipe(SD15), "flow_euler", 4)
    with pytest.raises(SamgError, match="flow"):
        schedules.make_schedule(recipe({"kind": "flow", "shift": 3.0}), "ddim", 4)
    with pytest.raises(SamgError, match="sampler"):
        schedules.make_schedule(recipe(SD15), "heun", 4)


def test_clip_sample_recipe_is_refused_not_ignored():
    with pytest.raises(SamgError, match="clip_sample"):
        schedules.make_schedule(recipe(dict(SD15, clip_sample=True)), "ddim", 4)
    schedules.make_schedule(recipe(dict(SD15, clip_sample=False)), "ddim", 4)


# CogVideoX-2b's scheduler_config.json (CogVideoXDDIMScheduler), as the manifest records it.
COGVIDEOX = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 timestep_spacing="trailing", steps_offset=0, rescale_betas_zero_snr=True, snr_shift_scale=3.0,
                 set_alpha_to_one=True)


def _cogvideox_reference():
    return diffusers.CogVideoXDDIMScheduler(**COGVIDEOX, clip_sample=False, prediction_type="v_prediction")


def test_cogvideox_alphas_cumprod_are_shifted_then_rescaled_to_zero():
    ref = _cogvideox_reference().alphas_cumprod.double().numpy()
    ours = schedules.alphas_cumprod(recipe(COGVIDEOX))
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-15)
    assert ours[-1] == 0.0  # exactly zero terminal SNR, no clamp
    # the number: sigma at t = 749 is 9.50 in diffusers (5.40 when the shift was ignored)
    assert schedules.train_sigmas(ours)[749] == pytest.approx(9.4969, abs=1e-3)
    # independent of diffusers: SD's scaled_linear alpha_bar at t=0 shifted by 3, the rescale keeps index 0
    a0 = 1 - 0.00085
    assert ours[0] == pytest.approx(a0 / (3 + (1 - 3) * a0), rel=1e-12)


@pytest.mark.parametrize("steps", [1, 2, 4, 5, 10, 50])
def test_cogvideox_ddim_matches_diffusers(steps):
    ref = _cogvideox_reference()
    ref.set_timesteps(steps)
    ours = schedules.make_schedule(recipe(COGVIDEOX), "ddim", steps)
    t = ref.timesteps.numpy()
    np.testing.assert_array_equal(ours.timesteps, t)
    ac = ref.alphas_cumprod.double().numpy()
    prev = np.concatenate([ac[t[1:]], [float(ref.final_alpha_cumprod)]])
    assert t[0] == 999 and np.isinf(ours.sigmas[0])  # alpha_bar_T = 0: infinite first sigma
    np.testing.assert_allclose(ours.sigmas[1:], np.sqrt((1 - prev) / prev), rtol=1e-10)
    assert ours.init_noise_sigma == float(ref.init_noise_sigma) == 1.0  # the variable starts as x_T = noise


def test_zero_terminal_snr_refusals_are_one_line_errors():
    with pytest.raises(SamgError, match="divides 1000"):  # diffusers' DDIM would land between timesteps
        schedules.make_schedule(recipe(COGVIDEOX), "ddim", 3)
    for sampler in ("euler", "dpmpp_2m"):
        with pytest.raises(SamgError, match="drop --karras"):
            schedules.make_schedule(recipe(COGVIDEOX), sampler, 4, karras=True)
    with pytest.raises(SamgError, match="snr_shift_scale"):
        schedules.make_schedule(recipe(dict(COGVIDEOX, snr_shift_scale=0.0)), "ddim", 4)
