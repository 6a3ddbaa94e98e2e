"""TensorRT / TensorRT-RTX: engine building (`samg build`) and a Runner over built engines.

Building runs anywhere TensorRT-RTX imports (ahead of time, also on a CPU-only machine); the
runner needs an NVIDIA GPU and CuPy (device memory, streams, CUDA graphs, and the
GuidanceCombine plugin's kernels).

    from samg.engines.tensorrt import BuildOptions, build_export, TensorRTRunner
    build_export("out/sdxl", BuildOptions(combine="plugin"))
    runner = TensorRTRunner("out/sdxl/engines/denoiser.engine", device="cuda")
    outputs = runner.run({"latents": ..., "timestep": ..., ...})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from samg.engines.trt_build import (  # noqa: F401  (the public build API lives here)
    COMBINE_PATHS,
    COMPONENTS,
    PLUGIN_ID,
    PRECISIONS,
    BuildOptions,
    BuildResult,
    build_export,
    make_logger,
    read_record,
    verify_engine,
)
from samg.engines.trt_loader import load_trt
from samg.engines.trt_profiles import ShapeRequest, parse_shape_spec  # noqa: F401
from samg.errors import SamgError, check, require


class TensorRTRunner:
    """Runs one engine built by `samg build`: numpy in/out via `run`, CuPy arrays via `run_device`.

    The engine's build record is checked first (hash, TensorRT flavour/version, GPU), the
    GuidanceCombine plugin is registered when the engine holds it, then the engine is deserialized.
    `cuda_graph=True` captures one CUDA graph per input-shape signature and replays it.
    """

    def __init__(self, path: str | Path, device: str = "cuda", *, cuda_graph: bool = False, device_id: int = 0):
        check(device == "cuda", f"the TensorRT backend runs on the GPU only, not device={device!r}: use --device cuda")
        path = Path(path)
        if path.suffix == ".onnx":
            path = path.parent / "engines" / f"{path.stem}.engine"
            check(path.is_file(), f"no engine for {path.stem}: run `samg build {path.parent.parent}` first")
        self.trt = trt = load_trt(read_record(path)["trt"]["flavour"])
        record = verify_engine(path, trt)
        self.cp = cp = require("cupy", "to run TensorRT engines; CUDA 12 hosts: pip install cupy-cuda12x")
        if record.get("plugins"):
            from samg.engines.plugin_trt import register_plugin

            register_plugin(trt)
        cp.cuda.Device(device_id).use()
        self.record = record
        self.path = path
        self.logger = make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise SamgError(
                f"TensorRT could not load {path} (rebuild it with `samg build`):\n{self.logger.report()}"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.cuda_graph = cuda_graph
        self._graphs: dict[tuple, tuple[Any, dict, dict]] = {}

    # -- execution -----------------------------------------------------------------------------
    def _check_names(self, feeds: dict) -> None:
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise SamgError(
                f"{self.path.name}: the engine expects inputs {self.input_names}, got {sorted(feeds)} "
                f"(missing {missing}, unexpected {extra}): rebuild the engine from the current export"
            )

    def _bind(self, inputs: dict) -> dict:
        """Set shapes and addresses for `inputs` (CuPy arrays); allocate and bind outputs."""
        cp = self.cp
        for name in self.input_names:
            array = inputs[name]
            if not self.context.set_input_shape(name, tuple(array.shape)):
                raise SamgError(
                    f"{self.path.name}: input {name} shape {tuple(array.shape)} is outside the engine's profile "
                    f"{self.record['profiles'].get(name)}: rebuild with `samg build --dynamic --min/--max ...`"
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
        cp = self.cp
        self._check_names(feeds)
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

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.run_device(feeds)
        return {name: self.cp.asnumpy(array) for name, array in outputs.items()}
