"""Bundled assets: the `samg-digits` model and the digit classifier used to judge its samples.

`SAMG_DIGITS_DIR` is a diffusers StableDiffusionPipeline folder (see its README.md);
`load_digit_classifier()` returns a callable images -> (logits, features).
"""

from pathlib import Path

from samg.bundled.classifier import CLASSIFIER_DIR, DigitClassifier, load_digit_classifier

SAMG_DIGITS_DIR = Path(__file__).resolve().parent / "samg-digits"

__all__ = ["SAMG_DIGITS_DIR", "CLASSIFIER_DIR", "DigitClassifier", "load_digit_classifier"]
