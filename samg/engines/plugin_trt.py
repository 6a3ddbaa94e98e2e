"""`samg::GuidanceCombine` as a Python TensorRT plugin (IPluginV3, creator IPluginCreatorV3One).

The ONNX parser maps a node of domain `samg`, op `GuidanceCombine` to this plugin when the model
carries no function body for it (the parser prefers the body), passing the node's attributes as
plugin fields. An engine stores the plugin's name, namespace and fields but not its code, so
:func:`register_plugin` must run before parsing and again before deserializing.

Build-time hooks (shapes, types, formats, workspace) need only TensorRT and numpy. `enqueue`
launches the CUDA kernels of :mod:`samg.engines.trt_kernels` through CuPy on TensorRT's stream.

The plugin classes subclass the chosen TensorRT module's classes (`tensorrt` or `tensorrt_rtx`),
so they are made per module by :func:`plugin_classes`.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

from samg.errors import SamgError, check, require

PLUGIN_NAME = "GuidanceCombine"
PLUGIN_NAMESPACE = "samg"
PLUGIN_VERSION = "1"

# Field name -> (default, python type). Defaults are the op's attribute defaults.
FIELDS = {"tau": (1.0, float), "sharpness": (4.0, float), "smooth": (0, int), "channel_axis": (1, int)}
EPSILON = 1e-12
_EDGE = math.exp(-1.0)
SMOOTH_EDGE = _EDGE / (1 + 2 * _EDGE)
SMOOTH_CENTRE = 1.0 / (1 + 2 * _EDGE)

_THREADS = 256
_SUM_THREADS = 256
# Blocks per sample for the max |c - u| pass: enough to fill a GPU at batch 1.
_PEAK_BLOCKS_PER_SAMPLE = 1024
_ALIGN = 256

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
    check(values["smooth"] in (0, 3), f"GuidanceCombine smooth must be 0 or 3, got {values['smooth']}")
    check(values["channel_axis"] in (1, 2), f"GuidanceCombine channel_axis must be 1 or 2, got {values['channel_axis']}")
    return values


def split_dims(dims: tuple[int, ...], channel_axis: int) -> tuple[int, int, int, int]:
    """View a prediction shape as `[B, O, C, I]` (see trt_kernels)."""
    check(len(dims) in (4, 5), f"GuidanceCombine needs rank 4 or 5 predictions, got shape {tuple(dims)}")
    check(channel_axis < len(dims) - 2, f"GuidanceCombine channel_axis={channel_axis} does not fit shape {tuple(dims)}")
    batch, channels = dims[0], dims[channel_axis]
    outer = math.prod(dims[1:channel_axis])
    inner = math.prod(dims[channel_axis + 1 :])
    return batch, outer, channels, inner


def workspace_bytes(dims: tuple[int, ...], channel_axis: int) -> int:
    """Scratch for the energy/membership buffers (two `[B, P]` float32) and the per-sample sums."""
    batch, outer, _, inner = split_dims(dims, channel_axis)
    plane = _aligned(4 * batch * outer * inner)
    return 2 * plane + _aligned(4 * batch)


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def plugin_classes(trt: ModuleType) -> tuple[type, type]:
    """The (plugin, creator) classes built on `trt` (the tensorrt or tensorrt_rtx module)."""
    if trt.__name__ in _CLASSES:
        return _CLASSES[trt.__name__]
    np = require("numpy")
    supported_types = (trt.DataType.FLOAT, trt.DataType.HALF)

    class GuidanceCombinePlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, values: dict[str, float | int] | None = None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name = PLUGIN_NAME
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            self.num_outputs = 1
            self.values = dict(values or fields_from_collection(None))
            self._launcher = None

        # -- core / build --------------------------------------------------------------------
        def get_capability_interface(self, capability_type):
            return self

        def clone(self):
            copy = GuidanceCombinePlugin(self.values)
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
                return desc.type in supported_types
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
            return trt.PluginFieldCollection(
                [
                    trt.PluginField("tau", np.array([self.values["tau"]], np.float32), trt.PluginFieldType.FLOAT32),
                    trt.PluginField(
                        "sharpness", np.array([self.values["sharpness"]], np.float32), trt.PluginFieldType.FLOAT32
                    ),
                    trt.PluginField("smooth", np.array([self.values["smooth"]], np.int32), trt.PluginFieldType.INT32),
                    trt.PluginField(
                        "channel_axis", np.array([self.values["channel_axis"]], np.int32), trt.PluginFieldType.INT32
                    ),
                ]
            )

        # -- runtime -------------------------------------------------------------------------
        def set_tactic(self, tactic):
            pass

        def on_shape_change(self, inputs, outputs):
            dims = tuple(inputs[0].dims)
            split_dims(dims, self.values["channel_axis"])
            if self.values["smooth"]:
                check(min(dims[-2:]) >= 2, f"GuidanceCombine smooth=3 needs H, W >= 2, got shape {dims}")

        def attach_to_context(self, context):
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            if self._launcher is None:
                self._launcher = CupyLauncher()
            dims = tuple(input_desc[0].dims)
            half = input_desc[0].type == trt.DataType.HALF
            self._launcher.launch(self.values, dims, half, inputs, outputs[0], workspace, stream)
            return 0

    class GuidanceCombineCreator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name = PLUGIN_NAME
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            self.field_names = trt.PluginFieldCollection(
                [
                    trt.PluginField("tau", np.array([], np.float32), trt.PluginFieldType.FLOAT32),
                    trt.PluginField("sharpness", np.array([], np.float32), trt.PluginFieldType.FLOAT32),
                    trt.PluginField("smooth", np.array([], np.int32), trt.PluginFieldType.INT32),
                    trt.PluginField("channel_axis", np.array([], np.int32), trt.PluginFieldType.INT32),
                ]
            )

        def create_plugin(self, name, field_collection, phase):
            return GuidanceCombinePlugin(fields_from_collection(field_collection))

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


class CupyLauncher:
    """Launches the trt_kernels stages with CuPy on an external (TensorRT) stream."""

    def __init__(self):
        self.cp = require("cupy", "to run the GuidanceCombine TensorRT plugin; CUDA 12 hosts: pip install cupy-cuda12x")
        from samg.engines.trt_kernels import KERNEL_NAMES, KERNEL_SOURCE

        module = self.cp.RawModule(code=KERNEL_SOURCE, options=("--std=c++14",))
        self.kernels = {name: module.get_function(name) for name in KERNEL_NAMES}

    def _grid(self, total: int) -> tuple[int]:
        return (max(1, min((total + _THREADS - 1) // _THREADS, 65535)),)

    def launch(self, values, dims, half, inputs, output, workspace, stream) -> None:
        cp = self.cp
        batch, outer, channels, inner = split_dims(dims, values["channel_axis"])
        positions = outer * inner
        plane = _aligned(4 * batch * positions)
        energy, member, sums = int(workspace), int(workspace) + plane, int(workspace) + 2 * plane
        # Raw device addresses travel as 64-bit scalars (the size of a pointer argument).
        ptr = cp.uint64
        u_ptr, c_ptr, scales_ptr = (ptr(int(p)) for p in inputs[:3])
        energy, member, sums = ptr(energy), ptr(member), ptr(sums)
        i64 = cp.int64
        shape_args = (i64(batch), i64(outer), i64(channels), i64(inner))
        suffix = "f16" if half else "f32"
        with cp.cuda.ExternalStream(int(stream)):
            k = self.kernels
            # The member plane's first B floats hold each sample's max |c - u| until `membership`
            # overwrites the plane (after `energy` and `normalizer`, their only readers).
            peaks = member
            cp.cuda.runtime.memsetAsync(int(peaks), 0, 4 * batch, int(stream))
            per_sample = positions * channels
            peak_blocks = max(1, min((per_sample + _SUM_THREADS - 1) // _SUM_THREADS, _PEAK_BLOCKS_PER_SAMPLE))
            k[f"sample_peak_{suffix}"](
                (peak_blocks, batch), (_SUM_THREADS,), (u_ptr, c_ptr, peaks, i64(per_sample)),
                shared_mem=4 * _SUM_THREADS,
            )
            k[f"energy_{suffix}"](self._grid(batch * positions), (_THREADS,),
                                  (u_ptr, c_ptr, peaks, energy, *shape_args))
            k["normalizer"]((batch,), (_SUM_THREADS,), (energy, peaks, sums, i64(positions), cp.float32(EPSILON)),
                            shared_mem=4 * _SUM_THREADS)
            k["membership"](
                self._grid(batch * positions),
                (_THREADS,),
                (energy, sums, member, i64(batch), i64(positions),
                 cp.float32(values["tau"]), cp.float32(values["sharpness"])),
            )
            if values["smooth"]:
                height, width = dims[-2], dims[-1]
                planes = batch * positions // (height * width)
                grid = self._grid(batch * positions)
                common = (i64(planes), i64(height), i64(width))
                weights = (cp.float32(SMOOTH_EDGE), cp.float32(SMOOTH_CENTRE))
                # member -> energy (reused as scratch) along W, then back along H
                k["smooth_pass"](grid, (_THREADS,), (member, energy, *common, cp.int32(1), *weights))
                k["smooth_pass"](grid, (_THREADS,), (energy, member, *common, cp.int32(0), *weights))
            total = batch * positions * channels
            k[f"combine_{suffix}"](
                self._grid(total), (_THREADS,), (u_ptr, c_ptr, scales_ptr, member, ptr(int(output)), *shape_args)
            )
