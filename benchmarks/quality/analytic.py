"""Analytic companion of the quality benchmark: guidance scored exactly on a Gaussian mixture.

The data are small "images" x0 of shape [C=2, 8, 8]. Each of 4 classes is a mixture of 2
components with diagonal covariance, so the noised densities, the exact denoisers E[x0 | x_sigma]
(conditional and unconditional) and the exact class likelihoods are closed form. Spatial structure:
- the condition moves only the foreground (the centre 4x4): in the background every class has the
  same means and variances, so there the conditional and unconditional denoisers agree and the
  delta score is exactly zero;
- the foreground's border ring has a tiny variance (a thin, high-curvature part of the data
  manifold) — where a large uniform guidance step overshoots.
The "model" is imperfect in the way that makes guidance useful: its covariances are inflated
(`--inflate`), so its unguided samples are too spread and often read as the wrong class.

Every rule from `samg.guidance` runs through its own dispatch (`GuidanceRule.apply`) in the runtime's
Euler sampler over the runtime's Karras sigmas, and is scored against the TRUE
conditional: alignment (exact Bayes classifier), NLL per dimension, distance off the thin
manifold, MMD, precision/recall (k-NN), diversity, and the mean effective scale.

    python -m benchmarks.quality.analytic --quick      # reduced sweep -> out/quality-quick/ (untracked)
    python -m benchmarks.quality.analytic              # full sweep, 3 seeds -> benchmarks/quality/results/
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.quality import report
from samg.errors import SamgError
from samg.guidance import INTERVAL_SIGMA_HI, INTERVAL_SIGMA_LO, get_rule

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class MixtureData:
    """Class-conditional Gaussian mixture with diagonal covariances over [C, H, W] images."""

    means: np.ndarray  # [Y, K, D]
    variances: np.ndarray  # [Y, K, D]
    shape: tuple[int, int, int]
    thin: np.ndarray = field(repr=False)  # [D] bool: high-curvature (tiny variance) dimensions
    foreground: np.ndarray = field(repr=False)  # [D] bool

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    def inflated(self, extra_variance: float) -> "MixtureData":
        """The imperfect model: `extra_variance` added to every foreground variance.

        The model is unsure exactly where the condition acts (too broad a conditional, the usual
        reason guidance helps), and it blurs the thin ring into a thick one. The background, which
        the condition does not move, is modelled exactly, so guidance cannot help or hurt there.
        """
        variances = self.variances.copy()
        variances[:, :, self.foreground] += extra_variance
        return MixtureData(self.means, variances, self.shape, self.thin, self.foreground)


def make_data(seed: int = 0, *, amplitude: float = 0.1, sigma: float = 0.5, thin_sigma: float = 0.02) -> MixtureData:
    rng = np.random.default_rng(seed)
    C, H, W = 2, 8, 8
    Y, K = 4, 2
    fg2d = np.zeros((H, W), bool)
    fg2d[2:6, 2:6] = True
    ring2d = fg2d.copy()
    ring2d[3:5, 3:5] = False
    fg = np.broadcast_to(fg2d, (C, H, W)).reshape(-1)
    thin = np.broadcast_to(ring2d, (C, H, W)).reshape(-1)
    D = C * H * W
    # One background for every class and component: were it to vary with the component, the
    # foreground would tell which component is likely and the condition would reach the background.
    background = rng.normal(0.0, 1.0, (1, D))
    class_pattern = rng.choice([-1.0, 1.0], (Y, D)) * amplitude
    component_shift = rng.normal(0.0, 0.3, (Y, K, D))
    means = np.where(fg, class_pattern[:, None, :] + component_shift, background[None, :, :])
    variances = np.full((Y, K, D), sigma**2)
    variances[:, :, thin] = thin_sigma**2
    return MixtureData(means, variances, (C, H, W), thin, fg)


def _component_log_probs(x: np.ndarray, means: np.ndarray, variances: np.ndarray) -> np.ndarray:
    """log N(x; mean_m, diag var_m) for x [B, D], components [M, D] -> [B, M] (float64)."""
    diff = x[:, None, :] - means[None]
    return -0.5 * ((diff**2 / variances[None]).sum(-1) + np.log(2 * np.pi * variances).sum(-1)[None])


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def denoise(data: MixtureData, x: np.ndarray, sigma: float, labels: np.ndarray | None) -> np.ndarray:
    """Exact E[x0 | x0 + sigma*n = x] ([B, D]); conditional on `labels` [B], or unconditional if None."""
    Y, K, D = data.means.shape
    means = data.means.reshape(Y * K, D)
    variances = data.variances.reshape(Y * K, D)
    noisy_var = variances + sigma**2
    logp = _component_log_probs(x, means, noisy_var) - math.log(Y * K)  # uniform class and component priors
    if labels is not None:
        own = (np.arange(Y * K)[None, :] // K) == labels[:, None]
        logp = np.where(own, logp, -np.inf)
    resp = np.exp(logp - logp.max(axis=1, keepdims=True))
    resp /= resp.sum(axis=1, keepdims=True)
    gain = variances / noisy_var  # [M, D]
    per_component = means[None] + gain[None] * (x[:, None, :] - means[None])
    return (resp[:, :, None] * per_component).sum(1)


def class_log_likelihood(data: MixtureData, x: np.ndarray) -> np.ndarray:
    """log p(x | y) for every class: [B, Y]."""
    Y, K, D = data.means.shape
    logp = _component_log_probs(x, data.means.reshape(Y * K, D), data.variances.reshape(Y * K, D))
    return _logsumexp(logp.reshape(len(x), Y, K), axis=2) - math.log(K)


def sample_true(data: MixtureData, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    comp = rng.integers(0, data.means.shape[1], len(labels))
    mean = data.means[labels, comp]
    return mean + np.sqrt(data.variances[labels, comp]) * rng.standard_normal(mean.shape)


SIGMA_MIN, SIGMA_MAX = 0.002, 10.0  # the Karras schedule's range for these unit-scale "images"


def karras_sigmas(n: int) -> np.ndarray:
    """The runtime's Karras sigmas (samg.runtime.schedules, rho 7) over [SIGMA_MIN, SIGMA_MAX], then 0."""
    from samg.runtime.schedules import karras_sigmas as runtime_karras

    return np.append(runtime_karras(SIGMA_MIN, SIGMA_MAX, n), 0.0)


