"""Turn a guided eps / v / flow network (a Runner over the exported denoiser) into a k-diffusion
denoiser `denoise(x, sigma) -> x0`.

Sampler variable and conversions (see schedules.py):
- epsilon: model input `x / sqrt(1 + s^2)`, `x0 = x - s * eps`
- v_prediction: model input `x / sqrt(1 + s^2)`, `x0 = x / (1 + s^2) - s / sqrt(1 + s^2) * v`
- flow: model input `x`, `x0 = x - s * v`

A fused export combines the two predictions inside the graph from `guidance_scales [B, 2]`
(w_min, w_max) fed on every call; a raw export returns both predictions and the rule runs here,
from samg.guidance. Rules a fused graph cannot express are refused with the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from samg.contract import Combine, GuidanceCombineAttrs, export_mode
from samg.runners.base import Runner
from samg.errors import SamgError
from samg.runtime.schedules import Schedule

SPATIAL_RULES = ("samg", "samg-quantile", "samg-bound", "samg-linear")  # rules taking w_min and w_max
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


@dataclass
class Guidance:
    """Which rule and how strong. `w_min == w_max` for single-scale rules; `options` holds the
    rule's own keyword parameters (e.g. phi, lam, sigma_lo/sigma_hi, eta, momentum)."""

    rule: str = "samg"
    w_min: float = 7.5
    w_max: float = 7.5
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        from samg.guidance import get_rule

        if self.rule != "scfg":  # S-CFG runs only inside an `samg export --guidance scfg` graph
            get_rule(self.rule)  # SamgError naming the known rules
        from samg.guidance import check_scale

        single = self.rule not in SPATIAL_RULES
        self.w_min = check_scale("--scale" if single else "--w-min", self.w_min)
        self.w_max = check_scale("--scale" if single else "--w-max", self.w_max)
        if self.w_min > self.w_max:
            raise SamgError(f"--w-min {self.w_min} is above --w-max {self.w_max}: swap them")
        if self.rule not in SPATIAL_RULES and self.w_min != self.w_max:
            raise SamgError(f"guidance {self.rule!r} takes one scale: pass --scale W instead of --w-min/--w-max")


def check_guidance_for_export(guidance: Guidance, combine: Combine | None) -> None:
    """SamgError unless the export's graph can run this guidance rule: a graph's combine op declares
    the rules it runs (`combine.rules`); a raw graph (None) runs every host-side rule."""
    scfg_graph = combine is not None and "scfg" in combine.rules
    if scfg_graph != (guidance.rule == "scfg"):  # S-CFG needs the attention maps, inside the graph only
        raise SamgError(
            "S-CFG needs an export made with `samg export --guidance scfg` and `--guidance scfg` here: "
            f"this export is {export_mode(combine)!r} and the guidance asked is {guidance.rule!r}"
        )
    if combine is not None and guidance.rule not in combine.rules:
        *others, last = combine.rules
        raise SamgError(
            f"guidance {guidance.rule!r} cannot run on a {export_mode(combine)} export (it combines in the graph): "
            f"re-export with --guidance raw, or use --guidance {', '.join(others)} or {last}"
        )


def _x0_from(prediction_type: str, out: np.ndarray, x: np.ndarray, sigma: float) -> np.ndarray:
    if np.isinf(sigma):  # alpha_bar = 0 (zero terminal SNR): x holds x_t, which is pure noise
        if prediction_type != "v_prediction":
            raise SamgError(f"this schedule starts at zero SNR (infinite sigma), where a {prediction_type} "
                            "model cannot predict x0: use a v_prediction model or a schedule without "
                            "rescale_betas_zero_snr")
        return -out  # x0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v at alpha_bar = 0, as diffusers' DDIM
    if prediction_type in ("epsilon", "flow"):
        return x - sigma * out
    # v_prediction
    return x / (1.0 + sigma**2) - (sigma / np.sqrt(1.0 + sigma**2)) * out


def host_rule_params(rule, options: dict[str, Any], w_min: float, w_max: float,
                     defaults: GuidanceCombineAttrs | None) -> dict[str, Any]:
    """A host-side rule's keyword parameters: the step's scales by parameter name, the export's
    GuidanceCombine attributes (tau, sharpness, smooth, channel_axis) unless the options set them."""
    params = dict(options)
    attributes = defaults.attributes() if defaults is not None else {}
    for name in rule.params:
        if name == "w_min":
            params[name] = w_min
        elif name in ("w_max", "scale", "lam"):
            params[name] = w_max
        elif name in attributes:
            params.setdefault(name, attributes[name])
    return params


