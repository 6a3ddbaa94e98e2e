"""The samg-shapes renderer and exact scorer: renders score correct for every prompt kind, and images
built wrong on purpose (colour, shape, position, extra or missing object) score wrong on exactly the
attribute that was broken. Expectations come from how each image was constructed."""

import numpy as np
import pytest

from samg.bundled import shapes as S
from samg.errors import SamgError

SEEDS = range(300)


def _scene(objects):
    """Render hand-placed objects (x0, y0, size given) with the renderer under test."""
    return S.render(objects)


def test_palette_and_grid_are_the_issue_values():
    assert S.COLOURS == {"red": (220, 30, 30), "green": (30, 190, 60), "blue": (40, 80, 230),
                         "yellow": (235, 215, 30), "magenta": (210, 40, 200), "cyan": (40, 200, 210)}
    assert S.POSITIONS == ("top left", "top", "top right", "left", "center", "right",
                           "bottom left", "bottom", "bottom right")
    # Cell boundaries at 32/3 px: x = 10.6 is the left column, 10.7 the middle one.
    assert S.cell_of(10.6, 5) == "top left" and S.cell_of(10.7, 5) == "top"
    assert S.cell_of(16, 16) == "center" and S.cell_of(31, 31) == "bottom right"


def test_masks_have_the_hand_derived_pixels():
    assert S.shape_mask("square", 9).sum() == 81
    # Circle of diameter 8 (pixel centres within radius 4 of the middle): rows have 4, 6, 8, 8,
    # 8, 8, 6, 4 pixels = 52.
    circle = S.shape_mask("circle", 8)
    assert circle.sum(axis=1).tolist() == [4, 6, 8, 8, 8, 8, 6, 4]
    # Triangle of side 8: row r keeps |x + 0.5 - 4| <= (r + 0.5) / 2 -> 2, 2, 4, 4, 6, 6, 8, 8 pixels.
    triangle = S.shape_mask("triangle", 8)
    assert triangle.sum(axis=1).tolist() == [2, 2, 4, 4, 6, 6, 8, 8]
    assert triangle[0].tolist() == [False] * 3 + [True] * 2 + [False] * 3  # apex in the middle, on top


@pytest.mark.parametrize("n_objects", [1, 2])
def test_renders_follow_the_spec(n_objects):
    rng = np.random.default_rng(n_objects)
    for _ in range(200):
        scene = S.random_scene(rng, n_objects)
        img = scene.image
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        colours = {tuple(p) for p in img.reshape(-1, 3)}
        assert colours == {(0, 0, 0)} | {S.COLOURS[o.colour] for o in scene.objects}
        cells = [o.position for o in scene.objects]
        assert len(set(cells)) == len(cells)
        for o in scene.objects:
            assert S.MIN_SHAPE_SIZE <= o.size <= S.MAX_SHAPE_SIZE
            assert 0 <= o.x0 and o.x0 + o.size <= 32 and 0 <= o.y0 and o.y0 + o.size <= 32
            # Centre in the named cell: the cell's column/row from its index, 32/3 px per cell.
            row, col = divmod(S.POSITIONS.index(o.position), 3)
            assert col * 32 / 3 < o.x0 + o.size / 2 < (col + 1) * 32 / 3
            assert row * 32 / 3 < o.y0 + o.size / 2 < (row + 1) * 32 / 3


def test_prompt_wording():
    red = S.ShapeObject("red", "circle", "top left")
    centre = S.ShapeObject("blue", "square", "center")
    assert S.prompt_for([red]) == "a red circle at the top left"
    assert S.prompt_for([centre]) == "a blue square in the center"
    assert S.prompt_for([red, centre]) == "a red circle at the top left and a blue square in the center"
    assert S.object_phrase(red, ("colour", "shape")) == "a red circle"
    assert S.object_phrase(centre, ("shape", "position")) == "a square in the center"
    assert S.object_phrase(red, ("colour",)) == "a red shape"
    assert S.parse_prompt("a square at the left and a red shape") == [
        {"shape": "square", "position": "left"}, {"colour": "red"}]


def test_training_prompts_cover_every_kind():
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(400):
        scene = S.random_scene(rng)
        prompt = S.random_prompt(scene.objects, rng)
        kinds.add(S.prompt_kind(prompt))
        assert set(prompt.split()) <= set(S.vocabulary())
    assert kinds == {"one", "two", "one-partial", "two-partial"}


