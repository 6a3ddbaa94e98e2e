"""Guidance quality on the bundled `samg-shapes` model, run through its ONNX export on ONNX Runtime.

samg-shapes draws one or two coloured shapes at named grid positions (samg.bundled.shapes), so
alignment is scored exactly, by rule, per prompt kind and per attribute:
- align_one / align_two: fraction of held-out one-object / two-object prompts whose sample has
  exactly the named shapes with every named colour, shape and position (`shapes.score`);
- colour, shape, position: fraction of samples with that attribute right for every named object;
  count: fraction with as many shapes as named;
- fd: Fréchet distance between scorer-side features of the samples and of held-out renders
  (4x4 average-pooled RGB + the palette histogram + the number of shapes found);
- off_palette: fraction of pixels farther than OFF_PALETTE_DISTANCE from every palette colour and
  from black (renders: 0; blurred or washed-out edges and off colours raise it) — edge sharpness;
- saturation / overshoot: fraction of decoded values outside [-1, 1] before clipping, mean excess;
- mean_scale / energy_weighted_scale: the applied scale map w(p), plain and delta-energy-weighted.

Every rule but S-CFG runs on a raw export with the host-side reference rules (so w(p) is measured
from the two predictions, `benchmarks.quality.digits.ScaleRecorder`); S-CFG runs its own exported
graph with the probe of `benchmarks.quality.scfg_digits`. Each setting runs on `--seeds` noise draws;
differences from CFG at matched energy-weighted scale are paired within a seed, with a 95% interval.

    python -m benchmarks.quality.shapes --quick     # -> out/quality-quick/ (untracked)
    python -m benchmarks.quality.shapes             # -> benchmarks/quality/results/
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.quality import digits, report, scfg_digits
from samg.bundled import shapes as S
from samg.errors import SamgError

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_MODEL = REPO / "samg" / "bundled" / "samg-shapes"
DEFAULT_CACHE = Path.home() / ".cache" / "samg" / "quality-shapes"
SAMPLER = "euler"
PROMPT_SEED = 777  # held-out prompts: the training pool uses other seeds (scripts/train_shapes.py)
REFERENCE_RENDERS = 1000
OFF_PALETTE_DISTANCE = 60.0  # RGB units; the closest two palette colours are ~100 apart
METRICS = ["align_one", "align_two", "colour", "shape", "position", "count", "fd", "off_palette",
           "saturation", "overshoot"]
RELATIVE = ("fd", "overshoot")
QUICK_PROMPTS, FULL_PROMPTS = 24, 60  # per kind (one object, two objects)
DEFAULT_SEEDS = 3


def held_out_prompts(per_kind: int) -> tuple[list[str], np.ndarray]:
    """per_kind one-object then per_kind two-object full prompts; kinds[i] = number of objects."""
    rng = np.random.default_rng(PROMPT_SEED)
    prompts = [S.prompt_for(S.random_scene(rng, n).objects) for n in (1, 2) for _ in range(per_kind)]
    return prompts, np.repeat([1, 2], per_kind)


def features(images: np.ndarray) -> np.ndarray:
    """Scorer-side features [N, 56] of uint8 images [N, 32, 32, 3] (see the module docstring)."""
    x = images.astype(np.float64) / 255
    pooled = x.reshape(len(x), 4, 8, 4, 8, 3).mean((2, 4)).reshape(len(x), -1)
    palette = np.array([S.BACKGROUND, *S.COLOURS.values()], np.float64)
    nearest = np.argmin(((images[..., None, :].astype(np.float64) - palette) ** 2).sum(-1), -1)
    hist = np.stack([(nearest == k).mean((1, 2)) for k in range(len(palette))], 1)
    count = np.array([[len(S.detect(im))] for im in images], np.float64)
    return np.concatenate([pooled, hist, count], 1)


def off_palette(images: np.ndarray) -> float:
    palette = np.array([S.BACKGROUND, *S.COLOURS.values()], np.float64)
    dist = np.sqrt(((images[..., None, :].astype(np.float64) - palette) ** 2).sum(-1)).min(-1)
    return float((dist > OFF_PALETTE_DISTANCE).mean())


def reference_features() -> np.ndarray:
    rng = np.random.default_rng(PROMPT_SEED + 1)
    return features(np.stack([S.random_scene(rng).image for _ in range(REFERENCE_RENDERS)]))


def to_uint8(images_pm1: np.ndarray) -> np.ndarray:
    """Decoded [N, 3, H, W] in [-1, 1] (unclipped) -> uint8 [N, H, W, 3], as users receive them."""
    x = np.asarray(images_pm1, np.float32).transpose(0, 2, 3, 1)
    return np.round((x / 2 + 0.5).clip(0, 1) * 255).astype(np.uint8)


def score(images_pm1: np.ndarray, prompts: list[str], kinds: np.ndarray, ref_features: np.ndarray) -> dict:
    images = to_uint8(images_pm1)
    scores = [S.score(im, p) for im, p in zip(images, prompts)]
    correct = np.array([s.correct for s in scores], float)
    sat, over = digits.saturation(images_pm1)
    out = {"align_one": float(correct[kinds == 1].mean()), "align_two": float(correct[kinds == 2].mean())}
    for attribute in S.ATTRIBUTES:
        out[attribute] = float(np.mean([bool(s.attribute_ok(attribute)) for s in scores]))
    out["count"] = float(np.mean([s.count_ok for s in scores]))
    out["fd"] = digits.frechet_distance(features(images), ref_features)
    out["off_palette"] = off_palette(images)
    out["saturation"], out["overshoot"] = sat, over
    return out


def ensure_export(model_dir: Path, cache: Path, guidance: str, *, quiet: bool = True) -> Path:
    """The export of `model_dir` with `guidance` (raw or scfg), made once per model version."""
    if not (model_dir / "model_index.json").is_file():
        raise SamgError(f"{model_dir} is not a diffusers pipeline folder: train it with scripts/train_shapes.py "
                        "or pass --model-path")
    out = cache / digits.model_fingerprint(model_dir) / f"{guidance}-smooth0"
    from samg.contract import MANIFEST

    if not (out / MANIFEST).is_file():
        from samg.export.exporter import ExportOptions, export

        out.parent.mkdir(parents=True, exist_ok=True)
        # smooth=0: the sweep sets smoothing per row; the export's own default must not leak in.
        export(ExportOptions(model="shapes", out=str(out), model_path=str(model_dir), guidance=guidance,
                             smooth=0, quiet=quiet))
    return out


def generate(pipe, rule: str, params: dict, prompts: list[str], noise: np.ndarray, steps: int):
    """Decoded images before clipping [N, 3, H, W], mean and energy-weighted applied scale.

    Runs the pipeline's own sampler (`Pipeline.sample`); on a raw export each step's scale map is
    recorded by digits.ScaleRecorder (the runtime's on_host_step hook); an S-CFG pipeline carries
    scfg_digits.ScaleProbeRunner (read by the caller)."""
    guidance = digits.make_guidance(rule, params)
    recorder = digits.ScaleRecorder()
    cond = pipe.conditioning_for(prompts, [""] * len(prompts))
    latents = pipe.sample(cond, noise, guidance=guidance, sampler=SAMPLER, steps=steps,
                          rng=np.random.default_rng(0), on_host_step=recorder)
    images = digits.decode_unclipped(pipe, latents)
    if recorder.scales:
        mean_scale, weighted = np.mean(recorder.scales, axis=0)
        return images, float(mean_scale), float(weighted)
    return images, digits.nominal_scale(params), digits.nominal_scale(params)


def sweep(quick: bool) -> list[tuple[str, str, dict]]:
    """(rule, label, params): CFG densely (the interpolated reference), SAMG and its variants at the
    pairs it is judged on, samg-linear (the third-party reading), and S-CFG (own graph, below)."""
    cfg_scales = [1, 2, 3, 5, 7.5, 10, 15] if quick else [1, 1.5, 2, 3, 4, 5, 6, 7.5, 10, 12.5, 15]
    pairs = [(2, 6), (3, 10)] if quick else [(1, 5), (2, 7.5), (3, 10), (5, 15)]
    variant_pairs = [(3, 10)] if quick else [(2, 7.5), (3, 10)]
    out = [("cfg", f"w={w}", {"scale": float(w)}) for w in cfg_scales]
    for a, b in pairs:
        out.append(("samg", f"({a},{b})", {"w_min": float(a), "w_max": float(b)}))
        out.append(("samg", f"({a},{b}) smooth", {"w_min": float(a), "w_max": float(b), "smooth": 3}))
    for a, b in variant_pairs:
        out.append(("samg-linear", f"({a},{b})", {"w_min": float(a), "w_max": float(b)}))
        out.append(("samg-quantile", f"({a},{b}) q=0.2", {"w_min": float(a), "w_max": float(b)}))
        out.append(("samg-bound", f"({a},{b})", {"w_min": float(a), "w_max": float(b), "w_ref": float(b)}))
    return out


def scfg_scales(quick: bool) -> list[float]:
    return [1.5, 2.5, 4.0] if quick else [1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0]


def run(quick: bool, out_dir: Path, *, model_dir: Path = DEFAULT_MODEL, cache: Path = DEFAULT_CACHE,
        per_kind: int | None = None, steps: int | None = None, seed: int = 0, seeds: int = DEFAULT_SEEDS,
        settings: list | None = None, with_scfg: bool = True, write: bool = True, progress: bool = True):
    from tqdm import tqdm

    from samg.runtime.pipeline import Pipeline

    per_kind = per_kind or (QUICK_PROMPTS if quick else FULL_PROMPTS)
    steps = steps or (16 if quick else 20)
    if seeds < 1:
        raise SamgError("--seeds must be at least 1")
    settings = sweep(quick) if settings is None else settings
    t0 = time.perf_counter()
    ref = reference_features()
    prompts, kinds = held_out_prompts(per_kind)
    raw = Pipeline.load(ensure_export(model_dir, cache, "raw"))
    scfg_pipe = probe = None
    if with_scfg:
        from samg.io import sha256_file

        scfg_dir = ensure_export(model_dir, cache, "scfg")
        scfg_pipe = Pipeline.load(scfg_dir)
        graph = scfg_pipe.export.denoiser.file
        probe = cache / "scfg-probes" / sha256_file(scfg_dir / graph)[:16] / graph
        if not probe.is_file():
            scfg_digits.probe_model(scfg_dir / graph, probe)
    height, width, _ = raw.validate_size(None, None, None)  # the model's own size
    shape = raw.latent_shape(len(prompts), height, width, None)
    stem = "shapes_quick" if quick else "shapes"
    rows = []
    for s in range(seed, seed + seeds):
        noise = np.random.default_rng(s).standard_normal(shape, dtype=np.float32)
        for rule, label, params in tqdm(settings, desc=f"shapes sweep, seed {s}", file=sys.stderr, disable=not progress):
            images, mean_scale, weighted = generate(raw, rule, params, prompts, noise, steps)
            row = {"rule": rule, "setting": label, "seed": s, "mean_scale": mean_scale,
                   "energy_weighted_scale": weighted, "smooth": params.get("smooth", 0)}
            row.update(score(images, prompts, kinds, ref))
            rows.append(row)
        if scfg_pipe is not None:
            for w in tqdm(scfg_scales(quick), desc=f"S-CFG, seed {s}", file=sys.stderr, disable=not progress):
                runner = scfg_digits.ScaleProbeRunner(probe)
                scfg_pipe.runners["denoiser"] = runner
                images, _, _ = generate(scfg_pipe, "scfg", {"scale": float(w)}, prompts, noise, steps)
                mean_scale, weighted = runner.summary()
                row = {"rule": "scfg", "setting": f"w={w:g}", "seed": s, "mean_scale": mean_scale,
                       "energy_weighted_scale": weighted, "smooth": 0}
                row.update(score(images, prompts, kinds, ref))
                rows.append(row)
        if write:
            out_dir.mkdir(parents=True, exist_ok=True)
            report.write_csv(rows, out_dir / f"{stem}.csv")  # a long run keeps the seeds it finished
    facts = {"prompts_per_kind": per_kind, "steps": steps, "sampler": SAMPLER,
             "seeds": " ".join(map(str, range(seed, seed + seeds))), "reference_renders": REFERENCE_RENDERS,
             "seconds": time.perf_counter() - t0}
    if write:
        write_outputs(rows, out_dir, quick=quick, **facts)
    return rows, facts


def best_cfg(rows) -> dict:
    """The CFG setting with the highest one-object alignment averaged over seeds (lowest scale on ties)."""
    cfg = [r for r in report.seed_summary(rows, ["align_one", "align_two", "mean_scale"]) if r["rule"] == "cfg"]
    # Alignments are means of counts over seeds: equal counts can differ in the last float digit.
    return max(cfg, key=lambda r: (round(r["align_one"], 9), -r["mean_scale"]))


DIFF_COLUMNS = [("energy_weighted_scale", "energy-weighted scale", 1.0), ("d_align_one", "Δ align one", 1.0),
                ("d_align_two", "Δ align two", 1.0), ("d_colour", "Δ colour", 1.0), ("d_shape", "Δ shape", 1.0),
                ("d_position", "Δ position", 1.0), ("d_count", "Δ count", 1.0), ("r_fd", "FD vs CFG, %", 100.0),
                ("d_off_palette", "Δ off-palette", 1.0), ("r_overshoot", "overshoot vs CFG, %", 100.0)]


def write_outputs(rows, out_dir: Path, *, quick: bool, **facts) -> None:
    from samg.io import atomic_write_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "shapes_quick" if quick else "shapes"
    report.write_csv(rows, out_dir / f"{stem}.csv")
    report.write_facts(out_dir, stem, facts)
    scale_cols = ["mean_scale", "energy_weighted_scale"]
    summary = report.seed_summary(rows, scale_cols + METRICS)
    cols = ["rule", "setting", "seeds", *scale_cols, *[c for m in METRICS for c in (m, f"{m}_std")]]
    matched = report.matched_differences(rows, METRICS, relative=RELATIVE)
    best = best_cfg(rows)
    command = "python -m benchmarks.quality.shapes" + (" --quick" if quick else "")
    fact_text = report.facts_text(facts)
    front_cols = ["rule", "setting", *scale_cols, "align_one", "align_two", "fd", "off_palette", "overshoot"]
    text = [
        "# samg-shapes benchmark: guidance quality on the exported model (ONNX Runtime), scored exactly\n",
        f"Generated by `{command}`: {fact_text}. Held-out full prompts, half one-object, half two-object; "
        "within a seed every setting starts from the same noise.\n",
        f"Best plain CFG (one-object alignment): {best['setting']} — one object {best['align_one']:.3f}, "
        f"two objects {best['align_two']:.3f} (means over seeds).\n",
        "Differences: mean over seeds of (setting − CFG interpolated at the setting's energy-weighted scale, same "
        "seed) with a 95% Student-t interval over seeds; **bold** = the interval excludes zero.\n",
        "## All settings (mean and std over seeds)\n", report.markdown_table(summary, cols),
        "\n## Against plain CFG at the same energy-weighted scale\n", report.interval_table(matched, DIFF_COLUMNS),
    ]
    for x, label in (("fd", "FD"), ("off_palette", "off-palette pixels"), ("overshoot", "overshoot")):
        for y in ("align_one", "align_two"):
            front = report.pareto_front(summary, x, y, maximize_x=False, maximize_y=True)
            text += [f"\n## Pareto front (means over seeds): {y} vs {label}\n", report.markdown_table(front, front_cols)]
    atomic_write_bytes(out_dir / f"{stem}.md", "\n".join(text).encode())
    report.plot_metrics_vs_scale(summary, ["align_one", "align_two", "fd", "off_palette", "overshoot"],
                                 out_dir / f"{stem}_metrics.png",
                                 "samg-shapes: metrics vs mean effective scale (means over seeds)")
    report.plot_pareto(summary, [("fd", "align_one", False, True), ("fd", "align_two", False, True),
                                 ("off_palette", "align_two", False, True), ("overshoot", "align_two", False, True)],
                       out_dir / f"{stem}_pareto.png", "samg-shapes: Pareto fronts (means over seeds)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_output_args(p)
    p.add_argument("--model-path", type=Path, default=DEFAULT_MODEL, help="diffusers pipeline folder of samg-shapes")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the raw and S-CFG exports are kept")
    p.add_argument("--per-kind", type=int, default=None,
                   help=f"prompts per kind (default {QUICK_PROMPTS} quick, {FULL_PROMPTS} full)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default 16 quick, 20 full)")
    p.add_argument("--seed", type=int, default=0, help="first noise seed")
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help=f"noise seeds (default {DEFAULT_SEEDS})")
    p.add_argument("--no-scfg", action="store_true", help="skip the S-CFG rows")
    p.add_argument("--report-only", action="store_true", help="re-render the tables and plots from the CSV")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return report.resolve_out(p.parse_args(argv))


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.per_kind is not None and a.per_kind < 2:
        raise SamgError("--per-kind must be at least 2 (the Fréchet distance needs pairs)")
    if a.report_only:
        stem = "shapes_quick" if a.quick else "shapes"
        rows = report.rows_to_rerender(a.out, stem)
        write_outputs(rows, a.out, quick=a.quick, **report.facts_to_rerender(a.out, stem, rows))
        print(f"re-rendered {a.out / stem}.md from {len(rows)} rows")
        return 0
    rows, facts = run(a.quick, a.out, model_dir=a.model_path, cache=a.cache, per_kind=a.per_kind, steps=a.steps,
                      seed=a.seed, seeds=a.seeds, with_scfg=not a.no_scfg, progress=not a.quiet)
    best = best_cfg(rows)
    print(f"wrote {len(rows)} rows ({a.seeds} seeds) to {a.out}; best CFG {best['setting']}: one object "
          f"{best['align_one']:.3f}, two objects {best['align_two']:.3f}; {facts['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    report.run_cli(main)
