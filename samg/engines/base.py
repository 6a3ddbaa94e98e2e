"""The Runner interface every backend implements, and `open_runner` to pick one by name.

A runner runs one graph (a .onnx file or an engine built from it): named numpy arrays in, named
numpy arrays out. The pipeline never asks which backend it has. GPU runners may also accept and
return device arrays; numpy in and out must always work.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from samg.errors import SamgError


@runtime_checkable
class Runner(Protocol):
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


# backend name -> "module:factory"; a factory takes (path, device=..., **opts) and returns a Runner.
BACKENDS = {
    "onnxruntime": "samg.engines.onnxruntime:OrtRunner",
    "torch": "samg.engines.torch:TorchRunner",
    "null": "samg.engines.null:NullRunner",
    "tensorrt": "samg.engines.tensorrt:TensorRTRunner",
}
DEVICES = ("cpu", "cuda")


def open_runner(path: str | Path, backend: str = "onnxruntime", device: str = "cpu", **opts) -> Runner:
    """Open the graph at `path` with `backend` on `device` (extra options go to the backend)."""
    if backend not in BACKENDS:
        raise SamgError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise SamgError(f"unknown device {device!r}: use cpu or cuda")
    module_name, factory_name = BACKENDS[backend].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise SamgError(f"backend {backend!r} is not available in this installation: use --backend onnxruntime") from None
        raise
    return getattr(module, factory_name)(Path(path), device=device, **opts)


def check_feeds(runner: Runner, feeds: dict[str, np.ndarray], where: str) -> None:
    """Refuse feeds that do not name exactly the graph's inputs (a contract mismatch, not user input)."""
    missing = [n for n in runner.input_names if n not in feeds]
    extra = [n for n in feeds if n not in runner.input_names]
    if missing or extra:
        raise SamgError(
            f"{where}: the graph expects inputs {runner.input_names}, got {sorted(feeds)} "
            f"(missing {missing}, unexpected {extra}): re-export the model with this samg version"
        )