def sample_guided(model: MixtureData, labels: np.ndarray, rule_name: str, params: dict, *, steps: int, seed: int):
    """The runtime's Euler sampler (samg.runtime.samplers) with the exact model guided by the rule's
    own dispatch (`GuidanceRule.apply`, as the runtime's denoiser calls it).

    Returns (x0 [B, D], mean effective scale, energy-weighted effective scale). The second weighs
    w(p) by the delta energy: the scale applied where guidance acts at all (where Δ = 0 the scale
    changes nothing, yet it counts in the plain mean).
    """
    from samg.guidance import StepInputs
    from samg.runtime.samplers import sample_euler

    rule = get_rule(rule_name)
    rule.check_params(params)  # a bad setting is an error, not a diverged (NaN) row
    state = rule.new_state()
    rng = np.random.default_rng(seed)
    sigmas = karras_sigmas(steps)
    B, (C, H, W) = len(labels), model.shape
    x = rng.standard_normal((B, C * H * W)) * sigmas[0]
    scales = []

    def guided_denoise(x_images: np.ndarray, sigma: float, step: int):
        flat = x_images.reshape(B, -1)
        x0_u, x0_c = denoise(model, flat, sigma, None), denoise(model, flat, sigma, labels)
        # The model is eps-parametrized (x = x0 + σ·eps): its two predictions, as images for the rules.
        eps = lambda x0: ((flat - x0) / sigma).reshape(B, C, H, W).astype(np.float32)  # noqa: E731
        inputs = StepInputs(eps(x0_u), eps(x0_c), x_images, sigma, step, "epsilon")
        applied = rule.step_applied_scales(inputs, **params)
        if applied is not None:
            scales.append(applied)
        return rule.apply(inputs, state, **params)

    try:
        x = sample_euler(guided_denoise, x.reshape(B, C, H, W), sigmas).reshape(B, -1)
    except SamgError:  # the sampler stops on non-finite latents: the setting diverged, scored as NaN
        x = np.full((B, C * H * W), np.nan)
    if scales:
        mean_scale, weighted = np.mean(scales, axis=0)
        return x, float(mean_scale), float(weighted)
    nominal = float(params.get("scale", float("nan")))
    return x, nominal, nominal


