"""`samg::GuidanceCombine` as a Python TensorRT plugin (IPluginV3, creator IPluginCreatorV3One).

The ONNX parser maps a node of domain `samg`, op `GuidanceCombine` to this plugin when the model
carries no function body for it (the parser prefers the body), passing the node's attributes as
plugin fields. An engine stores the plugin's name, namespace and fields but not its code, so
:func:`register_plugin` must run before parsing and again before deserializing.

Build-time hooks (shapes, types, formats, workspace) need only TensorRT and numpy. `enqueue`
launches the kernels of plugins/cuda/guidance_combine.cu (the one CUDA source of the op, shipped
beside this module as guidance_combine.cu) on TensorRT's stream. NVRTC compiles them through CuPy
once per process and GPU (`shared_launcher`), when an execution context takes the plugin
(`attach_to_context`, `on_shape_change`), never in `enqueue`, which may run under CUDA-graph
capture; the CUDA headers come from `cuda_include_dir` (NVRTC 13 has none built in).
The plugin is Python (IPluginV3) because polygraphy only loads plugin libraries, and standard
TensorRT's C++ headers are not available to build one.

The plugin classes subclass the chosen TensorRT module's classes (`tensorrt` or `tensorrt_rtx`),
so they are made per module by :func:`plugin_classes`.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Mapping

from samg.errors import SamgError, check, require
from samg.op.schema import DOMAIN, GUIDANCE_COMBINE, OP_TYPE, OP_VERSION, validate_attributes

# The ONNX parser maps a node to the plugin creator registered under its op type, domain and version.
PLUGIN_NAME = OP_TYPE
PLUGIN_NAMESPACE = DOMAIN
PLUGIN_VERSION = str(OP_VERSION)

# Field name -> (default, python type). Defaults are the op's attribute defaults.
FIELDS = {name: (default, type(default)) for name, default in GUIDANCE_COMBINE.defaults.items()}

# The kernels NVRTC compiles, by the C++ names the plugin launches them with.
KERNEL_SOURCE = Path(__file__).with_name("guidance_combine.cu")
KERNEL_NAMESPACE = "samg_combine_kernels"
ELEMENT_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
KERNEL_NAMES = tuple(
    f"{KERNEL_NAMESPACE}::{name}"
    for t in ELEMENT_TYPES.values()
    for name in (f"peak_kernel<{t}>", f"energy_kernel<{t}>", f"combine_kernel<{t}, true>", f"combine_kernel<{t}, false>")
) + (f"{KERNEL_NAMESPACE}::membership_kernel",)
# Launch shape of the kernels (guidance_combine.cu's `launch`): 256 threads, at most 4096 blocks
# per sample along x, the sample along y.
THREADS = 256
MAX_BLOCKS_PER_SAMPLE = 4096
MAX_BATCH = 65535
_ALIGN = 256
# guidance_combine.cu's `Shape`, passed by value: six int64 fields.
SHAPE_FIELDS = ("outer", "channels", "inner", "height", "width", "positions")

CUPY_PURPOSE = "to run the GuidanceCombine TensorRT plugin's kernels; on CUDA 12 hosts pip install cupy-cuda12x instead"
# module name -> (plugin class, creator class, registered creator instance)
_CLASSES: dict[str, tuple[type, type]] = {}
_REGISTERED: dict[str, Any] = {}


def fields_from_collection(collection) -> dict[str, float | int]:
    """Read tau/sharpness/smooth/channel_axis from a PluginFieldCollection (defaults for missing)."""
    np = require("numpy")
    values = {name: default for name, (default, _) in FIELDS.items()}
    for field in collection or []:
        if field.name not in FIELDS:
            continue  # the parser may pass extra node attributes (plugin_version, ...)
        data = np.asarray(field.data).reshape(-1)
        check(data.size >= 1, f"GuidanceCombine plugin field {field.name} is empty")
        values[field.name] = FIELDS[field.name][1](data[0])
    validate_attributes(**values)
    return values


def field_arrays(values: dict[str, float | int]) -> dict:
    """The plugin's fields as one-element arrays: float32 for float attributes, int32 for int ones."""
    np = require("numpy")
    return {name: np.array([values[name]], np.float32 if kind is float else np.int32)
            for name, (_, kind) in FIELDS.items()}