@pytest.mark.parametrize("n_objects", [1, 2])
def test_scorer_reads_renders_correct_for_every_prompt_kind(n_objects):
    rng = np.random.default_rng(100 + n_objects)
    for seed in SEEDS:
        scene = S.random_scene(rng, n_objects)
        for prompt in (S.prompt_for(scene.objects), S.random_prompt(scene.objects, rng)):
            result = S.score(scene.image, prompt)
            assert result.correct, (seed, prompt, result)
        found = sorted((d.colour, d.shape, d.position) for d in S.detect(scene.image))
        assert found == sorted((o.colour, o.shape, o.position) for o in scene.objects)


@pytest.mark.parametrize("shape", S.SHAPES)
@pytest.mark.parametrize("size", range(S.MIN_SHAPE_SIZE, S.MAX_SHAPE_SIZE + 1))
def test_every_shape_and_size_is_recognised(shape, size):
    obj = S.ShapeObject("green", shape, "center", x0=11, y0=11, size=size)
    result = S.score(_scene([obj]), f"a green {shape} in the center")
    assert result.correct, result


def _edge_pixels(mask):
    """Pixels of `mask` 4-adjacent to a pixel outside it (inside=True) or outside ones adjacent to it."""
    padded = np.pad(mask, 1)
    near = {True: np.zeros_like(mask), False: np.zeros_like(mask)}
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        shifted = padded[1 + dr : 1 + dr + mask.shape[0], 1 + dc : 1 + dc + mask.shape[1]]
        near[True] |= mask & ~shifted
        near[False] |= ~mask & shifted
    return near


def _degraded(shape, size, rng, how):
    """A green render of `shape` in the centre, damaged as generated images are: `flips` moves 1-4
    edge pixels out and 1-4 in (notches and bumps); `stray` adds a 2-4 px partial row or column
    along one side (it moves the bounding box by a pixel)."""
    mask = np.zeros((32, 32), bool)
    mask[11 : 11 + size, 11 : 11 + size] = S.shape_mask(shape, size)
    if how == "flips":
        near = _edge_pixels(mask)
        n = int(rng.integers(1, 5))
        for inside in (True, False):
            candidates = np.argwhere(near[inside])
            for r, c in candidates[rng.choice(len(candidates), n, replace=False)]:
                mask[r, c] = not inside
    else:
        rows, cols = np.nonzero(mask)
        length, side = int(rng.integers(2, 5)), int(rng.integers(4))
        if side >= 2:  # a column: work on the transpose
            mask = mask.T
        line = mask[rows.min()] if side % 2 == 0 else mask[rows.max()]
        edge_row = rows.min() if side % 2 == 0 else rows.max()
        if side >= 2:
            cols_t = np.nonzero(mask.any(1))[0]
            edge_row = cols_t.min() if side == 2 else cols_t.max()
            line = mask[edge_row]
        on = np.nonzero(line)[0]  # the segment touches the edge line, so it joins the shape
        start = int(rng.integers(on.min() - length + 1, on.max() + 1))
        mask[edge_row - 1 if side % 2 == 0 else edge_row + 1, start : start + length] = True
        if side >= 2:
            mask = mask.T
    image = np.zeros((32, 32, 3), np.uint8)
    image[mask] = S.COLOURS["green"]
    return image


DAMAGED_TRIALS = 600


