"""Registry of guidance rules by CLI name, with one uniform call shape for the runtime.

    rule = get_rule("samg")
    state = rule.new_state()                       # None unless rule.needs_state
    out = rule(u, c, step=i, sigma=s, state=state, w_min=3.0, w_max=9.0)

``rule(u, c, *, step, sigma, state, **params)`` passes ``step``/``sigma``/``state`` only to the rules
that declare them (so the runtime may always pass all three) and checks ``params`` against
``rule.params`` (name → default; ``REQUIRED`` has no default). Flags:

- ``fused``: run inside a fused graph by ``samg::GuidanceCombine`` (samg.op.schema.FUSED_RULES: samg,
  cfg, interval); ``needs_raw`` (= not fused): the model must be exported raw, outputting pred_uncond
  and pred_cond.
- ``needs_state`` / ``needs_sigma`` / ``needs_step``: extra inputs the rule reads.
- ``returns_uncond``: the result is ``CfgppOutput(guided, uncond)`` (CFG++); ``apply`` turns
  ``uncond`` into the step result's ``renoise_x0``. Every other rule returns one array.
- ``space``: where u and c must live. ``any``: linear in Δ, same sample in eps, v, flow or x0
  space; ``x0``: denoised predictions (APG); ``eps``: noise predictions (CFG++); ``prediction``:
  the model's own output as is (CFG-rescale, CFG-Zero*).

One dispatch for every host-side caller (the runtime's denoiser, the quality benchmarks)::

    result = rule.apply(StepInputs(u, c, x, sigma, step, prediction_type), state, **params)
    result.x0, result.renoise_x0                    # what the sampler steps with (samg.guidance.step)

``apply`` moves u and c into the rule's space, calls it, and returns x0 (and, for CFG++, the x0 to
re-noise along). ``rule.gate(sigma, **params)`` is the rule's own per-step gain on (w − 1) (the
interval rule: 1 inside its sigma range, 0 outside; every other rule 1), which the caller composes
with a per-step schedule (samg.guidance.schedules.step_scales). A rule's ``params`` are the keyword
parameters of its function, with their defaults (``REQUIRED`` where there is none).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from samg.errors import SamgError
from samg.guidance import rules as _rules
from samg.guidance import spatial as _spatial
from samg.guidance._xp import as_float32, check_pair
from samg.guidance.apg import APGState, apg
from samg.guidance.schedules import in_guidance_interval
from samg.guidance.step import StepInputs, StepResult, applied_scales
from samg.op.schema import FUSED_RULES

REQUIRED = "<required>"
# Arguments the caller supplies per step (passed only to the rules that declare them), not parameters.
_CONTEXT_ARGS = ("step", "sigma", "state")

# The largest guidance scale any runtime accepts (the C++ runtime uses the same bound). Published
# models use 1-20; far beyond, the output saturates to a flat image, which a user should hear about
# instead of receiving. Scales below 0 guide away from the prompt and are refused too.
MAX_GUIDANCE_SCALE = 100.0
# The scale used when none is given (samg generate, the pipeline, samg bench): the usual SD value.
DEFAULT_GUIDANCE_SCALE = 7.5


def check_scale(flag: str, value) -> float:
    """`value` as a float if it is a finite number in [0, MAX_GUIDANCE_SCALE], else a SamgError naming `flag`."""
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise SamgError(f"{flag} must be a number, got {value!r}: e.g. {flag} {DEFAULT_GUIDANCE_SCALE:g}") from None
    if not (0.0 <= w <= MAX_GUIDANCE_SCALE):  # also False for NaN
        raise SamgError(f"{flag} must be a finite number in 0..{MAX_GUIDANCE_SCALE:g}, got {value}: e.g. {flag} {DEFAULT_GUIDANCE_SCALE:g}")
    return w


def _keyword_params(fn: Callable[..., Any]) -> dict[str, Any]:
    """A rule function's parameters after (u, c), by name, with their defaults (REQUIRED: none)."""
    names = list(inspect.signature(fn).parameters.values())[2:]
    return {p.name: REQUIRED if p.default is inspect.Parameter.empty else p.default
            for p in names if p.name not in _CONTEXT_ARGS}


