#!/usr/bin/env python
"""Re-score samg-shapes' evaluation under other shape rules than the shipped one, for the model card.

- `fill`: the first scorer's rule (fill of the bounding box and top/bottom taper), replaced by template
  IoU because it read squares with a notch or a stray pixel as circles; writes
  `samg/bundled/samg-shapes/eval_fill_rule.json` (the same samples as eval.json).
- `strict`: the template rule with stricter thresholds (IoU >= 0.85 and >= 0.9, margin 0.05), printed:
  how much of the card's score rests on the thresholds.
- `--damaged`: both rules on the damaged renders of tests/test_shapes_data.py (known shapes).

    python scripts/shapes_scorer_variants.py [--damaged] [--strict-scales 2 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from fractions import Fraction
from pathlib import Path
from unittest import mock

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import train_shapes  # noqa: E402
from samg.bundled import shapes  # noqa: E402
from samg.io import atomic_write_json  # noqa: E402

# The first rule's thresholds. Renders (sizes 8..11): square fill 1, taper 0; circle fill 0.80-0.85,
# taper 0; triangle fill 0.59-0.63, taper 0.35-0.40.
SQUARE_MIN_FILL = 0.92
TRIANGLE_MIN_TAPER = 0.2
CIRCLE_FILL = (0.68, 0.92)
CIRCLE_MAX_TAPER = 0.12
TRIANGLE_FILL = (0.45, 0.75)


def classify_fill_rule(pixels: np.ndarray) -> str:
    """The first scorer's shape from a component's (row, col) pixels."""
    rows, cols = pixels[:, 0], pixels[:, 1]
    top, bottom = rows.min(), rows.max() + 1
    height, width = bottom - top, cols.max() + 1 - cols.min()
    fill = len(pixels) / (height * width)
    depth = rows - top  # 0 at the top row; the thirds are taken symmetrically from both ends
    third = height / 3
    taper = (np.sum(height - 1 - depth < third) - np.sum(depth < third)) / len(pixels)
    if fill >= SQUARE_MIN_FILL and abs(taper) < TRIANGLE_MIN_TAPER:
        return "square"
    if taper >= TRIANGLE_MIN_TAPER and TRIANGLE_FILL[0] <= fill <= TRIANGLE_FILL[1]:
        return "triangle"
    if abs(taper) <= CIRCLE_MAX_TAPER and CIRCLE_FILL[0] <= fill < CIRCLE_FILL[1]:
        return "circle"
    return "unknown"


def patched(**attributes):
    """Temporarily replace attributes of samg.bundled.shapes (detect() looks them up per call)."""
    return mock.patch.multiple(shapes, **attributes)


def damaged_rates(trials: int = 600, seeds=range(4)) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from test_shapes_data import _degraded  # the tests' damage, so the quoted rates are the tested ones

    for how in ("flips", "stray"):
        for name, rule in (("template", shapes.classify_shape), ("fill", classify_fill_rule)):
            right = {s: 0 for s in shapes.SHAPES}
            with patched(classify_shape=rule):
                for seed in seeds:
                    rng = np.random.default_rng(seed)
                    for trial in range(trials):
                        shape, size = shapes.SHAPES[trial % 3], shapes.MIN_SHAPE_SIZE + (trial // 3) % 4
                        found = shapes.detect(_degraded(shape, size, rng, how))
                        right[shape] += len(found) == 1 and found[0].shape == shape
            per_shape = trials * len(seeds) // 3
            print(f"damaged renders ({how}), {name} rule: " +
                  ", ".join(f"{s} {right[s]}/{per_shape}" for s in shapes.SHAPES), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=train_shapes.DEFAULT_OUT)
    p.add_argument("--eval-count", type=int, default=100)
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--scales", type=float, nargs="*", default=[1.0, 2.0, 3.0, 4.0, 5.0, 7.5])
    p.add_argument("--strict-scales", type=float, nargs="*", default=[2.0, 3.0])
    p.add_argument("--damaged", action="store_true", help="only the damaged-render rates")
    args = p.parse_args(argv)
    t0 = time.time()
    log = lambda msg: print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)  # noqa: E731
    damaged_rates()
    if args.damaged:
        return 0
    # One set of samples (the card's eval.json protocol), scored under each rule.
    samples = list(train_shapes.eval_samples(args.model, sorted(set(args.scales) | set(args.strict_scales)),
                                             args.eval_count, args.eval_steps, train_shapes.EVAL_SEED))
    log(f"generated {sum(len(prompts) for _, _, prompts, _ in samples)} samples")

    def results_under(scales, **rule) -> dict:
        results = {}
        with patched(**rule):
            for scale, n_objects, prompts, images in samples:
                if scale in scales:
                    results.setdefault(str(scale), {})[f"{n_objects}_object"] = train_shapes.score_samples(prompts, images)
        for scale, entry in results.items():
            log(f"eval guidance {scale}: {entry}")
        return results

    log("first (fill-of-box) rule:")
    results = results_under(args.scales, classify_shape=classify_fill_rule)
    atomic_write_json(args.model / "eval_fill_rule.json", {
        "scorer": "the first scorer's shape rule (scripts/shapes_scorer_variants.py: fill of the bounding box and "
                  "top/bottom taper), since replaced by template IoU; same samples and protocol as eval.json",
        "command": "python scripts/shapes_scorer_variants.py",
        "prompts_per_kind": args.eval_count, "steps": args.eval_steps, "results": results,
    })
    log(f"wrote {args.model / 'eval_fill_rule.json'}")
    for min_iou in (Fraction(17, 20), Fraction(9, 10)):
        log(f"template rule with IoU >= {float(min_iou)}, margin 0.05:")
        results_under(args.strict_scales, SHAPE_MIN_IOU=min_iou, SHAPE_MIN_MARGIN=Fraction(1, 20))
    return 0


if __name__ == "__main__":
    sys.exit(main())
