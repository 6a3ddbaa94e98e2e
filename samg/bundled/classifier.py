"""The digit classifier that judges samg-digits samples: a small CNN, run by ONNX Runtime or torch.

`load_digit_classifier()` returns a callable images -> (logits, features). Images are the model's
output: uint8 (0..255) or float in [0, 1], shaped [N, H, W], [N, H, W, 1] or [N, H, W, 3] (RGB is
averaged to gray). `features` is the penultimate layer, used for the Fréchet distance in the
quality benchmark. torch and onnxruntime are imported only when a classifier is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from samg.errors import SamgError, check, require

CLASSIFIER_DIR = Path(__file__).resolve().parent / "digit-classifier"
FEATURE_DIM = 128


def build_network(image_size: int = 16, feature_dim: int = FEATURE_DIM):
    """conv-conv-pool-conv-pool, then a `feature_dim` layer and 10 logits; returns (logits, features)."""
    torch = require("torch", "to build the digit classifier")
    nn = torch.nn

    class DigitCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            )
            self.features = nn.Sequential(
                nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * (image_size // 4) ** 2, feature_dim), nn.ReLU()
            )
            self.head = nn.Linear(feature_dim, 10)

        def forward(self, images):  # images: [N, 1, H, W] in [0, 1]
            features = self.features(self.conv(images))
            return self.head(features), features

    return DigitCNN()


def to_gray_batch(images, image_size: int) -> np.ndarray:
    """Accepted image batches -> float32 [N, 1, image_size, image_size] in [0, 1]."""
    x = np.asarray(images)
    if x.ndim == 4 and x.shape[-1] in (1, 3):
        x = x.mean(axis=-1) if x.dtype != np.uint8 else x.astype(np.float32).mean(axis=-1) / 255.0
    elif x.ndim == 3:
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x
    else:
        raise SamgError(f"digit classifier: images of shape {x.shape} are not [N,H,W], [N,H,W,1] or [N,H,W,3]: "
                        "pass a batch of grayscale or RGB images")
    x = np.asarray(x, np.float32)
    check(x.shape[1:] == (image_size, image_size),
          f"digit classifier: images are {x.shape[1]}x{x.shape[2]}, it reads {image_size}x{image_size}: "
          "generate at the model's default size or resize first")
    check(np.isfinite(x).all() and x.min() >= -0.01 and x.max() <= 1.01,
          "digit classifier: float images must lie in [0, 1] (uint8 images in 0..255): rescale them first")
    return np.clip(x, 0.0, 1.0)[:, None]


class DigitClassifier:
    """Callable images -> (logits [N, 10], features [N, FEATURE_DIM]), both float32 numpy."""

    def __init__(self, directory: Path = CLASSIFIER_DIR, backend: str = "onnxruntime"):
        directory = Path(directory)
        config_path = directory / "config.json"
        check(config_path.exists(), f"digit classifier not found in {directory}: run scripts/train_digit_classifier.py")
        self.config = json.loads(config_path.read_text())
        self.image_size = int(self.config["image_size"])
        self.backend = backend
        if backend == "onnxruntime":
            ort = require("onnxruntime", "to run the digit classifier")
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1  # tiny network: threads cost more than they give
            self._session = ort.InferenceSession(
                str(directory / self.config["onnx"]), options, providers=["CPUExecutionProvider"]
            )
        elif backend == "torch":
            torch = require("torch", "to run the digit classifier")
            safetensors = require("safetensors.torch", "to load the digit classifier")
            self._net = build_network(self.image_size, int(self.config["feature_dim"]))
            self._net.load_state_dict(safetensors.load_file(directory / self.config["weights"]))
            self._net.eval()
            self._torch = torch
        else:
            raise SamgError(f"digit classifier: unknown backend {backend!r}: use 'onnxruntime' or 'torch'")

    def __call__(self, images) -> tuple[np.ndarray, np.ndarray]:
        x = to_gray_batch(images, self.image_size)
        if self.backend == "onnxruntime":
            logits, features = self._session.run(["logits", "features"], {"images": x})
            return logits, features
        with self._torch.no_grad():
            logits, features = self._net(self._torch.from_numpy(x))
        return logits.numpy(), features.numpy()

    def predict(self, images) -> np.ndarray:
        return self(images)[0].argmax(axis=1)


def load_digit_classifier(backend: str = "onnxruntime", directory: Path = CLASSIFIER_DIR) -> DigitClassifier:
    return DigitClassifier(directory, backend)
