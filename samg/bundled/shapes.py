"""The shapes data behind the bundled `samg-shapes` model: a seeded renderer, prompts, an exact scorer.

Images are 32x32 RGB on black with one or two filled shapes (circle, square, up-pointing isosceles
triangle; bounding box 8..11 px) in one of six exact colours, each in a cell of a 3x3 grid. The
scorer reads a (generated) image back by rule: nearest palette colour per pixel, connected
components, centre cell, shape by matching each component against the renderer's masks (best
intersection over union); then says whether every attribute a prompt names is there and nothing
else is. numpy only (PIL not needed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from itertools import permutations

import numpy as np

from samg.errors import SamgError

IMAGE_SIZE = 32
GRID = 3  # 3x3 cells name the positions
MIN_SHAPE_SIZE, MAX_SHAPE_SIZE = 8, 11  # bounding box side, pixels
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 30),
    "magenta": (210, 40, 200),
    "cyan": (40, 200, 210),
}
BACKGROUND = (0, 0, 0)
SHAPES = ("circle", "square", "triangle")
# Row-major over the 3x3 grid: index = 3 * row + column.
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
ATTRIBUTES = ("colour", "shape", "position")
SHAPE_WORD_UNNAMED = "shape"  # stands in for the shape when a prompt leaves it out: "a red shape"

# Renderer: a shape's centre keeps this far (px) inside its cell so its label is not a coin toss,
# and two shapes' bounding boxes keep at least this gap so they stay separate components.
CELL_MARGIN = 0.75
MIN_GAP = 2
TWO_OBJECT_FRACTION = 0.5  # of training images
FULL_PROMPT_FRACTION = 0.6  # of objects named with all three attributes; the rest drop some
UNCOND_DROPOUT = 0.1  # of training prompts replaced by "" (classifier-free guidance)

# Scorer: components smaller than this are specks (the smallest render, an 8 px triangle, has 36).
MIN_OBJECT_PIXELS = 12
# Shape by template: a component is matched against the renderer's own masks of each shape (sizes
# 5..14, i.e. the rendered 8..11 with SHAPE_SIZE_SLACK either way, within that slack of the
# component's box, every offset) and takes the shape of best intersection over union, when that IoU
# is at least SHAPE_MIN_IOU and beats every other shape's by SHAPE_MIN_MARGIN (else "unknown"; exact
# fractions, so ties read unknown). Renders match their own shape at IoU 1 and the nearest other at
# <= 0.86 (a circle's mask is ~82% of its square's). A first rule (fill of the bounding box and
# top/bottom taper, kept in scripts/shapes_scorer_variants.py) read 99% of squares with 1-4 edge pixels
# flipped wrong, mostly as circles: one notch or one stray pixel moves the box. On 2400 such damaged
# renders (`python scripts/shapes_scorer_variants.py --damaged`, the damage of tests/test_shapes_data.py)
# the template rule reads 99.7% right (the misses: 8 px triangles just under IoU 0.8, read unknown,
# never another shape) and all 2400 with a stray partial row or column.
SHAPE_MIN_IOU = Fraction(4, 5)
SHAPE_MIN_MARGIN = Fraction(1, 50)
SHAPE_SIZE_SLACK = 3
TEMPLATE_SIZES = range(MIN_SHAPE_SIZE - SHAPE_SIZE_SLACK, MAX_SHAPE_SIZE + SHAPE_SIZE_SLACK + 1)


@dataclass(frozen=True)
class ShapeObject:
    """One rendered shape: its attributes and bounding box (top-left corner, side)."""

    colour: str
    shape: str
    position: str
    x0: int = 0
    y0: int = 0
    size: int = 0


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # uint8 [32, 32, 3]
    objects: tuple[ShapeObject, ...]


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean [size, size] filled mask of `shape` in its bounding box (pixel centres inside)."""
    if shape not in SHAPES:
        raise SamgError(f"unknown shape {shape!r}: choose one of {', '.join(SHAPES)}")
    if not MIN_SHAPE_SIZE <= size <= MAX_SHAPE_SIZE:
        raise SamgError(f"shape size {size} is outside {MIN_SHAPE_SIZE}..{MAX_SHAPE_SIZE}: pick a size in range")
    return _template(shape, size).copy()


