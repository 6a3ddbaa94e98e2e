"""Shared output of the quality benchmarks: CSV, markdown table, metric-vs-scale plots, Pareto fronts.

Rows are flat dicts. Every row carries `rule`, `setting` (a short label of its parameters) and
`mean_scale` (the mean effective scale mean_p w(p), or the nominal scale for rules without a scale
map), so every method is compared with plain CFG at matched effective scale.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Iterable, Sequence

from samg.io import atomic_path, atomic_write_bytes

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
