"""The whole sampling loop as ONE CUDA graph: captured once per (shape, steps, sampler), replayed
per request.

For static shapes and the deterministic samplers (GRAPH_SAMPLERS: euler, ddim, flow_euler,
dpmpp_2m) every step of a generation is the same sequence of kernels; only values change between
requests. `GraphLoop` keeps every value a request may change in device buffers that the captured
kernels read: the initial latents, the conditioning, each step's timestep and guidance scales, and
each step's sigma coefficients (`schedule_coefficients`, computed on the host from the sigmas in
float64, as the samplers do). A request copies its values in (`load`) and replays the graph
(`replay`): one graph serves any prompt and any guidance strength, and one launch replaces every
kernel launch of every step.

`run_buffered` is the loop the graph captures, written out against the buffers: the samplers'
update formulas (samg.runtime.samplers) with the step's sigma read from a buffer instead of a host
number. It runs eagerly too (`GraphLoop.eager`, on any device), which is how it is tested against
the normal loop on the CPU.

What a captured loop needs: the torch runner on CUDA (`graph_capturable`; ONNX Runtime keeps its own
streams and allocations), and a guidance rule that reads no host values during a step: fused graphs
(samg, cfg, interval: the scales come from the buffer) and the raw rules that take neither the
step's sigma nor a re-noise direction (`capturable_rule`). The latents check (NaN/Inf, and the
pipeline's blow-up bound when given) stays on the device and is read once after a replay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from samg.errors import SamgError, require
from samg.guidance.apg import APGState
from samg.guidance.registry import GuidanceRule
from samg.guidance.step import x0_from_prediction
from samg.runtime.denoiser import GuidedDenoiser, host_rule_params
from samg.runtime.samplers import StepCheck, finish_checks, finite_check, latent_peak

# Samplers whose steps draw no randomness, so a replay is the whole generation.
GRAPH_SAMPLERS = ("euler", "ddim", "flow_euler", "dpmpp_2m")
# Per-step coefficient rows of `schedule_coefficients` (one float32 [steps] row each).
COEFFICIENTS = ("sigma", "sigma_next", "c_in", "v_scale", "v_coef", "ratio", "expm1", "mix_a", "mix_b")


def capturable_rule(rule: GuidanceRule | None) -> bool:
    """A host-side rule a captured step can run: it reads neither the step's sigma (a host number)
    nor hands back a re-noise direction (CFG++ also checks its λ on the host). None: a fused graph."""
    return rule is None or not (rule.needs_sigma or rule.returns_uncond)


@dataclass(frozen=True)
class LoopPlan:
    """The structure of a loop, fixed for a captured graph: the sampler, the model's parametrization
    and, per step, whether its sigma is infinite (zero terminal SNR) and whether it steps to 0."""

    sampler: str
    prediction_type: str
    infinite: tuple[bool, ...]
    to_zero: tuple[bool, ...]

    @classmethod
    def of(cls, sampler: str, prediction_type: str, sigmas: np.ndarray) -> "LoopPlan":
        if sampler not in GRAPH_SAMPLERS:
            raise SamgError(f"the whole-loop CUDA graph runs the deterministic samplers ({', '.join(GRAPH_SAMPLERS)}), "
                            f"not {sampler!r}: pick one of those, or sample without the graph")
        sigmas = np.asarray(sigmas, np.float64)
        if np.isinf(sigmas[:-1]).any():  # only a v_prediction model has an x0 there: the same error as the loop's
            x0_from_prediction(prediction_type, 0.0, 0.0, math.inf)
        return cls(sampler, prediction_type, tuple(bool(v) for v in np.isinf(sigmas[:-1])),
                   tuple(bool(v == 0) for v in sigmas[1:]))

    @property
    def steps(self) -> int:
        return len(self.infinite)


def schedule_coefficients(sigmas: np.ndarray, prediction_type: str) -> np.ndarray:
    """[len(COEFFICIENTS), steps] float32: each step's numbers of the samplers' and the denoiser's
    formulas, in float64 from the sigmas as the host loop computes them, then rounded to float32
    (what torch does with a host number multiplying a float32 tensor).

    sigma, sigma_next; c_in (model input scale: 1/sqrt(1 + s²), 1 for flow or at s = inf); v_scale =
    1 + s², v_coef = s/sqrt(1 + s²) (v-prediction's x0); DPM-Solver++(2M): ratio (sigma_next/sigma,
    sigma_next at s = inf), expm1 = expm1(-h), mix_a = 1 + 1/(2r), mix_b = 1/(2r) (r = h_last / h;
    mix (1, 0) on the first step)."""
    sigmas = np.asarray(sigmas, np.float64)
    n = len(sigmas) - 1
    rows = {name: np.zeros(n) for name in COEFFICIENTS}
    h_last = None
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        inf = math.isinf(s)
        rows["sigma"][i], rows["sigma_next"][i] = s, s_next
        rows["c_in"][i] = 1.0 if prediction_type == "flow" or inf else 1.0 / np.sqrt(1.0 + s**2)
        rows["v_scale"][i] = 1.0 + s**2
        rows["v_coef"][i] = 1.0 if inf else s / np.sqrt(1.0 + s**2)
        rows["mix_a"][i], rows["mix_b"][i] = 1.0, 0.0
        if s_next == 0:
            continue  # dpmpp_2m's last step returns x0 (and h is not updated)
        h = -np.log(s_next) - (-np.log(s))
        if h_last is not None:
            r = h_last / h
            rows["mix_a"][i], rows["mix_b"][i] = 1 + 1 / (2 * r), 1 / (2 * r)
        rows["ratio"][i] = s_next if inf else s_next / s
        rows["expm1"][i] = np.expm1(-h)
        h_last = h
    return np.stack([rows[name] for name in COEFFICIENTS]).astype(np.float32)


def run_buffered(plan: LoopPlan, predict: Callable[[Any, int], Any], x, coefficients, *,
                 checks: tuple[StepCheck, ...] = ()):
    """The sampling loop over device buffers (what the CUDA graph captures): `predict(x, i)` -> the
    step's x0 in the sampler variable, `coefficients` the [len(COEFFICIENTS), steps] buffer. The
    samplers' updates, with sigma-derived numbers read from the buffer; `checks` run after each step."""
    row = dict(zip(COEFFICIENTS, coefficients))
    old_denoised = None
    for i in range(plan.steps):
        denoised = predict(x, i)
        if plan.sampler == "dpmpp_2m":
            if plan.to_zero[i]:
                x = denoised
            else:
                d = denoised if old_denoised is None else row["mix_a"][i] * denoised - row["mix_b"][i] * old_denoised
                x = row["ratio"][i] * x - row["expm1"][i] * d
            old_denoised = denoised
        else:  # euler, ddim, flow_euler: x0 + (x - x0) / sigma * sigma_next (at sigma = inf, x holds x / sigma)
            d = x if plan.infinite[i] else (x - denoised) / row["sigma"][i]
            x = denoised + d * row["sigma_next"][i]
        for check in checks:
            check(i, x)
    return x