@dataclass(frozen=True)
class GuidanceRule:
    name: str
    fn: Callable[..., Any]
    summary: str
    needs_state: bool = False
    needs_sigma: bool = False
    needs_step: bool = False
    returns_uncond: bool = False
    space: str = "any"
    scale_map: Callable[..., Any] | None = field(default=None, repr=False)
    # the rule's own per-step gain on (w − 1) from the step's sigma and its params (None: always 1)
    gate_fn: Callable[..., float] | None = field(default=None, repr=False)

    @property
    def params(self) -> dict[str, Any]:
        """Parameter name -> default (REQUIRED where the rule has none), from the rule's signature."""
        return _keyword_params(self.fn)

    @property
    def fused(self) -> bool:
        """A fused graph runs this rule (its GuidanceCombine op; samg.op.schema.FUSED_RULES)."""
        return self.name in FUSED_RULES

    @property
    def needs_raw(self) -> bool:
        return not self.fused

    def new_state(self) -> APGState | None:
        """A fresh per-generation state for stateful rules (APG's momentum), else None."""
        return APGState() if self.needs_state else None

    def check_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Fill defaults; SamgError for unknown or missing parameters."""
        defaults = self.params
        unknown = sorted(set(params) - set(defaults))
        if unknown:
            raise SamgError(
                f"guidance {self.name!r} has no parameter {', '.join(unknown)}: its parameters are "
                f"{', '.join(defaults) or 'none'}"
            )
        merged = {k: params.get(k, default) for k, default in defaults.items()}
        missing = [k for k, v in merged.items() if v is REQUIRED]
        if missing:
            raise SamgError(f"guidance {self.name!r} needs {', '.join(missing)}: pass it (e.g. --{missing[0].replace('_', '-')})")
        return merged

    def _context(self, step, sigma, state) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.needs_step:
            if step is None:
                raise SamgError(f"guidance {self.name!r} needs the step index: pass step=")
            extra["step"] = step
        if self.needs_sigma:
            if sigma is None:
                raise SamgError(f"guidance {self.name!r} needs the step's sigma: pass sigma=")
            extra["sigma"] = sigma
        if self.needs_state:
            if state is None:
                raise SamgError(f"guidance {self.name!r} keeps state across steps: pass state=rule.new_state()")
            extra["state"] = state
        return extra

    def __call__(self, u, c, *, step: int | None = None, sigma=None, state=None, **params):
        return self.fn(u, c, **self.check_params(params), **self._context(step, sigma, state))

    # -- one sampling step ----------------------------------------------------------------------
    def inputs_in_space(self, step: StepInputs):
        """(u, c) in the space the rule combines in: x0 for APG, else the model's own predictions
        (eps for CFG++, whose callers run epsilon models; linear rules give the same sample anyway)."""
        if self.space == "x0":
            return step.to_x0(step.pred_uncond), step.to_x0(step.pred_cond)
        return step.pred_uncond, step.pred_cond

    def apply(self, step: StepInputs, state=None, **params) -> StepResult:
        """The step's guided x0 (and CFG++'s re-noise x0) from the two predictions: the one dispatch."""
        u, c = self.inputs_in_space(step)
        out = self(u, c, step=step.step, sigma=step.sigma, state=state, **params)
        if self.space == "x0":
            return StepResult(as_float32(out))
        if self.returns_uncond:  # CFG++: x0 from the guided prediction, re-noise along u
            return StepResult(step.to_x0(as_float32(out.guided)), renoise_x0=step.to_x0(as_float32(out.uncond)))
        return StepResult(step.to_x0(as_float32(out)))

    def gate(self, sigma, **params) -> float:
        """The rule's own gain on (w − 1) at this step's sigma: 1 unless the rule turns itself off."""
        return 1.0 if self.gate_fn is None else float(self.gate_fn(sigma, self.check_params(params)))

    def step_scale_map(self, step: StepInputs, **params):
        """w(p) of this step, on the predictions in the rule's space (None: the rule has no scale map)."""
        if self.scale_map is None:
            return None
        u, c = self.inputs_in_space(step)
        merged = self.check_params(params)
        if self.needs_sigma:
            merged.update(self._context(None, step.sigma, None))
        return self.scale_map(u, c, **merged)

    def step_applied_scales(self, step: StepInputs, **params) -> tuple[float, float] | None:
        """(mean w, delta-energy-weighted mean w) of this step (samg.guidance.step.applied_scales),
        None for a rule without a scale map."""
        w = self.step_scale_map(step, **params)
        if w is None:
            return None
        u, c = self.inputs_in_space(step)
        return applied_scales(w, u, c, int(self.check_params(params).get("channel_axis", 1)))

    def effective_scale(self, u, c, *, sigma=None, **params):
        """mean_p w(p) per sample, float32 [B] (numpy or torch, like u)."""
        if self.scale_map is None:
            raise SamgError(
                f"guidance {self.name!r} has no scale map, so no effective scale: compare it by its scale parameter"
            )
        merged = self.check_params(params)
        if self.needs_sigma:
            merged.update(self._context(None, sigma, None))
        w = self.scale_map(u, c, **merged)
        ops = check_pair(u, c)
        return ops.mean(w, tuple(range(1, w.ndim))).reshape(-1)


