"""Shared output of the quality benchmarks: CSV, markdown table, metric-vs-scale plots, Pareto fronts.

Rows are flat dicts. Every row carries `rule`, `setting` (a short label of its parameters) and
`mean_scale` (the mean effective scale mean_p w(p), or the nominal scale for rules without a scale
map), so every method is compared with plain CFG at matched effective scale. Rows of a multi-seed
run also carry `seed`; a difference from CFG is then reported as its mean over seeds with a 95%
Student-t interval, and called resolved only when that interval excludes zero.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Iterable, Sequence

from samg.io import atomic_path, atomic_write_bytes

REPO = Path(__file__).resolve().parents[2]
# Full runs are the committed evidence; quick runs are smoke tests and must not overwrite it.
RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUICK_DIR = REPO / "out" / "quality-quick"
CONFIDENCE = 0.95  # two-sided level of every interval over seeds


def default_out_dir(quick: bool) -> Path:
    """Where a run writes when --out is not given: quick runs never write into the tracked results."""
    return QUICK_DIR if quick else RESULTS_DIR


# ---------------------------------------------------------------- the command line every benchmark shares


def add_output_args(parser, *, quick_help: str = "reduced sweep and sample count") -> None:
    """--quick and --out, which every quality benchmark takes with the same meaning."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default: {RESULTS_DIR} for full runs, {QUICK_DIR} for --quick)")


def resolve_out(args):
    """Fill in --out from --quick when it was not given (see `default_out_dir`); returns `args`."""
    args.out = args.out if args.out is not None else default_out_dir(args.quick)
    return args


def rows_to_rerender(out_dir: Path, stem: str) -> list[dict]:
    """The rows of an earlier run's `<stem>.csv` in `out_dir`, for --report-only."""
    from samg.errors import SamgError

    csv_path = out_dir / f"{stem}.csv"
    if not csv_path.is_file():
        raise SamgError(f"{csv_path} does not exist: run the benchmark first (without --report-only)")
    return read_csv(csv_path)


def write_facts(out_dir: Path, stem: str, facts: dict) -> None:
    """The run's facts (prompts, steps, seconds, ...) beside `<stem>.csv`, so a re-render keeps them."""
    from samg.io import atomic_write_json

    atomic_write_json(out_dir / f"{stem}.facts.json", facts)


def facts_to_rerender(out_dir: Path, stem: str, rows: Sequence[dict]) -> dict:
    """The facts an earlier run wrote with `write_facts` (none where it wrote none), seeds read off `rows`."""
    from samg.io import read_json_object

    return {**(read_json_object(out_dir / f"{stem}.facts.json") or {}), "seeds": seeds_text(rows)}


def seeds_text(rows: Sequence[dict]) -> str:
    """The seeds the rows were sampled with, as the reports' `seeds=` fact spells them."""
    return " ".join(map(str, by_seed(rows)))


def facts_text(facts: dict) -> str:
    """`key=value ...` for a report's first line; floats to four significant digits."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in facts.items())


def run_cli(main) -> None:
    """`python -m benchmarks.quality.<name>`: exit with main's status; a SamgError is one line and status 2."""
    import sys

    from samg.errors import SamgError

    try:
        sys.exit(main())
    except SamgError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


# A rule family is drawn as one line; these colours keep CFG the same in every figure.
FAMILY_STYLE = {
    "cfg": ("black", "o"),
    "samg": ("tab:red", "s"),
    "samg-smooth": ("tab:pink", "s"),
    "samg-quantile": ("tab:orange", "^"),
    "samg-bound": ("tab:brown", "v"),
    "samg-linear": ("tab:purple", "D"),
    "apg": ("tab:blue", "P"),
    "cfg-rescale": ("tab:cyan", "X"),
    "cfgpp": ("tab:green", "*"),
    "interval": ("tab:olive", "h"),
    "scfg": ("tab:gray", "<"),
}


def write_csv(rows: Sequence[dict], path: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def read_csv(path: Path) -> list[dict]:
    """Rows written by `write_csv`, numbers back as int/float (to re-render tables without re-sampling)."""
    def parse(text: str):
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    with open(path, newline="") as f:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def pareto_front(rows: Sequence[dict], x: str, y: str, *, maximize_x: bool, maximize_y: bool) -> list[dict]:
    """Rows not dominated on (x, y): no other row is at least as good on both and better on one."""
    sx = 1 if maximize_x else -1
    sy = 1 if maximize_y else -1
    finite = [r for r in rows if all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for k in (x, y))]
    front = []
    for r in finite:
        dominated = any(
            sx * o[x] >= sx * r[x] and sy * o[y] >= sy * r[y] and (sx * o[x] > sx * r[x] or sy * o[y] > sy * r[y])
            for o in finite
        )
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: r[x])


