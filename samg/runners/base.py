"""The Runner interface every backend implements, and `open_runner` to pick one by name.

A runner runs one graph (a .onnx file or an engine built from it): named arrays in, named numpy
arrays out. The pipeline never asks which backend it has. GPU runners may also accept and return
device arrays; numpy in and out must always work.

Every runner subclasses `GraphRunner`, which checks each call's feeds against the graph's declared
inputs (names, rank, dtype kind, fixed dims) with one SamgError line naming the input, and casts
numpy feeds to the declared dtype within a kind (float32 latents to a float16 graph, int32 ids to int64).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from samg.errors import SamgError


@runtime_checkable
class Runner(Protocol):
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class InputDecl:
    """One graph input as declared: dtype and dims (an int is fixed; None or a name is free)."""

    dtype: np.dtype
    dims: tuple[int | str | None, ...]


# Feeds may be cast within a kind, never across (a float where ids are expected is a caller's bug).
_KINDS = {"f": "float", "i": "integer", "u": "integer", "b": "bool"}


class GraphRunner:
    """Base of every runner: `run` checks and casts the feeds, then calls the backend's `_run`."""

    inputs: dict[str, InputDecl]
    output_names: list[str]
    path: Path

    @property
    def input_names(self) -> list[str]:
        return list(self.inputs)

    def run(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        return self._run(self.checked_feeds(feeds))

    def _run(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def checked_feeds(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """`feeds` in the graph's input order, numpy ones cast to the declared dtype; SamgError otherwise."""
        where = f"{self.path.name}: input"
        missing = [n for n in self.inputs if n not in feeds]
        extra = [n for n in feeds if n not in self.inputs]
        if missing or extra:
            name = (missing or extra)[0]
            problem = "is missing" if missing else "is not an input of this graph"
            raise SamgError(f"{where} {name!r} {problem} (the graph takes {', '.join(self.inputs)}): "
                            "re-export the model with this samg version, or rebuild its engine")
        checked = {}
        for name, decl in self.inputs.items():
            value = feeds[name]
            if not hasattr(value, "dtype") or not hasattr(value, "shape"):
                if callable(getattr(value, "shape", None)):  # a device value (OrtValue): bound as is
                    checked[name] = value
                    continue
                value = np.asarray(value)
            dtype, shape = _dtype_of(value), tuple(value.shape)
            if _KINDS.get(dtype.kind) != _KINDS.get(decl.dtype.kind):
                raise SamgError(f"{where} {name!r} has dtype {dtype}, the graph takes {decl.dtype}: "
                                f"pass {_KINDS.get(decl.dtype.kind, decl.dtype)} values")
            if len(shape) != len(decl.dims):
                raise SamgError(f"{where} {name!r} has shape {list(shape)} (rank {len(shape)}), the graph takes "
                                f"rank {len(decl.dims)} {list(decl.dims)}: pass the shape the graph declares")
            for axis, (size, want) in enumerate(zip(shape, decl.dims)):
                if isinstance(want, int) and size != want:
                    raise SamgError(f"{where} {name!r} has shape {list(shape)}, the graph fixes dim {axis} to "
                                    f"{want} ({list(decl.dims)}): pass the shape the graph declares")
            checked[name] = value.astype(decl.dtype) if isinstance(value, np.ndarray) and dtype != decl.dtype else value
        return checked


def torch_has_cuda() -> bool:
    """Whether torch is installed and sees a CUDA GPU (a CPU build of torch has none): where a
    runner on CUDA may keep the sampling loop in torch tensors. Imports torch only if installed."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def check_torch_cuda(asked: str) -> None:
    """Refuse `asked` (device_tensors=True on CUDA) where torch has no CUDA, in one line."""
    if not torch_has_cuda():
        raise SamgError(f"{asked} needs torch with CUDA (the sampling loop keeps torch tensors on the GPU), and this "
                        "torch has none: install a CUDA build of torch, or drop device_tensors (the loop runs on numpy)")


def _dtype_of(value) -> np.dtype:
    """The numpy dtype of a feed's elements; a torch tensor's by name (runners that take device
    tensors cast them themselves; bfloat16, which numpy lacks, checks as float32: the same kind)."""
    if type(value.dtype).__module__ == "torch":
        name = str(value.dtype).removeprefix("torch.")
        return np.dtype("float32" if name == "bfloat16" else name)
    return np.dtype(value.dtype)


# backend name -> "module:factory"; a factory takes (path, device=..., **opts) and returns a Runner.
BACKENDS = {
    "onnxruntime": "samg.runners.onnxruntime:OrtRunner",
    "torch": "samg.runners.torch:TorchRunner",
    "null": "samg.runners.null:NullRunner",
    "tensorrt": "samg.runners.tensorrt:TensorRTRunner",
}
DEVICES = ("cpu", "cuda")
# Backends that run on the CPU (TensorRT needs cuda): `samg encode` runs there.
CPU_BACKENDS = tuple(name for name in BACKENDS if name != "tensorrt")
# Backends a deployment runs on, so the ones `samg bench` times (torch is the reference, null does no work).
DEPLOYMENT_BACKENDS = ("onnxruntime", "tensorrt")


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


def export_graph(path: Path, *, float_dtype: str | None = None):
    """(export, role, inputs, output names) of a graph file named in its folder's samg.json.

    For the runners that do not run the ONNX file (torch, null): the graph's inputs come from the
    typed manifest (samg.contract.read_export, without hashing: these runners load no graph).
    `role` is "denoiser", "text_encoder" or "vae". `float_dtype` replaces float dtypes (the torch
    reference computes in float32); bfloat16, which numpy lacks, is float32 here.
    """
    from samg.contract import MANIFEST, read_export

    path = Path(path)
    if not (path.parent / MANIFEST).is_file():
        raise SamgError(f"{path.parent} has no {MANIFEST}: this backend runs the graphs of an export folder only")
    export = read_export(path.parent, verify=False)

    def decl(dtype: str, dims) -> InputDecl:
        if dtype.startswith("float") or dtype == "bfloat16":
            dtype = float_dtype or ("float32" if dtype == "bfloat16" else dtype)
        return InputDecl(np.dtype(dtype), tuple(dims))

    def declared(tensors, role: str) -> dict[str, InputDecl]:
        if not tensors:
            raise SamgError(f"{path.parent / MANIFEST} does not declare the {role} graph's inputs: "
                            "re-export the model with this samg version")
        return {name: decl(t.dtype, t.shape) for name, t in tensors.items()}

    name = path.name
    if name == export.denoiser.file:
        outputs = list(export.denoiser.outputs or (["guided"] if export.fused else ["pred_uncond", "pred_cond"]))
        return export, "denoiser", declared(export.denoiser.inputs, "denoiser"), outputs
    if name == export.text_encoder.file:
        inputs = {t.input_name: decl("int64", ("N", t.max_length)) for t in export.text_encoder.tokenizers}
        return export, "text_encoder", inputs, list(export.text_encoder.outputs)
    if name == export.vae.file:
        outputs = list(export.vae.outputs or ("images",))
        return export, "vae", declared(export.vae.inputs, "VAE decoder"), outputs
    raise SamgError(f"{name} is not a graph listed in {path.parent / MANIFEST}: this backend runs export folders only")
