"""`samg bench DIR`: side-by-side latency, measured in one run on the same model, sampler and steps.

Rows (medians and interquartile ranges over interleaved repetitions, so slow drifts of a shared
machine hit all rows alike; ratios are taken per repetition, then summarized, and each says whether
its spread resolves it from parity):
- end to end: samg runtime vs diffusers' own pipeline from the export's source/ folder (CPU torch);
- per denoising step: fused SAMG graph vs the peers' way (raw export, both predictions out, CFG on
  the host) vs the fused graph in plain-CFG mode (w_min == w_max);
- the sampling loop's own overhead per step (null runner: no model work).
A raw variant of the export is made in a temporary folder when --raw is not given; with
`--backend tensorrt` its engines are built there too, with DIR's engines' flavour, precision and
shapes (DIR itself must have been built: `samg build DIR`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


# samg's samplers that samg bench offers: those with a diffusers scheduler to compare against.
DIFFUSERS_SCHEDULERS = {"euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler",
                        "dpmpp_2m": "DPMSolverMultistepScheduler", "flow_euler": "FlowMatchEulerDiscreteScheduler"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from samg.guidance import DEFAULT_GUIDANCE_SCALE
    from samg.runners.base import DEPLOYMENT_BACKENDS, DEVICES

    p.add_argument("export_dir", metavar="DIR", help="fused export folder (written by samg export)")
    p.add_argument("--raw", default=None, help="raw export of the same model (default: exported to a temp folder)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--sampler", default="euler", choices=tuple(DIFFUSERS_SCHEDULERS))
    p.add_argument("--reps", type=int, default=5, help="repetitions of each measurement (interleaved)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--w-min", type=float, default=3.0)
    p.add_argument("--w-max", type=float, default=DEFAULT_GUIDANCE_SCALE)
    p.add_argument("--backend", default="onnxruntime", choices=DEPLOYMENT_BACKENDS)
    p.add_argument("--device", default="cpu", choices=DEVICES)
    p.add_argument("--no-diffusers", action="store_true", help="skip the diffusers end-to-end row")


def quartiles(samples) -> tuple[float, float, float]:
    """(first quartile, median, third quartile), linear interpolation between order statistics
    (numpy's default percentile method), so five samples give the 2nd, 3rd and 4th smallest."""
    xs = sorted(float(x) for x in samples)
    if not xs:
        raise ValueError("no samples")

    def at(q: float) -> float:
        pos = (len(xs) - 1) * q
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return at(0.25), at(0.5), at(0.75)


def ratio_spread(numerators, denominators) -> dict:
    """A ratio of two interleaved timings, with its spread and whether that spread resolves it.

    Repetition i of both rows ran back to back, so the ratio is taken per repetition (a load burst
    hits both terms) and then summarized: median, interquartile range and its width (`spread`).
    `resolved` is False when the spread is at least the ratio's distance from parity |1 - median|:
    the measurement then cannot tell the two rows apart."""
    if len(numerators) != len(denominators) or not numerators:
        raise ValueError("need one denominator per numerator, at least one of each")
    ratios = [a / b for a, b in zip(numerators, denominators)]
    q1, med, q3 = quartiles(ratios)
    spread, gap = q3 - q1, abs(1.0 - med)
    return {"ratio": med, "q1": q1, "q3": q3, "spread": spread, "gap": gap, "reps": len(ratios),
            "resolved": len(ratios) > 1 and spread < gap}


def resolution_note(r: dict) -> str:
    """The verdict printed after each ratio."""
    if r["reps"] < 2:
        return "not resolved: one repetition has no spread (raise --reps)"
    if r["resolved"]:
        return f"resolved: spread {r['spread']:.3f} below |1 - ratio| {r['gap']:.3f}"
    return f"not resolved: spread {r['spread']:.3f} exceeds |1 - ratio| {r['gap']:.3f}"


def format_ratio(label: str, r: dict, width: int = 36) -> str:
    return (f"  {label:<{width}} {r['ratio']:6.3f}  [IQR {r['q1']:.3f}–{r['q3']:.3f}]  {resolution_note(r)}")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _export_raw(export_dir: Path, export_info, into: Path) -> Path:
    """A raw export of the same source, size, dtype and opset as `export_info` (samg.contract.Export),
    in `into`."""
    from samg.errors import SamgError
    from samg.export.exporter import ExportOptions, export

    model_dir = export_info.source.model_dir(export_dir)
    if model_dir is None:
        raise SamgError("this export came from the hub: export a raw variant yourself and pass --raw DIR")
    lat = export_info.latent
    opts = ExportOptions(model=export_info.model, out=str(into / "raw"), model_path=str(model_dir), guidance="raw",
                         height=lat.height, width=lat.width, frames=lat.frames, dtype=export_info.dtype,
                         opset=export_info.opset, validate=False, quiet=True)
    return export(opts)


def _engine_record(export_dir: Path, flag: str):
    """The denoiser engine's record of an export that `--backend tensorrt` runs, after checking that
    every component has its engine; SamgError naming `samg build` otherwise."""
    from samg.contract import ENGINE_COMPONENTS, ENGINES_DIR, read_engine_record
    from samg.errors import SamgError

    missing = [c for c in ENGINE_COMPONENTS if not (export_dir / ENGINES_DIR / f"{c}.engine").is_file()]
    if missing:
        raise SamgError(f"{flag} {export_dir} has no TensorRT engine for {', '.join(missing)}: run "
                        f"`samg build {export_dir}` first (samg bench --backend tensorrt runs its engines)")
    return read_engine_record(export_dir / ENGINES_DIR / "denoiser.engine")


def build_raw_engines(raw_dir: Path, export_info, fused_record, quiet: bool = True):
    """Engines for the raw variant in `raw_dir`, built like DIR's (`fused_record`: DIR's denoiser
    engine record): same TensorRT flavour, precision and shapes; the raw graph has no combine."""
    from samg.build.engine import BuildOptions, build_export
    from samg.build.loader import CAPTURE_BUILD_FLAGS
    from samg.build.profiles import request_from_profiles

    capture_flags = CAPTURE_BUILD_FLAGS.get(fused_record.trt_flavour, ())
    options = BuildOptions(flavour=fused_record.trt_flavour, precision=fused_record.precision,
                           shapes=request_from_profiles(export_info.latent, fused_record.profiles),
                           cuda_graph=bool(capture_flags) and set(capture_flags) <= set(fused_record.build_flags),
                           quiet=quiet)
    return build_export(raw_dir, options)


def _diffusers_pipeline(export_dir: Path, export_info, sampler: str):
    """diffusers' pipeline from the export's source model folder with the scheduler that matches samg's
    sampler, or None where there is none on disk (a hub export, or the folder has moved)."""
    source = export_info.source.model_dir(export_dir)
    if source is None or not (source / "model_index.json").is_file():
        return None
    from samg.errors import require

    diffusers = require("diffusers", "for the diffusers comparison")
    from samg.export import from_pretrained

    pipe = from_pretrained(diffusers.DiffusionPipeline, str(source))
    pipe.scheduler = getattr(diffusers, DIFFUSERS_SCHEDULERS[sampler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None
    return pipe


def _step_callable(pipe, guidance, w_min, w_max, sampler, steps, noise):
    """One denoiser call (one sampling step's model work plus guidance) at the first sigma."""
    from samg.runtime import schedules
    from samg.runtime.denoiser import Guidance, GuidedDenoiser

    schedule = schedules.make_schedule(pipe.export.scheduler, sampler, steps)
    cond = pipe.conditioning("a photo of a cat", "", noise.shape[0])
    den = GuidedDenoiser(pipe.runners["denoiser"], prediction_type=pipe.prediction_type, combine=pipe.export.combine,
                         host_rule_attrs=pipe.export.host_rule_attrs, schedule=schedule, conditioning=cond,
                         guidance=Guidance(guidance, w_min, w_max))
    x = noise * schedule.init_noise_sigma
    sigma = float(schedule.sigmas[0])
    return lambda: den(x, sigma, 0)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from samg.contract import GuidanceCombineAttrs, read_export
    from samg.errors import SamgError
    from samg.runtime.pipeline import Pipeline

    if args.steps < 1 or args.reps < 1:
        raise SamgError("--steps and --reps must be at least 1")
    export_dir = Path(args.export_dir)
    export_info = read_export(export_dir)
    if not isinstance(export_info.combine, GuidanceCombineAttrs):
        raise SamgError(f"{export_dir} is a {export_info.mode} export: pass the fused export as DIR and a raw one "
                        "as --raw")
    tensorrt = args.backend == "tensorrt"
    if tensorrt:
        if args.device != "cuda":
            raise SamgError("--backend tensorrt runs on the GPU: add --device cuda")
        fused_record = _engine_record(export_dir, "DIR")  # checked before the raw export is made
        if args.raw:
            _engine_record(Path(args.raw), "--raw")
    prompt = "a photo of a cat"

    with tempfile.TemporaryDirectory(prefix="samg-bench-") as tmp:
        raw_dir = Path(args.raw) if args.raw else None
        if raw_dir is None:
            print("samg bench: exporting the raw variant for the peers' row ...", file=sys.stderr)
            raw_dir = _export_raw(export_dir, export_info, Path(tmp))
            if tensorrt:
                print("samg bench: building the raw variant's TensorRT engines like DIR's ...", file=sys.stderr)
                build_raw_engines(raw_dir, export_info, fused_record)
        fused = Pipeline.load(export_dir, backend=args.backend, device=args.device)
        null = Pipeline.load(export_dir, backend="null")
        height, width, frames = fused.validate_size(args.height, args.width, None)
        noise = np.random.default_rng(0).standard_normal(fused.latent_shape(1, height, width, frames)).astype(np.float32)
        raw = Pipeline.load(raw_dir, backend=args.backend, device=args.device)
        if raw.export.fused:
            raise SamgError(f"--raw {raw_dir} is not a raw export: export one with --guidance raw")

        null_cond = null.conditioning(prompt, "", 1)
        common = dict(steps=args.steps, sampler=args.sampler, latents=noise, height=height, width=width)
        rows = {
            "step: fused SAMG graph": _step_callable(fused, "samg", args.w_min, args.w_max, args.sampler, args.steps, noise),
            "step: raw graph + host CFG (peers)": _step_callable(raw, "cfg", args.w_max, args.w_max, args.sampler, args.steps, noise),
            "step: fused graph, plain CFG": _step_callable(fused, "cfg", args.w_max, args.w_max, args.sampler, args.steps, noise),
            "loop overhead per step (null runner)": lambda: null.sample(
                null_cond, noise, guidance=_guidance(args), sampler=args.sampler, steps=args.steps),
            "end to end: samg runtime (SAMG)": lambda: fused(prompt, guidance="samg", w_min=args.w_min, w_max=args.w_max, **common),
        }
        ref = None if args.no_diffusers else _diffusers_pipeline(export_dir, export_info, args.sampler)
        if ref is not None:
            torch = __import__("torch")
            latents_t = torch.from_numpy(noise)

            def diffusers_e2e():
                with torch.no_grad():
                    ref(prompt, num_inference_steps=args.steps, guidance_scale=args.w_max, latents=latents_t,
                        height=height, width=width, output_type="np")

            rows["end to end: diffusers pipeline (CFG)"] = diffusers_e2e
        for fn in rows.values():  # warm-up: session init, allocator, caches
            fn()
        times: dict[str, list[float]] = {k: [] for k in rows}
        for _ in range(args.reps):
            for name, fn in rows.items():
                times[name].append(_timed(fn))
        times["loop overhead per step (null runner)"] = [t / args.steps for t in times["loop overhead per step (null runner)"]]
        _print_table(times, args, fused.export.model)
    return 0


def _guidance(args):
    from samg.runtime.denoiser import Guidance

    return Guidance("samg", args.w_min, args.w_max)


# (label, numerator row, denominator row) of each printed ratio.
RATIOS = [
    ("raw+host CFG / fused SAMG step", "step: raw graph + host CFG (peers)", "step: fused SAMG graph"),
    ("fused plain CFG / fused SAMG step", "step: fused graph, plain CFG", "step: fused SAMG graph"),
    ("loop overhead / fused SAMG step", "loop overhead per step (null runner)", "step: fused SAMG graph"),
    ("diffusers e2e / samg e2e", "end to end: diffusers pipeline (CFG)", "end to end: samg runtime (SAMG)"),
]


def _print_table(times: dict[str, list[float]], args, model: str) -> None:
    """Each row's median and interquartile range (ms), then each ratio with its spread and verdict."""
    reps = len(next(iter(times.values())))
    print(f"samg bench: model {model}, sampler {args.sampler}, {args.steps} steps, "
          f"backend {args.backend}/{args.device}, median [interquartile range] of {reps} interleaved reps")
    width = max(len(k) for k in times)
    for name, samples in times.items():
        q1, med, q3 = quartiles(samples)
        print(f"  {name:<{width}}  {med * 1e3:10.3f} ms  [IQR {q1 * 1e3:.3f}–{q3 * 1e3:.3f}]")
    print("ratios (per interleaved rep; median [IQR]):")
    unresolved = 0
    for label, num, den in RATIOS:
        if num in times and den in times:
            r = ratio_spread(times[num], times[den])
            unresolved += not r["resolved"]
            print(format_ratio(label, r))
    if unresolved:
        print(f"{unresolved} ratio(s) not resolved: the machine's noise is as large as the difference; "
              "rerun on a quiet machine or with more --reps")
