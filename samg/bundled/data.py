"""The digits data behind the bundled `samg-digits` model: split, image scaling, prompts.

Shared by the training scripts, the tests and the quality benchmark so that all of them see the
same held-out digits and the same pixel scale. Needs numpy and scikit-learn (the data set ships
inside the scikit-learn wheel, so this works offline).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from samg.errors import require

SPLIT_SEED = 0
TEST_FRACTION = 0.2
# Digits are upsampled from 8x8 so the VAE has a spatial factor of 2 like SD's (which has 8).
IMAGE_SIZE = 16

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Prompt wordings; "{d}" is the numeral, "{w}" the word. Several per digit so that the text
# encoder has to learn that "7" and "seven" mean the same thing.
PROMPT_TEMPLATES = (
    "{d}",
    "{w}",
    "a {d}",
    "a handwritten {d}",
    "a handwritten {w}",
    "the digit {d}",
    "the digit {w}",
    "the number {w}",
    "a picture of a {d}",
)
# Only used when the image really is thin or bold (stroke mass within its class, see below).
STYLE_TEMPLATES = ("a {s} {d}", "a {s} {w}", "a {s} handwritten {w}", "the {s} digit {d}")
STYLES = ("thin", "bold")


@dataclass(frozen=True)
class DigitsSplit:
    """Images in [0, 1] at IMAGE_SIZE x IMAGE_SIZE, labels, styles and the original indices."""

    train_images: np.ndarray  # float32 [N, 16, 16]
    train_labels: np.ndarray  # int64 [N]
    train_styles: np.ndarray  # object [N]: "thin", "bold" or ""
    train_indices: np.ndarray  # int64 [N], indices into sklearn's load_digits()
    test_images: np.ndarray
    test_labels: np.ndarray
    test_indices: np.ndarray


def upsample_digits(images_0_16: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """8x8 digits with values 0..16 -> float32 [N, size, size] in [0, 1] (bilinear, like the model)."""
    from PIL import Image

    out = np.empty((len(images_0_16), size, size), np.float32)
    for i, img in enumerate(np.asarray(images_0_16, np.float32).reshape(-1, 8, 8) / 16.0):
        out[i] = np.asarray(Image.fromarray(img, mode="F").resize((size, size), Image.BILINEAR))
    return np.clip(out, 0.0, 1.0)


def stroke_styles(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """'thin' for the lightest third of each class by ink mass, 'bold' for the heaviest third."""
    mass = images.reshape(len(images), -1).sum(axis=1)
    styles = np.full(len(images), "", dtype=object)
    for digit in np.unique(labels):
        members = labels == digit
        low, high = np.quantile(mass[members], [1 / 3, 2 / 3])
        styles[members & (mass <= low)] = "thin"
        styles[members & (mass >= high)] = "bold"
    return styles


def load_split() -> DigitsSplit:
    """The seeded, stratified 80/20 split of sklearn's load_digits() used by every samg-digits part."""
    datasets = require("sklearn.datasets", "to load the digits data")
    model_selection = require("sklearn.model_selection", "to split the digits data")
    digits = datasets.load_digits()
    indices = np.arange(len(digits.target))
    train_idx, test_idx = model_selection.train_test_split(
        indices, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=digits.target
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    images = upsample_digits(digits.images)
    labels = digits.target.astype(np.int64)
    return DigitsSplit(
        train_images=images[train_idx],
        train_labels=labels[train_idx],
        train_styles=stroke_styles(images[train_idx], labels[train_idx]),
        train_indices=train_idx,
        test_images=images[test_idx],
        test_labels=labels[test_idx],
        test_indices=test_idx,
    )


def prompt_for(digit: int, style: str, rng: np.random.Generator) -> str:
    """A random wording for `digit`; styled wordings are drawn for thin/bold images half the time."""
    templates = PROMPT_TEMPLATES
    if style and rng.random() < 0.5:
        templates = STYLE_TEMPLATES
    template = templates[rng.integers(len(templates))]
    return template.format(d=digit, w=DIGIT_WORDS[digit], s=style)


def vocabulary() -> list[str]:
    """Every word a training prompt can contain (the tokenizer's vocabulary, after special tokens)."""
    words: set[str] = set()
    for template in PROMPT_TEMPLATES + STYLE_TEMPLATES:
        for digit in range(10):
            for style in STYLES:
                words.update(template.format(d=digit, w=DIGIT_WORDS[digit], s=style).split())
    return sorted(words)