def _pairwise_sq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T, 0.0)


def mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² with an RBF kernel, bandwidth from the median distance of the reference set."""
    dyy = _pairwise_sq(y, y)
    bw = np.median(dyy[np.triu_indices(len(y), 1)])
    k = lambda d: np.exp(-d / bw)  # noqa: E731
    kxx, kyy, kxy = k(_pairwise_sq(x, x)), k(dyy), k(_pairwise_sq(x, y))
    n, m = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())


def precision_recall(x: np.ndarray, ref: np.ndarray, k: int = 3) -> tuple[float, float]:
    """k-NN manifold precision and recall (Kynkäänniemi et al. 2019)."""

    def radii(a):
        d = _pairwise_sq(a, a)
        return np.sort(d, axis=1)[:, k]  # index 0 is the point itself

    r_ref, r_x = radii(ref), radii(x)
    precision = float((_pairwise_sq(x, ref) <= r_ref[None]).any(1).mean())
    recall = float((_pairwise_sq(ref, x) <= r_x[None]).any(1).mean())
    return precision, recall


def score(truth: MixtureData, x: np.ndarray, labels: np.ndarray, ref: np.ndarray, ref_labels: np.ndarray) -> dict:
    D = x.shape[1]
    ll = class_log_likelihood(truth, x)
    own = ll[np.arange(len(x)), labels]
    # Distance off the thin manifold: thin dims against the nearest component of the prompted class.
    comp_ll = np.stack([_component_log_probs(x[i : i + 1], truth.means[y], truth.variances[y])[0] for i, y in enumerate(labels)])
    nearest = truth.means[labels, comp_ll.argmax(1)]
    thin_std = float(np.sqrt(truth.variances[0, 0, truth.thin][0]))
    off = np.sqrt(((x - nearest)[:, truth.thin] ** 2).mean(1)) / thin_std
    per_class = []
    for y in np.unique(labels):
        xs, rs = x[labels == y], ref[ref_labels == y]
        p, r = precision_recall(xs, rs)
        div = float(np.sqrt(_pairwise_sq(xs, xs)[np.triu_indices(len(xs), 1)]).mean())
        div_ref = float(np.sqrt(_pairwise_sq(rs, rs)[np.triu_indices(len(rs), 1)]).mean())
        per_class.append((mmd2(xs, rs), p, r, div / div_ref))
    mmd, prec, rec, div = np.mean(per_class, axis=0)
    return {
        "alignment": float((ll.argmax(1) == labels).mean()),
        "nll_per_dim": float(-own.mean() / D),
        "off_manifold": float(off.mean()),
        "mmd2": float(mmd),
        "precision": float(prec),
        "recall": float(rec),
        "diversity": float(div),  # mean pairwise distance relative to the true conditional's
    }


def sweep(quick: bool) -> list[tuple[str, str, dict]]:
    """(rule, label, params) for every setting of the sweep."""
    cfg_scales = [1, 2, 3, 4, 6, 8, 10, 12, 15] if quick else [1, 1.5, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15]
    pairs = [(1, 5), (2, 8), (3, 9), (3, 12), (5, 15)] if quick else [
        (a, b) for a in (1, 2, 3, 5, 7) for b in (3, 5, 7, 9, 12, 15) if b > a
    ]
    out = [("cfg", f"w={w}", {"scale": float(w)}) for w in cfg_scales]
    for a, b in pairs:
        out.append(("samg", f"({a},{b})", {"w_min": float(a), "w_max": float(b)}))
        out.append(("samg", f"({a},{b}) smooth", {"w_min": float(a), "w_max": float(b), "smooth": 3}))
    extra_attrs = [(0.5, 4.0), (2.0, 4.0), (1.0, 1.0), (1.0, 16.0)] if not quick else [(2.0, 4.0), (1.0, 16.0)]
    for tau, k in extra_attrs:
        out.append(("samg", f"(3,12) tau={tau} k={k}", {"w_min": 3.0, "w_max": 12.0, "tau": tau, "sharpness": k}))
    for a, b in pairs:
        out.append(("samg-quantile", f"({a},{b}) q=0.2", {"w_min": float(a), "w_max": float(b)}))
        out.append(("samg-bound", f"({a},{b})", {"w_min": float(a), "w_max": float(b), "w_ref": float(b)}))
        out.append(("samg-linear", f"({a},{b})", {"w_min": float(a), "w_max": float(b)}))
    guided_scales = [3, 6, 10, 15] if quick else [2, 3, 4, 6, 8, 10, 12, 15]
    for w in guided_scales:
        out.append(("apg", f"w={w}", {"scale": float(w), "norm_threshold": 2.5, "momentum": -0.5}))
        out.append(("cfg-rescale", f"w={w}", {"scale": float(w)}))
        out.append(("interval", f"w={w}", {"scale": float(w), "sigma_lo": INTERVAL_SIGMA_LO, "sigma_hi": INTERVAL_SIGMA_HI}))
    for lam in ([0.2, 0.6, 1.0] if quick else [0.1, 0.2, 0.4, 0.6, 0.8, 1.0]):
        out.append(("cfgpp", f"lam={lam}", {"lam": float(lam)}))
    return out


def core(settings: list) -> list:
    """CFG and SAMG with default attributes, with and without smoothing (what the defaults rest on)."""
    return [(rule, label, params) for rule, label, params in settings
            if rule == "cfg" or (rule == "samg" and set(params) <= {"w_min", "w_max", "smooth"})]


METRICS = ["alignment", "nll_per_dim", "off_manifold", "mmd2", "precision", "recall", "diversity"]


DATA_SEED = 0  # the mixture itself is fixed; seeds vary the sampling noise and the reference draw
DEFAULT_SEEDS = 3
KEY_METRICS = ["alignment", "mmd2", "off_manifold", "nll_per_dim", "precision", "recall"]


def run(quick: bool, out_dir: Path, *, inflate: float = 0.25, steps: int = 24, per_class: int | None = None, seed: int = 0,
        seeds: int = 1, quiet: bool = False, only_core: bool = False):
    """Every setting on `seeds` noise draws (seed, seed+1, ...) of the same mixture; one row per setting and seed."""
    from tqdm import tqdm

    truth = make_data(DATA_SEED)
    model = truth.inflated(inflate)
    per_class = per_class or (64 if quick else 256)
    labels = np.repeat(np.arange(truth.num_classes), per_class)
    settings = core(sweep(quick)) if only_core else sweep(quick)
    rows = []
    t0 = time.perf_counter()
    for s in range(seed, seed + seeds):
        ref = sample_true(truth, labels, np.random.default_rng(s + 1))
        for rule, label, params in tqdm(settings, desc=f"analytic sweep, seed {s}", file=sys.stderr, disable=quiet):
            x, mean_scale, weighted = sample_guided(model, labels, rule, params, steps=steps, seed=s + 2)
            row = {"rule": rule, "setting": label, "seed": s, "mean_scale": mean_scale, "energy_weighted_scale": weighted}
            if np.isfinite(x).all():
                row.update(score(truth, x, labels, ref, labels))
            else:
                row.update({m: float("nan") for m in METRICS})
            row["smooth"] = params.get("smooth", 0)
            rows.append(row)
    write_outputs(rows, out_dir, "analytic_quick" if quick else "analytic", inflate=inflate, steps=steps,
                  per_class=per_class, seeds=" ".join(str(s) for s in range(seed, seed + seeds)),
                  seconds=round(time.perf_counter() - t0))
    return rows


def write_outputs(rows, out_dir: Path, stem: str = "analytic", **facts) -> None:
    """CSV of every (setting, seed); markdown of means ± std and of differences from CFG with intervals."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_csv(rows, out_dir / f"{stem}.csv")
    scale_cols = ["mean_scale", "energy_weighted_scale"]
    summary = report.seed_summary(rows, scale_cols + METRICS)
    cols = ["rule", "setting", "seeds", *scale_cols, *[c for m in METRICS for c in (m, f"{m}_std")]]
    front_cols = ["rule", "setting", *scale_cols, *METRICS]
    diff_cols = [("d_alignment", "Δ alignment", 1.0), ("r_mmd2", "MMD² vs CFG, %", 100.0),
                 ("d_off_manifold", "Δ off-manifold", 1.0), ("d_nll_per_dim", "Δ NLL/dim", 1.0),
                 ("d_precision", "Δ precision", 1.0), ("d_recall", "Δ recall", 1.0)]
    matched = report.matched_differences(rows, KEY_METRICS, scale_key="mean_scale", relative=("mmd2",))
    matched_w = report.matched_differences(rows, KEY_METRICS, relative=("mmd2",))
    front_a = report.pareto_front(summary, "mmd2", "alignment", maximize_x=False, maximize_y=True)
    front_b = report.pareto_front(summary, "off_manifold", "alignment", maximize_x=False, maximize_y=True)
    text = [
        "# Analytic benchmark: guidance on an exact Gaussian mixture\n",
        f"Generated by `python -m benchmarks.quality.analytic{' --quick' if stem.endswith('quick') else ''}` "
        + " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in facts.items()) + "\n",
        "Differences: mean over seeds of (setting − CFG interpolated at the setting's own scale, same seed) "
        "and its 95% Student-t interval over seeds; **bold** = the interval excludes zero (resolved).\n",
        "## All settings (mean and std over seeds)\n", report.markdown_table(summary, cols),
        "\n## Against plain CFG at the same mean effective scale (CFG interpolated per seed)\n",
        report.interval_table(matched, [("mean_scale", "mean scale", 1.0), *diff_cols]),
        "\n## Against plain CFG at the same energy-weighted scale (CFG interpolated per seed)\n",
        report.interval_table(matched_w, [("energy_weighted_scale", "energy-weighted scale", 1.0), *diff_cols]),
        "\n## Smoothing: `smooth=3` minus `smooth=0` at the same (w_min, w_max), each against CFG at its own "
        "energy-weighted scale (MMD² column: difference of the two ratios to CFG, in points)\n",
        report.interval_table(report.smoothing_contrasts(rows, KEY_METRICS, relative=("mmd2",)), diff_cols),
        "\n## Pareto front (means over seeds): alignment vs MMD²\n", report.markdown_table(front_a, front_cols),
        "\n## Pareto front (means over seeds): alignment vs distance off the thin manifold\n",
        report.markdown_table(front_b, front_cols),
    ]
    from samg.io import atomic_write_bytes

    atomic_write_bytes(out_dir / f"{stem}.md", "\n".join(text).encode())
    report.plot_metrics_vs_scale(summary, METRICS, out_dir / f"{stem}_metrics.png",
                                 "Gaussian mixture: metrics vs mean effective scale (means over seeds)")
    report.plot_pareto(
        summary,
        [("mmd2", "alignment", False, True), ("off_manifold", "alignment", False, True), ("recall", "alignment", True, True)],
        out_dir / f"{stem}_pareto.png",
        "Gaussian mixture: Pareto fronts (means over seeds)",
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_output_args(p)
    p.add_argument("--inflate", type=float, default=0.25, help="variance added to the model's foreground (imperfect model)")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--per-class", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="first noise seed")
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                   help=f"number of noise seeds; spreads are over seeds (default {DEFAULT_SEEDS})")
    p.add_argument("--core", action="store_true", help="only CFG and SAMG with default attributes, with and without smoothing")
    p.add_argument("--report-only", action="store_true",
                   help="re-render the tables and plots from the output folder's CSV without sampling")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return report.resolve_out(p.parse_args(argv))


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.seeds < 1 or a.steps < 1 or (a.per_class is not None and a.per_class < 4):
        raise SamgError("--seeds and --steps must be at least 1 and --per-class at least 4 (k-NN recall needs neighbours)")
    stem = "analytic_quick" if a.quick else "analytic"
    if a.report_only:
        rows = report.rows_to_rerender(a.out, stem)
        write_outputs(rows, a.out, stem, seeds=report.seeds_text(rows), note="re-rendered from the CSV")
        print(f"re-rendered {a.out}/{stem}.md from {len(rows)} rows")
        return 0
    rows = run(a.quick, a.out, inflate=a.inflate, steps=a.steps, per_class=a.per_class, seed=a.seed, seeds=a.seeds,
               quiet=a.quiet, only_core=a.core)
    print(f"wrote {len(rows)} rows ({a.seeds} seeds) to {a.out}/{stem}.{{csv,md}} and {stem}_*.png")
    return 0


if __name__ == "__main__":
    report.run_cli(main)