# Scale maps for the rules whose map is uniform or piecewise (shape [B, 1, ...] like SAMG's).


def _cfg_scale_map(u, c, scale):
    ops = check_pair(u, c)
    return ops.broadcast(ops.param(scale, u), u[:, :1])


def _interval_scale_map(u, c, scale, *, sigma, sigma_lo, sigma_hi):
    inside = in_guidance_interval(sigma, sigma_lo, sigma_hi)
    return _cfg_scale_map(u, c, scale if inside else 1.0)


def _interval_gate(sigma, params: Mapping[str, Any]) -> float:
    return 1.0 if in_guidance_interval(sigma, params["sigma_lo"], params["sigma_hi"]) else 0.0


RULES: dict[str, GuidanceRule] = {
    r.name: r
    for r in [
        GuidanceRule("cfg", _rules.cfg, "u + w·Δ", scale_map=_cfg_scale_map),
        GuidanceRule(
            "samg",
            _spatial.samg_v1,
            "samg-v1: sigmoid membership of normalized delta energy, w_max − (w_max − w_min)·m",
            scale_map=_spatial.samg_scale_map,
        ),
        GuidanceRule(
            "samg-quantile",
            _spatial.samg_quantile,
            "top q of energy per sample gets w_min, the rest w_max",
            scale_map=_spatial.quantile_scale_map,
        ),
        GuidanceRule(
            "samg-bound",
            _spatial.samg_bound,
            "clip(1 + (w_ref − 1)·Ê^(-1/2), w_min, w_max)",
            scale_map=_spatial.bound_scale_map,
        ),
        GuidanceRule(
            "samg-linear",
            _spatial.samg_linear,
            "w_max − (w_max − w_min)·minmax(Ê)",
            scale_map=_spatial.linear_scale_map,
        ),
        GuidanceRule("cfg-rescale", _rules.cfg_rescale, "CFG then rescale to std(c), mixed by phi", space="prediction"),
        GuidanceRule(
            "apg",
            apg,
            "adaptive projected guidance in x0 space (momentum, norm clip, orthogonal projection)",
            needs_state=True,
            space="x0",
        ),
        GuidanceRule("cfgpp", _rules.cfgpp, "CFG++: x0 from u + λ·Δ, re-noise with u", returns_uncond=True, space="eps"),
        GuidanceRule(
            "interval",
            _rules.guidance_interval,
            "CFG for sigma in (sigma_lo, sigma_hi], else c",
            needs_sigma=True,
            scale_map=_interval_scale_map,
            gate_fn=_interval_gate,
        ),
        GuidanceRule(
            "cfg-zero-star",
            _rules.cfg_zero_star,
            "s*·u + w·(c − s*·u), s* = <c,u>/||u||², zero for the first steps",
            needs_step=True,
            space="prediction",
        ),
    ]
}

# Rules whose scale is the pair (w_min, w_max) (spatially varying); every other rule takes one scale.
SPATIAL_RULES = tuple(name for name, rule in RULES.items() if "w_max" in rule.params)


def get_rule(name: str) -> GuidanceRule:
    """The rule registered under a CLI name (see RULES)."""
    try:
        return RULES[name]
    except KeyError:
        raise SamgError(f"unknown guidance {name!r}: choose one of {', '.join(RULES)}") from None


def rule_names() -> list[str]:
    return list(RULES)


def effective_scale(rule: str | GuidanceRule, u, c, *, sigma=None, **params):
    """mean_p w(p) per sample ([B] float32) for a rule with a scale map (cfg, samg*, interval)."""
    rule = get_rule(rule) if isinstance(rule, str) else rule
    return rule.effective_scale(u, c, sigma=sigma, **params)
