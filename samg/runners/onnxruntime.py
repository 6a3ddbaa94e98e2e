"""ONNX Runtime runner: CPU EP, or CUDA EP with IO binding.

Numpy feeds give numpy outputs (on CUDA: inputs copied in once, outputs allocated on the GPU by ORT
and read back). Torch tensor feeds are bound where they live, through IO binding on their memory
(`data_ptr`), and the outputs are written into torch tensors allocated beside them, so a sampling
loop on the GPU never passes through the host (`tensor_device`; on CUDA by default when torch is
installed with CUDA: a CPU build of torch keeps the loop on numpy). The same binding works for CPU
tensors on the CPU EP. torch is imported only for that (never for numpy feeds). ONNX Runtime runs on
its own stream, so each call waits for torch's work first: one synchronization per step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from samg.errors import SamgError, require
from samg.guidance._xp import is_torch
from samg.runners.base import GraphRunner, InputDecl, check_torch_cuda, torch_has_cuda

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
                 threads: int | None = None, providers: list | None = None, device_tensors: bool | None = None):
        """device_tensors: let the sampling loop hand this runner torch tensors on its device and get
        tensors back (default: on CUDA when torch is installed with CUDA; True on the CPU binds CPU
        tensors, True on CUDA needs torch with CUDA)."""
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
        if device_tensors and device == "cuda":
            check_torch_cuda("device_tensors=True on CUDA")
        self.device_tensors = device_tensors  # None: decided when the loop first asks (tensor_device)

    @property
    def tensor_device(self) -> str | None:
        """The device where the loop keeps its arrays as torch tensors for this runner (see the
        module doc), None for numpy. The default is decided here, not when the runner is made, so
        a CPU runner never imports torch."""
        if self.device_tensors is None:
            self.device_tensors = self.device == "cuda" and torch_has_cuda()
        return self.device if self.device_tensors else None

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
        if any(is_torch(v) for v in feeds.values()):
            return self._run_on_tensors(feeds)
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

    def _run_on_tensors(self, feeds: dict) -> dict:
        """IO binding on torch tensors: each input bound where it lives (cast within its kind to the
        graph's dtype on its device), each output written into a tensor allocated on the same device
        (its shape from the inputs' named dims; an output whose dims the inputs do not name is
        allocated by ORT and copied over). Outputs in the graph's dtypes."""
        torch = sys.modules["torch"]
        device = next(v.device for v in feeds.values() if is_torch(v))
        where = ("cuda" if device.type == "cuda" else "cpu", device.index or 0)
        binding = self.session.io_binding()
        bound, sizes = [], {}  # the bound tensors live until the run is over; named dim -> size
        for name, value in feeds.items():
            decl = self.inputs[name]
            tensor = value if is_torch(value) else torch.from_numpy(np.array(value))
            tensor = tensor.to(device=device, dtype=_torch_dtype(torch, decl.dtype)).contiguous()
            bound.append(tensor)
            sizes.update({dim: size for dim, size in zip(decl.dims, tensor.shape) if isinstance(dim, str)})
            binding.bind_input(name, *where, decl.dtype.type, tuple(tensor.shape), tensor.data_ptr())
        outputs = {}
        for out in self.session.get_outputs():
            shape = [dim if isinstance(dim, int) else sizes.get(dim) for dim in out.shape]
            dtype = np.dtype(_ORT_TYPES.get(out.type, np.float32))
            if None in shape:
                binding.bind_output(out.name, *where)
                continue
            outputs[out.name] = torch.empty(shape, dtype=_torch_dtype(torch, dtype), device=device)
            binding.bind_output(out.name, *where, dtype.type, shape, outputs[out.name].data_ptr())
        if device.type == "cuda":  # ORT runs on its own stream: the inputs torch wrote must be done
            torch.cuda.current_stream(device).synchronize()
        self.session.run_with_iobinding(binding, self._run_options)  # returns once ORT's work is done
        if len(outputs) < len(self.output_names):  # rare (no denoiser output): read back, then placed
            for name, value in zip(self.output_names, binding.copy_outputs_to_cpu()):
                outputs.setdefault(name, torch.from_numpy(value).to(device))
        return {name: outputs[name] for name in self.output_names}


def _torch_dtype(torch, dtype: np.dtype):
    """The torch dtype of a numpy dtype (the graph's declared element types all have one)."""
    return getattr(torch, np.dtype(dtype).name)
