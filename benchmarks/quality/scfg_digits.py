"""S-CFG on the bundled `samg-digits` model: what it segments, and how it compares with plain CFG.

    python -m benchmarks.quality.scfg_digits masks --out docs/images/scfg_masks.png
    python -m benchmarks.quality.scfg_digits sweep [--quick]

`masks` samples a few prompts with the torch reference (diffusers pipeline + attention capture,
`samg.scfg.capture`) and draws, at a few steps, the decoded x0 estimate, the token whose aggregated
attention map is largest at each latent location (background, where the start-of-text token wins,
shaded), and the per-location scale w·rate(p). With `--export DIR` (an `samg export --guidance scfg`
folder of the same model) it also runs the exported graph on the same inputs and reports the largest
difference of the guided prediction.

`sweep` generates with the exported S-CFG denoiser on ONNX Runtime at several w and scores the samples
with the metrics of `benchmarks.quality.digits`, next to a plain-CFG sweep from the same noise. The
graph returns only the guided prediction, so the benchmark runs a copy of it whose two predictions
`u`, `c` (the inputs of the SemanticCombine node) are also graph outputs, and measures the applied
scale per location from the graph's own output: w·rate(p) = <guided − u, Δ> / |Δ|² with Δ = c − u.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.quality import digits, report
from samg.demo import PROBE_OUTPUTS
from samg.errors import SamgError, check

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_MASKS_PNG = REPO / "docs" / "images" / "scfg_masks.png"
MASK_PROMPTS = ("a handwritten 0", "a handwritten 4", "a handwritten 7")


def sweep_scales(quick: bool) -> list[float]:
    """S-CFG w values: the applied scale is w·rate(p) with rate in [0.8, 3], so w stays moderate."""
    return [1.5, 2.5, 4.0, 6.0] if quick else [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.5]


# ------------------------------------------------------------------------- masks (torch reference)


@dataclass
class StepView:
    """What S-CFG saw and did at one sampling step, for every prompt of the batch."""

    step: int
    sigma: float
    x0_images: np.ndarray  # [N, H, W, 3] in [0, 1], the decoded x0 estimate of the guided prediction
    token_of_max: np.ndarray  # [N, h, w] int: index of the token whose normalized map is largest
    foreground: np.ndarray  # [N, h, w] bool: where the non-start tokens' map beats the start-of-text map
    scale_map: np.ndarray  # [N, H, W] float: w·rate(p), the scale applied per latent location
    token_gap: np.ndarray  # [N]: median relative gap between the largest and second token map
    map_contrast: np.ndarray  # [N]: spatial std of the normalized token maps (mean over tokens)
    onnx_inputs: dict = field(default_factory=dict)  # the denoiser graph's feeds at this step
    guided: np.ndarray | None = None  # torch reference guided prediction [N, C, H, W]
    pred_uncond: np.ndarray | None = None  # the reference's two predictions [N, C, H, W]
    pred_cond: np.ndarray | None = None
    token_maps: np.ndarray | None = None  # semantic_maps of both halves: [2N, T, h, w], [2N, 2, h, w]
    fore_maps: np.ndarray | None = None


@dataclass
class MaskTrace:
    prompts: list[str]
    tokens: list[list[str]]  # per prompt, the token strings of every position
    scale: float
    factors: tuple[int, ...]
    steps: int
    views: list[StepView]


def load_diffusers_pipeline(model_dir: Path):
    """The samg-digits or samg-shapes diffusers pipeline (float32, CPU), or a SamgError naming the fix."""
    from samg.errors import require

    require("torch", "to draw S-CFG masks")
    diffusers = require("diffusers", "to draw S-CFG masks")
    if not (Path(model_dir) / "model_index.json").is_file():
        raise SamgError(f"{model_dir} is not a diffusers pipeline folder: train it with scripts/train_digits.py "
                        "or pass --model-path")
    from samg.export import from_pretrained

    pipe = from_pretrained(diffusers.StableDiffusionPipeline, str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def shown_steps(steps: int, count: int) -> list[int]:
    """`count` step indices spread evenly from the first to the last step."""
    return sorted({int(round(s)) for s in np.linspace(0, steps - 1, max(1, min(count, steps)))})


def trace_masks(pipe, prompts=MASK_PROMPTS, *, scale: float = 5.0, steps: int = 20, show: int = 4,
                seed: int = 0) -> MaskTrace:
    """Sample `prompts` with the torch S-CFG reference (the runtime's Euler sampler and sigmas for the
    model's scheduler) and record masks, scale maps and x0 estimates at `show` steps."""
    import torch

    from samg.contract import scheduler_recipe
    from samg.runtime import samplers, schedules
    from samg.scfg.capture import install_capture, scfg_unet_step
    from samg.scfg.reference import scfg_combine, semantic_maps, semantic_masks

    check(pipe.scheduler.config.get("prediction_type", "epsilon") == "epsilon",
          "the mask picture decodes x0 for epsilon-prediction models only")
    schedule = schedules.make_schedule(scheduler_recipe(dict(pipe.scheduler.config)), "euler", steps)
    unet, vae, tok = pipe.unet.eval(), pipe.vae.eval(), pipe.tokenizer
    store, factors = install_capture(unet)
    n = len(prompts)
    ids = tok([""] + list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    tokens = [tok.convert_ids_to_tokens(row.tolist()) for row in ids[1:]]
    latent_hw = (unet.config.sample_size, unet.config.sample_size)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, unet.config.in_channels, *latent_hw, generator=gen)
    keep = set(shown_steps(steps, show))
    views = []
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0]
        cond = torch.cat([emb[:1].expand(n, -1, -1), emb[1:]])  # [2N, L, D], unconditional first

        def denoise(x_np: np.ndarray, sigma: float, i: int) -> np.ndarray:
            x = torch.from_numpy(np.asarray(x_np, np.float32))
            model_in = x / float(np.sqrt(1.0 + sigma**2))  # the epsilon model's input (as GuidedDenoiser feeds it)
            timestep = torch.full((n,), float(schedule.timestep_for(sigma)), dtype=torch.float32)
            guided, (u, c, self_maps, cross_maps) = scfg_unet_step(
                unet, store, factors, model_in, timestep, cond, scale, return_parts=True)
            x0 = x - sigma * guided
            if i in keep:
                token_maps, fore_maps = semantic_maps(self_maps, cross_maps, latent_hw, factors=factors)
                _, fore = semantic_masks(self_maps, cross_maps, latent_hw, factors=factors)
                _, rate = scfg_combine(u, c, self_maps, cross_maps, scale, factors=factors, return_rate=True)
                cond_maps = token_maps[n:]
                top2 = cond_maps.topk(min(2, cond_maps.shape[1]), dim=1).values
                gap = (top2[:, 0] - top2[:, -1]) / top2[:, 0]
                image = vae.decode(x0 / vae.config.scaling_factor).sample.clamp(-1, 1)
                views.append(StepView(
                    step=i, sigma=sigma,
                    x0_images=(image.permute(0, 2, 3, 1).numpy() + 1) / 2,
                    token_of_max=token_maps[n:].argmax(1).numpy(),  # masks come from the conditional half
                    foreground=fore[:, 0].numpy() > 0.5,  # from the unconditional half (the code's quirk)
                    scale_map=scale * rate[:, 0].numpy(),
                    token_gap=gap.flatten(1).median(1).values.numpy(),
                    map_contrast=cond_maps.std(dim=(2, 3)).mean(1).numpy(),
                    onnx_inputs={"latents": model_in.numpy(), "timestep": timestep.numpy(),
                                 "encoder_hidden_states": cond.numpy(),
                                 "guidance_scales": np.full((n, 2), scale, np.float32)},
                    guided=guided.numpy(), pred_uncond=u.numpy(), pred_cond=c.numpy(),
                    token_maps=token_maps.numpy(), fore_maps=fore_maps.numpy(),
                ))
            return x0.numpy()

        x = noise.numpy() * np.float32(schedule.init_noise_sigma)
        samplers.sample_euler(denoise, x, schedule.sigmas)
    return MaskTrace(list(prompts), tokens, float(scale), tuple(factors), steps, views)


