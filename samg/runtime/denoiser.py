"""Turn a guided eps / v / flow network (a Runner over the exported denoiser) into a k-diffusion
denoiser `denoise(x, sigma, step) -> StepResult` (samg.guidance.step: the guided x0, and for CFG++
the x0 to re-noise along).

Sampler variable and conversions (samg.guidance.step, schedules.py):
- epsilon: model input `x / sqrt(1 + s^2)`, `x0 = x - s * eps`
- v_prediction: model input `x / sqrt(1 + s^2)`, `x0 = x / (1 + s^2) - s / sqrt(1 + s^2) * v`
- flow: model input `x`, `x0 = x - s * v`

A fused export combines the two predictions inside the graph from `guidance_scales [B, 2]`
(w_min, w_max) fed on every call; a raw export returns both predictions and the rule runs here
through `GuidanceRule.apply` (samg.guidance), the one dispatch. Rules a fused graph cannot express
are refused with the fix.

Array types: the denoiser works on whatever `x` is, a numpy array or a torch tensor on any device
(samg.guidance._xp), and hands the runner feeds of that type. A runner that computes on a GPU and
takes device tensors says so with `tensor_device` ("cuda"); the pipeline then places the initial
noise there (`place`) and the whole loop stays on the device. The feeds that do not change during a
generation go there once: the conditioning, and per-step tables of every step's timestep and
guidance scales (`step_tables`), indexed on the device instead of copied per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from samg.contract import Combine, GuidanceCombineAttrs, export_mode
from samg.errors import SamgError, require
from samg.guidance._xp import TORCH, as_float32, is_torch, ops_for
from samg.guidance.registry import DEFAULT_GUIDANCE_SCALE, SPATIAL_RULES, GuidanceRule, check_scale, get_rule
from samg.guidance.schedules import step_scales
from samg.guidance.step import PREDICTION_TYPES, StepInputs, StepResult, x0_from_prediction
from samg.runners.base import Runner
from samg.runtime.schedules import Schedule

SCFG_RULE = "scfg"  # S-CFG runs only inside an `samg export --guidance scfg` graph (it needs the attention maps)


@dataclass
class Guidance:
    """Which rule and how strong. `w_min == w_max` for single-scale rules; `options` holds the
    rule's own keyword parameters (e.g. phi, lam, sigma_lo/sigma_hi, eta, momentum)."""

    rule: str = "samg"
    w_min: float = DEFAULT_GUIDANCE_SCALE
    w_max: float = DEFAULT_GUIDANCE_SCALE
    options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.rule != SCFG_RULE:
            get_rule(self.rule)  # SamgError naming the known rules
        single = self.rule not in SPATIAL_RULES
        self.w_min = check_scale("--scale" if single else "--w-min", self.w_min)
        self.w_max = check_scale("--scale" if single else "--w-max", self.w_max)
        if self.w_min > self.w_max:
            raise SamgError(f"--w-min {self.w_min} is above --w-max {self.w_max}: swap them")
        if self.rule not in SPATIAL_RULES and self.w_min != self.w_max:
            raise SamgError(f"guidance {self.rule!r} takes one scale: pass --scale W instead of --w-min/--w-max")

    def host_rule(self) -> GuidanceRule | None:
        """The registered rule (None for S-CFG, which has no host-side form)."""
        return None if self.rule == SCFG_RULE else get_rule(self.rule)


def check_guidance_for_export(guidance: Guidance, combine: Combine | None) -> None:
    """SamgError unless the export's graph can run this guidance rule: a graph's combine op declares
    the rules it runs (`combine.rules`); a raw graph (None) runs every host-side rule."""
    scfg_graph = combine is not None and SCFG_RULE in combine.rules
    if scfg_graph != (guidance.rule == SCFG_RULE):  # S-CFG needs the attention maps, inside the graph only
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


def _as_type_of(x, value):
    """A runner output in x's array type and place (a runner given tensors returns tensors; one that
    only speaks numpy is met halfway)."""
    if is_torch(x) and not is_torch(value):
        return TORCH.upload(np.asarray(value), x)
    if not is_torch(x) and is_torch(value):
        return TORCH.to_host(value)
    return value