def _model_input_scale(prediction_type: str, sigma: float) -> float:
    # at sigma = inf the sampler variable already holds the model latents (samg.runtime.schedules)
    return 1.0 if prediction_type == "flow" or np.isinf(sigma) else 1.0 / np.sqrt(1.0 + sigma**2)


class Denoiser:
    """`denoise(x, sigma) -> x0` over a runner; callable, one instance per generation (APG keeps state)."""

    def __init__(self, runner: Runner, *, prediction_type: str, schedule: Schedule,
                 conditioning: dict[str, np.ndarray], guidance: Guidance, combine: Combine | None = None,
                 host_rule_attrs: GuidanceCombineAttrs | None = None,
                 scale_schedule: Callable[[int, float], tuple[float, float]] | None = None):
        """combine: the graph's combine op (samg.contract.Export.combine; None: a raw graph returning
        both predictions). host_rule_attrs: the defaults host-side rules take (Export.host_rule_attrs)."""
        if prediction_type not in PREDICTION_TYPES:
            raise SamgError(f"unknown prediction_type {prediction_type!r} in samg.json: re-export the model")
        guidance.validate()
        check_guidance_for_export(guidance, combine)
        self.runner = runner
        self.prediction_type = prediction_type
        self.fused = combine is not None  # the graph takes guidance_scales and outputs guided (scfg: (w, w))
        self.schedule = schedule
        self.conditioning = conditioning
        self.guidance = guidance
        self.host_rule_attrs = host_rule_attrs
        # per-step (w_min, w_max): a guidance-weight schedule may override the constant scales
        self.scale_schedule = scale_schedule
        self.renoise_x0: np.ndarray | None = None
        self._apg_state = None
        self.calls = 0

    # -- scales -------------------------------------------------------------------------------
    def scales_at(self, step: int, sigma: float) -> tuple[float, float]:
        """The step's (w_min, w_max): the per-step schedule's scales (else the constant ones), and
        (1, 1) outside the interval rule's sigma range. A scale is 1 + (w − 1)·gain, so this is
        gain = schedule gain × interval indicator: the two compose instead of one replacing the other."""
        g = self.guidance
        if g.rule == "interval":
            from samg.guidance import get_rule, in_guidance_interval

            defaults = get_rule("interval").params
            lo, hi = (g.options.get(k, defaults[k]) for k in ("sigma_lo", "sigma_hi"))
            if not in_guidance_interval(sigma, lo, hi):
                return 1.0, 1.0
        if self.scale_schedule is not None:
            return tuple(float(v) for v in self.scale_schedule(step, sigma))  # type: ignore[return-value]
        return g.w_min, g.w_max

    # -- the call -------------------------------------------------------------------------------
    def __call__(self, x: np.ndarray, sigma: float) -> np.ndarray:
        batch = x.shape[0]
        step = int(np.nonzero(self.schedule.sigmas[:-1] == sigma)[0][0]) if sigma in self.schedule.sigmas[:-1] else self.calls
        feeds = {
            "latents": (x * _model_input_scale(self.prediction_type, sigma)).astype(np.float32),
            "timestep": np.full((batch,), self.schedule.timestep_for(sigma), np.float32),
            **self.conditioning,
        }
        w_min, w_max = self.scales_at(step, sigma)
        self.calls += 1
        self.renoise_x0 = None
        if self.fused:
            feeds["guidance_scales"] = np.tile(np.array([[w_min, w_max]], np.float32), (batch, 1))
            guided = np.asarray(self.runner.run(feeds)["guided"], np.float32)
            return _x0_from(self.prediction_type, guided, x, sigma)
        outs = self.runner.run(feeds)
        u = np.asarray(outs["pred_uncond"], np.float32)
        c = np.asarray(outs["pred_cond"], np.float32)
        return self._host_combine(u, c, x, sigma, step, w_min, w_max)

    def _host_combine(self, u, c, x, sigma, step, w_min, w_max) -> np.ndarray:
        from samg.guidance import get_rule

        rule, pt = get_rule(self.guidance.rule), self.prediction_type
        params = host_rule_params(rule, self.guidance.options, w_min, w_max, self.host_rule_attrs)
        if rule.needs_state and self._apg_state is None:
            self._apg_state = rule.new_state()
        if rule.space == "x0":  # APG: combine denoised predictions
            u, c = _x0_from(pt, u, x, sigma), _x0_from(pt, c, x, sigma)
        out = rule(u, c, step=step, sigma=sigma, state=self._apg_state, **params)
        if rule.space == "x0":
            return np.asarray(out, np.float32)
        if rule.returns_uncond:  # CFG++: x0 from the guided prediction, re-noise along u
            self.renoise_x0 = _x0_from(pt, np.asarray(out.uncond, np.float32), x, sigma)
            out = out.guided
        return _x0_from(pt, np.asarray(out, np.float32), x, sigma)
