"""Guidance quality on the bundled `samg-digits` model, run through its ONNX export on ONNX Runtime.

Every rule runs on a raw export (the denoiser outputs pred_uncond and pred_cond) with the host-side
reference rules of `samg.guidance`, so that the effective scale map w(p) of every step can be
measured from the two predictions. A few settings are then re-run on a fused export (the combine
inside the graph, as users deploy it) from the same noise, to prove both paths give the same images.

Scores, from the bundled digit classifier (`samg.bundled.load_digit_classifier`):
- alignment: fraction of samples read as the prompted digit;
- fd: Fréchet distance between classifier features of the samples and of the held-out test digits;
- diversity: mean pairwise feature distance within a prompt, relative to the test digits' own;
- saturation / overshoot: fraction of decoded pixels outside [-1, 1] before clipping, and the mean
  excess |x| - 1 over all pixels;
- mean_scale: mean_p w(p) over pixels, samples and steps; energy_weighted_scale: w(p) weighted by
  the delta energy |c - u|² (the scale applied where guidance acts at all).

Every setting runs on `--seeds` noise draws (3 by default); differences from CFG are reported as
their mean over seeds with a 95% interval, paired within each seed.

    python -m benchmarks.quality.digits --quick     # reduced sweep -> out/quality-quick/ (untracked)
    python -m benchmarks.quality.digits             # full sweep -> benchmarks/quality/results/
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks.quality import report
from samg.errors import SamgError
from samg.guidance import INTERVAL_SIGMA_HI, INTERVAL_SIGMA_LO
from samg.runtime.denoiser import Guidance

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_MODEL = REPO / "samg" / "bundled" / "samg-digits"
DEFAULT_CACHE = Path.home() / ".cache" / "samg" / "quality-digits"
PROMPT = "a handwritten {d}"
NUM_DIGITS = 10
SAMPLER = "euler"

METRICS = ["alignment", "fd", "diversity", "saturation", "overshoot"]
QUICK_PER_DIGIT, FULL_PER_DIGIT = 10, 20
DEFAULT_SEEDS = 3  # the least that gives a spread to every claimed difference (quick and full runs alike)


# ---------------------------------------------------------------------------------- metrics


def alignment(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose arg-max class is the prompted digit."""
    return float((np.asarray(logits).argmax(1) == np.asarray(labels)).mean())


def frechet_distance_from_stats(mu1, cov1, mu2, cov2) -> float:
    """|mu1 - mu2|² + tr(S1 + S2 - 2 (S1 S2)^½), as FID computes it (pytorch-fid's offset fallback)."""
    import warnings

    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    with warnings.catch_warnings():  # few samples in 128 dimensions: singular covariances are expected
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():  # singular product: regularize, as pytorch-fid does
        offset = np.eye(len(cov1)) * 1e-6
        covmean = linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    covmean = np.real(covmean)  # tiny imaginary parts come from round-off
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D]."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise SamgError("the Fréchet distance needs at least 2 samples per set: raise --per-digit")
    return frechet_distance_from_stats(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def saturation(images: np.ndarray) -> tuple[float, float]:
    """(fraction of values outside [-1, 1], mean excess max(|x| - 1, 0) over all values) of unclipped images."""
    excess = np.maximum(np.abs(np.asarray(images, np.float64)) - 1.0, 0.0)
    return float((excess > 0).mean()), float(excess.mean())


def mean_pairwise_distance(features: np.ndarray) -> float:
    """Mean Euclidean distance over all pairs of rows."""
    f = np.asarray(features, np.float64)
    sq = np.maximum((f * f).sum(1)[:, None] + (f * f).sum(1)[None] - 2 * f @ f.T, 0.0)
    return float(np.sqrt(sq[np.triu_indices(len(f), 1)]).mean())


def diversity(features: np.ndarray, labels: np.ndarray) -> float:
    """Mean over prompts (digits) of the mean pairwise feature distance within the prompt."""
    labels = np.asarray(labels)
    return float(np.mean([mean_pairwise_distance(features[labels == d]) for d in np.unique(labels)]))


def to_classifier_images(images_pm1: np.ndarray) -> np.ndarray:
    """Decoded [N, 3, H, W] in [-1, 1] -> [N, H, W, 3] in [0, 1], quantized to 8 bits as users receive them."""
    x = np.asarray(images_pm1, np.float32).transpose(0, 2, 3, 1)
    return np.round((x / 2 + 0.5).clip(0, 1) * 255) / np.float32(255)


def gray_to_classifier_images(images01: np.ndarray) -> np.ndarray:
    """Held-out digits [N, H, W] in [0, 1] -> [N, H, W, 3] (grey repeated on RGB, like training)."""
    return np.repeat(np.asarray(images01, np.float32)[..., None], 3, axis=-1)


@dataclass(frozen=True)
class Reference:
    """Classifier view of the held-out test digits."""

    features: np.ndarray
    accuracy: float  # the classifier's own accuracy on them
    diversity: float


def reference_stats(classify: Callable) -> Reference:
    from samg.bundled import data

    split = data.load_split()
    logits, features = classify(gray_to_classifier_images(split.test_images))
    features = np.asarray(features, np.float64)
    return Reference(features, alignment(logits, split.test_labels), diversity(features, split.test_labels))


def score(images_pm1: np.ndarray, labels: np.ndarray, classify: Callable, ref: Reference) -> dict:
    logits, features = classify(to_classifier_images(images_pm1))
    features = np.asarray(features, np.float64)
    sat, over = saturation(images_pm1)
    return {
        "alignment": alignment(logits, labels),
        "fd": frechet_distance(features, ref.features),
        "diversity": diversity(features, labels) / ref.diversity,
        "saturation": sat,
        "overshoot": over,
    }


# --------------------------------------------------------------------------- exports and sampling


def model_fingerprint(model_dir: Path) -> str:
    """Hash of every file of the pipeline folder, so a retrained model is re-exported."""
    from samg.io import sha256_file

    h = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(model_dir)).encode())
        h.update(sha256_file(path).encode())
    return h.hexdigest()[:16]