def graph_runs(trace: MaskTrace, export_dir: Path) -> list[dict]:
    """The exported scfg graph (ONNX Runtime) on every traced step's inputs: its outputs by name, with
    its own mask decisions (`samg.scfg.compare.probe_session`)."""
    from samg.contract import read_export
    from samg.scfg.compare import probe_session, run_probe

    manifest = read_export(export_dir)
    if manifest.mode != "scfg":
        raise SamgError(f"{export_dir} is a {manifest.mode!r} export: pass an export made with "
                        "`samg export --model digits --guidance scfg`")
    session = probe_session(Path(export_dir) / manifest.denoiser.file)
    return [run_probe(session, view.onnx_inputs) for view in trace.views]


def view_check(view: StepView, outputs: dict):
    """`samg.scfg.compare.tie_safe_check` of a graph run (`outputs`: guided and the graph's masks) against
    the torch reference of one traced step."""
    from samg.scfg.compare import PROBE_FORE_MASK, PROBE_TOKEN_MASK, tie_safe_check

    return tie_safe_check(view.pred_uncond, view.pred_cond, view.onnx_inputs["guidance_scales"], view.token_maps,
                          view.fore_maps, outputs[PROBE_TOKEN_MASK], outputs[PROBE_FORE_MASK], outputs["guided"])


