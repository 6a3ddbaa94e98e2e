"""Noise schedules: numpy re-implementations of diffusers' timestep/sigma math.

Everything is expressed k-diffusion style as a decreasing list of sigmas ending in the final sigma,
plus the model timestep fed at each step. For DDPM-family models sigma is the variance-exploding
noise level `sqrt((1 - alpha_bar) / alpha_bar)` and the sampler variable is `x_t * sqrt(1 + sigma^2)`;
for flow models sigma is the interpolation weight and the sampler variable is `x_t` itself.
The formulas follow diffusers 0.42 (EulerDiscreteScheduler, DDIMScheduler, CogVideoXDDIMScheduler,
DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler) so that CFG runs match diffusers.

Zero terminal SNR (CogVideoX: alpha_bar_T = 0 exactly) makes the first sigma infinite. There the
sampler variable holds its limit `x_VE / sigma`, which is the model latents x_t themselves (= the
noise), so `init_noise_sigma` is 1 and the samplers/denoiser treat `sigma == inf` as that limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from samg.contract import DiscreteScheduler, FlowScheduler, SchedulerRecipe
from samg.errors import SamgError
from samg.runtime.samplers import SAMPLERS

FLOW_ONLY_SAMPLER = "flow_euler"  # steps flow-matching sigmas only
FLOW_SAMPLERS = (FLOW_ONLY_SAMPLER, "euler")  # euler on a flow model runs flow_euler's schedule
DISCRETE_SAMPLERS = tuple(name for name in SAMPLERS if name != FLOW_ONLY_SAMPLER)
KARRAS_SAMPLERS = ("euler", "euler_a", "dpmpp_2m")  # the samplers whose schedule has a Karras form


def _one_of(names) -> str:
    *others, last = names
    return f"{', '.join(others)} or {last}" if others else last

# diffusers' defaults for recipe keys an export leaves out (DDPMScheduler's; CogVideoXDDIMScheduler's
# betas for its shifted recipe; FlowMatchEulerDiscreteScheduler's shift)
DEFAULT_TRAIN_TIMESTEPS = 1000
DEFAULT_BETAS = (0.0001, 0.02, "linear")
DEFAULT_SHIFTED_BETAS = (0.00085, 0.012, "scaled_linear")
DEFAULT_FLOW_SHIFT = 1.0


def _or(value, default):
    return default if value is None else value


def num_train_timesteps(recipe: SchedulerRecipe) -> int:
    """The model's training timesteps (diffusers refuses more sampling steps)."""
    return int(_or(recipe.num_train_timesteps, DEFAULT_TRAIN_TIMESTEPS))


@dataclass(frozen=True)
class Schedule:
    """What a sampler needs: sigmas (steps + 1, decreasing), model timesteps (steps), start scale."""

    sigmas: np.ndarray  # float64 [steps + 1]
    timesteps: np.ndarray  # float64 [steps]: the model's own timestep value at sigmas[i]
    init_noise_sigma: float  # initial sampler variable = standard normal noise * this
    kind: str  # "discrete" (VP model, VE sampler variable) or "flow"

    def to_model_latents(self, x: np.ndarray) -> np.ndarray:
        """Convert the final sampler variable back to the model's latent space."""
        if self.kind == "discrete":
            return x / np.sqrt(1.0 + float(self.sigmas[-1]) ** 2)
        return x

    def timestep_for(self, sigma: float) -> float:
        """The model timestep for a sigma of this schedule (exact table lookup: no re-interpolation)."""
        hits = np.nonzero(self.sigmas[:-1] == sigma)[0]
        if hits.size:
            return float(self.timesteps[hits[0]])
        raise ValueError(f"sigma {sigma} is not a step of this schedule")


# ---------------------------------------------------------------- discrete (DDPM family) schedules


def betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str) -> np.ndarray:
    n = num_train_timesteps
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, n, dtype=np.float32)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        t = np.arange(n + 1) / n
        alpha_bar = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
        return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    raise SamgError(f"unknown beta_schedule {beta_schedule!r} in samg.json: use linear, scaled_linear or squaredcos_cap_v2")


