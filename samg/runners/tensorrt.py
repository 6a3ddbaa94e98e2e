"""A Runner over TensorRT / TensorRT-RTX engines built by `samg build` (samg.build).

Needs an NVIDIA GPU and CuPy (device memory, streams, CUDA graphs, and the GuidanceCombine
plugin's kernels). Importing this module imports neither TensorRT nor the builder.

    runner = TensorRTRunner("out/sdxl/engines/denoiser.engine", device="cuda")
    outputs = runner.run({"latents": ..., "timestep": ..., ...})

The engine is deserialized by polygraphy; running stays ours (polygraphy's TrtRunner has no CUDA
graph replay and does not hand back CuPy arrays).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from samg.contract import ENGINES_DIR, read_engine_record, verify_engine
from samg.errors import SamgError, check, require
from samg.runners.base import GraphRunner, InputDecl


class TensorRTRunner(GraphRunner):
    """Runs one engine built by `samg build`: numpy in/out via `run`, CuPy arrays via `run_device`.

    The engine's build record is checked first (samg.contract.verify_engine: hash, TensorRT
    flavour/version, GPU), the GuidanceCombine plugin is registered when the engine holds it, then
    the engine is deserialized.
    `cuda_graph=True` captures one CUDA graph per input-shape signature and replays it.
    """

    def __init__(self, path: str | Path, device: str = "cuda", *, cuda_graph: bool = False, device_id: int = 0):
        check(device == "cuda", f"the TensorRT backend runs on the GPU only, not device={device!r}: use --device cuda")
        path = Path(path)
        if path.suffix == ".onnx":
            path = path.parent / ENGINES_DIR / f"{path.stem}.engine"
            check(path.is_file(), f"no engine for {path.stem}: run `samg build {path.parent.parent}` first")
        from samg.build.loader import flavour_of, gpu_compute_capability, load_trt, make_logger, polygraphy_trt

        record = read_engine_record(path)  # names the TensorRT flavour to load before the engine is checked
        self.trt = trt = load_trt(record.trt_flavour)
        record = verify_engine(path, trt_flavour=flavour_of(trt), trt_version=trt.__version__,
                               gpu_capability=gpu_compute_capability(), record=record)
        self.cp = cp = require("cupy", "to run TensorRT engines; CUDA 12 hosts: pip install cupy-cuda12x")
        if record.plugins:
            from samg.build.plugin import register_plugin

            register_plugin(trt)
        cp.cuda.Device(device_id).use()
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
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        # -1 marks a dim the engine's profile leaves free
        self.inputs = {
            n: InputDecl(self.dtypes[n], tuple(d if d >= 0 else None for d in self.engine.get_tensor_shape(n)))
            for n in names if is_input[n]
        }
        self.output_names = [n for n in names if not is_input[n]]
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.cuda_graph = cuda_graph
        self._graphs: dict[tuple, tuple[Any, dict, dict]] = {}

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
            outputs[name] = cp.empty(shape, dtype=self.dtypes[name])
            self.context.set_tensor_address(name, outputs[name].data.ptr)
        return outputs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.ptr):
            raise SamgError(f"TensorRT failed to run {self.path.name}:\n{self.logger.report()}")

    def run_device(self, feeds: dict) -> dict:
        """CuPy (or numpy) arrays in, CuPy arrays out; stays on the GPU."""
        return self._device_run(self.checked_feeds(feeds))

    def _device_run(self, feeds: dict) -> dict:
        cp = self.cp
        with self.stream:
            inputs = {n: cp.ascontiguousarray(cp.asarray(feeds[n], dtype=self.dtypes[n])) for n in self.input_names}
            if not self.cuda_graph:
                outputs = self._bind(inputs)
                self._execute()
                self.stream.synchronize()
                return outputs
            return self._run_graph(inputs)

    def _run_graph(self, inputs: dict) -> dict:
        """Replay a captured graph for this shape signature (captured on first use)."""
        signature = tuple((n, inputs[n].shape) for n in self.input_names)
        if signature not in self._graphs:
            static_inputs = {n: a.copy() for n, a in inputs.items()}
            outputs = self._bind(static_inputs)
            self._execute()  # TensorRT needs one plain run before capture (shape-dependent setup)
            self.stream.synchronize()
            self.stream.begin_capture()
            self._execute()
            graph = self.stream.end_capture()
            self._graphs[signature] = (graph, static_inputs, outputs)
        graph, static_inputs, outputs = self._graphs[signature]
        for name, array in inputs.items():
            static_inputs[name][...] = array
        graph.launch(self.stream)
        self.stream.synchronize()
        return {n: a.copy() for n, a in outputs.items()}

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._device_run(feeds)
        return {name: self.cp.asnumpy(array) for name, array in outputs.items()}
