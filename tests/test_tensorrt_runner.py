"""What the TensorRT runner and loader decide before any GPU work, checked on the CPU: tensor
dtypes (bfloat16 through ml_dtypes), GPUs a flavour does not run on, the CUDA-graph build flag
(part of the engine's cache key), and torch tensors as feeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from samg.build.loader import available_flavours
from samg.errors import SamgError

pytestmark = pytest.mark.tensorrt
if not available_flavours():
    pytest.skip("TensorRT / TensorRT-RTX is not importable (pip install tensorrt-rtx-cu13)", allow_module_level=True)

from samg.build.engine import BuildOptions, build_export  # noqa: E402
from samg.build.loader import (  # noqa: E402
    CAPTURE_BUILD_FLAGS,
    check_gpu_supported,
    flavour_of,
    load_trt,
    numpy_dtype,
    supported_compute_capabilities,
)
from samg.contract import engine_cache_key  # noqa: E402
from samg.runners.base import InputDecl  # noqa: E402
from samg.runners.tensorrt import TensorRTRunner, download_layout, upload_layout  # noqa: E402
from trt_export_helpers import write_export  # noqa: E402


@pytest.fixture(scope="module")
def trt():
    return load_trt()


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """The standalone export built without and with the CUDA-graph flag (one engine cache)."""
    root = tmp_path_factory.mktemp("trt_runner")
    export = write_export(root / "export")
    built = {}
    for cuda_graph in (False, True):
        options = BuildOptions(out_dir=root / f"engines-{cuda_graph}", cache_dir=root / "cache", quiet=True,
                               cuda_graph=cuda_graph)
        built[cuda_graph] = build_export(export, options)[0]
    return root, export, built


def test_engine_tensor_dtypes_include_bfloat16(trt):
    import ml_dtypes

    D = trt.DataType
    expected = {D.FLOAT: np.float32, D.HALF: np.float16, D.BF16: ml_dtypes.bfloat16, D.INT32: np.int32,
                D.INT64: np.int64, D.BOOL: np.bool_, D.INT8: np.int8, D.UINT8: np.uint8}
    for data_type, dtype in expected.items():
        assert numpy_dtype(trt, data_type) == np.dtype(dtype), data_type
    with pytest.raises(SamgError, match="no numpy equivalent: export the model as float32"):
        numpy_dtype(trt, D.FP8)


def test_bfloat16_feeds_round_to_nearest_even_and_come_back_as_float32():
    torch = pytest.importorskip("torch")
    import ml_dtypes

    bf16 = np.dtype(ml_dtypes.bfloat16)
    values = np.array([1.0, 1.00390625, 1.01171875, -3.14159, 65504.0, 1e-30, np.inf], np.float32)
    bits = upload_layout(values, bf16)
    assert bits.dtype == np.int16 and bits.flags.c_contiguous
    # torch's own float32 -> bfloat16 conversion is the independent reference
    expected = torch.from_numpy(values).to(torch.bfloat16)
    assert np.array_equal(bits, expected.view(torch.int16).numpy())
    back = download_layout(bits, bf16)
    assert back.dtype == np.float32
    assert np.array_equal(back, expected.float().numpy())
    # other dtypes pass through unchanged
    halves = upload_layout(values[:4], np.dtype(np.float16))
    assert halves.dtype == np.float16 and download_layout(halves, np.dtype(np.float16)) is halves


def test_a_gpu_the_flavour_does_not_support_is_refused_in_one_line(engines, trt):
    supported = supported_compute_capabilities(trt)
    if supported is None:
        pytest.skip("standard TensorRT builds for the GPU it runs on: no list to refuse from")
    # TensorRT-RTX 1.x builds for Turing, Ampere, Ada and Blackwell, not Hopper (sm_90: H100/H200)
    assert {"sm_75", "sm_86", "sm_89"} <= set(supported)
    unsupported = next(c for c in ("sm_90", "sm_70", "sm_60") if c not in supported)
    _, _, built = engines
    with pytest.raises(SamgError) as refused:
        TensorRTRunner(built[False].engine_path, device="cuda", gpu_capability=unsupported)
    message = str(refused.value)
    assert "\n" not in message
    assert f"{flavour_of(trt)} {trt.__version__} does not run on this GPU (compute capability {unsupported})" in message
    assert f"it supports {', '.join(supported)}" in message
    check_gpu_supported(trt, "sm_89")  # supported: no error
    check_gpu_supported(trt, None)  # no GPU seen: the other checks speak


def test_cuda_graph_build_flag_is_part_of_the_engine_key(engines, trt):
    root, export, built = engines
    plain, capturable = built[False].record, built[True].record
    flags = CAPTURE_BUILD_FLAGS[flavour_of(trt)]
    assert capturable.build_flags == tuple(sorted(flags))
    assert plain.build_flags == ()
    if flags:
        assert plain.key != capturable.key
        written = json.loads(built[True].engine_path.with_name("denoiser.engine.json").read_text())
        assert written["build_flags"] == list(flags)
    # Without flags the record and key are what they were before the field existed.
    assert "build_flags" not in json.loads(built[False].engine_path.with_name("denoiser.engine.json").read_text())
    fields = {name: getattr(plain, name) for name in ("component", "onnx_sha256", "trt_flavour", "trt_version",
                                                       "compute_capability", "precision", "combine", "profiles")}
    assert engine_cache_key(**fields) == plain.key
    assert engine_cache_key(**fields, build_flags=flags) == capturable.key
    # the same request again is a cache hit, the other one a rebuild
    again = build_export(export, BuildOptions(out_dir=root / "engines-True", cache_dir=root / "cache", quiet=True,
                                              cuda_graph=True))[0]
    assert again.status == "up-to-date"


def test_cuda_graph_runs_need_an_engine_built_for_capture(engines, trt):
    _, _, built = engines
    if CAPTURE_BUILD_FLAGS[flavour_of(trt)]:
        with pytest.raises(SamgError, match=r"built without REQUIRE_USER_ALLOCATION.*samg build DIR --cuda-graph"):
            TensorRTRunner(built[False].engine_path, device="cuda", cuda_graph=True, gpu_capability="sm_89")
    try:
        import cupy  # noqa: F401
    except ImportError:
        # the engine built for capture passes that check and stops only at the missing CuPy
        with pytest.raises(SamgError, match="cupy is not installed"):
            TensorRTRunner(built[True].engine_path, device="cuda", cuda_graph=True, gpu_capability="sm_89")


def _feed_checker(inputs: dict[str, InputDecl]) -> TensorRTRunner:
    """A runner with only what checked_feeds reads (no engine: that needs a GPU)."""
    runner = TensorRTRunner.__new__(TensorRTRunner)
    runner.inputs = inputs
    runner.path = Path("denoiser.engine")
    return runner


def test_torch_tensors_are_checked_like_arrays_and_kept_as_they_are():
    torch = pytest.importorskip("torch")
    runner = _feed_checker({"latents": InputDecl(np.dtype(np.float32), (None, 4, None, None)),
                            "timestep": InputDecl(np.dtype(np.float32), (None,)),
                            "ids": InputDecl(np.dtype(np.int64), (None, 8))})
    latents = torch.zeros(2, 4, 8, 8, dtype=torch.bfloat16)
    ids = torch.zeros(2, 8, dtype=torch.int32)
    checked = runner.checked_feeds({"latents": latents, "timestep": np.zeros(2, np.float64), "ids": ids})
    assert checked["latents"] is latents and checked["ids"] is ids  # bound as they are, no copy
    assert checked["timestep"].dtype == np.float32  # numpy feeds are still cast
    with pytest.raises(SamgError, match=r"input 'ids' has dtype float32, the graph takes int64"):
        runner.checked_feeds({"latents": latents, "timestep": np.zeros(2, np.float32), "ids": ids.float()})
    with pytest.raises(SamgError, match=r"input 'latents' has shape \[2, 3, 8, 8\], the graph fixes dim 1 to 4"):
        runner.checked_feeds({"latents": torch.zeros(2, 3, 8, 8), "timestep": np.zeros(2, np.float32), "ids": ids})


def test_cli_cuda_graph_flag_reaches_the_record(tmp_path, trt):
    import subprocess
    import sys

    export = write_export(tmp_path / "export")
    command = [sys.executable, "-m", "samg", "build", str(export), "--cuda-graph", "--quiet",
               "--out", str(tmp_path / "engines"), "--cache-dir", str(tmp_path / "cache")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "engines" / "denoiser.engine.json").read_text())
    assert record.get("build_flags", []) == list(CAPTURE_BUILD_FLAGS[flavour_of(trt)])
