"""A Runner over TensorRT / TensorRT-RTX engines built by `samg build` (samg.build).

Needs an NVIDIA GPU and CuPy (device memory, streams, CUDA graphs, and the GuidanceCombine
plugin's kernels). Importing this module imports neither TensorRT nor the builder.

    runner = TensorRTRunner("out/sdxl/engines/denoiser.engine", device="cuda")
    outputs = runner.run({"latents": ..., "timestep": ..., ...})          # numpy in, numpy out
    outputs = runner.run({"latents": torch_cuda_tensor, ...})             # torch in, torch out
    outputs = runner.run_device({"latents": cupy_array, ...})             # CuPy in, CuPy out

Torch CUDA tensors are bound where they live (DLPack) and the outputs come back as torch tensors on
the GPU, so the sampling loop stays on the device (`tensor_device`, "cuda" where torch has CUDA; the
loop then uploads the noise and conditioning once). Each call synchronizes its own stream before it
returns (one synchronization per step): the outputs' memory is CuPy's, and torch cannot order its
later reads and CuPy's reuse of that memory by itself.

The engine is deserialized by polygraphy; running stays ours (polygraphy's TrtRunner has no CUDA
graph replay and does not hand back device arrays).

TODO(first RTX-class GPU): TensorRT-RTX >= 1.2 has built-in CUDA graphs (IRuntimeConfig, with
dynamic shapes), a one-line switch that may replace `cuda_graph=True`'s own capture; and check
whether engines built with REQUIRE_USER_ALLOCATION need `context.set_device_memory` or a
`temporary_allocator` from the runner, which supplies neither today. Neither can be checked on a
CPU or on an H200 (TensorRT-RTX does not run on compute capability 9.0).

bfloat16 tensors: numpy has no bfloat16, so `run` takes and returns them as float32 (converted
through ml_dtypes on the host); on the device they are 16-bit buffers (CuPy has no bfloat16 either),
and torch bfloat16 tensors are bound as they are.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from samg.contract import ENGINES_DIR, read_engine_record, verify_engine
from samg.errors import SamgError, check, require
from samg.runners.base import GraphRunner, InputDecl, check_torch_cuda, torch_has_cuda

CUPY_PURPOSE = "to run TensorRT engines; on CUDA 12 hosts pip install cupy-cuda12x instead"
# CuPy has no bfloat16: device buffers of bfloat16 tensors are int16 (the same two bytes).
DEVICE_BFLOAT16 = np.dtype(np.int16)


def _is_bfloat16(dtype: np.dtype) -> bool:
    return dtype.name == "bfloat16"


def _host_dtype(dtype: np.dtype) -> np.dtype:
    """What `run` takes and returns for an engine tensor: float32 for bfloat16 (numpy has none)."""
    return np.dtype(np.float32) if _is_bfloat16(dtype) else dtype


def _device_dtype(dtype: np.dtype) -> np.dtype:
    return DEVICE_BFLOAT16 if _is_bfloat16(dtype) else dtype


def upload_layout(value, dtype: np.dtype) -> np.ndarray:
    """A host feed as the bytes the engine's device buffer holds: cast to `dtype` (bfloat16 through
    ml_dtypes), contiguous, viewed as the device dtype (int16 for bfloat16)."""
    host = np.ascontiguousarray(np.asarray(value).astype(dtype, copy=False))
    return host.view(_device_dtype(dtype))


def download_layout(bits: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A device buffer copied to the host (device dtype) as `run` returns it: bfloat16 as float32."""
    return bits.view(dtype).astype(np.float32) if _is_bfloat16(dtype) else bits


def _is_torch_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")  # a torch tensor can only exist once torch is imported
    return torch is not None and isinstance(value, torch.Tensor)