@lru_cache(maxsize=None)
def _template(shape: str, size: int) -> np.ndarray:
    """The renderer's mask of `shape` at any side `size` (the scorer matches sizes beyond 8..11)."""
    centres = np.arange(size) + 0.5
    y, x = np.meshgrid(centres, centres, indexing="ij")
    half = size / 2
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "circle":
        return (x - half) ** 2 + (y - half) ** 2 <= half**2
    # Triangle: apex at the top middle, base the full bottom row; the row's half width grows
    # linearly with depth, measured at the row's lower edge so the apex row is not empty.
    return np.abs(x - half) <= (y + 0.5) / size * half


def cell_of(cx: float, cy: float) -> str:
    """Name of the 3x3 grid cell holding the point (cx, cy) in pixel coordinates."""
    cell = IMAGE_SIZE / GRID
    col = min(GRID - 1, max(0, int(cx // cell)))
    row = min(GRID - 1, max(0, int(cy // cell)))
    return POSITIONS[GRID * row + col]


def _place(position: str, size: int, rng: np.random.Generator) -> tuple[int, int]:
    """A top-left corner so the box fits in the image and its centre is inside `position`'s cell."""
    index = POSITIONS.index(position)
    row, col = divmod(index, GRID)
    cell = IMAGE_SIZE / GRID

    def axis(k: int) -> int:
        lo, hi = k * cell + CELL_MARGIN, (k + 1) * cell - CELL_MARGIN
        starts = [s for s in range(IMAGE_SIZE - size + 1) if lo <= s + size / 2 <= hi]
        return int(rng.choice(starts))

    return axis(col), axis(row)


def render(objects) -> np.ndarray:
    """uint8 [32, 32, 3] image of `objects` (ShapeObject with x0, y0, size set) on black."""
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for obj in objects:
        mask = shape_mask(obj.shape, obj.size)
        region = image[obj.y0 : obj.y0 + obj.size, obj.x0 : obj.x0 + obj.size]
        region[mask] = COLOURS[obj.colour]
    return image


def _boxes_apart(a: ShapeObject, b: ShapeObject) -> bool:
    gap_x = max(a.x0, b.x0) - min(a.x0 + a.size, b.x0 + b.size)
    gap_y = max(a.y0, b.y0) - min(a.y0 + a.size, b.y0 + b.size)
    return max(gap_x, gap_y) >= MIN_GAP


def random_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """A seeded random scene with 1 or 2 shapes (2 in different cells, boxes apart)."""
    if n_objects is None:
        n_objects = 2 if rng.random() < TWO_OBJECT_FRACTION else 1
    if n_objects not in (1, 2):
        raise SamgError(f"a scene holds 1 or 2 shapes, not {n_objects}: pass n_objects=1 or 2")
    while True:
        cells = rng.choice(len(POSITIONS), size=n_objects, replace=False)
        objects = []
        for cell in cells:
            size = int(rng.integers(MIN_SHAPE_SIZE, MAX_SHAPE_SIZE + 1))
            position = POSITIONS[int(cell)]
            x0, y0 = _place(position, size, rng)
            objects.append(ShapeObject(
                colour=list(COLOURS)[int(rng.integers(len(COLOURS)))],
                shape=SHAPES[int(rng.integers(len(SHAPES)))],
                position=position, x0=x0, y0=y0, size=size,
            ))
        if n_objects == 1 or _boxes_apart(*objects):
            return Scene(render(objects), tuple(objects))


def object_phrase(obj: ShapeObject, named=ATTRIBUTES) -> str:
    """'a red circle at the top left' with only the `named` attributes ('a circle', 'a red shape')."""
    words = ["a"]
    if "colour" in named:
        words.append(obj.colour)
    words.append(obj.shape if "shape" in named else SHAPE_WORD_UNNAMED)
    if "position" in named:
        words.append("in the center" if obj.position == "center" else f"at the {obj.position}")
    return " ".join(words)


def prompt_for(objects, named=None) -> str:
    """The prompt naming `objects`; `named[i]` lists the attributes said of object i (default all)."""
    named = named or [ATTRIBUTES] * len(objects)
    return " and ".join(object_phrase(obj, n) for obj, n in zip(objects, named))


def random_prompt(objects, rng: np.random.Generator) -> str:
    """A training prompt for a scene: each object fully named, or with a random non-empty subset."""
    named = []
    for _ in objects:
        if rng.random() < FULL_PROMPT_FRACTION:
            named.append(ATTRIBUTES)
        else:
            keep = rng.random(len(ATTRIBUTES)) < 0.5
            if keep.all() or not keep.any():  # a partial prompt: one or two attributes
                keep = np.zeros(len(ATTRIBUTES), bool)
                keep[rng.integers(len(ATTRIBUTES))] = True
            named.append(tuple(a for a, k in zip(ATTRIBUTES, keep) if k))
    order = rng.permutation(len(objects))
    return prompt_for([objects[i] for i in order], [named[i] for i in order])


def vocabulary() -> list[str]:
    """Every word a training prompt can contain (the tokenizer's vocabulary, after special tokens)."""
    words = {"a", "and", "at", "in", "the", SHAPE_WORD_UNNAMED, *COLOURS, *SHAPES}
    for position in POSITIONS:
        words.update(position.split())
    return sorted(words)


# ---------------------------------------------------------------------------------------------
# Reading prompts and images back

_PHRASE = re.compile(
    r"^a(?: (?P<colour>{c}))? (?P<shape>{s})(?: (?:at the (?P<pos>{p})|in the (?P<center>center)))?$".format(
        c="|".join(COLOURS), s="|".join(SHAPES + (SHAPE_WORD_UNNAMED,)),
        p="|".join(p for p in POSITIONS if p != "center"))
)


def parse_prompt(prompt: str) -> list[dict[str, str]]:
    """Named attributes per object: 'a red circle and a square' -> [{colour, shape}, {shape}]."""
    objects = []
    for phrase in prompt.strip().lower().split(" and "):
        match = _PHRASE.match(" ".join(phrase.split()))
        if match is None:
            raise SamgError(f"cannot read shapes prompt {prompt!r}: write 'a {{colour}} {{shape}} at the "
                            "{position}' (attributes optional), joined by ' and '")
        named = {}
        if match["colour"]:
            named["colour"] = match["colour"]
        if match["shape"] != SHAPE_WORD_UNNAMED:
            named["shape"] = match["shape"]
        if match["pos"] or match["center"]:
            named["position"] = match["pos"] or "center"
        objects.append(named)
    return objects


def _palette_indices(image: np.ndarray) -> np.ndarray:
    """[H, W] index of the nearest palette colour (0 = black background, 1.. = COLOURS order)."""
    palette = np.array([BACKGROUND, *COLOURS.values()], np.float32)
    pixels = np.asarray(image, np.float32)[..., None, :]
    return np.argmin(((pixels - palette) ** 2).sum(-1), axis=-1)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an [n, 2] array of (row, col)."""
    seen = np.zeros_like(mask)
    found = []
    h, w = mask.shape
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        seen[r0, c0] = True
        stack, pixels = [(r0, c0)], []
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        found.append(np.array(pixels))
    return found


@lru_cache(maxsize=None)
def _template_counts(shape: str, size: int) -> tuple[np.ndarray, int]:
    """`_template` as int32 with its pixel count, as the matcher sums over it (built once per size)."""
    mask = _template(shape, size)
    return mask.astype(np.int32), int(mask.sum())


def shape_ious(pixels: np.ndarray) -> dict[str, Fraction]:
    """Best intersection over union (exact) of a component's (row, col) pixels with each shape's
    template, over TEMPLATE_SIZES within SHAPE_SIZE_SLACK of the component's box and every offset.

    A size whose area alone keeps the IoU below SHAPE_MIN_IOU - SHAPE_MIN_MARGIN (IoU <= min(n, m) /
    max(n, m)) is skipped, and a shape with no size left reads 0: no decision of `classify_shape`
    changes, and a 32x32 blob or a long stripe costs nothing."""
    rows, cols = pixels[:, 0], pixels[:, 1]
    height, width = rows.max() + 1 - rows.min(), cols.max() + 1 - cols.min()
    n = len(pixels)
    floor = SHAPE_MIN_IOU - SHAPE_MIN_MARGIN
    sizes = [s for s in TEMPLATE_SIZES if min(height, width) - SHAPE_SIZE_SLACK <= s <= max(height, width) + SHAPE_SIZE_SLACK]
    best = {shape: Fraction(0) for shape in SHAPES}
    if not sizes:
        return best
    pad = sizes[-1]  # every template can slide fully across the component
    canvas = np.zeros((height + 2 * pad, width + 2 * pad), np.int32)
    canvas[rows - rows.min() + pad, cols - cols.min() + pad] = 1
    for shape in SHAPES:
        for size in sizes:
            mask, area = _template_counts(shape, size)
            if Fraction(min(n, area), max(n, area)) < floor:
                continue
            windows = np.lib.stride_tricks.sliding_window_view(canvas, mask.shape)
            inter = int(np.einsum("ijkl,kl->ij", windows, mask).max())
            best[shape] = max(best[shape], Fraction(inter, n + area - inter))
    return best


def classify_shape(pixels: np.ndarray) -> str:
    """'square' | 'circle' | 'triangle' | 'unknown' from a component's (row, col) pixels."""
    ious = shape_ious(pixels)
    ranked = sorted(ious.values(), reverse=True)
    if ranked[0] < SHAPE_MIN_IOU or ranked[0] - ranked[1] < SHAPE_MIN_MARGIN:  # exact: ties read unknown
        return "unknown"
    return max(ious, key=ious.get)


@dataclass(frozen=True)
class Detection:
    colour: str
    shape: str
    position: str
    pixels: int


def detect(image: np.ndarray) -> list[Detection]:
    """The shapes in an image, read by rule (see the module docstring); specks are ignored."""
    image = np.asarray(image)
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise SamgError(f"shapes images are {IMAGE_SIZE}x{IMAGE_SIZE}x3, got {image.shape}: pass one HWC image")
    if image.dtype != np.uint8:
        raise SamgError(f"shapes images are uint8 0..255, got {image.dtype}: convert with np.round(x * 255)")
    labels = _palette_indices(image)
    names = list(COLOURS)
    found = []
    for k, colour in enumerate(names, start=1):
        for pixels in _components(labels == k):
            if len(pixels) < MIN_OBJECT_PIXELS:
                continue
            cy = (pixels[:, 0].min() + pixels[:, 0].max() + 1) / 2
            cx = (pixels[:, 1].min() + pixels[:, 1].max() + 1) / 2
            found.append(Detection(colour, classify_shape(pixels), cell_of(cx, cy), len(pixels)))
    return found


@dataclass(frozen=True)
class Score:
    """Whether an image shows exactly what a prompt names.

    `attributes[i][a]` says whether named object i's attribute a is right under the best matching of
    named objects to found ones (only named attributes appear); `count_ok` whether as many shapes
    were found as named; `correct` = count_ok and every named attribute right.
    """

    correct: bool
    count_ok: bool
    attributes: list[dict[str, bool]]
    found: list[Detection] = field(default_factory=list)

    def attribute_ok(self, attribute: str) -> bool | None:
        """All named objects have `attribute` right (None when the prompt names it for no object)."""
        values = [a[attribute] for a in self.attributes if attribute in a]
        return all(values) if values else None


def score(image: np.ndarray, prompt: str) -> Score:
    """Score one uint8 [32, 32, 3] image against a shapes prompt."""
    named = parse_prompt(prompt)
    found = detect(image)
    best = None
    # Try every assignment of found shapes to named objects (at most a few); missing ones are None.
    padded = found + [None] * max(0, len(named) - len(found))
    for perm in permutations(range(len(padded)), len(named)):
        attrs = []
        for obj, j in zip(named, perm):
            det = padded[j]
            attrs.append({a: det is not None and getattr(det, a) == v for a, v in obj.items()})
        hits = sum(sum(a.values()) for a in attrs)
        if best is None or hits > best[0]:
            best = (hits, attrs)
    attrs = best[1]
    count_ok = len(found) == len(named)
    correct = count_ok and all(all(a.values()) for a in attrs)
    return Score(correct, count_ok, attrs, found)


def prompt_kind(prompt: str) -> str:
    """'one' or 'two' objects, with '-partial' when some attribute is left out."""
    named = parse_prompt(prompt)
    kind = "one" if len(named) == 1 else "two"
    return kind if all(len(o) == len(ATTRIBUTES) for o in named) else kind + "-partial"