def family(row: dict) -> str:
    """The line a row belongs to in the plots (SAMG with smoothing drawn apart)."""
    if row["rule"] == "samg" and row.get("smooth", 0):
        return "samg-smooth"
    return row["rule"]


def plot_metrics_vs_scale(rows: Sequence[dict], metrics: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(metrics)
    cols = min(3, n)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(5 * cols, 3.6 * math.ceil(n / cols)), squeeze=False)
    families = list(dict.fromkeys(family(r) for r in rows))
    for ax, metric in zip(axes.flat, metrics):
        for fam in families:
            pts = sorted((r["mean_scale"], r[metric]) for r in rows if family(r) == fam and _finite(r.get(metric)))
            if not pts:
                continue
            color, marker = FAMILY_STYLE.get(fam, ("tab:gray", "."))
            # only CFG is one curve; other families mix several parameters, so joining them would zigzag
            style = "-" if fam == "cfg" else "none"
            ax.plot(*zip(*pts), linestyle=style, color=color, marker=marker, ms=4, lw=1.5, label=fam, alpha=0.85)
        ax.set_xlabel("mean effective scale  mean_p w(p)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def plot_pareto(rows: Sequence[dict], pairs: Iterable[tuple[str, str, bool, bool]], path: Path, title: str) -> None:
    """One panel per (x, y, maximize_x, maximize_y): all points by family, the front drawn as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(pairs)
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 4.2), squeeze=False)
    for ax, (x, y, mx, my) in zip(axes.flat, pairs):
        for fam in dict.fromkeys(family(r) for r in rows):
            pts = [(r[x], r[y]) for r in rows if family(r) == fam and _finite(r.get(x)) and _finite(r.get(y))]
            if pts:
                color, marker = FAMILY_STYLE.get(fam, ("tab:gray", "."))
                ax.scatter(*zip(*pts), color=color, marker=marker, s=18, label=fam, alpha=0.8)
        front = pareto_front(rows, x, y, maximize_x=mx, maximize_y=my)
        if front:
            ax.plot([r[x] for r in front], [r[y] for r in front], "k--", lw=1, label="Pareto front")
        ax.set_xlabel(f"{x} ({'higher' if mx else 'lower'} is better)")
        ax.set_ylabel(f"{y} ({'higher' if my else 'lower'} is better)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def matched_scale_table(
    rows: Sequence[dict], metrics: Sequence[str], *, reference: str = "cfg", scale_key: str = "mean_scale"
) -> list[dict]:
    """Each non-CFG row next to plain CFG interpolated at the same mean effective scale.

    CFG is swept over scales, so its metrics are linearly interpolated at the row's mean scale;
    rows outside the CFG sweep's range are left out (no extrapolation).
    """
    ref = sorted((r for r in rows if r["rule"] == reference), key=lambda r: r[scale_key])
    out = []
    if len(ref) < 2:
        return out
    xs = [r[scale_key] for r in ref]
    for r in rows:
        if r["rule"] == reference or not _finite(r.get(scale_key)) or not (xs[0] <= r[scale_key] <= xs[-1]):
            continue
        entry = {"rule": r["rule"], "setting": r["setting"], scale_key: r[scale_key]}
        for m in metrics:
            ys = [q[m] for q in ref]
            entry[m] = r[m]
            entry[f"cfg_{m}"] = _interp(r[scale_key], xs, ys)
        out.append(entry)
    return out


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """Mean, sample std (ddof 1) and the Student-t interval of the mean of `values` (one per seed).

    With fewer than two finite values the spread is unknown: std and bounds are NaN (never resolved)."""
    from scipy import stats

    v = [float(x) for x in values if _finite(x)]
    n = len(v)
    mean = sum(v) / n if n else float("nan")
    if n < 2:
        return {"mean": mean, "std": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": n}
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "lo": mean - half, "hi": mean + half, "n": n}


def resolved(iv: dict) -> bool:
    """True when the interval excludes zero (the sign of the difference is settled by the data)."""
    return _finite(iv["lo"]) and _finite(iv["hi"]) and (iv["lo"] > 0 or iv["hi"] < 0)


def by_seed(rows: Sequence[dict]) -> dict:
    """Rows grouped by their `seed` (rows without one form a single group)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(r.get("seed", 0), []).append(r)
    return groups


def seed_summary(rows: Sequence[dict], columns: Sequence[str]) -> list[dict]:
    """One row per (rule, setting): the mean of each column over seeds and its std (`<column>_std`)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["rule"], r["setting"]), []).append(r)
    out = []
    for (rule, setting), rs in groups.items():
        entry = {"rule": rule, "setting": setting, "seeds": len(rs)}
        for c in columns:
            iv = interval([r.get(c) for r in rs])
            entry[c], entry[f"{c}_std"] = iv["mean"], iv["std"]
        if "smooth" in rs[0]:
            entry["smooth"] = rs[0]["smooth"]
        out.append(entry)
    return out


def matched_differences(rows: Sequence[dict], metrics: Sequence[str], *, scale_key: str = "energy_weighted_scale",
                        relative: Sequence[str] = ()) -> list[dict]:
    """Each non-CFG setting minus CFG interpolated at its scale, paired within each seed, over seeds.

    Within a seed every setting starts from the same noise, so the difference is taken there and its
    spread over seeds is the spread of the claim. `d_<m>` is the interval (see `interval`) of
    rule − CFG; for metrics in `relative` also `r_<m>`: rule / CFG − 1. A setting enters only the
    seeds where its scale falls inside CFG's sweep (`seeds` counts them)."""
    per_setting: dict = {}
    for seed_rows in by_seed(rows).values():
        for e in matched_scale_table(seed_rows, metrics, scale_key=scale_key):
            per_setting.setdefault((e["rule"], e["setting"]), []).append(e)
    out = []
    for (rule, setting), es in per_setting.items():
        scale = interval([e[scale_key] for e in es])
        entry = {"rule": rule, "setting": setting, "seeds": len(es), scale_key: scale["mean"],
                 f"{scale_key}_std": scale["std"]}
        for m in metrics:
            entry[f"d_{m}"] = interval([e[m] - e[f"cfg_{m}"] for e in es])
            if m in relative:
                entry[f"r_{m}"] = interval([e[m] / e[f"cfg_{m}"] - 1 for e in es if e[f"cfg_{m}"] != 0])
        out.append(entry)
    return out


def contrast(rows: Sequence[dict], metrics: Sequence[str], a: tuple[str, str], b: tuple[str, str], *,
             scale_key: str = "energy_weighted_scale", relative: Sequence[str] = ()) -> dict | None:
    """Setting `a` against setting `b`, each first against CFG at its own matched scale, per seed.

    (a − CFG(scale_a)) − (b − CFG(scale_b)): which of two settings is closer to or further past CFG,
    with its interval over seeds. None when the two are never matched in the same seed."""
    pairs = []
    for seed_rows in by_seed(rows).values():
        es = {(e["rule"], e["setting"]): e for e in matched_scale_table(seed_rows, metrics, scale_key=scale_key)}
        if a in es and b in es:
            pairs.append((es[a], es[b]))
    if not pairs:
        return None
    entry = {"a": " ".join(a), "b": " ".join(b), "seeds": len(pairs)}
    for m in metrics:
        entry[f"d_{m}"] = interval([(ea[m] - ea[f"cfg_{m}"]) - (eb[m] - eb[f"cfg_{m}"]) for ea, eb in pairs])
        if m in relative:
            entry[f"r_{m}"] = interval([(ea[m] / ea[f"cfg_{m}"]) - (eb[m] / eb[f"cfg_{m}"]) for ea, eb in pairs
                                        if ea[f"cfg_{m}"] != 0 and eb[f"cfg_{m}"] != 0])
    return entry


def smoothing_contrasts(rows: Sequence[dict], metrics: Sequence[str], *, relative: Sequence[str] = ()) -> list[dict]:
    """SAMG `(a,b) smooth` minus SAMG `(a,b)`, each against CFG at its own energy-weighted scale (`contrast`)."""
    settings = {(r["rule"], r["setting"]) for r in rows}
    out = []
    for rule, label in dict.fromkeys((r["rule"], r["setting"]) for r in rows):
        plain = label[: -len(" smooth")]
        if rule == "samg" and label.endswith(" smooth") and (rule, plain) in settings:
            c = contrast(rows, metrics, (rule, label), (rule, plain), relative=relative)
            if c is not None:
                out.append(c)
    return out


def format_interval(iv: dict, digits: int = 3, scale: float = 1.0) -> str:
    """`+0.012 [−0.004, +0.028]`; bold when the interval excludes zero; the bare mean with one seed."""
    m = iv["mean"] * scale
    if not _finite(iv["lo"]):
        return f"{m:+.{digits}g}"
    text = f"{m:+.{digits}g} [{iv['lo'] * scale:+.{digits}g}, {iv['hi'] * scale:+.{digits}g}]"
    return f"**{text}**" if resolved(iv) else text


def interval_table(entries: Sequence[dict], columns: Sequence[tuple[str, str, float]]) -> str:
    """Markdown table of `matched_differences` / `contrast` entries; columns are (key, header, scale)."""
    head = [k for k in ("rule", "setting", "a", "b", "seeds") if entries and k in entries[0]]
    lines = ["| " + " | ".join(head + [h for _, h, _ in columns]) + " |", "|" + "---|" * (len(head) + len(columns))]
    for e in entries:
        cells = [_fmt(e[k]) for k in head]
        for key, _, scale in columns:
            v = e.get(key)
            cells.append(format_interval(v, scale=scale) if isinstance(v, dict) else _fmt(v) if v is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
