#!/usr/bin/env python
"""Train the digit classifier that reads samg-digits samples, on the training split only.

    python scripts/train_digit_classifier.py            # ~1 min on 2 cores

Trains a small CNN (samg/bundled/classifier.py) on the upsampled training digits with one-pixel
shifts and a little noise (so it is not thrown by the small artefacts of generated images), reports
accuracy on the held-out 20%, and writes samg/bundled/digit-classifier/: weights (safetensors),
classifier.onnx (logits and penultimate features) and config.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from samg.bundled import classifier as digit_classifier  # noqa: E402
from samg.bundled import data as digits_data  # noqa: E402
from samg.io import atomic_dir, atomic_write_json  # noqa: E402


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shift by up to one pixel each way (zero fill) plus mild Gaussian noise."""
    n = len(x)
    padded = F.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2, n), generator=gen)
    size = x.shape[-1]
    shifted = torch.stack([padded[i, :, dy[i]:dy[i] + size, dx[i]:dx[i] + size] for i in range(n)])
    return (shifted + 0.03 * torch.randn(shifted.shape, generator=gen)).clamp(0, 1)


def evaluate(net, images: np.ndarray, labels: np.ndarray) -> float:
    net.eval()
    with torch.no_grad():
        logits, _ = net(torch.from_numpy(images[:, None]))
    return float((logits.argmax(1).numpy() == labels).mean())


def export(net, out: Path, image_size: int, test_accuracy: float, epochs: int, seed: int) -> None:
    from safetensors.torch import save_file

    net.eval()
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp / "classifier.safetensors")
        torch.onnx.export(
            net, (torch.zeros(2, 1, image_size, image_size),), str(tmp / "classifier.onnx"),
            input_names=["images"], output_names=["logits", "features"],
            dynamic_axes={"images": {0: "N"}, "logits": {0: "N"}, "features": {0: "N"}},
            opset_version=17, dynamo=False,
        )
        atomic_write_json(tmp / "config.json", {
            "image_size": image_size, "channels": 1, "input": "images [N, 1, H, W] float32 in [0, 1] (0 = background)",
            "outputs": ["logits", "features"], "feature_dim": digit_classifier.FEATURE_DIM,
            "weights": "classifier.safetensors", "onnx": "classifier.onnx",
            "trained_on": "samg.bundled.data.load_split() training split (80%, seed 0, stratified)",
            "test_accuracy": test_accuracy, "epochs": epochs, "seed": seed,
            "command": "python scripts/train_digit_classifier.py",
        })


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=digit_classifier.CLASSIFIER_DIR)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()

    split = digits_data.load_split()
    size = digits_data.IMAGE_SIZE
    net = digit_classifier.build_network(size)
    x = torch.from_numpy(split.train_images[:, None])
    y = torch.from_numpy(split.train_labels)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-3)
    steps_per_epoch = (len(x) + 63) // 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=args.epochs * steps_per_epoch)
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 64):
            idx = order[start:start + 64]
            logits, _ = net(augment(x[idx], gen))
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            acc = evaluate(net, split.test_images, split.test_labels)
            print(f"[{time.time() - t0:5.1f}s] epoch {epoch + 1}: loss {loss.item():.4f} test accuracy {acc:.4f}", flush=True)

    test_accuracy = evaluate(net, split.test_images, split.test_labels)
    export(net, args.out, size, test_accuracy, args.epochs, args.seed)
    onnx_accuracy = float((digit_classifier.load_digit_classifier(directory=args.out).predict(split.test_images)
                           == split.test_labels).mean())
    print(f"held-out test accuracy: torch {test_accuracy:.4f}, onnxruntime {onnx_accuracy:.4f} "
          f"({len(split.test_labels)} digits); saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