def ensure_export(model_dir: Path, cache: Path, guidance: str, *, quiet: bool = True) -> Path:
    """The export of `model_dir` with `guidance` (raw or fused), made once per model version."""
    if not (model_dir / "model_index.json").is_file():
        raise SamgError(
            f"{model_dir} is not a diffusers pipeline folder: train it with scripts/train_digits.py or pass --model-path"
        )
    out = cache / model_fingerprint(model_dir) / f"{guidance}-smooth0"
    from samg.contract import MANIFEST

    if not (out / MANIFEST).is_file():
        from samg.export.exporter import ExportOptions, export

        out.parent.mkdir(parents=True, exist_ok=True)
        # smooth=0: the sweep sets smoothing per row; the export's own default must not leak in.
        export(ExportOptions(model="digits", out=str(out), model_path=str(model_dir), guidance=guidance,
                             smooth=0, quiet=quiet))
    return out


class ScaleRecorder:
    """`on_host_step` hook of the runtime's GuidedDenoiser (raw exports): records each step's mean_p w(p)
    and its delta-energy-weighted mean, from the rule's own scale map (GuidanceRule.step_applied_scales)."""

    def __init__(self):
        self.scales: list[tuple[float, float]] = []

    def __call__(self, rule, inputs, params) -> None:
        scales = rule.step_applied_scales(inputs, **params)
        if scales is not None:
            self.scales.append(scales)


def make_guidance(rule: str, params: dict) -> Guidance:
    """A sweep entry's params -> the runtime's Guidance (scales separate from the rule's options)."""
    params = dict(params)
    if "w_min" in params:
        lo, hi = params.pop("w_min"), params.pop("w_max")
    else:
        lo = hi = params.pop("scale") if "scale" in params else params.pop("lam")
    return Guidance(rule, float(lo), float(hi), params)


def nominal_scale(params: dict) -> float:
    """Scale of a rule without a scale map (its nominal CFG scale; NaN for CFG++'s lambda)."""
    return float(params.get("scale", float("nan")))


def generate(pipe, rule: str, params: dict, labels: np.ndarray, noise: np.ndarray, steps: int,
             batch: int = 512) -> tuple[np.ndarray, float, float]:
    """Decoded images before clipping [N, 3, H, W], mean effective scale, energy-weighted scale."""
    guidance = make_guidance(rule, params)
    guidance.validate()
    prompts = [PROMPT.format(d=d) for d in range(NUM_DIGITS)]
    enc = pipe.encode([""] + prompts)  # row 0: the unconditional (empty) prompt
    images, scales = [], []
    for start in range(0, len(labels), batch):
        lab = labels[start : start + batch]
        cond = {k: np.concatenate([np.repeat(v[:1], len(lab), 0), v[1 + lab]]) for k, v in enc.items()}
        recorder = ScaleRecorder()
        latents = pipe.sample(cond, noise[start : start + batch], guidance=guidance, sampler=SAMPLER, steps=steps,
                              rng=np.random.default_rng(0), on_host_step=recorder)
        images.append(decode_unclipped(pipe, latents))
        if recorder.scales:
            scales.append((len(lab), np.mean(recorder.scales, axis=0)))
    out = np.concatenate(images)
    if scales:
        n = sum(k for k, _ in scales)
        mean_scale, weighted = sum(k * s for k, s in scales) / n
        return out, float(mean_scale), float(weighted)
    return out, nominal_scale(params), nominal_scale(params)


