"""The samg::GuidanceCombine Python TensorRT plugin: registration, parsing, build-time hooks.

Parsing a plugin node is first checked in a subprocess (the RTX wheel's missing library link
aborts the process instead of raising); the in-process tests need that check to pass.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

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


def _nvidia_wheel_dirs(kind: str) -> list[str]:
    """`kind` ("lib" or "include") folders of NVIDIA's pip wheels on sys.path (nvidia/cu13/lib, ...)."""
    import glob

    return sorted({d for folder in sys.path if folder for d in glob.glob(f"{folder}/nvidia/*/{kind}")})


def _nvrtc():
    """libnvrtc (pip install nvidia-cuda-nvrtc, or a CUDA toolkit), or None."""
    import ctypes
    import ctypes.util
    import glob
    import site

    names = [ctypes.util.find_library("nvrtc")]
    folders = site.getsitepackages() + _nvidia_wheel_dirs("lib") + ["/usr/local/cuda/lib64"]
    for folder in folders:
        names += sorted(glob.glob(f"{folder}/nvidia/cu*/lib/libnvrtc.so*")) + sorted(glob.glob(f"{folder}/libnvrtc.so*"))
    for name in filter(None, names):
        if ".alt." in name:
            continue  # the wheel's alternative build, same API
        try:
            # libnvrtc dlopens its builtins library by name: load the one beside it first
            for builtins in sorted(Path(name).parent.glob("libnvrtc-builtins.so*")) if "/" in name else ():
                ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _wheel_header_dir():
    """The CUDA headers as NVIDIA's pip wheel installs them (nvidia-cuda-runtime), or None."""
    from samg.build.plugin import cuda_include_dir

    try:
        return cuda_include_dir(environ={}, system_roots=[])
    except SamgError:
        return None


@pytest.mark.parametrize("headers", ["found by default", "from the nvidia-cuda-runtime wheel"])
def test_plugin_kernels_compile_with_nvrtc_as_cupy_compiles_them(headers):
    """What CupyLauncher hands to cupy.RawModule: guidance_combine.cu's text, its options and name
    expressions, compiled by NVRTC itself; every kernel it launches is in the PTX."""
    import ctypes

    from samg.build.plugin import KERNEL_NAMES, KERNEL_SOURCE, compile_options, cuda_include_dir

    nvrtc = _nvrtc()
    if nvrtc is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc)")
    include = cuda_include_dir() if headers == "found by default" else _wheel_header_dir()
    if include is None:
        pytest.skip("no nvidia/*/include folder with the CUDA headers on sys.path (pip install nvidia-cuda-runtime)")
    assert KERNEL_SOURCE.resolve() == (Path(__file__).parents[1] / "plugins" / "cuda" / "guidance_combine.cu").resolve()
    program = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), KERNEL_SOURCE.read_bytes(), b"guidance_combine.cu",
                                    0, None, None) == 0
    for name in KERNEL_NAMES:
        assert nvrtc.nvrtcAddNameExpression(program, name.encode()) == 0
    options = [o.encode() for o in (*compile_options(include), "--gpu-architecture=compute_80")]
    status = nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    assert status == 0, log.value.decode()[-3000:]
    nvrtc.nvrtcGetPTXSize(program, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    assert nvrtc.nvrtcGetPTX(program, ptx) == 0
    text = ptx.value.decode()
    for name in KERNEL_NAMES:
        lowered = ctypes.c_char_p()
        assert nvrtc.nvrtcGetLoweredName(program, name.encode(), ctypes.byref(lowered)) == 0, name
        assert f".entry {lowered.value.decode()}(" in text, name
    assert len(KERNEL_NAMES) == 13  # peak, energy, combine (smooth or not) per element type + membership
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


def test_nvrtc_without_the_include_path_does_not_find_the_headers():
    """Why compile_options passes -I: NVRTC 13 has no built-in cuda_fp16.h."""
    import ctypes

    from samg.build.plugin import KERNEL_SOURCE

    nvrtc = _nvrtc()
    if nvrtc is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc)")
    version = (ctypes.c_int(), ctypes.c_int())
    nvrtc.nvrtcVersion(ctypes.byref(version[0]), ctypes.byref(version[1]))
    if version[0].value < 13:
        pytest.skip(f"NVRTC {version[0].value}.{version[1].value}: the missing built-in header is NVRTC 13's")
    program = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), KERNEL_SOURCE.read_bytes(), b"g.cu", 0, None, None) == 0
    options = [b"--std=c++17", b"--gpu-architecture=compute_80"]
    status = nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    assert status != 0 and "cuda_bf16.h" in log.value.decode()


def _header_tree(root: Path, *headers: str) -> Path:
    root.mkdir(parents=True)
    for header in headers:
        (root / header).write_text("// stand-in\n")
    return root


def test_cuda_include_dir_search_order_and_the_missing_headers_error(tmp_path):
    from samg.build.plugin import cuda_include_candidates, cuda_include_dir

    both = ("cuda_fp16.h", "cuda_bf16.h")
    site_dir = tmp_path / "site"
    wheel13 = _header_tree(site_dir / "nvidia" / "cu13" / "include", *both)
    wheel12 = _header_tree(site_dir / "nvidia" / "cuda_runtime" / "include", *both)
    toolkit = _header_tree(tmp_path / "toolkit" / "include", *both)
    half_only = _header_tree(tmp_path / "old" / "include", "cuda_fp16.h")
    system = [str(tmp_path / "system")]

    # CUDA_PATH first, then the wheels (CUDA 13's before CUDA 12's), then the system roots
    environ = {"CUDA_PATH": str(tmp_path / "toolkit")}
    assert cuda_include_candidates(environ, [str(site_dir)], system) == [
        toolkit, wheel13, wheel12, tmp_path / "system" / "include"]
    assert cuda_include_dir(environ, [str(site_dir)], system) == str(toolkit)
    assert cuda_include_dir({}, [str(site_dir)], system) == str(wheel13)
    # a folder lacking cuda_bf16.h is passed over
    assert cuda_include_dir({"CUDA_HOME": str(tmp_path / "old")}, [str(site_dir)], []) == str(wheel13)
    assert half_only.is_dir()
    assert cuda_include_dir({}, [], [str(tmp_path / "toolkit")]) == str(toolkit)
    with pytest.raises(SamgError, match=r"cuda_fp16\.h and cuda_bf16\.h were not found.*pip install nvidia-cuda-runtime"):
        cuda_include_dir({"CUDA_PATH": str(tmp_path / "old")}, [str(tmp_path / "nowhere")], [])


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed")
def test_cuda_kernel_source_compiles(tmp_path):
    from samg.build.plugin import KERNEL_SOURCE

    # The plugin's source is plugins/cuda/guidance_combine.cu itself; nvcc compiles its kernels too.
    ptx = tmp_path / "k.ptx"
    subprocess.run(["nvcc", "-ptx", "-std=c++17", "-arch=compute_75", str(KERNEL_SOURCE.resolve()), "-o", str(ptx)],
                   check=True, timeout=120)
    text = ptx.read_text()
    for name in ("peak_kernel", "energy_kernel", "membership_kernel", "combine_kernel"):
        assert name in text
    for element in ("f", "6__half", "13__nv_bfloat16"):  # mangled template arguments
        assert f"peak_kernelI{element}" in text
