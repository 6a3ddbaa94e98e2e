"""The C++ runtime's sampling loop (samg-run) against the Python runtime's, side by side.

    python benchmarks/native/bench_loop.py [--steps 20] [--repeats 5] [--sampler euler] [--threads 0]
                                           [--work-dir /tmp/samg-bench-loop] [--models digits,sd15-tiny]

Same export, conditioning (.npy from `samg encode`'s code path), noise, sampler, steps and guidance
(SAMG, w 2..5) on both sides. Repetitions interleave (C++, Python, C++, ...) so machine noise hits
both alike. Each side measures, in its own process, the whole loop and the time inside the
denoiser session's Run calls: samg-run with `--timing --repeat 2` (the second, warm loop counts;
session load is excluded), Python by wrapping the denoiser runner's ONNX Runtime session (warmed
by one loop first). Per-step overhead = (loop - denoiser) / steps: what the runtime itself costs
per step (feeds, x0, sampler update, copies). Prints medians, ratios, and the latents' max |diff|.
Exports are made once into --work-dir and reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

PROMPT, NEGATIVE = "a handwritten 7", ""
W_MIN, W_MAX = 2.0, 5.0
MODELS = {  # label -> ExportOptions keywords; sizes are the exports' defaults
    "digits": {"model": "digits"},
    "sd15-tiny": {"model": "sd15", "tiny": True},
}


def export_once(work_dir: Path, label: str) -> Path:
    from samg.export.exporter import ExportOptions, export

    out = work_dir / label
    from samg.contract import MANIFEST

    if not (out / MANIFEST).is_file():
        export(ExportOptions(out=str(out), validate=False, quiet=True, **MODELS[label]))
    return out


class TimedSession:
    """Wraps an onnxruntime InferenceSession: accumulates the wall time of its run() calls."""

    def __init__(self, session):
        self._session = session
        self.seconds = 0.0
        self.calls = 0

    def run(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._session.run(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1

    def __getattr__(self, name):
        return getattr(self._session, name)


def python_loop(pipe, timed: TimedSession, cond, noise, sampler: str, steps: int):
    from samg.runtime.denoiser import Guidance

    timed.seconds, timed.calls = 0.0, 0
    start = time.perf_counter()
    latents = pipe.sample(cond, noise, guidance=Guidance("samg", W_MIN, W_MAX), sampler=sampler, steps=steps)
    loop = time.perf_counter() - start
    assert timed.calls == steps, (timed.calls, steps)
    return latents, {"loop_s": loop, "denoiser_run_s": timed.seconds}


def cpp_loop(samg_run: str, export_dir: Path, inputs: Path, sampler: str, steps: int, threads: int):
    out = inputs / "cpp-latents.npy"
    result = subprocess.run(
        [samg_run, str(export_dir), "--cond", str(inputs), "--noise", str(inputs / "noise.npy"), "--sampler", sampler,
         "--steps", str(steps), "--w-min", str(W_MIN), "--w-max", str(W_MAX), "--threads", str(threads),
         "--timing", "--repeat", "2", "--out-latents", str(out)],
        capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"samg-run failed: {result.stderr.strip()}")
    run = json.loads(result.stdout)["runs"][-1]
    assert run["denoiser_calls"] == steps
    return np.load(out), run


def bench_model(label: str, export_dir: Path, samg_run: str, args) -> dict:
    from samg.runtime.pipeline import Pipeline

    pipe = Pipeline.load(export_dir, threads=args.threads or None)
    runner = pipe.runners["denoiser"]
    timed = TimedSession(runner.session)
    runner.session = timed
    inputs = export_dir.parent / f"{label}-inputs"
    inputs.mkdir(exist_ok=True)
    cond = pipe.conditioning(PROMPT, NEGATIVE, batch=1)  # what `samg encode` writes
    for name, value in cond.items():
        np.save(inputs / f"{name}.npy", np.ascontiguousarray(value, np.float32))
    lat = pipe.latent
    noise = np.random.default_rng(0).standard_normal(
        pipe.latent_shape(1, lat.height, lat.width, None), dtype=np.float32)
    np.save(inputs / "noise.npy", noise)

    python_loop(pipe, timed, cond, noise, args.sampler, args.steps)  # warm-up, as the C++ side's first loop
    samples = {"cpp": [], "python": []}
    for _ in range(args.repeats):
        cpp_latents, run = cpp_loop(samg_run, export_dir, inputs, args.sampler, args.steps, args.threads)
        samples["cpp"].append(run)
        py_latents, run = python_loop(pipe, timed, cond, noise, args.sampler, args.steps)
        samples["python"].append(run)
    row = {"model": label, "shape": "x".join(map(str, noise.shape)),
           "max_diff": float(np.abs(cpp_latents - py_latents).max())}
    for side, runs in samples.items():
        loop = statistics.median(r["loop_s"] for r in runs)
        denoiser = statistics.median(r["denoiser_run_s"] for r in runs)
        overhead = statistics.median((r["loop_s"] - r["denoiser_run_s"]) / args.steps for r in runs)
        row[side] = {"loop_ms": loop * 1e3, "denoiser_ms": denoiser * 1e3, "overhead_ms_per_step": overhead * 1e3}
    return row


def print_table(rows: list[dict], args) -> None:
    print(f"{args.sampler}, {args.steps} steps, SAMG w {W_MIN}..{W_MAX}, batch 1, {args.repeats} interleaved repeats,"
          f" ORT threads {args.threads or 'default'}; medians")
    header = (f"{'model':10s} {'latents':9s} | {'loop ms C++':>11s} {'Python':>8s} {'ratio':>6s} | "
              f"{'denoiser ms C++':>15s} {'Python':>8s} | {'overhead ms/step C++':>20s} {'Python':>8s} {'ratio':>7s} |"
              f" {'max|diff|':>9s}")
    print(header)
    print("-" * len(header))
    for r in rows:
        c, p = r["cpp"], r["python"]
        overhead_ratio = p["overhead_ms_per_step"] / c["overhead_ms_per_step"] if c["overhead_ms_per_step"] > 0 else float("inf")
        print(f"{r['model']:10s} {r['shape']:9s} | {c['loop_ms']:11.1f} {p['loop_ms']:8.1f} {p['loop_ms'] / c['loop_ms']:6.2f} |"
              f" {c['denoiser_ms']:15.1f} {p['denoiser_ms']:8.1f} | {c['overhead_ms_per_step']:20.3f}"
              f" {p['overhead_ms_per_step']:8.3f} {overhead_ratio:7.1f} | {r['max_diff']:9.1e}")
    print("ratio = Python / C++; overhead = (loop - time inside denoiser Run) / steps")


def main() -> None:
    import samg.native

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sampler", default="euler", choices=("euler", "ddim", "dpmpp_2m"))
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads on both sides (0: default)")
    parser.add_argument("--work-dir", default="/tmp/samg-bench-loop", help="exports and inputs are kept here")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    args = parser.parse_args()
    labels = [m for m in args.models.split(",") if m]
    unknown = [m for m in labels if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}: use {', '.join(MODELS)}")

    samg_run = samg.native.runtime_executable(build_if_missing=True)
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    rows = [bench_model(label, export_once(work_dir, label), samg_run, args) for label in labels]
    print_table(rows, args)


if __name__ == "__main__":
    main()