def unclipped_vae(export_dir: Path) -> Path:
    """A copy of the export's VAE decoder without its final Clip to [-1, 1] (made once, next to it).

    The exported decoder clamps inside the graph (the export contract promises images in [-1, 1]),
    which hides the overshoot this benchmark measures; everything before the Clip is unchanged."""
    out = export_dir / "vae_decoder_unclipped.onnx"
    if out.is_file():
        return out
    import onnx

    from samg.contract import read_export
    from samg.io import atomic_write_bytes

    model = onnx.load(str(export_dir / read_export(export_dir).vae.file))
    graph = model.graph
    (output,) = [o for o in graph.output if o.name == "images"]
    (clip,) = [n for n in graph.node if "images" in n.output]
    if clip.op_type != "Clip":
        raise SamgError(f"{export_dir}/vae_decoder.onnx does not end in a Clip: delete {export_dir} to re-export it")
    for node in graph.node:  # the clip's input becomes the graph output "images"
        node.input[:] = ["images" if name == clip.input[0] else name for name in node.input]
        node.output[:] = ["images" if name == clip.input[0] else name for name in node.output]
    graph.node.remove(clip)
    onnx.checker.check_model(model)
    atomic_write_bytes(out, model.SerializeToString())
    return out


def decode_unclipped(pipe, latents: np.ndarray) -> np.ndarray:
    """The VAE decoder's output [N, 3, H, W] before it is clipped to [-1, 1]."""
    from samg.runners.base import open_runner

    vae = pipe.export.vae
    if not hasattr(pipe, "_unclipped_vae"):  # cached on the pipeline: one session per export
        pipe._unclipped_vae = open_runner(unclipped_vae(pipe.export_dir))
    z = latents / np.float32(vae.scaling_factor) + np.float32(vae.shift_factor or 0.0)
    out = np.asarray(pipe._unclipped_vae.run({"latents": z})["images"], np.float32)
    from samg.io import check_finite

    check_finite("decoded images", out, "(VAE decoder output)")
    return out


# ---------------------------------------------------------------------------------- the sweep

APG = {"norm_threshold": 1.0, "momentum": -0.5}  # threshold for 4x8x8 latents (the paper's 15 is for 128x128)


def sweep(quick: bool) -> list[tuple[str, str, dict]]:
    """(rule, label, params) for every setting of the sweep.

    The full sweep is sized for three seeds on two shared cores (~40 settings): CFG densely (it is
    the interpolated reference), SAMG at the four (w_min, w_max) pairs it is judged on, each with
    and without smoothing, and the other rules at three scales."""
    cfg_scales = [1, 2, 3, 5, 7.5, 10, 15] if quick else [1, 1.5, 2, 3, 4, 5, 6, 7.5, 10, 15]
    pairs = [(2, 6), (3, 9), (5, 15)] if quick else [(1, 5), (2, 7.5), (3, 10), (5, 15)]
    smooth_pairs = [(3, 9)] if quick else pairs
    attrs = [(0.5, 4.0), (1.0, 16.0)] if quick else [(0.5, 4.0), (2.0, 4.0), (1.0, 1.0), (1.0, 16.0)]
    attr_pair = (3, 9) if quick else (3, 10)
    variant_pairs = [(3, 9)] if quick else [(2, 7.5), (5, 15)]
    guided_scales = [5, 10] if quick else [3, 7.5, 15]
    lams = [0.4, 0.8] if quick else [0.2, 0.6, 1.0]
    out = [("cfg", f"w={w}", {"scale": float(w)}) for w in cfg_scales]
    for a, b in pairs:
        out.append(("samg", f"({a},{b})", {"w_min": float(a), "w_max": float(b)}))
    for a, b in smooth_pairs:
        out.append(("samg", f"({a},{b}) smooth", {"w_min": float(a), "w_max": float(b), "smooth": 3}))
    a, b = attr_pair
    for tau, k in attrs:
        out.append(("samg", f"({a},{b}) tau={tau} k={k}", {"w_min": float(a), "w_max": float(b), "tau": tau, "sharpness": k}))
    for a, b in variant_pairs:
        out.append(("samg-quantile", f"({a},{b}) q=0.2", {"w_min": float(a), "w_max": float(b)}))
        out.append(("samg-bound", f"({a},{b})", {"w_min": float(a), "w_max": float(b), "w_ref": float(b)}))
        out.append(("samg-linear", f"({a},{b})", {"w_min": float(a), "w_max": float(b)}))
    for w in guided_scales:
        out.append(("apg", f"w={w}", {"scale": float(w), **APG}))
        out.append(("cfg-rescale", f"w={w}", {"scale": float(w)}))
        out.append(("interval", f"w={w}", {"scale": float(w), "sigma_lo": INTERVAL_SIGMA_LO, "sigma_hi": INTERVAL_SIGMA_HI}))
    for lam in lams:
        out.append(("cfgpp", f"lam={lam}", {"lam": float(lam)}))
    return out