class GraphLoop:
    """One sampling loop over static device buffers, captured as one CUDA graph on first `replay`.

    Made from the GuidedDenoiser of a first request (its runner, rule and schedule fix the graph)
    and that request's initial latents (their shape and device). `load(x, denoiser)` copies a
    request's values into the buffers; `replay()` runs the captured graph (capturing on first use)
    and returns the final sampler variable; `eager()` runs the same loop without the graph.
    `key(...)` names what a graph depends on, for a cache of loops."""

    def __init__(self, denoiser: GuidedDenoiser, sampler: str, x, *, bound: float | None = None,
                 bound_error: Callable[[int, float], SamgError] | None = None):
        """bound: stop with an error when |latents| exceeds it (checked on the device);
        bound_error(step_index, peak): that error (default: a message naming the bound)."""
        self.torch = require("torch", "for the whole-loop CUDA graph")
        if not capturable_rule(denoiser.rule) and not denoiser.fused:
            raise SamgError(f"guidance {denoiser.guidance.rule!r} reads host values during a step, so the whole-loop "
                            "CUDA graph cannot run it: sample without the graph")
        self.plan = LoopPlan.of(sampler, denoiser.prediction_type, denoiser.schedule.sigmas)
        self.denoiser = denoiser
        self.bound = bound
        self.bound_error = bound_error
        device = x.device
        placed = denoiser.placed_feeds(x)
        torch = self.torch
        # The buffers: fresh device memory the graph reads; `load` overwrites them in place.
        self.buffers = {
            "x": torch.empty_like(x, dtype=torch.float32),
            "timestep": torch.empty_like(placed["tables"]["timestep"]),
            "guidance_scales": torch.empty_like(placed["tables"]["guidance_scales"]),
            "coefficients": torch.empty((len(COEFFICIENTS), self.plan.steps), dtype=torch.float32, device=device),
            **{f"conditioning.{name}": torch.empty_like(v) for name, v in placed["conditioning"].items()},
        }
        self.graph = None
        self.captures = 0  # how many times a graph was captured (one per loop)
        self._captured: tuple[Any, list[StepCheck]] | None = None  # the graph's output and checks
        self.load(x, denoiser)

    @staticmethod
    def key(denoiser: GuidedDenoiser, sampler: str, x) -> tuple:
        """What a captured loop depends on: shapes, steps, sampler, the loop's structure, the runner
        and the rule with its non-scale options (scales, timesteps, sigmas and conditioning are data)."""
        g = denoiser.guidance
        plan = LoopPlan.of(sampler, denoiser.prediction_type, denoiser.schedule.sigmas)
        shapes = tuple((name, tuple(v.shape)) for name, v in sorted(denoiser.conditioning.items()))
        return (tuple(x.shape), str(x.device), plan, id(denoiser.runner), g.rule,
                tuple(sorted((k, repr(v)) for k, v in g.options.items())), shapes)

    # -- values in ------------------------------------------------------------------------------
    def load(self, x, denoiser: GuidedDenoiser) -> None:
        """Copy a request's values into the buffers: its initial latents x, its conditioning, its
        per-step timesteps and scales, and its schedule's sigma coefficients."""
        if LoopPlan.of(self.plan.sampler, denoiser.prediction_type, denoiser.schedule.sigmas) != self.plan:
            raise SamgError("this request's schedule has another structure than the captured loop's: "
                            "make a GraphLoop for it")
        placed = denoiser.placed_feeds(x)
        b = self.buffers
        b["x"].copy_(x)
        b["timestep"].copy_(placed["tables"]["timestep"])
        b["guidance_scales"].copy_(placed["tables"]["guidance_scales"])
        b["coefficients"].copy_(self.torch.from_numpy(
            schedule_coefficients(denoiser.schedule.sigmas, denoiser.prediction_type)))
        for name, value in placed["conditioning"].items():
            b[f"conditioning.{name}"].copy_(value)
        self.denoiser = denoiser  # its options and state object are the ones the loop uses

    # -- the loop -------------------------------------------------------------------------------
    def _predict(self, x, i: int):
        """The step's x0 from the buffers: the denoiser graph on (scaled x, timestep, conditioning,
        scales), then the rule (raw graphs) and the conversion to x0 with the step's sigma numbers."""
        den, b = self.denoiser, self.buffers
        row = dict(zip(COEFFICIENTS, b["coefficients"]))
        cond = {k.split(".", 1)[1]: v for k, v in b.items() if k.startswith("conditioning.")}
        feeds = {"latents": x * row["c_in"][i], "timestep": b["timestep"][i], **cond}
        scales = b["guidance_scales"][i]
        if den.fused:
            feeds["guidance_scales"] = scales
            return self._to_x0(den.runner.run(feeds)["guided"].float(), x, i, row)
        outs = den.runner.run(feeds)
        u, c = outs["pred_uncond"].float(), outs["pred_cond"].float()
        rule = den.rule
        params = host_rule_params(rule, den.guidance.options, scales[:, 0], scales[:, 1], den.host_rule_attrs)
        if rule.space == "x0":
            u0, c0 = self._to_x0(u, x, i, row), self._to_x0(c, x, i, row)
            return rule(u0, c0, step=i, state=self._state, **params).float()
        return self._to_x0(rule(u, c, step=i, state=self._state, **params).float(), x, i, row)

    def _to_x0(self, prediction, x, i: int, row):
        """samg.guidance.step.x0_from_prediction with the step's sigma numbers from the buffer."""
        if self.plan.infinite[i]:
            return -prediction
        if self.plan.prediction_type == "v_prediction":
            return x / row["v_scale"][i] - row["v_coef"][i] * prediction
        return x - row["sigma"][i] * prediction

    def _run(self) -> tuple[Any, tuple[StepCheck, ...]]:
        """(final x, its checks): the loop over the buffers with a fresh rule state and fresh checks
        (their device state is part of what a graph captures, read after each replay)."""
        self._state = APGState() if (self.denoiser.rule is not None and self.denoiser.rule.needs_state) else None
        x = self.buffers["x"]
        checks = [finite_check(x, self.plan.steps)]
        if self.bound is not None:
            bound, steps = self.bound, self.plan.steps
            error = self.bound_error or (lambda i, peak: SamgError(
                f"latents reached |x| = {peak:.3g} after step {i + 1}/{steps}, beyond the sane bound {bound:.3g}: "
                "the model output blew up; lower the guidance scale or check the model files"))
            checks.append(StepCheck(latent_peak, lambda peak: peak > bound, error))
        return run_buffered(self.plan, self._predict, x, self.buffers["coefficients"], checks=tuple(checks)), checks

    @staticmethod
    def _finish(x, checks):
        finish_checks(checks)  # the earliest failing step, as the normal loop names it
        return x.clone()

    def eager(self):
        """The loop over the buffers without a graph (the function a capture records)."""
        with self.torch.no_grad():
            return self._finish(*self._run())

    def replay(self):
        """The final sampler variable for the loaded values: capture on first use (after one eager
        warm-up run, which compiles kernels and picks algorithms outside the capture), then replay."""
        torch = self.torch
        if self.buffers["x"].device.type != "cuda" or not getattr(self.denoiser.runner, "graph_capturable", False):
            raise SamgError("the whole-loop CUDA graph needs the torch backend on a CUDA device: use --backend torch "
                            "--device cuda, or sample without the graph")
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():
                self._finish(*self._run())  # warm-up: nothing may compile or allocate anew inside the capture
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(self.graph):
                self._captured = self._run()
            self.captures += 1
        self.graph.replay()
        return self._finish(*self._captured)


class GraphLoops:
    """Captured loops by what they depend on (`GraphLoop.key`): the first request of a key makes
    and captures its loop, every later one copies its values in and replays that capture."""

    def __init__(self):
        self.loops: dict[tuple, GraphLoop] = {}

    def sample(self, denoiser: GuidedDenoiser, sampler: str, x, *, bound: float | None = None,
               bound_error: Callable[[int, float], SamgError] | None = None):
        """The final sampler variable for this request (x: its initial latents on the GPU). bound,
        bound_error: GraphLoop's; the error of the loop's first request is the one its graph keeps
        (a message may depend on the bound and the steps, both part of the key, nothing else)."""
        key = (GraphLoop.key(denoiser, sampler, x), bound)
        loop = self.loops.get(key)
        if loop is None:
            loop = self.loops[key] = GraphLoop(denoiser, sampler, x, bound=bound, bound_error=bound_error)
        else:
            loop.load(x, denoiser)
        return loop.replay()