class GuidedDenoiser:
    """`denoise(x, sigma, step) -> StepResult` over a runner; callable, one instance per generation
    (APG keeps its momentum in it)."""

    def __init__(self, runner: Runner, *, prediction_type: str, schedule: Schedule,
                 conditioning: dict[str, np.ndarray], guidance: Guidance, combine: Combine | None = None,
                 host_rule_attrs: GuidanceCombineAttrs | None = None,
                 scale_schedule: Callable[[int, float], tuple[float, float]] | None = None,
                 on_host_step: Callable[[GuidanceRule, StepInputs, dict[str, Any]], None] | None = None):
        """combine: the graph's combine op (samg.contract.Export.combine; None: a raw graph returning
        both predictions). host_rule_attrs: the defaults host-side rules take (Export.host_rule_attrs).
        scale_schedule(step, sigma) -> (w_min, w_max): per-step scales replacing the constant ones.
        on_host_step(rule, inputs, params): called before each host-side combine (benchmarks measure
        the rule's scale map there). conditioning: numpy arrays or tensors; placed like x on first use."""
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
        self.scale_schedule = scale_schedule
        self.on_host_step = on_host_step
        self.rule = guidance.host_rule()
        self.state = self.rule.new_state() if self.rule is not None else None  # fresh per generation
        self._placed: tuple[tuple, dict[str, Any]] | None = None  # (placement key, placed step feeds)

    def _params(self, w_min: float, w_max: float) -> dict[str, Any]:
        return host_rule_params(self.rule, self.guidance.options, w_min, w_max, self.host_rule_attrs)

    # -- scales -------------------------------------------------------------------------------
    def scales_at(self, step: int, sigma: float) -> tuple[float, float]:
        """The step's (w_min, w_max): the per-step schedule's scales (else the constant ones) under
        the rule's own gate (the interval rule: (1, 1) outside its sigma range). A scale is
        1 + (w − 1)·gain, so the gains multiply: the two compose instead of one replacing the other."""
        g = self.guidance
        scales = (g.w_min, g.w_max) if self.scale_schedule is None else \
            tuple(float(v) for v in self.scale_schedule(step, sigma))
        gate = 1.0 if self.rule is None else self.rule.gate(sigma, **self._params(g.w_min, g.w_max))
        return scales if gate == 1.0 else step_scales(scales, gate)  # type: ignore[return-value]

    # -- where the loop runs ------------------------------------------------------------------
    @property
    def tensor_device(self) -> str | None:
        """The torch device the loop runs on: the runner's `tensor_device` (a GPU runner that takes
        and returns device tensors), None for numpy on the host."""
        return getattr(self.runner, "tensor_device", None)

    def place(self, array: np.ndarray):
        """A host array (the initial noise) where the loop runs: a tensor on the runner's device (one
        upload), or the array itself."""
        device = self.tensor_device
        if device is None:
            return array
        torch = require("torch", "to run the sampling loop on the GPU")
        return TORCH.upload(np.asarray(array), torch.empty(0, device=device))

    def step_tables(self, batch: int) -> dict[str, np.ndarray]:
        """Every step's values that do not depend on x, on the host: `timestep` [steps, B] float32 and
        `guidance_scales` [steps, B, 2] float32 (scales_at: schedule and gate; fed to a fused graph,
        the rule's scales on a raw one)."""
        sigmas = [float(s) for s in self.schedule.sigmas[:-1]]
        timesteps = np.array([self.schedule.timestep_for(s) for s in sigmas], np.float32).reshape(-1, 1)
        scales = np.array([self.scales_at(i, s) for i, s in enumerate(sigmas)], np.float32).reshape(-1, 1, 2)
        return {"timestep": np.repeat(timesteps, batch, axis=1), "guidance_scales": np.repeat(scales, batch, axis=1)}

    def placed_feeds(self, x) -> dict[str, Any]:
        """The step tables and the conditioning placed like x (once per batch size and device)."""
        ops = ops_for(x)
        key = (ops.name, str(getattr(x, "device", "host")), int(x.shape[0]))
        if self._placed is None or self._placed[0] != key:
            tables = {name: ops.upload(t, x) for name, t in self.step_tables(int(x.shape[0])).items()}
            conditioning = {name: ops.upload(v, x) for name, v in self.conditioning.items()}
            self._placed = (key, {"tables": tables, "conditioning": conditioning})
        return self._placed[1]

    def _step_feeds(self, x, sigma: float, step: int) -> dict[str, Any]:
        """timestep, the conditioning and (fused) guidance_scales for this step, placed like x."""
        placed = self.placed_feeds(x)
        tables = placed["tables"]
        if 0 <= step < len(self.schedule.sigmas) - 1 and sigma == float(self.schedule.sigmas[step]):
            feeds = {name: table[step] for name, table in tables.items()}
        else:  # a call off the schedule's own steps (a test, a benchmark): this call's values, placed now
            ops, batch = ops_for(x), int(x.shape[0])
            feeds = {"timestep": ops.upload(np.full((batch,), self.schedule.timestep_for(sigma), np.float32), x)}
            if self.fused:
                scales = np.array([self.scales_at(step, sigma)], np.float32)
                feeds["guidance_scales"] = ops.upload(np.tile(scales, (batch, 1)), x)
        return {"timestep": feeds["timestep"], **placed["conditioning"],
                **({"guidance_scales": feeds["guidance_scales"]} if self.fused else {})}

    # -- the call -------------------------------------------------------------------------------
    def __call__(self, x, sigma: float, step: int) -> StepResult:
        ops = ops_for(x)
        feeds = {"latents": ops.f32(x * _model_input_scale(self.prediction_type, sigma)),
                 **self._step_feeds(x, sigma, step)}
        if self.fused:
            guided = as_float32(_as_type_of(x, self.runner.run(feeds)["guided"]))
            return StepResult(x0_from_prediction(self.prediction_type, guided, x, sigma))
        outs = self.runner.run(feeds)
        inputs = StepInputs(as_float32(_as_type_of(x, outs["pred_uncond"])),
                            as_float32(_as_type_of(x, outs["pred_cond"])), x, sigma, step, self.prediction_type)
        params = self._params(*self.scales_at(step, sigma))
        if self.on_host_step is not None:
            self.on_host_step(self.rule, inputs, params)
        return self.rule.apply(inputs, self.state, **params)