def core(settings: list) -> list:
    """The settings the samg-v1 defaults are decided on: CFG and SAMG with default attributes, with and
    without smoothing (a cheaper run to add seeds to the claims that matter most)."""
    return [(rule, label, params) for rule, label, params in settings
            if rule == "cfg" or (rule == "samg" and set(params) <= {"w_min", "w_max", "smooth"})]


# Settings re-run on the fused export: the combine in the graph must give the raw path's images.
# The fused graph carries the attributes ensure_export pins (tau 1, sharpness 4, no smoothing).
FUSED_CHECKS = [("cfg", "w=5", {"scale": 5.0}), ("samg", "(3,9)", {"w_min": 3.0, "w_max": 9.0})]


def run(quick: bool, out_dir: Path, *, model_dir: Path = DEFAULT_MODEL, cache: Path = DEFAULT_CACHE,
        per_digit: int | None = None, steps: int | None = None, seed: int = 0, seeds: int = 1,
        settings: list | None = None, fused_checks: list | None = None, write: bool = True, progress: bool = True,
        classifier_dir: Path | None = None):
    """Every setting on `seeds` noise draws (seeds seed, seed+1, ...); one row per setting and seed.

    With `write`, the per-seed CSV is rewritten after each seed (a long run keeps what it finished)
    and the tables and plots at the end."""
    from tqdm import tqdm

    from samg.bundled import CLASSIFIER_DIR, load_digit_classifier
    from samg.runtime.pipeline import Pipeline

    per_digit = per_digit or (QUICK_PER_DIGIT if quick else FULL_PER_DIGIT)
    steps = steps or (16 if quick else 20)
    if seeds < 1:
        raise SamgError("--seeds must be at least 1")
    settings = sweep(quick) if settings is None else settings
    fused_checks = FUSED_CHECKS if fused_checks is None else fused_checks
    t0 = time.perf_counter()
    classify = load_digit_classifier(directory=classifier_dir or CLASSIFIER_DIR)
    ref = reference_stats(classify)
    raw = Pipeline.load(ensure_export(model_dir, cache, "raw"))
    labels = np.repeat(np.arange(NUM_DIGITS), per_digit)
    h, w = raw.latent.latent_height, raw.latent.latent_width
    seed_list = list(range(seed, seed + seeds))
    stem = "digits_quick" if quick else "digits"
    rows, checks = [], []
    for s in seed_list:
        noise = np.random.default_rng(s).standard_normal((len(labels), raw.latent.channels, h, w),
                                                         dtype=np.float32)
        raw_images = {}
        for rule, label, params in tqdm(settings, desc=f"digits sweep, seed {s}", file=sys.stderr,
                                        disable=not progress):
            images, mean_scale, weighted = generate(raw, rule, params, labels, noise, steps)
            row = {"rule": rule, "setting": label, "seed": s, "mean_scale": mean_scale,
                   "energy_weighted_scale": weighted}
            row.update(score(images, labels, classify, ref))
            row["smooth"] = params.get("smooth", 0)
            rows.append(row)
            if s == seed_list[0]:
                raw_images[(rule, label)] = images
        if fused_checks and s == seed_list[0]:  # the fused graph's equality with the raw path: one seed shows it
            fused = Pipeline.load(ensure_export(model_dir, cache, "fused"))
            for rule, label, params in tqdm(fused_checks, desc="fused check", file=sys.stderr, disable=not progress):
                images, _, _ = generate(fused, rule, params, labels, noise, steps)
                reference = raw_images.get((rule, label))
                if reference is None:
                    reference, _, _ = generate(raw, rule, params, labels, noise, steps)
                sc = score(images, labels, classify, ref)
                checks.append({"rule": rule, "setting": label, "seed": s,
                               "max_abs_pixel_diff": float(np.abs(images - reference).max()),
                               "alignment_fused": sc["alignment"],
                               "alignment_raw": score(reference, labels, classify, ref)["alignment"]})
        del raw_images
        if write:
            out_dir.mkdir(parents=True, exist_ok=True)
            report.write_csv(rows, out_dir / f"{stem}.csv")
    facts = {"per_digit": per_digit, "steps": steps, "sampler": SAMPLER, "seeds": " ".join(map(str, seed_list)),
             "classifier_test_accuracy": ref.accuracy, "test_digits": len(ref.features),
             "seconds": time.perf_counter() - t0}
    if write:
        write_outputs(rows, checks, out_dir, quick=quick, **facts)
    return rows, checks, facts