def rescale_zero_terminal_snr(b: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1 (as diffusers' rescale_zero_terminal_snr)."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - b))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def shifted_alphas_cumprod(cfg: DiscreteScheduler) -> np.ndarray:
    """CogVideoXDDIMScheduler's alpha_bar: cumprod of 1 - betas, shifted by `snr_shift_scale` as SD3,
    `alpha_bar / (s + (1 - s) * alpha_bar)`, then (if asked) rescaled to zero terminal SNR, which
    ends exactly at 0. Its scaled_linear betas are float64 (other diffusers schedulers: float32)."""
    n = num_train_timesteps(cfg)
    start, end = float(_or(cfg.beta_start, DEFAULT_SHIFTED_BETAS[0])), float(_or(cfg.beta_end, DEFAULT_SHIFTED_BETAS[1]))
    kind = _or(cfg.beta_schedule, DEFAULT_SHIFTED_BETAS[2])
    if kind == "scaled_linear":
        b = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    else:
        b = betas(n, start, end, kind).astype(np.float32)
    shift = float(cfg.snr_shift_scale)
    if not (np.isfinite(shift) and shift > 0):
        raise SamgError(f"snr_shift_scale {shift} in samg.json must be a positive number: re-export the model")
    ac = np.cumprod(1.0 - b, dtype=b.dtype)
    ac = (ac / (shift + (1 - shift) * ac)).astype(b.dtype)
    if cfg.rescale_betas_zero_snr:  # diffusers' version on alphas_cumprod, no clamp
        sqrt_ab = np.sqrt(ac)
        first, last = sqrt_ab[0], sqrt_ab[-1]
        ac = (((sqrt_ab - last) * (first / (first - last))) ** 2).astype(b.dtype)
    return ac


def check_train_schedule(cfg: DiscreteScheduler, ac: np.ndarray) -> None:
    """SamgError naming the scheduler fields when their alpha_bar is not a diffusion schedule: every
    training step must add noise (alpha_bar below 1), and every step but a zero-SNR rescaled last
    one must keep signal (alpha_bar above 0). Checked before sampling, so nothing non-finite follows."""
    shifted = cfg.snr_shift_scale is not None
    defaults = DEFAULT_SHIFTED_BETAS if shifted else DEFAULT_BETAS
    start, end, kind = (_or(value, default) for value, default in zip(
        (cfg.beta_start, cfg.beta_end, cfg.beta_schedule), defaults))
    fields = f"samg.json's scheduler (beta_start {start:g}, beta_end {end:g}, {kind})"
    if not (ac < 1).all():
        raise SamgError(f"{fields} gives a training step without noise (a beta of 0, so sigma 0): beta_start and "
                        "beta_end must be above 0: re-export the model")
    kept = ac[:-1] if cfg.rescale_betas_zero_snr else ac
    if not (kept > 0).all():
        raise SamgError(f"{fields} leaves no signal before the last training step (alpha_bar reaches 0, an infinite "
                        f"sigma): these are not training betas (e.g. beta_start {defaults[0]:g}, beta_end "
                        f"{defaults[1]:g}): re-export the model")


def alphas_cumprod(cfg: DiscreteScheduler) -> np.ndarray:
    if cfg.snr_shift_scale is not None:  # CogVideoXDDIMScheduler's recipe (see the recipe's scheduler_class)
        ac = shifted_alphas_cumprod(cfg)
        check_train_schedule(cfg, ac)
        return ac
    b = betas(
        num_train_timesteps(cfg),
        float(_or(cfg.beta_start, DEFAULT_BETAS[0])),
        float(_or(cfg.beta_end, DEFAULT_BETAS[1])),
        _or(cfg.beta_schedule, DEFAULT_BETAS[2]),
    )
    zero_snr = bool(cfg.rescale_betas_zero_snr)
    if zero_snr:
        check_train_schedule(cfg, np.cumprod((1.0 - b).astype(np.float32), dtype=np.float32))
        b = rescale_zero_terminal_snr(b)  # divides by first - last, which the check above keeps nonzero
    # float32 like diffusers (its betas are float32 tensors): small sigmas depend on this rounding
    ac = np.cumprod((1.0 - b).astype(np.float32), dtype=np.float32)
    check_train_schedule(cfg, ac)
    if zero_snr:
        ac[-1] = 2.0**-24  # as diffusers: near zero so that the first sigma is finite
    return ac


def train_sigmas(ac: np.ndarray) -> np.ndarray:
    """sigma(t) for t = 0..T-1 (increasing); inf where alpha_bar is 0 (zero terminal SNR)."""
    ac = np.asarray(ac, np.float64)
    with np.errstate(divide="ignore"):
        return np.sqrt((1.0 - ac) / ac)


def init_noise_scale(first_sigma: float, finite_scale: float) -> float:
    """The starting scale of standard normal noise: `finite_scale` of the scheduler, or 1 when the
    first sigma is infinite (the sampler variable then holds the model latents, see the module doc)."""
    return 1.0 if np.isinf(first_sigma) else float(finite_scale)


def _refuse_karras_at_zero_snr(sigmas: np.ndarray) -> None:
    if np.isinf(sigmas).any():
        raise SamgError("--karras spaces sigmas between the smallest and the largest, and this schedule's largest "
                        "is infinite (zero terminal SNR): drop --karras")


def sigma_to_t(sigma: np.ndarray | float, log_sigmas: np.ndarray) -> np.ndarray:
    """Piecewise-linear interpolation of t in log-sigma (diffusers' `_sigma_to_t`)."""
    sigma = np.asarray(sigma, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists.reshape(len(log_sigmas), -1) >= 0, axis=0).argmax(axis=0)
    low = low.clip(max=len(log_sigmas) - 2)
    w = (log_sigmas[low] - log_sigma.reshape(-1)) / (log_sigmas[low] - log_sigmas[low + 1])
    w = np.clip(w, 0.0, 1.0)
    return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def spaced_timesteps(spacing: str, steps: int, num_train: int, steps_offset: int) -> np.ndarray:
    """Timesteps of EulerDiscreteScheduler/DDIMScheduler for `timestep_spacing` (Lin et al. Table 2)."""
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, steps)[::-1].copy()
    if spacing == "leading":
        ratio = num_train // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(num_train, 0, -num_train / steps)) - 1.0
    raise SamgError(f"unknown timestep_spacing {spacing!r} in samg.json: use leading, trailing or linspace")


def euler_schedule(cfg: DiscreteScheduler, steps: int, *, karras: bool = False) -> Schedule:
    """EulerDiscreteScheduler (also Euler ancestral): interpolated sigmas, final sigma 0."""
    ac = alphas_cumprod(cfg)
    num_train = len(ac)
    spacing = _or(cfg.timestep_spacing, "leading")
    ts = spaced_timesteps(spacing, steps, num_train, int(cfg.steps_offset or 0))
    full = train_sigmas(ac)
    sig = np.interp(ts, np.arange(num_train), full)
    if karras:
        _refuse_karras_at_zero_snr(full)
        sig = karras_sigmas(float(sig[-1]), float(sig[0]), steps)
        ts = sigma_to_t(sig, np.log(full))
    sig = np.concatenate([sig, [0.0]])
    max_sigma = float(sig.max())
    # diffusers' quirk: the starting noise is scaled by sqrt(sigma^2 + 1) for "leading" spacing
    init = max_sigma if spacing in ("linspace", "trailing") else (max_sigma**2 + 1) ** 0.5
    return Schedule(sig, ts.astype(np.float64), init_noise_scale(max_sigma, init), "discrete")


def ddim_schedule(cfg: DiscreteScheduler, steps: int) -> Schedule:
    """DDIMScheduler with eta 0: it is exactly Euler on these sigmas (sigma at integer timesteps)."""
    ac = alphas_cumprod(cfg)
    num_train = len(ac)
    spacing = _or(cfg.timestep_spacing, "leading")
    ts = spaced_timesteps(spacing, steps, num_train, int(cfg.steps_offset or 0))
    if spacing == "linspace":
        ts = ts.round()
    ts = ts.astype(np.int64)
    if ts.max() >= num_train:  # leading spacing + steps_offset near num_train steps (diffusers' DDIM fails there too)
        raise SamgError(f"DDIM at {steps} steps reaches timestep {ts.max()}, past this model's {num_train} training "
                        "timesteps: use fewer steps (e.g. 50) or --sampler euler")
    prev = ts - num_train // steps  # DDIM's own "previous timestep" rule, even for trailing spacing
    final_ac = 1.0 if _or(cfg.set_alpha_to_one, True) else float(ac[0])  # diffusers default: True
    ac_at = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final_ac)
    sig_now = train_sigmas(ac[ts])
    sig_next = train_sigmas(ac_at)
    # DDIM steps from t to prev; consecutive steps meet exactly when prev == next t. diffusers then
    # evaluates the model at a timestep the previous step did not land on; samg does not copy that.
    sig = np.concatenate([sig_now, sig_next[-1:]])
    if not np.array_equal(prev[:-1], ts[1:]):
        raise SamgError(f"DDIM with {spacing} spacing at {steps} steps evaluates the model at timesteps its steps "
                        f"do not land on: use a step count that divides {num_train} (e.g. 50) or --sampler euler")
    return Schedule(sig, ts.astype(np.float64), init_noise_scale(sig[0], np.sqrt(1 + sig[0] ** 2)), "discrete")