def onnx_agreement(trace: MaskTrace, export_dir: Path):
    """The exported graph against the torch reference over the traced steps, tie-safe
    (`samg.scfg.compare.tie_safe_check`: its masks a valid arg-max of the reference's maps, its output
    the reference combine given those masks). Returns the worst step's check (largest error, smallest
    decided fraction, total invalid mask locations)."""
    from samg.scfg.compare import TieSafeCheck

    checks = [view_check(view, outputs) for view, outputs in zip(trace.views, graph_runs(trace, export_dir))]
    return TieSafeCheck(max((c.error for c in checks), default=0.0), sum(c.invalid_locations for c in checks),
                        min((c.decided_fraction for c in checks), default=1.0))


def token_label(token: str, position: int) -> str:
    return f"{position}: {token}" + (" (start of text)" if position == 0 else "")


def plot_masks(trace: MaskTrace, path: Path, *, note: str = "") -> None:
    """One block per prompt: x0 estimate, token of the largest map, and w·rate(p), at each traced step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    n, cols = len(trace.prompts), len(trace.views)
    num_tokens = len(trace.tokens[0])
    palette = list(plt.get_cmap("tab10").colors) + list(plt.get_cmap("Set3").colors)
    if num_tokens > len(palette):  # long token sequences (CLIP's 77): distinct hues, legend shows winners only
        palette = [plt.get_cmap("hsv")(i / num_tokens) for i in range(num_tokens)]
    cmap = ListedColormap(palette[:num_tokens])
    # one colour range for every scale panel, from the data (the clamps allow 0.8 w .. min(3 w, 15))
    lo = min(float(v.scale_map.min()) for v in trace.views)
    hi = max(max(float(v.scale_map.max()) for v in trace.views), lo + 1e-3)
    fig, axes = plt.subplots(3 * n, cols + 1, figsize=(1.2 * cols + 2.3, 1.3 * 3 * n + 0.4),
                             gridspec_kw={"width_ratios": [1] * cols + [1.9]}, squeeze=False)
    rows_names = ("x0 estimate", "token of\nlargest map", "w·rate(p)")
    for p in range(n):
        for col, view in enumerate(trace.views):
            a_img, a_tok, a_rate = (axes[3 * p + k, col] for k in range(3))
            a_img.imshow(view.x0_images[p], interpolation="nearest")
            a_img.set_title(f"step {view.step + 1}/{trace.steps}\nσ={view.sigma:.2f}", fontsize=8)
            a_tok.imshow(view.token_of_max[p], cmap=cmap, vmin=-0.5, vmax=num_tokens - 0.5, interpolation="nearest")
            # background (start-of-text wins): hatched dark overlay, so the foreground stands out
            background = np.ma.masked_where(view.foreground[p], np.ones_like(view.token_of_max[p], float))
            a_tok.imshow(background, cmap=ListedColormap(["black"]), alpha=0.55, interpolation="nearest")
            a_tok.set_title(f"map contrast {view.map_contrast[p]:.0e}", fontsize=7)
            im = a_rate.imshow(view.scale_map[p], cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
            a_rate.set_title(f"mean {view.scale_map[p].mean():.2f}", fontsize=8)
            for k, ax in enumerate((a_img, a_tok, a_rate)):
                ax.set_xticks([])
                ax.set_yticks([])
                if col == 0:
                    ax.set_ylabel(rows_names[k], fontsize=8)
        side_img, side_tok, side_rate = (axes[3 * p + k, cols] for k in range(3))
        side_img.axis("off")
        side_img.text(0.0, 0.5, f"“{trace.prompts[p]}”", fontsize=10, fontweight="bold", ha="left", va="center",
                      transform=side_img.transAxes)
        side_tok.axis("off")
        winners = set(np.unique([v.token_of_max[p] for v in trace.views]).tolist()) | {0}
        shown = [i for i in range(num_tokens) if num_tokens <= 20 or i in winners][:24]
        handles = [Patch(color=palette[i], label=token_label(trace.tokens[p][i], i)) for i in shown]
        handles.append(Patch(facecolor=(0, 0, 0, 0.55), label="darkened: background\n(start of text wins)"))
        side_tok.legend(handles=handles, loc="center left", fontsize=6.5, frameon=False, borderaxespad=0)
        side_rate.axis("off")
        bar = fig.colorbar(im, cax=side_rate.inset_axes((0.02, 0.05, 0.1, 0.9)))
        bar.set_label("w·rate(p)", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    levels = " and ".join(f"{f}" for f in trace.factors)
    fig.suptitle(f"S-CFG on samg-digits: w = {trace.scale:g}, Euler {trace.steps} steps; "
                 f"maps from the UNet levels at downsampling factors {levels}", fontsize=9)
    if note:
        fig.text(0.01, 0.003, note, fontsize=7, ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.015, 1, 0.985))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    report._save(fig, path)


def masks_main(a) -> int:
    import torch

    torch.set_num_threads(a.threads)
    pipe = load_diffusers_pipeline(a.model_path)
    trace = trace_masks(pipe, a.prompt or MASK_PROMPTS, scale=a.scale, steps=a.steps, show=a.show, seed=a.seed)
    note = ""
    if a.export:
        agreement = onnx_agreement(trace, a.export)
        note = (f"exported S-CFG graph (ONNX Runtime) vs this torch reference, same inputs, given the graph's masks: "
                f"max rel. difference {agreement.error:.1e} (masks decided at >= {agreement.decided_fraction:.0%})")
        print(note)
    plot_masks(trace, a.out, note=note)
    print(f"wrote {a.out} (levels {trace.factors}, {len(trace.views)} steps shown)")
    return 0


# ------------------------------------------------------------------------- sweep (ONNX Runtime)


def probe_model(denoiser_onnx: Path, out: Path) -> Path:
    """A copy of the S-CFG denoiser whose SemanticCombine inputs u and c are extra graph outputs."""
    from samg.demo import probe_graph
    from samg.scfg.op import DOMAIN, OP_TYPE

    return probe_graph(denoiser_onnx, out, ops={(DOMAIN, OP_TYPE)}, fix="pass an export made with --guidance scfg")


def applied_scale(u: np.ndarray, c: np.ndarray, guided: np.ndarray) -> tuple[float, float]:
    """(mean_p s(p), energy-weighted mean) of the per-location scale s with guided = u + s(p)·(c − u).

    s(p) = <guided − u, Δ>(p) / |Δ(p)|² (exact for S-CFG up to rounding); locations where Δ vanishes
    carry no guidance and are left out of the plain mean."""
    delta = c.astype(np.float64) - u
    step = guided.astype(np.float64) - u
    energy = (delta * delta).sum(1)  # [B, H, W]
    inner = (step * delta).sum(1)
    valid = energy > 1e-12 * max(float(energy.mean()), 1e-30)
    mean = float((inner[valid] / energy[valid]).mean()) if valid.any() else float("nan")
    weighted = float(inner.sum() / max(float(energy.sum()), 1e-30))
    return mean, weighted


class ScaleProbeRunner:
    """Runner over the probe graph: returns `guided` and records the applied scale of every call."""

    def __init__(self, probe_onnx: Path, threads: int | None = None):
        from samg.runners import open_runner

        self.inner = open_runner(probe_onnx, "onnxruntime", "cpu", **({"threads": threads} if threads else {}))
        self.input_names = self.inner.input_names
        self.output_names = ["guided"]
        self.records: list[tuple[int, float, float]] = []  # (batch, mean scale, energy-weighted scale)

    def run(self, feeds):
        outs = self.inner.run(feeds)
        u, c, guided = (np.asarray(outs[k], np.float32) for k in (*PROBE_OUTPUTS, "guided"))
        self.records.append((len(guided), *applied_scale(u, c, guided)))
        return {"guided": guided}

    def summary(self) -> tuple[float, float]:
        """Means over every call (steps and batches), weighted by batch size."""
        n = np.array([r[0] for r in self.records], float)
        stats = np.array([r[1:] for r in self.records], float)
        return tuple(float(v) for v in (n[:, None] * stats).sum(0) / n.sum())


def scfg_rows(quick: bool, *, model_dir: Path = digits.DEFAULT_MODEL, cache: Path = digits.DEFAULT_CACHE,
              per_digit: int | None = None, steps: int | None = None, seed: int = 0, scales=None,
              classifier_dir: Path | None = None, progress: bool = True, export_dir: Path | None = None) -> list[dict]:
    """S-CFG rows (rule "scfg", setting "w=…") scored like `benchmarks.quality.digits` rows, from the
    exported S-CFG graph on ONNX Runtime. Same sample count, steps, prompts and noise as `digits.run`.
    `export_dir`: an existing scfg export to use instead of exporting `model_dir` into `cache`."""
    from tqdm import tqdm

    from samg.bundled import CLASSIFIER_DIR, load_digit_classifier
    from samg.runtime.pipeline import Pipeline

    per_digit = per_digit or (10 if quick else 24)
    steps = steps or (16 if quick else 20)
    scales = sweep_scales(quick) if scales is None else scales
    if export_dir is None:
        export_dir = digits.ensure_export(Path(model_dir), Path(cache), "scfg")
    export_dir = Path(export_dir)
    from samg.contract import read_export
    from samg.io import sha256_file

    # keyed by the graph's hash, so a re-export gets a fresh probe and export folders stay untouched
    graph = read_export(export_dir).denoiser.file
    probe = Path(cache) / "scfg-probes" / sha256_file(export_dir / graph)[:16] / graph
    if not probe.is_file():
        probe_model(export_dir / graph, probe)
    classify = load_digit_classifier(directory=classifier_dir or CLASSIFIER_DIR)
    ref = digits.reference_stats(classify)
    pipe = Pipeline.load(export_dir)
    labels = np.repeat(np.arange(digits.NUM_DIGITS), per_digit)
    lat = pipe.latent
    noise = np.random.default_rng(seed).standard_normal(
        (len(labels), lat.channels, lat.latent_height, lat.latent_width), dtype=np.float32)
    rows = []
    for w in tqdm(scales, desc="scfg sweep", file=sys.stderr, disable=not progress):
        probe_runner = ScaleProbeRunner(probe)
        pipe.runners["denoiser"] = probe_runner
        images, _, _ = digits.generate(pipe, "scfg", {"scale": float(w)}, labels, noise, steps)
        mean_scale, weighted = probe_runner.summary()
        row = {"rule": "scfg", "setting": f"w={w:g}", "mean_scale": mean_scale, "energy_weighted_scale": weighted}
        row.update(digits.score(images, labels, classify, ref))
        row["nominal_scale"] = float(w)
        rows.append(row)
    return rows


def cfg_settings(quick: bool) -> list:
    return [s for s in digits.sweep(quick) if s[0] == "cfg"]


def write_sweep(rows: list[dict], out_dir: Path, *, quick: bool, facts: dict) -> Path:
    from samg.io import atomic_write_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "scfg_digits_quick" if quick else "scfg_digits"
    report.write_csv(rows, out_dir / f"{stem}.csv")
    key = ["alignment", "fd", "diversity", "saturation"]
    cols = ["rule", "setting", "mean_scale", "energy_weighted_scale", *digits.METRICS]
    matched = report.matched_scale_table(rows, key)
    matched_w = report.matched_scale_table(rows, key, scale_key="energy_weighted_scale")
    command = "python -m benchmarks.quality.scfg_digits sweep" + (" --quick" if quick else "")
    fact_text = report.facts_text(facts)
    text = [
        "# S-CFG on samg-digits (exported graph, ONNX Runtime) vs plain CFG\n",
        f"Generated by `{command}`: {fact_text}. Prompts `{digits.PROMPT}` for d = 0..9, the same noise "
        "for every setting. S-CFG's mean_scale is mean_p w·rate(p), measured from the graph's own output.\n",
        "## All settings\n", report.markdown_table(rows, cols),
        "\n## S-CFG against plain CFG at the same mean effective scale (CFG interpolated)\n",
        report.markdown_table(matched, list(matched[0]) if matched else ["rule"]),
        "\n## S-CFG against plain CFG at the same energy-weighted scale (CFG interpolated)\n",
        report.markdown_table(matched_w, list(matched_w[0]) if matched_w else ["rule"]),
        "\n## Summary\n", summarize(rows),
    ]
    atomic_write_bytes(out_dir / f"{stem}.md", "\n".join(text).encode())
    report.plot_metrics_vs_scale(rows, digits.METRICS, out_dir / f"{stem}_metrics.png",
                                 "samg-digits: S-CFG vs CFG, metrics vs mean effective scale")
    return out_dir / f"{stem}.md"


def summarize(rows: list[dict]) -> str:
    """Plain-language comparison with CFG at matched scale, under both scale conventions."""
    lines = []
    for scale_key, name in (("mean_scale", "mean effective scale mean_p w·rate(p)"),
                            ("energy_weighted_scale", "energy-weighted scale")):
        matched = report.matched_scale_table(rows, ["alignment", "fd", "saturation"], scale_key=scale_key)
        if not matched:
            lines.append(f"No S-CFG setting falls inside the CFG sweep's range of {name}.")
            continue
        parts = []
        for metric, up in (("alignment", True), ("fd", False), ("saturation", False)):
            diff = [(r[metric] - r[f"cfg_{metric}"]) * (1 if up else -1) for r in matched]
            parts.append(f"{metric} better/equal/worse {sum(d > 0 for d in diff)}/{sum(d == 0 for d in diff)}/"
                         f"{sum(d < 0 for d in diff)}")
        fd_ratio = [r["fd"] / r["cfg_fd"] for r in matched if r["cfg_fd"] > 0]
        align = [r["alignment"] - r["cfg_alignment"] for r in matched]
        lines.append(f"At matched {name}, {len(matched)} S-CFG settings vs CFG: {'; '.join(parts)}; "
                     f"FD ratio S-CFG/CFG {min(fd_ratio):.3f}–{max(fd_ratio):.3f}; "
                     f"alignment difference {min(align):+.3f} to {max(align):+.3f}.")
    return "\n\n".join(lines) + "\n"


def sweep_main(a) -> int:
    t0 = time.perf_counter()
    kw = dict(model_dir=a.model_path, cache=a.cache, per_digit=a.per_digit, steps=a.steps, seed=a.seed,
              classifier_dir=a.classifier_dir)
    rows = scfg_rows(a.quick, progress=not a.quiet, **kw)
    cfg_rows, _, facts = digits.run(a.quick, a.out, settings=cfg_settings(a.quick), fused_checks=[], write=False,
                                    progress=not a.quiet, **kw)
    facts = {**facts, "seconds": time.perf_counter() - t0}
    path = write_sweep(cfg_rows + rows, a.out, quick=a.quick, facts=facts)
    print(f"wrote {path}: {len(rows)} S-CFG settings, {len(cfg_rows)} CFG settings; {facts['seconds']:.0f} s")
    print(summarize(cfg_rows + rows).strip())
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("masks", help="picture of S-CFG's token masks and scale maps (torch reference)")
    m.add_argument("--out", type=Path, default=DEFAULT_MASKS_PNG)
    m.add_argument("--model-path", type=Path, default=digits.DEFAULT_MODEL, help="diffusers pipeline folder")
    m.add_argument("--export", type=Path, default=None,
                   help="an scfg export of the same model: also check the ONNX graph on the same inputs")
    m.add_argument("--prompt", action="append", help="prompt (repeat for several; default: three digits)")
    m.add_argument("--scale", type=float, default=5.0)
    m.add_argument("--steps", type=int, default=20)
    m.add_argument("--show", type=int, default=4, help="how many steps to show")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--threads", type=int, default=1)
    s = sub.add_parser("sweep", help="S-CFG rows at several scales vs a CFG sweep (exported graph, ONNX Runtime)")
    report.add_output_args(s)
    s.add_argument("--model-path", type=Path, default=digits.DEFAULT_MODEL)
    s.add_argument("--classifier-dir", type=Path, default=None)
    s.add_argument("--cache", type=Path, default=digits.DEFAULT_CACHE)
    s.add_argument("--per-digit", type=int, default=None)
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.command == "masks":
        if a.steps < 1 or a.show < 1:
            raise SamgError("--steps and --show must be at least 1")
        return masks_main(a)
    if a.per_digit is not None and a.per_digit < 2:
        raise SamgError("--per-digit must be at least 2 (diversity and FD need pairs)")
    return sweep_main(report.resolve_out(a))


if __name__ == "__main__":
    report.run_cli(main)