def best_cfg(rows) -> dict:
    """The CFG setting with the highest alignment averaged over seeds (lowest scale on ties)."""
    cfg = [r for r in report.seed_summary(rows, ["alignment", "mean_scale"]) if r["rule"] == "cfg"]
    return max(cfg, key=lambda r: (r["alignment"], -r["mean_scale"]))


# Differences from CFG reported with their spread: (column key, header, display factor).
DIFF_COLUMNS = [("energy_weighted_scale", "energy-weighted scale", 1.0),
                ("energy_weighted_scale_std", "its std", 1.0), ("d_alignment", "Δ alignment", 1.0),
                ("r_fd", "FD vs CFG, %", 100.0), ("d_fd", "Δ FD", 1.0), ("d_diversity", "Δ diversity", 1.0),
                ("r_overshoot", "overshoot vs CFG, %", 100.0), ("d_saturation", "Δ saturation", 1.0)]
DIFF_METRICS = ["alignment", "fd", "diversity", "saturation", "overshoot"]
QUICK_PER_DIGIT, FULL_PER_DIGIT = 10, 20
DEFAULT_SEEDS = 3  # the least that gives a spread to every claimed difference (quick and full runs alike)
RELATIVE = ("fd", "overshoot")


def write_outputs(rows, checks, out_dir: Path, *, quick: bool, **facts) -> None:
    """CSV of every (setting, seed); markdown of means ± std and of differences from CFG with intervals."""
    from samg.io import atomic_write_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "digits_quick" if quick else "digits"
    report.write_csv(rows, out_dir / f"{stem}.csv")
    scale_cols = ["mean_scale", "energy_weighted_scale"]
    summary = report.seed_summary(rows, scale_cols + METRICS)
    cols = ["rule", "setting", "seeds", *scale_cols, *[c for m in METRICS for c in (m, f"{m}_std")]]
    diff_cols = [(k, h, f) for k, h, f in DIFF_COLUMNS]
    matched_w = report.matched_differences(rows, DIFF_METRICS, relative=RELATIVE)
    matched = report.matched_differences(rows, DIFF_METRICS, scale_key="mean_scale", relative=RELATIVE)
    mean_cols = [("mean_scale", "mean scale", 1.0), ("mean_scale_std", "its std", 1.0), *diff_cols[2:]]
    front_fd = report.pareto_front(summary, "fd", "alignment", maximize_x=False, maximize_y=True)
    front_sat = report.pareto_front(summary, "saturation", "alignment", maximize_x=False, maximize_y=True)
    front_over = report.pareto_front(summary, "overshoot", "alignment", maximize_x=False, maximize_y=True)
    best = best_cfg(rows)
    command = "python -m benchmarks.quality.digits" + (" --quick" if quick else "")
    fact_text = report.facts_text(facts)
    front_cols = ["rule", "setting", *scale_cols, *METRICS]
    text = [
        "# samg-digits benchmark: guidance quality on the exported model (ONNX Runtime)\n",
        f"Generated by `{command}`: {fact_text}. Prompts `{PROMPT}` for d = 0..9; within a seed every setting "
        "starts from the same noise.\n",
        f"Best plain CFG: {best['setting']} — alignment {best['alignment']:.3f} averaged over seeds "
        f"(the classifier reads {100 * best['alignment']:.1f}% of the samples as the prompted digit).\n",
        "How to read the differences: each cell is the mean over seeds of (setting − CFG interpolated at the "
        "setting's own scale, same seed) and its 95% Student-t interval over seeds; **bold** = the interval "
        "excludes zero (resolved); anything else is not resolved by this run.\n",
        "## All settings (mean and std over seeds)\n", report.markdown_table(summary, cols),
        "\n## Against plain CFG at the same energy-weighted scale (CFG interpolated per seed)\n",
        report.interval_table(matched_w, diff_cols),
        "\n## Against plain CFG at the same mean effective scale (CFG interpolated per seed)\n",
        report.interval_table(matched, mean_cols),
    ]
    contrasts = report.smoothing_contrasts(rows, DIFF_METRICS, relative=RELATIVE)
    if contrasts:
        text += ["\n## Smoothing: `smooth=3` minus `smooth=0` at the same (w_min, w_max), each against CFG at its own "
                 "energy-weighted scale\n", report.interval_table(contrasts, diff_cols[2:])]
    text += [
        "\n## Pareto front (means over seeds): alignment vs FD\n", report.markdown_table(front_fd, front_cols),
        "\n## Pareto front (means over seeds): alignment vs saturation (fraction of pixels outside [-1, 1])\n",
        report.markdown_table(front_sat, front_cols),
        "\n## Pareto front (means over seeds): alignment vs overshoot (mean excess beyond [-1, 1])\n",
        report.markdown_table(front_over, front_cols),
    ]
    if checks:
        text += ["\n## Fused export vs raw export + host rule (same noise)\n", report.markdown_table(checks, list(checks[0]))]
    atomic_write_bytes(out_dir / f"{stem}.md", "\n".join(text).encode())
    report.plot_metrics_vs_scale(summary, METRICS, out_dir / f"{stem}_metrics.png",
                                 "samg-digits: metrics vs mean effective scale (means over seeds)")
    report.plot_pareto(summary, [("fd", "alignment", False, True), ("saturation", "alignment", False, True),
                                 ("overshoot", "alignment", False, True)],
                       out_dir / f"{stem}_pareto.png", "samg-digits: Pareto fronts (means over seeds)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_output_args(p)
    p.add_argument("--model-path", type=Path, default=DEFAULT_MODEL, help="diffusers pipeline folder of samg-digits")
    p.add_argument("--classifier-dir", type=Path, default=None, help="digit classifier folder (default: the bundled one)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the raw and fused exports are kept")
    p.add_argument("--per-digit", type=int, default=None,
                   help=f"samples per prompt (default {QUICK_PER_DIGIT} quick, {FULL_PER_DIGIT} full)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default 16 quick, 20 full)")
    p.add_argument("--seed", type=int, default=0, help="first noise seed")
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                   help=f"number of noise seeds (seed, seed+1, ...); spreads are over seeds (default {DEFAULT_SEEDS})")
    p.add_argument("--core", action="store_true",
                   help="only CFG and SAMG with default attributes, with and without smoothing; no fused check")
    p.add_argument("--report-only", action="store_true",
                   help="re-render the tables and plots from the output folder's CSV without sampling")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return report.resolve_out(p.parse_args(argv))


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.per_digit is not None and a.per_digit < 2:
        raise SamgError("--per-digit must be at least 2 (diversity and FD need pairs)")
    if a.seeds < 1:
        raise SamgError("--seeds must be at least 1")
    if a.report_only:
        stem = "digits_quick" if a.quick else "digits"
        rows = report.rows_to_rerender(a.out, stem)
        write_outputs(rows, [], a.out, quick=a.quick, seeds=report.seeds_text(rows),
                      note="re-rendered from the CSV (fused checks not re-run)")
        print(f"re-rendered {a.out / stem}.md from {len(rows)} rows")
        return 0
    rows, checks, facts = run(a.quick, a.out, model_dir=a.model_path, cache=a.cache, per_digit=a.per_digit,
                              steps=a.steps, seed=a.seed, seeds=a.seeds, progress=not a.quiet,
                              classifier_dir=a.classifier_dir, settings=core(sweep(a.quick)) if a.core else None,
                              fused_checks=[] if a.core else None)
    best = best_cfg(rows)
    print(f"wrote {len(rows)} rows ({a.seeds} seeds) to {a.out}; best CFG {best['setting']}: "
          f"alignment {best['alignment']:.3f}; {facts['seconds']:.0f} s")
    for c in checks:
        print(f"fused check {c['rule']} {c['setting']}: max |pixel diff| {c['max_abs_pixel_diff']:.2e}")
    return 0


if __name__ == "__main__":
    report.run_cli(main)
