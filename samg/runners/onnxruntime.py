"""ONNX Runtime runner: CPU EP, or CUDA EP with IO binding (outputs stay on the GPU until read)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from samg.errors import SamgError, require
from samg.runners.base import GraphRunner, InputDecl

# ONNX tensor type string -> numpy dtype of the graph's declared inputs.
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


class OrtRunner(GraphRunner):
    def __init__(self, path: Path, device: str = "cpu", *, custom_op_library: str | None = None,
                 threads: int | None = None, providers: list | None = None):
        ort = require("onnxruntime", "to run exported models")
        path = Path(path)
        if not path.is_file():
            raise SamgError(f"model file not found: {path}: check the export folder or re-export")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # idle ORT threads spin by default, stealing a shared CPU from everything else (torch, other sessions)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = int(threads)
        if custom_op_library:
            options.register_custom_ops_library(str(custom_op_library))
        if providers is None:
            providers = ["CPUExecutionProvider"]
            if device == "cuda":
                if "CUDAExecutionProvider" not in ort.get_available_providers():
                    raise SamgError(
                        "ONNX Runtime has no CUDA execution provider here: pip install onnxruntime-gpu, or use --device cpu"
                    )
                providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types; name the usual causes
            msg = str(exc)
            if "custom" in msg.lower() or "domain" in msg.lower() or "not a registered function/op" in msg:
                raise SamgError(
                    f"{path.name} uses an operator ONNX Runtime cannot run here ({msg.splitlines()[0][:200]}): "
                    "re-export with the op's function body attached, or pass the samg custom-op library"
                ) from None
            raise SamgError(f"ONNX Runtime cannot load {path.name}: {msg.splitlines()[0][:300]}") from None
        self.device = device
        self.path = path
        # failures reach the caller as exceptions (and SamgError for running out of memory): no log lines too
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4
        self.inputs = {
            i.name: InputDecl(np.dtype(_ORT_TYPES.get(i.type, np.float32)), tuple(i.shape))
            for i in self.session.get_inputs()
        }
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._ort = ort

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return self._session_run(feeds)
        except Exception as exc:  # ORT's own exception types; only running out of memory is the user's to fix
            if not isinstance(exc, MemoryError) and "Failed to allocate memory" not in str(exc):
                raise
            shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in feeds.items())
            raise SamgError(f"out of memory running {self.path.name} on {shapes}: "
                            "lower --height/--width, --frames or --num-images") from None

    def _session_run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.device != "cuda":
            outs = self.session.run(self.output_names, feeds, self._run_options)
            return dict(zip(self.output_names, outs))
        # IO binding: inputs copied once, outputs allocated on the GPU by ORT.
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, self._ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.output_names:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding, self._run_options)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))
