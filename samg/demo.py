"""`samg demo`: the main job on the embedded default — export the bundled samg-digits model with the
fused guidance combine, run it on ONNX Runtime (CPU), and write a PNG grid comparing plain CFG with
SAMG across scales for a few prompts.

Each row of the grid is one prompt under one rule; columns go from weak to strong guidance. CFG
column k and SAMG column k have about the same mean effective scale (printed), so the grid compares
the rules at matched strength, as the quality benchmark does.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_PROMPTS = ["a handwritten 3", "the digit seven", "a bold 5", "0"]
# (cfg scale, samg w_min, samg w_max): SAMG's pair straddles the CFG scale of its column.
DEFAULT_LADDER = [(1.0, 1.0, 1.0), (3.0, 2.0, 4.0), (5.0, 3.0, 7.0), (7.5, 4.0, 10.0), (10.0, 5.0, 14.0)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="out/demo", help="output folder (export and grid); default out/demo")
    parser.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT",
                        help="a prompt (repeatable); default: four digit prompts")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    parser.add_argument("--images", type=int, default=4, help="images per grid cell (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-path", default=None, help="a samg-digits pipeline folder (default: the bundled one)")
    parser.add_argument("--reexport", action="store_true", help="export again even if OUT/export exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from samg.contract import MANIFEST
    from samg.errors import check

    check(args.steps > 0, f"--steps must be positive, got {args.steps}")
    check(args.images > 0, f"--images must be positive, got {args.images}")
    out = Path(args.out)
    export_dir = out / "export"
    if args.reexport or not (export_dir / MANIFEST).is_file():
        from samg.export.exporter import ExportOptions, export

        print(f"samg demo: exporting samg-digits to {export_dir} (fused SAMG combine)", file=sys.stderr)
        export(ExportOptions(model="digits", out=str(export_dir), model_path=args.model_path, quiet=args.quiet))
    else:
        print(f"samg demo: reusing the export in {export_dir} (--reexport to redo it)", file=sys.stderr)

    from samg.runtime.pipeline import Pipeline

    pipe = Pipeline.load(export_dir, backend="onnxruntime", device="cpu")
    prompts = args.prompts or DEFAULT_PROMPTS
    rows, labels, timings = [], [], []
    for prompt in prompts:
        for rule in ("cfg", "samg"):
            cells = []
            for w, w_min, w_max in DEFAULT_LADDER:
                kwargs = {"scale": w} if rule == "cfg" else {"w_min": w_min, "w_max": w_max}
                start = time.perf_counter()
                images = pipe(prompt, "", guidance=rule, steps=args.steps, seed=args.seed, num_images=args.images,
                              **kwargs)
                elapsed = time.perf_counter() - start
                timings.append(elapsed / args.images)
                cells.append(images)
            rows.append(cells)
            labels.append(f"{rule.upper()}  {prompt!r}")
    header = [f"CFG {w:g} | SAMG {lo:g}-{hi:g}" for w, lo, hi in DEFAULT_LADDER]
    grid_path = out / "grid.png"
    _write_grid(rows, labels, header, grid_path)
    n = len(timings) * args.images
    print(f"samg demo: wrote {grid_path} ({len(rows)} rows x {len(DEFAULT_LADDER)} scales x {args.images} images)")
    print(f"samg demo: {n} images, {sum(timings) / len(timings) * 1000:.0f} ms per image on average "
          f"(min {min(timings) * 1000:.0f} ms, max {max(timings) * 1000:.0f} ms; {args.steps} steps, ONNX Runtime CPU)")
    return 0


def _write_grid(rows, labels, header, path: Path) -> None:
    """Rows of cells (each cell: uint8 [N, H, W, 3]) into one PNG with row labels and a header."""
    import numpy as np
    from PIL import Image, ImageDraw

    from samg.io import atomic_path

    h, w = rows[0][0].shape[1:3]
    zoom = max(1, 64 // max(h, w))
    cell_w = rows[0][0].shape[0] * w * zoom
    pad, label_w, head_h = 6, 200, 22
    width = label_w + len(rows[0]) * (cell_w + pad)
    height = head_h + len(rows) * (h * zoom + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(header):
        draw.text((label_w + j * (cell_w + pad), 4), text, fill="black")
    for i, (cells, label) in enumerate(zip(rows, labels)):
        y = head_h + i * (h * zoom + pad)
        draw.text((4, y + h * zoom // 2 - 6), label, fill="black")
        for j, images in enumerate(cells):
            strip = np.concatenate(list(images), axis=1)
            tile = Image.fromarray(strip).resize((strip.shape[1] * zoom, strip.shape[0] * zoom), Image.NEAREST)
            canvas.paste(tile, (label_w + j * (cell_w + pad), y))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
