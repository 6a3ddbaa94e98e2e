"""`samg demo`: the main job on the embedded default — export the bundled samg-shapes model (fused
SAMG combine, and an S-CFG graph), run it on ONNX Runtime (CPU), and write one PNG grid comparing
plain CFG, SAMG and S-CFG across guidance strengths, with the scale each rule applied beside every image.

Rows are prompts; columns are (rule, strength). Next to each cell's images is the scale map w(p) the
rule applied, averaged over the sampling steps, for the cell's first image: read from the graph itself
(the combine node's two predictions u, c are exposed as extra outputs of a probe copy of the denoiser,
and w(p) = <guided - u, c - u> / |c - u|², exact for all three rules). All maps share one colour scale.
`--model digits` runs the same grid on the older samg-digits model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Per bundled model: default prompts and the strength ladder, (CFG scale, SAMG (w_min, w_max), S-CFG w).
# SAMG's pair straddles the CFG scale of its column; S-CFG applies w·rate(p) with rate about 0.8..3,
# so its w sits lower. The applied mean scale of every cell is printed and drawn.
MODELS = {
    "shapes": {
        "prompts": ["a red circle at the top left", "a blue square in the center", "a yellow triangle at the bottom",
                    "a green square at the top right and a magenta circle at the bottom left"],
        "ladder": [(2.0, (1.0, 3.0), 1.5), (5.0, (3.0, 8.0), 2.5), (9.0, (5.0, 14.0), 4.0)],
    },
    "digits": {
        "prompts": ["a handwritten 3", "the digit seven", "a bold 5", "0"],
        "ladder": [(2.0, (1.0, 3.0), 1.5), (5.0, (3.0, 7.0), 2.5), (10.0, (5.0, 14.0), 4.0)],
    },
}
RULES = ("cfg", "samg", "scfg")
RULE_TITLES = {"cfg": "CFG", "samg": "SAMG", "scfg": "S-CFG"}
PROBE_OUTPUTS = ("probe_pred_uncond", "probe_pred_cond")
COMBINE_OPS = {("samg", "GuidanceCombine"), ("samg", "SemanticCombine")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="out/demo", help="output folder (exports and grid); default out/demo")
    parser.add_argument("--model", choices=sorted(MODELS), default="shapes",
                        help="bundled model to run (default shapes)")
    parser.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT",
                        help="a prompt (repeatable); default: four prompts of the model")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    parser.add_argument("--images", type=int, default=1, help="images per grid cell (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-path", default=None, help="the model's pipeline folder (default: the bundled one)")
    parser.add_argument("--reexport", action="store_true", help="export again even if OUT/export exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from samg.errors import check

    check(args.steps > 0, f"--steps must be positive, got {args.steps}")
    check(args.images > 0, f"--images must be positive, got {args.images}")
    out = Path(args.out)
    check(not out.exists() or out.is_dir(), f"--out {out} is a file: pass a folder for the exports and grid.png")
    check(not (out / "grid.png").is_dir(), f"{out / 'grid.png'} is a folder: move it away or pick another --out")
    model = MODELS[args.model]
    exports = {kind: _ensure_export(args, out / name, kind)
               for kind, name in (("fused", "export"), ("scfg", "export-scfg"))}

    from samg.runtime.pipeline import Pipeline

    pipes = {}
    for kind, folder in exports.items():
        pipe = Pipeline.load(folder, backend="onnxruntime", device="cpu")
        graph = pipe.export.denoiser.file
        pipe.runners["denoiser"] = ScaleProbeRunner(probe_graph(folder / graph, out / "probe" / kind / graph))
        pipes[kind] = pipe
    prompts = args.prompts or model["prompts"]
    columns = [(rule, rung) for rule in RULES for rung in model["ladder"]]
    rows, timings = [], []
    for prompt in prompts:
        cells = []
        for rule, (w, (w_min, w_max), w_scfg) in columns:
            pipe = pipes["scfg" if rule == "scfg" else "fused"]
            kwargs = {"cfg": {"scale": w}, "samg": {"w_min": w_min, "w_max": w_max}, "scfg": {"scale": w_scfg}}[rule]
            pipe.runners["denoiser"].reset()
            start = time.perf_counter()
            images = pipe(prompt, "", guidance=rule, steps=args.steps, seed=args.seed, num_images=args.images,
                          **kwargs)
            per_image = (time.perf_counter() - start) / args.images
            timings.append(per_image)
            scale_map = pipe.runners["denoiser"].mean_map()[0]
            cells.append((images, scale_map))
            print(f"samg demo: {RULE_TITLES[rule]:5s} {_setting(rule, kwargs):9s} {prompt!r}: "
                  f"{per_image * 1000:.0f} ms per image, mean applied scale {scale_map.mean():.2f}")
        rows.append(cells)
    header = [f"{RULE_TITLES[rule]} {_setting(rule, kw)}" for rule, kw in
              ((r, {"cfg": {"scale": w}, "samg": {"w_min": lo, "w_max": hi}, "scfg": {"scale": ws}}[r])
               for r, (w, (lo, hi), ws) in columns)]
    grid_path = out / "grid.png"
    _write_grid(rows, prompts, header, grid_path)
    n = len(timings) * args.images
    print(f"samg demo: wrote {grid_path} ({len(rows)} prompts x {len(columns)} rule/scale columns x {args.images} "
          "images, each with its scale map)")
    print(f"samg demo: {n} images in {sum(timings) * args.images:.1f} s of generation, {sum(timings) / len(timings) * 1000:.0f} "
          f"ms per image on average (min {min(timings) * 1000:.0f}, max {max(timings) * 1000:.0f}; {args.steps} steps, "
          "ONNX Runtime CPU)")
    return 0


def _setting(rule: str, kwargs: dict) -> str:
    return f"{kwargs['w_min']:g}-{kwargs['w_max']:g}" if rule == "samg" else f"{kwargs['scale']:g}"


def _ensure_export(args, folder: Path, guidance: str) -> Path:
    from samg.contract import MANIFEST

    if args.reexport or not (folder / MANIFEST).is_file():
        from samg.export.exporter import ExportOptions, export

        print(f"samg demo: exporting samg-{args.model} to {folder} ({guidance} guidance graph)", file=sys.stderr)
        export(ExportOptions(model=args.model, out=str(folder), model_path=args.model_path, guidance=guidance,
                             quiet=args.quiet))
    else:
        print(f"samg demo: reusing the export in {folder} (--reexport to redo it)", file=sys.stderr)
    return folder


def probe_graph(denoiser_onnx: Path, out: Path, *, ops=COMBINE_OPS, fix: str = "run samg demo with --reexport") -> Path:
    """A copy of the denoiser whose combine node's inputs u and c are extra graph outputs (PROBE_OUTPUTS).

    `ops` are the (domain, op_type) pairs that count as the combine node; `fix` ends the error when the
    graph does not hold exactly one."""
    from samg.errors import check, require
    from samg.io import atomic_path

    onnx = require("onnx", "to read the scale maps off the exported graph")
    model = onnx.load(str(denoiser_onnx))
    graph = model.graph
    nodes = [n for n in graph.node if (n.domain, n.op_type) in ops]
    kind = "combine" if len(ops) > 1 else "::".join(next(iter(ops)))
    check(len(nodes) == 1, f"{denoiser_onnx} has {len(nodes)} {kind} nodes, expected 1: {fix}")
    guided_type = graph.output[0].type
    for source, name in zip(nodes[0].input[:2], PROBE_OUTPUTS):
        graph.node.append(onnx.helper.make_node("Identity", [source], [name], name=f"{name}_probe"))
        value = graph.output.add()
        value.name = name
        value.type.CopyFrom(guided_type)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        onnx.save(model, str(tmp))
    return out


class ScaleProbeRunner:
    """Runs the probe graph; returns `guided` and sums the applied scale map of every call."""

    def __init__(self, probe_onnx: Path):
        from samg.runners import open_runner

        self.inner = open_runner(probe_onnx, "onnxruntime", "cpu")
        self.input_names = self.inner.input_names
        self.output_names = ["guided"]
        self.reset()

    def reset(self) -> None:
        self.total, self.calls = None, 0

    def run(self, feeds):
        import numpy as np

        outs = self.inner.run(feeds)
        u, c, guided = (np.asarray(outs[k], np.float64) for k in (*PROBE_OUTPUTS, "guided"))
        delta = c - u
        energy = (delta * delta).sum(1)
        # w(p) = <guided - u, delta> / |delta|²; where delta vanishes no scale acts: count it as 0.
        w = np.where(energy > 1e-20, ((guided - u) * delta).sum(1) / np.maximum(energy, 1e-20), 0.0)
        self.total = w if self.total is None else self.total + w
        self.calls += 1
        return {"guided": guided.astype(np.float32)}

    def mean_map(self):
        """[B, h, w] applied scale averaged over the calls since reset()."""
        return self.total / max(self.calls, 1)


def _write_grid(rows, prompts, header, path: Path) -> None:
    """Rows of cells (uint8 images [N, H, W, 3], scale map [h, w]) into one PNG: the images of a cell,
    then its scale map (dark = low, bright = high, one colour scale for the whole grid)."""
    import numpy as np
    from PIL import Image, ImageDraw

    from samg.io import atomic_path

    h, w = rows[0][0][0].shape[1:3]
    zoom = max(1, 96 // max(h, w))
    n = rows[0][0][0].shape[0]
    cell_w = (n + 1) * w * zoom + 4
    pad, head_h, label_h = 10, 34, 16
    top = max(float(np.max(m)) for cells in rows for _, m in cells)
    width = pad + len(rows[0]) * (cell_w + pad)
    height = head_h + len(rows) * (label_h + h * zoom + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 2), f"scale maps: black = 0 ... white = {top:.1f} (mean applied w(p) over steps, first image)",
              fill="black")
    for j, text in enumerate(header):
        draw.text((pad + j * (cell_w + pad), 18), text, fill="black")
    for i, (cells, prompt) in enumerate(zip(rows, prompts)):
        y = head_h + i * (label_h + h * zoom + pad)
        draw.text((pad, y), repr(prompt), fill="black")
        y += label_h
        for j, (images, scale_map) in enumerate(cells):
            x = pad + j * (cell_w + pad)
            strip = np.concatenate(list(images), axis=1)
            canvas.paste(Image.fromarray(strip).resize((strip.shape[1] * zoom, h * zoom), Image.NEAREST), (x, y))
            grey = np.clip(np.asarray(scale_map, np.float64) / max(top, 1e-9), 0, 1)
            heat = _heat(grey)
            canvas.paste(Image.fromarray(heat).resize((w * zoom, h * zoom), Image.NEAREST), (x + n * w * zoom + 4, y))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def _heat(x):
    """[h, w] in [0, 1] -> uint8 RGB: black -> red -> yellow -> white (readable without a legend)."""
    import numpy as np

    r = np.clip(3 * x, 0, 1)
    g = np.clip(3 * x - 1, 0, 1)
    b = np.clip(3 * x - 2, 0, 1)
    return (np.stack([r, g, b], -1) * 255).round().astype(np.uint8)
