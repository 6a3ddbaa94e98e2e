"""The bundled digit classifier and the data split it shares with samg-digits."""

import numpy as np
import pytest

from samg.bundled import CLASSIFIER_DIR, load_digit_classifier
from samg.bundled import data as digits_data
from samg.errors import SamgError


@pytest.fixture(scope="module")
def split():
    return digits_data.load_split()


@pytest.fixture(scope="module")
def classify():
    return load_digit_classifier()


def test_split_is_seeded_stratified_and_disjoint(split):
    assert len(split.test_labels) == 360 and len(split.train_labels) == 1437
    assert not set(split.train_indices) & set(split.test_indices)
    counts = np.bincount(split.test_labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~20% of each class
    again = digits_data.load_split()
    np.testing.assert_array_equal(again.test_indices, split.test_indices)
    assert split.train_images.shape[1:] == (digits_data.IMAGE_SIZE,) * 2
    assert 0.0 <= split.train_images.min() and split.train_images.max() <= 1.0


def test_classifier_reads_held_out_digits(split, classify):
    logits, features = classify(split.test_images)
    assert logits.shape == (360, 10) and features.shape == (360, 128)
    accuracy = (logits.argmax(1) == split.test_labels).mean()
    assert accuracy >= 0.95, accuracy


def test_uint8_rgb_input_matches_float_gray(split, classify):
    gray = split.test_images[:50]
    rgb_uint8 = np.repeat(np.round(gray * 255).astype(np.uint8)[..., None], 3, axis=-1)
    np.testing.assert_array_equal(classify.predict(rgb_uint8), classify.predict(gray))


def test_torch_backend_agrees_with_onnx(split, classify):
    pytest.importorskip("torch")
    torch_classify = load_digit_classifier(backend="torch")
    onnx_logits, onnx_features = classify(split.test_images[:40])
    torch_logits, torch_features = torch_classify(split.test_images[:40])
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4)
    np.testing.assert_allclose(onnx_features, torch_features, atol=1e-4)


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((2, 8, 8), np.float32), "8x8"),
        (np.zeros((16, 16), np.float32), "shape"),
        (np.full((2, 16, 16), 2.0, np.float32), "[0, 1]"),
    ],
)
def test_bad_input_is_a_one_line_samg_error(classify, images, message):
    with pytest.raises(SamgError, match=message.replace("[", r"\[").replace("]", r"\]")):
        classify(images)


def test_missing_classifier_folder_is_reported(tmp_path):
    with pytest.raises(SamgError, match="train_digit_classifier"):
        load_digit_classifier(directory=tmp_path)
    with pytest.raises(SamgError, match="backend"):
        load_digit_classifier(backend="tensorflow", directory=CLASSIFIER_DIR)
