"""Registry of guidance rules by CLI name, with one uniform call shape for the runtime.

    rule = get_rule("samg")
    state = rule.new_state()                       # None unless rule.needs_state
    out = rule(u, c, step=i, sigma=s, state=state, w_min=3.0, w_max=9.0)

``rule(u, c, *, step, sigma, state, **params)`` passes ``step``/``sigma``/``state`` only to the rules
that declare them (so the runtime may always pass all three) and checks ``params`` against
``rule.params`` (name → default; ``REQUIRED`` has no default). Flags:

- ``fused``: computable inside the exported graph by ``samg::GuidanceCombine`` (cfg, samg only);
  ``needs_raw`` (= not fused): the engine must be exported raw, outputting pred_uncond and pred_cond.
- ``needs_state`` / ``needs_sigma`` / ``needs_step``: extra inputs the rule reads.
- ``returns_uncond``: the result is ``CfgppOutput(guided, uncond)``; the sampler re-noises with
  ``uncond`` (CFG++). Every other rule returns one array.
- ``space``: where u and c must live. ``any``: linear in Δ, same sample in eps, v, flow or x0
  space; ``x0``: denoised predictions (APG); ``eps``: noise predictions (CFG++); ``prediction``:
  the model's own output as is (CFG-rescale, CFG-Zero*).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from samg.errors import SamgError
from samg.guidance import rules as _rules
from samg.guidance import spatial as _spatial
from samg.guidance._xp import check_pair
from samg.guidance.apg import APGState, apg
from samg.guidance.schedules import INTERVAL_SIGMA_HI, INTERVAL_SIGMA_LO

REQUIRED = "<required>"

# The largest guidance scale any runtime accepts (the C++ runtime uses the same bound). Published
# models use 1-20; far beyond, the output saturates to a flat image, which a user should hear about
# instead of receiving. Scales below 0 guide away from the prompt and are refused too.
MAX_GUIDANCE_SCALE = 100.0


def check_scale(flag: str, value) -> float:
    """`value` as a float if it is a finite number in [0, MAX_GUIDANCE_SCALE], else a SamgError naming `flag`."""
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise SamgError(f"{flag} must be a number, got {value!r}: e.g. {flag} 7.5") from None
    if not (0.0 <= w <= MAX_GUIDANCE_SCALE):  # also False for NaN
        raise SamgError(f"{flag} must be a finite number in 0..{MAX_GUIDANCE_SCALE:g}, got {value}: e.g. {flag} 7.5")
    return w


@dataclass(frozen=True)
class GuidanceRule:
    name: str
    fn: Callable[..., Any]
    params: Mapping[str, Any]
    summary: str
    fused: bool = False
    needs_state: bool = False
    needs_sigma: bool = False
    needs_step: bool = False
    returns_uncond: bool = False
    space: str = "any"
    scale_map: Callable[..., Any] | None = field(default=None, repr=False)

    @property
    def needs_raw(self) -> bool:
        return not self.fused

    def new_state(self) -> APGState | None:
        """A fresh per-generation state for stateful rules (APG's momentum), else None."""
        return APGState() if self.needs_state else None

    def check_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Fill defaults; SamgError for unknown or missing parameters."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise SamgError(
                f"guidance {self.name!r} has no parameter {', '.join(unknown)}: its parameters are "
                f"{', '.join(self.params) or 'none'}"
            )
        merged = {k: params.get(k, default) for k, default in self.params.items()}
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
    inside = _rules.in_guidance_interval(sigma, sigma_lo, sigma_hi)
    return _cfg_scale_map(u, c, scale if inside else 1.0)


_SAMG_ATTRS = {"tau": 1.0, "sharpness": 4.0, "smooth": 0, "channel_axis": 1}

RULES: dict[str, GuidanceRule] = {
    r.name: r
    for r in [
        GuidanceRule(
            "cfg", _rules.cfg, {"scale": REQUIRED}, "u + w·Δ", fused=True, scale_map=_cfg_scale_map
        ),
        GuidanceRule(
            "samg",
            _spatial.samg_v1,
            {"w_min": REQUIRED, "w_max": REQUIRED, **_SAMG_ATTRS},
            "samg-v1: sigmoid membership of normalized delta energy, w_max − (w_max − w_min)·m",
            fused=True,
            scale_map=_spatial.samg_scale_map,
        ),
        GuidanceRule(
            "samg-quantile",
            _spatial.samg_quantile,
            {"w_min": REQUIRED, "w_max": REQUIRED, "q": 0.2, "channel_axis": 1},
            "top q of energy per sample gets w_min, the rest w_max",
            scale_map=_spatial.quantile_scale_map,
        ),
        GuidanceRule(
            "samg-bound",
            _spatial.samg_bound,
            {"w_min": REQUIRED, "w_max": REQUIRED, "w_ref": None, "channel_axis": 1},
            "clip(1 + (w_ref − 1)·Ê^(-1/2), w_min, w_max)",
            scale_map=_spatial.bound_scale_map,
        ),
        GuidanceRule(
            "samg-linear",
            _spatial.samg_linear,
            {"w_min": REQUIRED, "w_max": REQUIRED, "channel_axis": 1},
            "w_max − (w_max − w_min)·minmax(Ê)",
            scale_map=_spatial.linear_scale_map,
        ),
        GuidanceRule(
            "cfg-rescale",
            _rules.cfg_rescale,
            {"scale": REQUIRED, "phi": 0.7},
            "CFG then rescale to std(c), mixed by phi",
            space="prediction",
        ),
        GuidanceRule(
            "apg",
            apg,
            {"scale": REQUIRED, "eta": 0.0, "norm_threshold": 15.0, "momentum": -0.5},
            "adaptive projected guidance in x0 space (momentum, norm clip, orthogonal projection)",
            needs_state=True,
            space="x0",
        ),
        GuidanceRule(
            "cfgpp",
            _rules.cfgpp,
            {"lam": REQUIRED},
            "CFG++: x0 from u + λ·Δ, re-noise with u",
            returns_uncond=True,
            space="eps",
        ),
        GuidanceRule(
            "interval",
            _rules.guidance_interval,
            {"scale": REQUIRED, "sigma_lo": INTERVAL_SIGMA_LO, "sigma_hi": INTERVAL_SIGMA_HI},
            "CFG for sigma in (sigma_lo, sigma_hi], else c",
            needs_sigma=True,
            scale_map=_interval_scale_map,
        ),
        GuidanceRule(
            "cfg-zero-star",
            _rules.cfg_zero_star,
            {"scale": REQUIRED, "zero_init_steps": 1},
            "s*·u + w·(c − s*·u), s* = <c,u>/||u||², zero for the first steps",
            needs_step=True,
            space="prediction",
        ),
    ]
}


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