def split_dims(dims: tuple[int, ...], channel_axis: int) -> tuple[int, int, int, int]:
    """View a prediction shape as `[B, O, C, I]` (guidance_combine.cu's samg_combine_layout)."""
    check(len(dims) in (4, 5), f"GuidanceCombine needs rank 4 or 5 predictions, got shape {tuple(dims)}")
    check(channel_axis < len(dims) - 2, f"GuidanceCombine channel_axis={channel_axis} does not fit shape {tuple(dims)}")
    batch, channels = dims[0], dims[channel_axis]
    outer = math.prod(dims[1:channel_axis])
    inner = math.prod(dims[channel_axis + 1 :])
    return batch, outer, channels, inner


def workspace_bytes(dims: tuple[int, ...], channel_axis: int) -> int:
    """Scratch for the energy and membership maps (two `[B, P]` float32), then the per-sample
    energy sums (B double) and peaks (B float) in one aligned block."""
    batch, outer, _, inner = split_dims(dims, channel_axis)
    plane = _aligned(4 * batch * outer * inner)
    return 2 * plane + _aligned(12 * batch)


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def plugin_classes(trt: ModuleType) -> tuple[type, type]:
    """The (plugin, creator) classes built on `trt` (the tensorrt or tensorrt_rtx module)."""
    if trt.__name__ in _CLASSES:
        return _CLASSES[trt.__name__]
    element_types = {trt.DataType.FLOAT: "float32", trt.DataType.HALF: "float16", trt.DataType.BF16: "bfloat16"}
    field_types = {name: trt.PluginFieldType.FLOAT32 if kind is float else trt.PluginFieldType.INT32
                   for name, (_, kind) in FIELDS.items()}

    class GuidanceCombinePlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, values: dict[str, float | int] | None = None, runtime: bool = False):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name = PLUGIN_NAME
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            self.num_outputs = 1
            self.values = dict(values or fields_from_collection(None))
            self.runtime = runtime  # created to run (deserialized engine), not while building
            self._launcher = None

        # -- core / build --------------------------------------------------------------------
        def get_capability_interface(self, capability_type):
            return self

        def clone(self):
            copy = GuidanceCombinePlugin(self.values, self.runtime)
            copy._launcher = self._launcher
            return copy

        def get_output_data_types(self, input_types):
            return [input_types[0]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            return [trt.DimsExprs(inputs[0])]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos == 0:
                return desc.type in element_types
            if pos == 2:  # scales [B, 2] are always float32
                return desc.type == trt.DataType.FLOAT
            # pred_cond and guided share pred_uncond's type
            return desc.type == in_out[0].desc.type

        def configure_plugin(self, inputs, outputs):
            split_dims(tuple(inputs[0].desc.dims), self.values["channel_axis"])

        def get_workspace_size(self, inputs, outputs):
            return workspace_bytes(tuple(inputs[0].max), self.values["channel_axis"])

        def get_valid_tactics(self):
            return []

        def get_fields_to_serialize(self):
            # A PluginField borrows its array's memory: the arrays live on the plugin, or TensorRT
            # would read freed memory once they are garbage collected.
            self._serialized_arrays = field_arrays(self.values)
            return trt.PluginFieldCollection(
                [trt.PluginField(name, array, field_types[name]) for name, array in self._serialized_arrays.items()]
            )

        # -- runtime -------------------------------------------------------------------------
        def set_tactic(self, tactic):
            pass

        def on_shape_change(self, inputs, outputs):
            dims = tuple(inputs[0].dims)
            split_dims(dims, self.values["channel_axis"])
            if self.values["smooth"]:
                check(min(dims[-2:]) >= 2, f"GuidanceCombine smooth=3 needs H, W >= 2, got shape {dims}")
            if self.runtime and self._launcher is None:
                self._launcher = shared_launcher()

        def attach_to_context(self, context):
            # The kernels are compiled here, when the execution context is made, never in enqueue:
            # enqueue may run inside a CUDA-graph capture, where compiling and loading a module fails.
            copy = self.clone()
            copy.runtime = True
            copy._launcher = shared_launcher()
            return copy

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            if self._launcher is None:  # a build-time run (standard TensorRT times plugins): no context
                self._launcher = shared_launcher()
            dims = tuple(input_desc[0].dims)
            element = element_types[input_desc[0].type]
            self._launcher.launch(self.values, dims, element, inputs, outputs[0], workspace, stream)
            return 0

    class GuidanceCombineCreator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name = PLUGIN_NAME
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            # Empty arrays: the creator declares names and types only; kept alive like the plugin's.
            self._field_arrays = {name: array[:0] for name, array in field_arrays(fields_from_collection(None)).items()}
            self.field_names = trt.PluginFieldCollection(
                [trt.PluginField(name, array, field_types[name]) for name, array in self._field_arrays.items()]
            )

        def create_plugin(self, name, field_collection, phase):
            return GuidanceCombinePlugin(fields_from_collection(field_collection), phase == trt.TensorRTPhase.RUNTIME)

    _CLASSES[trt.__name__] = (GuidanceCombinePlugin, GuidanceCombineCreator)
    return _CLASSES[trt.__name__]


def register_plugin(trt: ModuleType) -> None:
    """Register the GuidanceCombine creator with `trt`'s plugin registry (idempotent).

    The creator instance is kept alive here: TensorRT holds only a borrowed reference.
    """
    if trt.__name__ in _REGISTERED:
        return
    _, creator_class = plugin_classes(trt)
    creator = creator_class()
    registry = trt.get_plugin_registry()
    if not registry.register_creator(creator, PLUGIN_NAMESPACE):
        # Someone (another samg import of the same module) may have registered it already.
        if registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
            raise SamgError(f"TensorRT refused to register the {PLUGIN_NAMESPACE}::{PLUGIN_NAME} plugin creator")
    _REGISTERED[trt.__name__] = creator


# What guidance_combine.cu includes under NVRTC; NVRTC 13 has no built-in copy of either.
CUDA_HEADERS = ("cuda_fp16.h", "cuda_bf16.h")
CUDA_HEADERS_HINT = ("install the CUDA headers: pip install nvidia-cuda-runtime (CUDA 13; nvidia-cuda-runtime-cu12 "
                     "for CUDA 12), or install the CUDA toolkit and set CUDA_PATH to its folder")
SYSTEM_CUDA_ROOT = "/usr/local/cuda"


def cuda_include_candidates(environ: Mapping[str, str] | None = None, search_paths: Iterable[str] | None = None,
                            system_roots: Iterable[str] | None = None) -> list[Path]:
    """Folders that may hold the CUDA headers, in the order they are tried: $CUDA_PATH/include,
    $CUDA_HOME/include, the include folders of NVIDIA's pip wheels on `search_paths` (default
    sys.path: nvidia-cuda-runtime puts them in nvidia/cu13/include, its CUDA 12 wheel in
    nvidia/cuda_runtime/include), then `system_roots` (default: CuPy's CUDA path, /usr/local/cuda)."""
    environ = os.environ if environ is None else environ
    roots = [environ.get("CUDA_PATH"), environ.get("CUDA_HOME")]
    candidates = [Path(root) / "include" for root in roots if root]
    for folder in sys.path if search_paths is None else search_paths:
        wheels = Path(folder or ".") / "nvidia"
        if wheels.is_dir():
            found = [p for p in wheels.iterdir() if (p / "include").is_dir()]
            candidates += [p / "include" for p in sorted(found, key=_newest_cuda_first)]
    if system_roots is None:
        system_roots = [_cupy_cuda_path(), SYSTEM_CUDA_ROOT]
    candidates += [Path(root) / "include" for root in system_roots if root]
    return candidates


def _newest_cuda_first(folder: Path) -> tuple:
    """CUDA 13 wheels share nvidia/cu13/; CUDA 12 ones have a folder per library (cuda_runtime, ...)."""
    name = folder.name
    if name.startswith("cu") and name[2:].isdigit():
        return (0, -int(name[2:]), name)
    return (1, 0, name)


def _cupy_cuda_path() -> str | None:
    try:
        import cupy
    except ImportError:
        return None
    try:
        return cupy.cuda.get_cuda_path()
    except Exception:  # noqa: BLE001 - CuPy without a toolkit: the other places are tried
        return None


def cuda_include_dir(environ: Mapping[str, str] | None = None, search_paths: Iterable[str] | None = None,
                     system_roots: Iterable[str] | None = None) -> str:
    """The first candidate folder (cuda_include_candidates) holding every header in CUDA_HEADERS."""
    for folder in cuda_include_candidates(environ, search_paths, system_roots):
        if all((folder / header).is_file() for header in CUDA_HEADERS):
            return str(folder)
    raise SamgError(f"the CUDA headers {' and '.join(CUDA_HEADERS)} were not found for compiling the GuidanceCombine "
                    f"kernels: {CUDA_HEADERS_HINT}")


def compile_options(include_dir: str) -> tuple[str, ...]:
    return ("--std=c++17", f"-I{include_dir}")


# device id -> the compiled kernels (one NVRTC compile per process and GPU)
_LAUNCHERS: dict[int, "CupyLauncher"] = {}


def shared_launcher() -> "CupyLauncher":
    """The kernels compiled for the current CUDA device, compiled on first use."""
    cp = require("cupy", CUPY_PURPOSE)
    device = cp.cuda.runtime.getDevice()
    if device not in _LAUNCHERS:
        _LAUNCHERS[device] = CupyLauncher()
    return _LAUNCHERS[device]


class CupyLauncher:
    """Launches guidance_combine.cu's kernels with CuPy on an external (TensorRT) stream, in the
    order of the file's own host `launch`."""

    def __init__(self):
        self.cp = require("cupy", CUPY_PURPOSE)
        np = require("numpy")
        module = self.cp.RawModule(code=KERNEL_SOURCE.read_text(), options=compile_options(cuda_include_dir()),
                                   name_expressions=KERNEL_NAMES)
        self.kernels = {name: module.get_function(name) for name in KERNEL_NAMES}
        self.shape_dtype = np.dtype([(f, np.int64) for f in SHAPE_FIELDS], align=True)
        self.np = np

    def kernel(self, name: str):
        return self.kernels[f"{KERNEL_NAMESPACE}::{name}"]

    def launch(self, values, dims, element, inputs, output, workspace, stream) -> None:
        cp, np = self.cp, self.np
        batch, outer, channels, inner = split_dims(dims, values["channel_axis"])
        check(batch <= MAX_BATCH, f"GuidanceCombine batch {batch} is larger than {MAX_BATCH} (the kernels' grid)")
        positions = outer * inner
        if batch == 0 or positions == 0 or channels == 0:
            return
        plane = _aligned(4 * batch * positions)
        base = int(workspace)
        energy, member, sums = base, base + plane, base + 2 * plane
        peaks = sums + 8 * batch
        # Raw device addresses travel as 64-bit scalars (the size of a pointer argument).
        ptr = cp.uint64
        u, c, scales = (ptr(int(p)) for p in inputs[:3])
        out = ptr(int(output))
        shape = np.array([(outer, channels, inner, dims[-2], dims[-1], positions)], self.shape_dtype)[0]
        tau, k = np.float32(values["tau"]), np.float32(values["sharpness"])
        t = ELEMENT_TYPES[element]
        grid = (max(1, min((positions + THREADS - 1) // THREADS, MAX_BLOCKS_PER_SAMPLE)), batch)
        block = (THREADS,)
        with cp.cuda.ExternalStream(int(stream)):
            cp.cuda.runtime.memsetAsync(sums, 0, 12 * batch, int(stream))  # sums and peaks start at 0
            self.kernel(f"peak_kernel<{t}>")(grid, block, (u, c, ptr(peaks), shape))
            self.kernel(f"energy_kernel<{t}>")(grid, block, (u, c, ptr(peaks), ptr(energy), ptr(sums), shape))
            map_ = energy
            if values["smooth"]:
                self.kernel("membership_kernel")(grid, block, (ptr(energy), ptr(sums), ptr(peaks), ptr(member), shape, tau, k))
                map_ = member
            smooth = "true" if values["smooth"] else "false"
            self.kernel(f"combine_kernel<{t}, {smooth}>")(
                grid, block, (u, c, scales, out, ptr(map_), ptr(sums), ptr(peaks), shape, tau, k)
            )