def dpm_schedule(cfg: DiscreteScheduler, steps: int, *, karras: bool = False) -> Schedule:
    """DPMSolverMultistepScheduler's timesteps/sigmas (its own spacing rules, final sigma 0)."""
    ac = alphas_cumprod(cfg)
    num_train = len(ac)
    spacing = _or(cfg.timestep_spacing, "linspace")
    last = num_train  # lambda_min_clipped = -inf (diffusers default) clips nothing
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = last // (steps + 1)
        ts = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + int(cfg.steps_offset or 0)
    elif spacing == "trailing":
        ts = np.arange(last, 0, -num_train / steps).round().astype(np.int64) - 1
    else:
        raise SamgError(f"unknown timestep_spacing {spacing!r} in samg.json: use leading, trailing or linspace")
    full = train_sigmas(ac)
    if karras:
        _refuse_karras_at_zero_snr(full)
        sig = karras_sigmas(float(full[0]), float(full[-1]), steps)
        ts = sigma_to_t(sig, np.log(full)).round()
    else:
        sig = np.interp(ts, np.arange(num_train), full)
    sig = np.concatenate([sig, [0.0]])
    return Schedule(sig, ts.astype(np.float64), init_noise_scale(sig[0], np.sqrt(1 + sig[0] ** 2)), "discrete")