@pytest.mark.parametrize("how", ["flips", "stray"])
def test_shapes_with_notches_bumps_and_stray_pixels_keep_their_shape(how):
    # Generated shapes are rarely pixel-exact; the damage here is what samples show. The first scorer
    # (fill of the bounding box, scripts/shapes_scorer_variants.py) read 99% of the flipped squares wrong.
    rng = np.random.default_rng(0)
    wrong = []
    for trial in range(DAMAGED_TRIALS):
        shape, size = S.SHAPES[trial % 3], S.MIN_SHAPE_SIZE + (trial // 3) % 4
        found = S.detect(_degraded(shape, size, rng, how))
        assert len(found) == 1 and found[0].colour == "green" and found[0].position == "center", (trial, found)
        if found[0].shape != shape:
            wrong.append((shape, size, found[0].shape))
    # Measured over seeds 0-3: 7 of 2400 flips misread (all 8 px triangles, read unknown), no strays; a
    # damaged shape was never read as another shape. Seed 0: 1 flip.
    assert len(wrong) <= DAMAGED_TRIALS // 100, wrong
    assert all(got == "unknown" for _, _, got in wrong), wrong


def test_in_between_and_elongated_blobs_are_no_shape():
    centres = np.arange(12) + 0.5
    y, x = np.meshgrid(np.arange(6) + 0.5, centres, indexing="ij")
    ellipse = ((x - 6) / 6) ** 2 + ((y - 3) / 3) ** 2 <= 1  # 6x12: twice as wide as tall
    image = np.zeros((32, 32, 3), np.uint8)
    image[13:19, 10:22][ellipse] = S.COLOURS["blue"]
    assert [d.shape for d in S.detect(image)] == ["unknown"]


RED_CIRCLE = S.ShapeObject("red", "circle", "top left", x0=1, y0=1, size=9)
BLUE_SQUARE = S.ShapeObject("blue", "square", "bottom right", x0=22, y0=22, size=9)


@pytest.mark.parametrize("image_objects,prompt,wrong", [
    ([RED_CIRCLE], "a green circle at the top left", {"colour"}),
    ([RED_CIRCLE], "a red triangle at the top left", {"shape"}),
    ([RED_CIRCLE], "a red square at the top left", {"shape"}),
    ([RED_CIRCLE], "a red circle at the bottom", {"position"}),
    ([RED_CIRCLE], "a red circle in the center", {"position"}),
    ([BLUE_SQUARE], "a blue circle at the bottom right", {"shape"}),
    # Binding: both objects exist, but colours are swapped between them.
    ([RED_CIRCLE, BLUE_SQUARE], "a blue circle at the top left and a red square at the bottom right", {"colour"}),
    ([RED_CIRCLE, BLUE_SQUARE], "a red circle at the bottom right and a blue square at the top left",
     {"position"}),
])
def test_scorer_flags_the_wrong_attribute(image_objects, prompt, wrong):
    result = S.score(_scene(image_objects), prompt)
    assert not result.correct
    assert result.count_ok
    for attribute in S.ATTRIBUTES:
        assert result.attribute_ok(attribute) is (attribute not in wrong), (attribute, result)


def test_scorer_flags_extra_and_missing_objects():
    both = _scene([RED_CIRCLE, BLUE_SQUARE])
    extra = S.score(both, "a red circle at the top left")
    assert not extra.correct and not extra.count_ok and extra.attribute_ok("colour")  # the named one is right
    missing = S.score(_scene([RED_CIRCLE]), "a red circle at the top left and a blue square at the bottom right")
    assert not missing.correct and not missing.count_ok
    assert missing.attributes[0] == {"colour": True, "shape": True, "position": True}
    assert missing.attributes[1] == {"colour": False, "shape": False, "position": False}
    empty = S.score(np.zeros((32, 32, 3), np.uint8), "a red circle")
    assert not empty.correct and not empty.count_ok


def test_specks_and_noise_are_ignored_but_unknown_blobs_are_not_shapes():
    image = _scene([RED_CIRCLE])
    image[30, 0] = S.COLOURS["green"]  # a 1-pixel speck (< MIN_OBJECT_PIXELS)
    image[28:30, 5:7] = S.COLOURS["cyan"]  # a 4-pixel speck
    noisy = np.clip(image.astype(int) + np.random.default_rng(0).integers(-20, 21, image.shape), 0, 255)
    assert S.score(noisy.astype(np.uint8), "a red circle at the top left").correct
    # A hollow square (10x10 outline, 2 px thick) overlaps a full square by 64/100 at best: no shape.
    ring = np.zeros((32, 32, 3), np.uint8)
    ring[10:20, 10:20] = S.COLOURS["yellow"]
    ring[12:18, 12:18] = 0
    found = S.detect(ring)
    assert len(found) == 1 and found[0].shape == "unknown"
    assert not S.score(ring, "a yellow square in the center").correct


def test_bad_input_is_one_clear_error():
    with pytest.raises(SamgError, match="cannot read shapes prompt"):
        S.score(np.zeros((32, 32, 3), np.uint8), "a purple circle")
    with pytest.raises(SamgError, match="32x32x3"):
        S.score(np.zeros((16, 16, 3), np.uint8), "a red circle")
    with pytest.raises(SamgError, match="uint8"):
        S.score(np.zeros((32, 32, 3), np.float32), "a red circle")
