"""The samg-digits denoiser graph alone, per batch size: how much batching can give before any
host-side work (python -m benchmarks.serving.denoiser [--export DIR]).

One ONNX Runtime CPU session (the serving default), the graph fed exactly what a batched serving
call feeds (latents, per-sample timesteps and scales, uncond-first conditioning), timed in-process:
median and spread of CALLS calls per batch size after WARMUP calls. Writes
results/denoiser.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_FILE = "denoiser.json"
BATCH_SIZES = (1, 8, 16)  # one request; the benchmark's 8 clients; its max_batch_size
CALLS, WARMUP = 20, 3


def measure(export_dir: Path) -> dict:
    """{"batch_sizes": [{"batch", "median_ms", "min_ms", "max_ms", "per_image_ms"}], "facts": {...}}."""
    import onnxruntime

    from samg.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(export_dir)
    runner = pipeline.runners["denoiser"]
    request = pipeline.plan("a handwritten 3", output="latents")
    rows = []
    for batch in BATCH_SIZES:
        feeds = {
            "latents": np.random.default_rng(0).standard_normal((batch, *request.shape[1:])).astype(np.float32),
            "timestep": np.linspace(999, 1, batch).astype(np.float32),
            "guidance_scales": np.tile(np.float32([[2.0, 6.0]]), (batch, 1)),
            # [2B] uncond-first, as a call of B one-image requests: every negative row, then every prompt row
            **pipeline.conditioning(request.prompt, request.negative_prompt, batch),
        }
        feeds = {name: feeds[name] for name in runner.input_names}
        for _ in range(WARMUP):
            runner.run(feeds)
        times = []
        for _ in range(CALLS):
            start = time.perf_counter()
            runner.run(feeds)
            times.append((time.perf_counter() - start) * 1000)
        median = statistics.median(times)
        rows.append({"batch": batch, "median_ms": median, "min_ms": min(times), "max_ms": max(times),
                     "per_image_ms": median / batch})
    load = os.getloadavg()
    facts = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs", "load_avg_at_end": f"{load[0]:.1f}",
             "model": "samg-digits 16x16", "calls": CALLS, "warmup": WARMUP,
             "onnxruntime": onnxruntime.__version__, "session": "samg's default OrtRunner (CPU)"}
    return {"batch_sizes": rows, "facts": facts}


def markdown(result: dict) -> str:
    lines = ["| batch | median (ms) | min–max (ms) | per image (ms) |", "|---|---|---|---|"]
    for r in result["batch_sizes"]:
        lines.append(f"| {r['batch']} | {r['median_ms']:.1f} | {r['min_ms']:.1f}–{r['max_ms']:.1f} | "
                     f"{r['per_image_ms']:.2f} |")
    one = result["batch_sizes"][0]["per_image_ms"]
    best = min(r["per_image_ms"] for r in result["batch_sizes"])
    lines.append(f"\nBatching the graph alone gives at most {one / best:.1f}x per image here "
                 f"(per-image time at batch 1 / the best batch).")
    lines.append("\n" + ", ".join(f"{k}={v}" for k, v in result["facts"].items()))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from samg.io import atomic_write_json

    p = argparse.ArgumentParser(prog="python -m benchmarks.serving.denoiser", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", type=Path, help="a samg-digits export (default: exported into a temp folder)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="samg-denoiser-bench-") as work:
        export_dir = a.export
        if export_dir is None:
            from samg.export.exporter import ExportOptions, export

            print("exporting samg-digits ...", file=sys.stderr)
            export_dir = export(ExportOptions(model="digits", out=str(Path(work) / "digits"), validate=False,
                                              quiet=True))
        result = measure(Path(export_dir))
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out / RESULTS_FILE, result)
    print(markdown(result))
    print(f"wrote {a.out / RESULTS_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
