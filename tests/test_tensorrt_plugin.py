"""The samg::GuidanceCombine Python TensorRT plugin: registration, parsing, build-time hooks.

Parsing a plugin node is first checked in a subprocess (the RTX wheel's missing library link
aborts the process instead of raising); the in-process tests need that check to pass.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from samg.build.loader import available_flavours
from samg.errors import SamgError

pytestmark = pytest.mark.tensorrt
if not available_flavours():
    pytest.skip("TensorRT / TensorRT-RTX is not importable (pip install tensorrt-rtx-cu13)", allow_module_level=True)

PARSE_SCRIPT = textwrap.dedent(
    """
    from samg.build.loader import load_trt
    from samg.build.engine import plugin_layer_count
    from samg.build.loader import make_logger
    from samg.build.plugin import register_plugin
    from samg.op.function import make_standalone_model
    trt = load_trt()
    register_plugin(trt)
    for with_function in (False, True):
        model = make_standalone_model(with_function=with_function)
        logger = make_logger(trt)
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        assert parser.parse(model.SerializeToString()), logger.report()
        print(f"with_function={with_function} plugin_layers={plugin_layer_count(trt, network)}")
    """
)


@pytest.fixture(scope="module")
def plugin_parse_is_safe():
    """Parse a plugin node in a child process first: an abort there must not kill pytest."""
    result = subprocess.run([sys.executable, "-c", PARSE_SCRIPT], capture_output=True, text=True, timeout=180)
    if result.returncode != 0:
        pytest.fail(f"parsing a GuidanceCombine plugin node failed (rc={result.returncode}):\n{result.stderr[-2000:]}")
    return result.stdout


@pytest.fixture(scope="module")
def trt(plugin_parse_is_safe):
    from samg.build.plugin import register_plugin
    from samg.build.loader import load_trt

    module = load_trt()
    register_plugin(module)
    return module


def test_plugin_node_parses_without_abort_and_function_body_wins(plugin_parse_is_safe):
    # Without the body the parser maps the node to the plugin; with it, the body is inlined.
    assert "with_function=False plugin_layers=1" in plugin_parse_is_safe
    assert "with_function=True plugin_layers=0" in plugin_parse_is_safe


def parse(trt, model):
    from samg.build.loader import make_logger

    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model.SerializeToString()), logger.report()
    return network, (builder, parser, logger)


def test_parser_passes_node_attributes_as_plugin_fields(trt):
    from samg.op.function import make_standalone_model

    model = make_standalone_model(
        rank=5, dtype="float16", tau=0.5, sharpness=2.0, smooth=3, channel_axis=2, with_function=False
    )
    network, _keep = parse(trt, model)
    assert network.num_layers == 1
    layer = network.get_layer(0)
    assert layer.type == trt.LayerType.PLUGIN_V3
    layer.__class__ = trt.IPluginV3Layer  # the bindings return the base class
    plugin = layer.plugin
    assert plugin.values == {"tau": 0.5, "sharpness": 2.0, "smooth": 3, "channel_axis": 2}
    assert (plugin.plugin_name, plugin.plugin_namespace, plugin.plugin_version) == ("GuidanceCombine", "samg", "1")
    output = network.get_output(0)
    assert output.dtype == trt.DataType.HALF and len(output.shape) == 5


def test_creator_reads_fields_and_serializes_them_back(trt):
    creator = trt.get_plugin_registry().get_creator("GuidanceCombine", "1", "samg")
    assert creator is not None
    fields = trt.PluginFieldCollection(
        [
            trt.PluginField("tau", np.array([0.25], np.float32), trt.PluginFieldType.FLOAT32),
            trt.PluginField("smooth", np.array([3], np.int32), trt.PluginFieldType.INT32),
        ]
    )
    plugin = creator.create_plugin("combine", fields, trt.TensorRTPhase.BUILD)
    assert plugin.values == {"tau": 0.25, "sharpness": 4.0, "smooth": 3, "channel_axis": 1}
    serialized = {f.name: np.asarray(f.data).item() for f in plugin.get_fields_to_serialize()}
    assert serialized == pytest.approx({"tau": 0.25, "sharpness": 4.0, "smooth": 3, "channel_axis": 1})
    # A deserialized engine recreates the plugin from exactly these fields.
    again = creator.create_plugin("combine", plugin.get_fields_to_serialize(), trt.TensorRTPhase.RUNTIME)
    assert again.values == plugin.values
    assert plugin.clone().values == plugin.values


def test_serialized_fields_outlive_garbage_collection(trt):
    # A PluginField borrows its array: TensorRT reads the fields after get_fields_to_serialize
    # returns, so freed arrays would serialize whatever reused their memory.
    import gc

    from samg.build.plugin import plugin_classes

    plugin_class, _ = plugin_classes(trt)
    plugin = plugin_class({"tau": 1.2345, "sharpness": 2.5, "smooth": 3, "channel_axis": 2})
    fields = plugin.get_fields_to_serialize()
    gc.collect()
    reuse = [np.full(4, 99.0, np.float32) for _ in range(2000)]  # noqa: F841 - occupies freed memory
    read_back = {f.name: np.asarray(f.data).item() for f in fields}
    assert read_back == {"tau": pytest.approx(1.2345), "sharpness": 2.5, "smooth": 3, "channel_axis": 2}
    types = {f.name: f.type for f in fields}
    assert types == {"tau": trt.PluginFieldType.FLOAT32, "sharpness": trt.PluginFieldType.FLOAT32,
                     "smooth": trt.PluginFieldType.INT32, "channel_axis": trt.PluginFieldType.INT32}


def test_kernels_compile_when_the_context_is_made_not_in_enqueue(trt):
    """A deserialized (runtime) plugin compiles its kernels in on_shape_change / attach_to_context,
    which run before enqueue (and so outside any CUDA-graph capture); a plugin made while building
    never needs CuPy. Without CuPy the compile step shows as its install hint."""
    import importlib.util

    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed: compiling here would need a GPU (tests/test_tensorrt_gpu.py runs it)")
    creator = trt.get_plugin_registry().get_creator("GuidanceCombine", "1", "samg")
    shape = trt.PluginTensorDesc()
    shape.dims, shape.type, shape.format = trt.Dims([2, 4, 8, 8]), trt.DataType.FLOAT, trt.TensorFormat.LINEAR
    building = creator.create_plugin("combine", None, trt.TensorRTPhase.BUILD)
    building.on_shape_change([shape] * 3, [shape])  # shape checks only
    running = creator.create_plugin("combine", None, trt.TensorRTPhase.RUNTIME)
    with pytest.raises(SamgError, match=r"cupy is not installed.*GuidanceCombine"):
        running.on_shape_change([shape] * 3, [shape])
    with pytest.raises(SamgError, match=r"cupy is not installed.*GuidanceCombine"):
        building.attach_to_context(None)


def test_bad_fields_are_refused(trt):
    from samg.build.plugin import fields_from_collection

    for name, value in (("smooth", 5), ("channel_axis", 3)):
        bad = trt.PluginFieldCollection([trt.PluginField(name, np.array([value], np.int32), trt.PluginFieldType.INT32)])
        with pytest.raises(SamgError, match=f"{name} must be"):
            fields_from_collection(bad)


def desc(trt, dtype, dims=(2, 4, 8, 8), fmt=None):
    d = trt.DynamicPluginTensorDesc()
    d.desc.type = dtype
    d.desc.format = fmt or trt.TensorFormat.LINEAR
    d.desc.dims = trt.Dims(list(dims))
    d.max = trt.Dims(list(dims))
    return d


def test_output_types_and_format_combinations(trt):
    from samg.build.plugin import plugin_classes

    plugin_class, _ = plugin_classes(trt)
    plugin = plugin_class()
    F, H, I = trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.INT32
    assert plugin.get_output_data_types([H, H, F]) == [H]
    assert plugin.get_output_data_types([F, F, F]) == [F]

    def ok(types, fmt=None):
        in_out = [desc(trt, t, fmt=fmt if i == 0 else None) for i, t in enumerate(types)]
        return all(plugin.supports_format_combination(pos, in_out, 3) for pos in range(4))

    assert ok([F, F, F, F]) and ok([H, H, F, H])
    assert not ok([H, H, H, H])  # scales stay float32
    assert not ok([F, H, F, F]) and not ok([H, H, F, F])  # one dtype for u, c and the output
    assert not ok([I, I, F, I])
    assert not ok([F, F, F, F], fmt=trt.TensorFormat.CHW32)


def test_workspace_and_layout_split():
    from samg.build.plugin import split_dims, workspace_bytes

    assert split_dims((2, 4, 8, 8), 1) == (2, 1, 4, 64)
    assert split_dims((2, 4, 3, 8, 8), 1) == (2, 1, 4, 192)  # [B, C, F, H, W]
    assert split_dims((2, 3, 4, 8, 8), 2) == (2, 3, 4, 64)  # [B, F, C, H, W]
    # two [B, P] float32 planes + B sums and peaks, each rounded up to 256 bytes
    assert workspace_bytes((2, 4, 8, 8), 1) == 2 * 512 + 256
    with pytest.raises(SamgError):
        split_dims((2, 4, 8, 8), 2)
