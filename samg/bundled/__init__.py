"""Bundled assets: the `samg-digits` and `samg-shapes` models and the digit classifier used to judge
samg-digits' samples (samg-shapes' are judged exactly by rule: `samg.bundled.shapes.score`).

`SAMG_DIGITS_DIR`, `SAMG_SHAPES_DIR` are diffusers StableDiffusionPipeline folders (see their README.md);
`load_digit_classifier()` returns a callable images -> (logits, features).
"""

from pathlib import Path

from samg.bundled.classifier import CLASSIFIER_DIR, DigitClassifier, load_digit_classifier

SAMG_DIGITS_DIR = Path(__file__).resolve().parent / "samg-digits"
SAMG_SHAPES_DIR = Path(__file__).resolve().parent / "samg-shapes"

__all__ = ["SAMG_DIGITS_DIR", "SAMG_SHAPES_DIR", "CLASSIFIER_DIR", "DigitClassifier", "load_digit_classifier"]
