"""Serving throughput and latency on NVIDIA Triton Inference Server: continuous batching vs one
request at a time vs Triton's request-level dynamic batching, side by side in one run.

One tritonserver serves one repository with three models over the same samg-digits export:

  samg           continuous: every request joins the running denoiser batches at its next step
  samg_single    one at a time: engine batch size 1, no batching (the baseline)
  samg_dynamic   Triton's dynamic batching: one `execute` runs the batch Triton formed to completion
                 (denoiser calls shared), and no new request starts before the whole batch is done

Closed-loop clients (gRPC `infer`, one connection each) send the same mixed workload to each model
(prompts, rules samg/cfg, scales, 10/20/30 steps, seeds) at each concurrency; rounds repeat the
whole sweep with the model order rotated, so slow drift of the machine spreads over all three.
Throughput is requests per second over a cell's wall time; latency is per request, client-side.
A full run also times the denoiser graph alone per batch size (benchmarks/serving/denoiser.py).
`--from-results` rewrites the report and the plot from a saved serving.json without serving.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUICK_DIR = REPO / "out" / "serving-quick"
PLOT = REPO / "docs" / "images" / "serving_benchmark.png"
CONCURRENCY = (1, 4, 8, 16)
QUICK_CONCURRENCY = (1, 8)
ROUNDS, QUICK_ROUNDS = 3, 1
STEP_CHOICES = (10, 20, 30)
MAX_BATCH_SIZE = 16  # engine (and Triton dynamic batcher) batch: the largest concurrency fits one call
MODEL_LOAD_TIMEOUT_S = 300
# name in the report -> (Triton model, mode, batch size, inputs with Triton's batch dimension)
MODELS = {
    "continuous": ("samg", "continuous", MAX_BATCH_SIZE, False),
    "one at a time": ("samg_single", "single", 1, False),
    "dynamic batching": ("samg_dynamic", "dynamic", MAX_BATCH_SIZE, True),
}
TARGET_SPEEDUP_AT_8 = 3.0
TARGET_P95_RATIO_AT_8 = 2.5


def workload(n: int, offset: int = 0) -> list[dict]:
    """`n` requests, the same for every model: mixed prompts, rules, scales, steps and seeds."""
    rng = np.random.default_rng(1234 + offset)
    out = []
    for i in range(n):
        rule = ("samg", "cfg")[i % 2]
        out.append(dict(prompt=f"a handwritten {int(rng.integers(10))}", guidance=rule,
                        guidance_scale=float(rng.choice([3.0, 5.0, 7.5])),
                        num_inference_steps=int(rng.choice(STEP_CHOICES)), seed=int(rng.integers(2**62))))
    return out


def run_cell(grpc_address: str, model: str, batched: bool, requests: list[dict], concurrency: int) -> dict:
    """The requests through `concurrency` closed-loop clients; wall time and per-request latencies."""
    import tritonclient.grpc as grpc

    from samg.serve.client import generate

    queue = list(enumerate(requests))
    lock = threading.Lock()
    latencies = [0.0] * len(requests)

    def client_loop() -> None:
        client = grpc.InferenceServerClient(grpc_address)
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    i, request = queue.pop(0)
                start = time.perf_counter()
                generate(client, model=model, batched=batched, infer_options={"client_timeout": 600}, **request)
                latencies[i] = time.perf_counter() - start
        finally:
            client.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(client_loop) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - start
    lat = np.array(latencies)
    return {"requests": len(requests), "wall_s": wall, "throughput_rps": len(requests) / wall,
            "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)), "mean_s": float(lat.mean())}


def summarize(rows: list[dict]) -> list[dict]:
    """Per (model, concurrency): median over rounds, with the min..max spread."""
    out = []
    keys = sorted({(r["model"], r["concurrency"]) for r in rows}, key=lambda k: (list(MODELS).index(k[0]), k[1]))
    for model, conc in keys:
        cell = [r for r in rows if r["model"] == model and r["concurrency"] == conc]
        entry = {"model": model, "concurrency": conc, "rounds": len(cell)}
        for metric in ("throughput_rps", "p50_s", "p95_s"):
            values = [r[metric] for r in cell]
            entry[metric] = statistics.median(values)
            entry[metric + "_min"], entry[metric + "_max"] = min(values), max(values)
        out.append(entry)
    return out


def headline(summary: list[dict]) -> dict:
    """The targets at 8 clients: continuous throughput / one-at-a-time throughput, and continuous
    p95 / the p95 of the same requests sent alone (one client), against two baselines: the
    continuous model with one client (p95_ratio_at_8) and the one-at-a-time model with one client
    (p95_ratio_vs_serial_lone_at_8)."""
    get = {(s["model"], s["concurrency"]): s for s in summary}
    out = {}
    if ("continuous", 8) in get and ("one at a time", 8) in get:
        out["speedup_at_8"] = get["continuous", 8]["throughput_rps"] / get["one at a time", 8]["throughput_rps"]
        out["dynamic_speedup_at_8"] = (get["dynamic batching", 8]["throughput_rps"]
                                       / get["one at a time", 8]["throughput_rps"]) if ("dynamic batching", 8) in get else None
    if ("continuous", 8) in get and ("continuous", 1) in get:
        out["p95_ratio_at_8"] = get["continuous", 8]["p95_s"] / get["continuous", 1]["p95_s"]
        out["lone_p95_s"] = get["continuous", 1]["p95_s"]
    if ("continuous", 8) in get and ("one at a time", 1) in get:
        out["p95_ratio_vs_serial_lone_at_8"] = get["continuous", 8]["p95_s"] / get["one at a time", 1]["p95_s"]
        out["serial_lone_p95_s"] = get["one at a time", 1]["p95_s"]
    return out


def throughput_comparison(summary: list[dict]) -> list[str]:
    """Per concurrency, continuous against each alternative: the median ratio, and 'every round
    above' only when continuous's worst round beats the alternative's best ('every round below'
    the other way round), else 'ranges overlap'."""
    get = {(s["model"], s["concurrency"]): s for s in summary}
    lines = []
    for conc in sorted({s["concurrency"] for s in summary}):
        mine = get.get(("continuous", conc))
        if mine is None:
            continue
        parts = []
        for other in ("one at a time", "dynamic batching"):
            theirs = get.get((other, conc))
            if theirs is None:
                continue
            if min(mine["rounds"], theirs["rounds"]) < 2:
                verdict = "one round: no spread"
            elif mine["throughput_rps_min"] > theirs["throughput_rps_max"]:
                verdict = "every round above"
            elif mine["throughput_rps_max"] < theirs["throughput_rps_min"]:
                verdict = "every round below"
            else:
                verdict = "ranges overlap"
            parts.append(f"{mine['throughput_rps'] / theirs['throughput_rps']:.2f}x {other} ({verdict})")
        lines.append(f"- {conc} client{'s' * (conc != 1)}: " + "; ".join(parts))
    return lines


def markdown(summary: list[dict], head: dict, facts: dict) -> str:
    lines = ["| model | clients | throughput (req/s) | p50 latency (s) | p95 latency (s) |", "|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['model']} | {s['concurrency']} | {s['throughput_rps']:.2f} ({s['throughput_rps_min']:.2f}–"
                     f"{s['throughput_rps_max']:.2f}) | {s['p50_s']:.3f} ({s['p50_s_min']:.3f}–{s['p50_s_max']:.3f}) | "
                     f"{s['p95_s']:.3f} ({s['p95_s_min']:.3f}–{s['p95_s_max']:.3f}) |")
    text = "\n".join(lines) + "\n\nMedian over rounds (min–max in brackets).\n"
    if "speedup_at_8" in head:
        text += (f"\nAt 8 clients: continuous batching gives {head['speedup_at_8']:.2f}x the one-at-a-time throughput "
                 f"(target {TARGET_SPEEDUP_AT_8:g}x)")
        if head.get("dynamic_speedup_at_8"):
            text += f"; Triton's dynamic batching {head['dynamic_speedup_at_8']:.2f}x"
        text += "."
    if "p95_ratio_at_8" in head:
        text += (f" Its p95 latency (target at most {TARGET_P95_RATIO_AT_8:g}x that of a lone request) is "
                 f"{head['p95_ratio_at_8']:.2f}x the p95 of the same requests sent alone to the continuous model "
                 f"({head['lone_p95_s']:.3f} s)")
        if "p95_ratio_vs_serial_lone_at_8" in head:
            text += (f", {head['p95_ratio_vs_serial_lone_at_8']:.2f}x that of the one-at-a-time model "
                     f"({head['serial_lone_p95_s']:.3f} s)")
        text += "."
    comparison = throughput_comparison(summary)
    if comparison:
        text += "\n\nContinuous batching's throughput against the others (ratio of medians; ranges: min–max over rounds):\n"
        text += "\n".join(comparison)
    text += "\n\n" + ", ".join(f"{k}={v}" for k, v in facts.items()) + "\n"
    return text


def plot(summary: list[dict], path: Path, title: str) -> None:
    from samg.errors import require
    from samg.io import atomic_path

    require("matplotlib", "to plot the serving benchmark")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(10, 4))
    for model in MODELS:
        rows = [s for s in summary if s["model"] == model]
        if not rows:
            continue
        conc = [s["concurrency"] for s in rows]
        for ax, metric in ((ax_t, "throughput_rps"), (ax_l, "p95_s")):
            mid = np.array([s[metric] for s in rows])
            err = np.array([[m - s[metric + "_min"] for m, s in zip(mid, rows)],
                            [s[metric + "_max"] - m for m, s in zip(mid, rows)]])
            ax.errorbar(conc, mid, yerr=err, marker="o", capsize=3, label=model)
    ax_t.set(xlabel="concurrent clients", ylabel="throughput (requests/s)", xscale="log", xticks=list(CONCURRENCY),
             xticklabels=list(map(str, CONCURRENCY)), title="throughput")
    ax_l.set(xlabel="concurrent clients", ylabel="p95 latency (s)", xscale="log", xticks=list(CONCURRENCY),
             xticklabels=list(map(str, CONCURRENCY)), title="p95 latency")
    for ax in (ax_t, ax_l):
        ax.grid(alpha=0.3)
        ax.minorticks_off()
    ax_t.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"concurrency {QUICK_CONCURRENCY}, {QUICK_ROUNDS} round, "
                                                        "fewer requests (a smoke run; never overwrites the results)")
    p.add_argument("--export", type=Path, help="a samg-digits export to use (default: exported into a temp folder)")
    p.add_argument("--requests", type=int, default=None, help="requests per cell (default 32; 8 with --quick)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"results folder (default {RESULTS_DIR.relative_to(REPO)}; {QUICK_DIR.relative_to(REPO)} with --quick)")
    p.add_argument("--plot", type=Path, default=None, help=f"plot path (default {PLOT.relative_to(REPO)}; in --out with --quick)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--from-results", action="store_true",
                   help="rewrite the report (.md) and the plot from the saved .json in --out; no server, no new numbers")
    a = p.parse_args(argv)
    a.out = a.out or (QUICK_DIR if a.quick else RESULTS_DIR)
    a.plot = a.plot or (a.out / "serving_benchmark.png" if a.quick else PLOT)
    a.requests = a.requests or (8 if a.quick else 32)
    return a


def plot_title(facts: dict, rounds: int) -> str:
    return (f"samg serve on tritonserver 2.51, samg-digits, {facts['machine']} (ONNX Runtime CPU, load "
            f"{facts['load_avg_at_end']}); median of {rounds} round(s), bars min–max")


def report(a: argparse.Namespace, stem: str, rows: list[dict], facts: dict, rounds: int) -> str:
    """Write the .json, the .md and the plot for `rows`; returns the report text."""
    from samg.io import atomic_write_bytes, atomic_write_json

    summary = summarize(rows)
    head = headline(summary)
    text = markdown(summary, head, facts)
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out / f"{stem}.json", {"facts": facts, "headline": head, "summary": summary, "rows": rows})
    atomic_write_bytes(a.out / f"{stem}.md", text.encode())
    plot(summary, a.plot, plot_title(facts, rounds))
    return text


def main(argv=None) -> int:
    from tqdm import tqdm

    from samg.errors import SamgError, require
    from samg.serve.install import TritonNotFound, find_tritonserver
    from samg.serve.repository import ModelEntry, write_repository
    from samg.serve.server import TritonServer, local_endpoints

    a = parse_args(argv)
    stem = "serving_quick" if a.quick else "serving"
    if a.from_results:
        import json

        saved = json.loads((a.out / f"{stem}.json").read_text())
        print(report(a, stem, saved["rows"], saved["facts"], saved["facts"]["rounds"]))
        return 0
    require("tritonclient.grpc", "to run the serving benchmark")
    try:
        install = find_tritonserver()
    except TritonNotFound as exc:
        raise SamgError(str(exc)) from None
    concurrency = QUICK_CONCURRENCY if a.quick else CONCURRENCY
    rounds = QUICK_ROUNDS if a.quick else ROUNDS
    with tempfile.TemporaryDirectory(prefix="samg-serving-bench-") as work:
        work = Path(work)
        export_dir = a.export
        if export_dir is None:
            from samg.export.exporter import ExportOptions, export

            if not a.quiet:
                print("exporting samg-digits ...", file=sys.stderr)
            export_dir = export(ExportOptions(model="digits", out=str(work / "digits"), validate=False, quiet=True))
        entries = tuple(ModelEntry(name, mode, size) for name, mode, size, _ in MODELS.values())
        repository = write_repository(work / "repository", export_dir, models=entries)
        endpoints = local_endpoints()
        server = TritonServer(install, repository, endpoints, work / "tritonserver.log")
        load_at_start = os.getloadavg()[0]  # the machine's own load (the training jobs of others), before ours
        server.start()
        rows = []
        try:
            server.wait_ready(MODEL_LOAD_TIMEOUT_S)
            for label, (model, _, _, batched) in MODELS.items():  # warm-up: first calls allocate
                run_cell(endpoints.grpc, model, batched, workload(4, offset=99), 2)
            cells = [(r, c, m) for r in range(rounds) for c in concurrency for m in range(len(MODELS))]
            bar = tqdm(total=len(cells), desc="serving benchmark", unit="cell", disable=a.quiet, file=sys.stderr)
            for rnd, conc, m in cells:
                label = list(MODELS)[(m + rnd) % len(MODELS)]  # rotated order per round
                model, _, _, batched = MODELS[label]
                requests = workload(max(a.requests, conc), offset=rnd)
                bar.set_postfix_str(f"round {rnd + 1} {label} x{conc}")
                row = run_cell(endpoints.grpc, model, batched, requests, conc)
                rows.append({"model": label, "concurrency": conc, "round": rnd, **row})
                bar.update()
            bar.close()
        finally:
            server.stop()
        load_at_end = os.getloadavg()[0]
        if not a.quick:  # the graph alone, on the same export, right after
            from benchmarks.serving import denoiser
            from samg.io import atomic_write_json

            a.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(a.out / denoiser.RESULTS_FILE, denoiser.measure(Path(export_dir)))
    import onnxruntime

    facts = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs", "load_avg_at_start": f"{load_at_start:.1f}",
             "load_avg_at_end": f"{load_at_end:.1f}",
             "model": "samg-digits 16x16", "steps": "/".join(map(str, STEP_CHOICES)), "requests_per_cell": a.requests,
             "rounds": rounds, "max_batch_size": MAX_BATCH_SIZE, "tritonserver": "2.51.0",
             "onnxruntime": onnxruntime.__version__, "client": "tritonclient gRPC, same machine"}
    text = report(a, stem, rows, facts, rounds)
    print(text)
    if not a.quiet:
        print(f"wrote {a.out / (stem + '.md')}, {a.out / (stem + '.json')}, {a.plot}", file=sys.stderr)
    return 0