class TensorRTRunner(GraphRunner):
    """Runs one engine built by `samg build`: numpy in/out via `run` (torch CUDA tensors in, torch
    tensors out); CuPy arrays or torch CUDA tensors via `run_device` (outputs as torch tensors when
    any input was one, else CuPy arrays).

    The engine's build record is checked first (samg.contract.verify_engine: hash, TensorRT
    flavour/version, GPU), then that the flavour runs on this GPU, the GuidanceCombine plugin is
    registered (and its kernels compiled) when the engine holds it, then the engine is deserialized.
    `cuda_graph=True` captures one CUDA graph per input-shape signature and replays it (TensorRT-RTX
    engines must be built with `samg build --cuda-graph`). `gpu_capability`: this GPU's "sm_XY"
    (default: asked from the CUDA driver). `device_tensors`: the sampling loop hands this runner torch
    CUDA tensors and gets tensors back (default: when torch has CUDA; False keeps the loop on numpy).
    """

    def __init__(self, path: str | Path, device: str = "cuda", *, cuda_graph: bool = False, device_id: int = 0,
                 gpu_capability: str | None = None, device_tensors: bool | None = None, **unknown):
        check(not unknown, f"the TensorRT backend takes no option {', '.join(map(repr, unknown))}: drop it "
                           "(its options: cuda_graph, device_id, gpu_capability, device_tensors)")
        check(device == "cuda", f"the TensorRT backend runs on the GPU only, not device={device!r}: use --device cuda")
        if device_tensors:
            check_torch_cuda("device_tensors=True")
        self.device_tensors = device_tensors
        path = Path(path)
        if path.suffix == ".onnx":
            path = path.parent / ENGINES_DIR / f"{path.stem}.engine"
            check(path.is_file(), f"no engine for {path.stem}: run `samg build {path.parent.parent}` first")
        from samg.build.loader import (
            CAPTURE_BUILD_FLAGS,
            check_gpu_supported,
            flavour_of,
            gpu_compute_capability,
            load_trt,
            make_logger,
            numpy_dtype,
            polygraphy_trt,
        )

        record = read_engine_record(path)  # names the TensorRT flavour to load before the engine is checked
        self.trt = trt = load_trt(record.trt_flavour)
        capability = gpu_capability or gpu_compute_capability()
        check_gpu_supported(trt, capability)
        record = verify_engine(path, trt_flavour=flavour_of(trt), trt_version=trt.__version__,
                               gpu_capability=capability, record=record)
        if cuda_graph:
            missing = [f for f in CAPTURE_BUILD_FLAGS.get(record.trt_flavour, ()) if f not in record.build_flags]
            check(not missing, f"{path} was built without {', '.join(missing)}, which {record.trt_flavour} needs to "
                               "capture its runs into a CUDA graph: rebuild it with `samg build DIR --cuda-graph`, "
                               "or run without cuda_graph")
        self.cp = cp = require("cupy", CUPY_PURPOSE)
        cp.cuda.Device(device_id).use()
        self.device_id = device_id
        if record.plugins:
            from samg.build.plugin import register_plugin, shared_launcher

            register_plugin(trt)
            shared_launcher()  # compiled now: a missing CuPy or CUDA header is one line here, not a failed run
        self.record = record
        self.path = path
        self.logger = make_logger(trt)
        polygraphy = polygraphy_trt(trt)
        from polygraphy.exception import PolygraphyException

        try:
            self.engine = polygraphy.engine_from_bytes(path.read_bytes(), runtime=trt.Runtime(self.logger))
        except PolygraphyException:
            raise SamgError(f"TensorRT could not load {path} (rebuild it with `samg build`):\n{self.logger.report()}") from None
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.dtypes = {n: numpy_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        # -1 marks a dim the engine's profile leaves free
        self.inputs = {
            n: InputDecl(_host_dtype(self.dtypes[n]), tuple(d if d >= 0 else None for d in self.engine.get_tensor_shape(n)))
            for n in names if is_input[n]
        }
        self.output_names = [n for n in names if not is_input[n]]
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.cuda_graph = cuda_graph
        self._graphs: dict[tuple, tuple[Any, dict, dict]] = {}

    @property
    def tensor_device(self) -> str | None:
        """Where the sampling loop keeps its arrays as torch tensors for this runner: "cuda" where
        torch has CUDA (unless device_tensors=False), None for numpy. Asked lazily: a loop that
        never reads it never imports torch."""
        if self.device_tensors is None:
            self.device_tensors = torch_has_cuda()
        return "cuda" if self.device_tensors else None

    # -- feeds (GraphRunner.checked_feeds checks numpy, CuPy and torch feeds alike) -------------
    def _to_device(self, name: str, value):
        """A feed as a contiguous CuPy array of the engine's device dtype (on self.stream)."""
        cp, dtype = self.cp, self.dtypes[name]
        if _is_torch_tensor(value):
            return self._from_torch(name, value)
        if isinstance(value, cp.ndarray):
            if _is_bfloat16(dtype):
                check(value.dtype == DEVICE_BFLOAT16,
                      f"{self.path.name}: input {name!r} is bfloat16, which CuPy cannot cast to: pass a numpy array "
                      "or a torch bfloat16 tensor")
                return cp.ascontiguousarray(value)
            return cp.ascontiguousarray(value.astype(dtype, copy=False))  # cast on the device
        return cp.asarray(upload_layout(value, dtype))

    def _from_torch(self, name: str, tensor):
        """A torch CUDA tensor bound in place (DLPack, no copy); cast on the device when its dtype differs."""
        torch = sys.modules["torch"]
        device = tensor.device
        check(device.type == "cuda" and (device.index is None or device.index == self.device_id),
              f"{self.path.name}: input {name!r} is a torch tensor on {device}, the engine runs on cuda:{self.device_id}: "
              "move it there (or pass a numpy array)")
        wanted = getattr(torch, self.dtypes[name].name)  # float32, float16, bfloat16, int64, ... share names
        tensor = tensor.to(wanted).contiguous()
        if wanted == torch.bfloat16:
            tensor = tensor.view(torch.int16)
        # DLPack with CuPy's current stream (self.stream): torch makes that stream wait for its own
        return self.cp.from_dlpack(tensor)

    def _to_torch(self, name: str, array):
        torch = require("torch", "to return torch tensors")
        tensor = torch.from_dlpack(array)
        return tensor.view(torch.bfloat16) if _is_bfloat16(self.dtypes[name]) else tensor

    def _to_host(self, name: str, array) -> np.ndarray:
        return download_layout(self.cp.asnumpy(array), self.dtypes[name])

    # -- execution -----------------------------------------------------------------------------
    def _bind(self, inputs: dict) -> dict:
        """Set shapes and addresses for `inputs` (CuPy arrays); allocate and bind outputs."""
        cp = self.cp
        for name in self.input_names:
            array = inputs[name]
            if not self.context.set_input_shape(name, tuple(array.shape)):
                raise SamgError(
                    f"{self.path.name}: input {name} shape {tuple(array.shape)} is outside the engine's profile "
                    f"{self.record.profiles.get(name)}: rebuild with `samg build --dynamic --min/--max ...`"
                )
            self.context.set_tensor_address(name, array.data.ptr)
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = cp.empty(shape, dtype=_device_dtype(self.dtypes[name]))
            self.context.set_tensor_address(name, outputs[name].data.ptr)
        return outputs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.ptr):
            raise SamgError(f"TensorRT failed to run {self.path.name}:\n{self.logger.report()}")

    def run_device(self, feeds: dict) -> dict:
        """CuPy arrays, torch CUDA tensors or numpy arrays in; stays on the GPU. Outputs are torch
        tensors when any input was a torch tensor, CuPy arrays otherwise."""
        return self._device_outputs(self.checked_feeds(feeds), cupy_out=True)

    def _device_outputs(self, feeds: dict, *, cupy_out: bool) -> dict:
        """Run on checked feeds: torch tensors out when any feed was one, else CuPy arrays
        (`cupy_out`) or numpy arrays."""
        outputs = self._device_run(feeds)
        if any(_is_torch_tensor(v) for v in feeds.values()):
            return {name: self._to_torch(name, a) for name, a in outputs.items()}
        if cupy_out:
            return outputs
        return {name: self._to_host(name, a) for name, a in outputs.items()}

    def _device_run(self, feeds: dict) -> dict:
        """The outputs as CuPy arrays, complete when this returns (self.stream synchronized)."""
        with self.stream:
            inputs = {n: self._to_device(n, feeds[n]) for n in self.input_names}
            if not self.cuda_graph:
                outputs = self._bind(inputs)
                self._execute()
                self.stream.synchronize()  # after the run: the outputs are written
                return outputs
            return self._run_graph(inputs)

    def _run_graph(self, inputs: dict) -> dict:
        """Replay a captured graph for this shape signature (captured on first use)."""
        signature = tuple((n, inputs[n].shape) for n in self.input_names)
        if signature not in self._graphs:
            static_inputs = {n: a.copy() for n, a in inputs.items()}
            outputs = self._bind(static_inputs)
            self._execute()  # one plain run before capture: shape-dependent setup and compiles happen here
            self.stream.synchronize()
            if not self._capturable():
                self.cuda_graph = False
                print(f"samg: {self.path.name}: TensorRT cannot capture this engine's runs into a CUDA graph "
                      "(data-dependent shapes or on-device control flow): running it without one", file=sys.stderr)
                return outputs
            self._graphs[signature] = (self._capture(), static_inputs, outputs)
        graph, static_inputs, outputs = self._graphs[signature]
        for name, array in inputs.items():
            static_inputs[name][...] = array
        graph.launch(self.stream)
        # the copies out of the graph's buffers are queued on self.stream too: wait for them, not
        # only for the graph (a reader on another stream would otherwise see them unwritten)
        copies = {n: a.copy() for n, a in outputs.items()}
        self.stream.synchronize()
        return copies

    def _capturable(self) -> bool:
        """TensorRT's own answer where it has one (TensorRT-RTX: is_stream_capturable)."""
        ask = getattr(self.context, "is_stream_capturable", None)
        return True if ask is None else bool(ask(self.stream.ptr))

    def _capture(self):
        """One run captured on self.stream; a failed capture is ended so the stream stays usable."""
        self.stream.begin_capture()
        captured = False
        try:
            self._execute()
            captured = True
        finally:
            if not captured:
                try:
                    self.stream.end_capture()
                except Exception:  # noqa: BLE001 - the capture is invalid anyway; the run's error is raised
                    pass
        return self.stream.end_capture()

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._device_outputs(feeds, cupy_out=False)