# ---------------------------------------------------------------- flow matching


def shift_sigmas(s: np.ndarray, shift: float) -> np.ndarray:
    return shift * s / (1 + (shift - 1) * s)


def flow_schedule(cfg: FlowScheduler, steps: int) -> Schedule:
    """FlowMatchEulerDiscreteScheduler (static shift). Like diffusers, the end points of the
    training schedule are already shifted and then the inference sigmas are shifted again."""
    num_train = num_train_timesteps(cfg)
    shift = float(_or(cfg.shift, DEFAULT_FLOW_SHIFT))
    sigma_max = float(shift_sigmas(np.array(1.0), shift))
    sigma_min = float(shift_sigmas(np.array(1.0 / num_train), shift))
    ts = np.linspace(sigma_max * num_train, sigma_min * num_train, steps)
    sig = shift_sigmas(ts / num_train, shift)
    return Schedule(np.concatenate([sig, [0.0]]), sig * num_train, 1.0, "flow")


def make_schedule(cfg: SchedulerRecipe, sampler: str, steps: int, *, karras: bool = False) -> Schedule:
    """The schedule diffusers' matching scheduler would use for `sampler` (see samplers.SAMPLERS)."""
    if steps < 1:
        raise SamgError(f"steps must be at least 1, got {steps}: pass --steps N with N >= 1")
    if sampler not in SAMPLERS:
        raise SamgError(f"unknown sampler {sampler!r}: use {_one_of(SAMPLERS)}")
    if isinstance(cfg, FlowScheduler):
        if sampler not in FLOW_SAMPLERS:
            raise SamgError(f"sampler {sampler!r} does not apply to a flow-matching model: use --sampler {FLOW_ONLY_SAMPLER}")
        return flow_schedule(cfg, steps)
    if cfg.clip_sample:  # a pixel-space DDPM recipe; diverging silently would be worse
        raise SamgError("the model's scheduler clips x0 (clip_sample=true in samg.json), which samg's samplers "
                        "do not do: set it false in samg.json if the model is a latent diffusion model")
    if sampler == FLOW_ONLY_SAMPLER:
        raise SamgError(f"{sampler} needs a flow-matching model: use --sampler {_one_of(DISCRETE_SAMPLERS)}")
    if karras and sampler not in KARRAS_SAMPLERS:
        raise SamgError(f"--karras does not apply to {sampler}: use --sampler {_one_of(KARRAS_SAMPLERS)} with --karras")
    if sampler == "ddim":
        return ddim_schedule(cfg, steps)
    if sampler == "dpmpp_2m":
        return dpm_schedule(cfg, steps, karras=karras)
    if sampler in ("euler", "euler_a"):
        return euler_schedule(cfg, steps, karras=karras)
    raise AssertionError(f"sampler {sampler!r} is in SAMPLERS without a schedule here")
