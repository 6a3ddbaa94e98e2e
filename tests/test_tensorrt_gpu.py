"""TensorRT engines on a GPU: the runner, and the plugin's CUDA combine against the reference.

Needs an NVIDIA GPU, TensorRT (or TensorRT-RTX) and CuPy; skipped cleanly elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest

from samg.build.loader import available_flavours, gpu_compute_capability

pytestmark = [pytest.mark.gpu, pytest.mark.tensorrt]
if not available_flavours():
    pytest.skip("TensorRT / TensorRT-RTX is not importable (pip install tensorrt-rtx-cu13)", allow_module_level=True)
if gpu_compute_capability() is None:
    pytest.skip("no NVIDIA GPU (CUDA driver) on this machine", allow_module_level=True)
pytest.importorskip("cupy", reason="CuPy runs TensorRT engines and the plugin kernels (pip install cupy-cuda12x)")

from trt_export_helpers import write_export  # noqa: E402

from samg.build.engine import BuildOptions, build_export  # noqa: E402
from samg.build.profiles import ShapeRequest  # noqa: E402
from samg.runners.tensorrt import TensorRTRunner  # noqa: E402
from samg.guidance import samg_v1  # noqa: E402
from samg_expectation import (  # noqa: E402
    CFG_RTOL,
    energy_sum_overflow_case,
    huge_delta_case,
    scaled_delta_case,
    spec_cfg,
    spec_samg_v1,
)

CASES = [
    # dtype, smooth, channel_axis, prediction shape (batch first)
    ("float32", 0, 1, (2, 4, 16, 12)),
    ("float32", 3, 1, (3, 4, 16, 12)),
    ("float16", 3, 1, (2, 4, 8, 8)),
    ("float32", 3, 2, (2, 3, 4, 8, 6)),  # [B, F, C, H, W]
    ("float32", 0, 1, (1, 4, 3, 8, 8)),  # [B, C, F, H, W]
    ("bfloat16", 3, 1, (2, 4, 8, 8)),  # fed and returned as float32 (numpy has no bfloat16)
]
TOLERANCE = {"float32": 1e-5, "float16": 3e-3, "bfloat16": 2e-2}


def make_runner(tmp_path, dtype, smooth, channel_axis, shape, combine, **runner_options):
    export = write_export(
        tmp_path / "export", dtype=dtype, shape=("B", *shape[1:]), smooth=smooth, channel_axis=channel_axis
    )
    request = ShapeRequest(dynamic=True, opt={"batch": 1}, max={"batch": 4})
    options = BuildOptions(combine=combine, shapes=request, cache_dir=tmp_path / "cache", quiet=True,
                           cuda_graph=runner_options.get("cuda_graph", False))
    result = build_export(export, options)[0]
    return TensorRTRunner(result.engine_path, device="cuda", **runner_options)


def inputs(shape, dtype, seed=0):
    """u, c in `dtype` (bfloat16: float32 values already rounded to it, as the runner takes them)."""
    rng = np.random.default_rng(seed)
    storage = dtype
    if dtype == "bfloat16":
        import ml_dtypes

        storage = ml_dtypes.bfloat16
    u = rng.standard_normal(shape).astype(storage)
    c = (u.astype(np.float32) + rng.standard_normal(shape) * rng.uniform(0.1, 2.0, size=shape)).astype(storage)
    if dtype == "bfloat16":
        u, c = u.astype(np.float32), c.astype(np.float32)
    batch = shape[0]
    scales = np.stack([np.linspace(1.5, 3.0, batch), np.linspace(6.0, 9.0, batch)], axis=1).astype(np.float32)
    return {"pred_uncond": u, "pred_cond": c, "scales": scales}


@pytest.mark.parametrize("combine", ["plugin", "function"])
@pytest.mark.parametrize("dtype,smooth,channel_axis,shape", CASES)
def test_engine_matches_the_reference(tmp_path, combine, dtype, smooth, channel_axis, shape):
    runner = make_runner(tmp_path, dtype, smooth, channel_axis, shape, combine)
    feeds = inputs(shape, dtype)
    out = runner.run(feeds)["guided"]
    assert out.dtype == np.dtype("float32" if dtype == "bfloat16" else dtype) and out.shape == shape
    scales = feeds["scales"]
    u, c = (feeds[n].astype(np.float32) for n in ("pred_uncond", "pred_cond"))
    expected = samg_v1(u, c, scales[:, 0], scales[:, 1], smooth=smooth, channel_axis=channel_axis)
    tolerance = TOLERANCE[dtype]
    np.testing.assert_allclose(out.astype(np.float32), expected, rtol=tolerance, atol=tolerance * np.abs(expected).max())


def test_cuda_graph_replay_matches_plain_runs(tmp_path):
    shape = (2, 4, 16, 12)
    graph_runner = make_runner(tmp_path, "float32", 3, 1, shape, "plugin", cuda_graph=True)
    for seed in (0, 1):  # the second call replays the captured graph with new inputs
        feeds = inputs(shape, "float32", seed)
        scales = feeds["scales"]
        expected = samg_v1(feeds["pred_uncond"], feeds["pred_cond"], scales[:, 0], scales[:, 1], smooth=3)
        np.testing.assert_allclose(graph_runner.run(feeds)["guided"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_torch_cuda_tensors_in_and_out_match_numpy_runs(tmp_path, dtype):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    shape = (2, 4, 16, 12)
    runner = make_runner(tmp_path, dtype, 3, 1, shape, "plugin")
    feeds = inputs(shape, dtype)
    expected = runner.run(feeds)["guided"]
    wanted = getattr(torch, dtype)
    device_feeds = {n: torch.from_numpy(np.ascontiguousarray(a)).to("cuda").to(wanted if n != "scales" else torch.float32)
                    for n, a in feeds.items()}
    out = runner.run_device(device_feeds)["guided"]
    assert isinstance(out, torch.Tensor) and out.is_cuda and out.dtype == wanted and tuple(out.shape) == shape
    # the same engine on the same values (atomic sums may order differently: the dtype's tolerance)
    np.testing.assert_allclose(out.float().cpu().numpy(), expected.astype(np.float32), rtol=TOLERANCE[dtype],
                               atol=TOLERANCE[dtype] * np.abs(expected).max())


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_run_takes_and_returns_torch_tensors_for_the_device_loop(tmp_path, cuda_graph):
    """What GuidedDenoiser hands a runner whose tensor_device is "cuda": torch CUDA tensors in, torch
    CUDA tensors out of `run`, complete when it returns (graph replays included: the copies out of
    the graph's buffers are waited for), equal to the reference."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    shape = (2, 4, 16, 12)
    runner = make_runner(tmp_path, "float32", 3, 1, shape, "plugin", cuda_graph=cuda_graph)
    assert runner.tensor_device == "cuda"
    results = []
    for seed in (0, 1):  # with cuda_graph the second call replays the capture with new inputs
        feeds = inputs(shape, "float32", seed)
        out = runner.run({n: torch.from_numpy(a).to("cuda") for n, a in feeds.items()})["guided"]
        assert isinstance(out, torch.Tensor) and out.is_cuda and tuple(out.shape) == shape
        results.append(out)
        scales = feeds["scales"]
        expected = samg_v1(feeds["pred_uncond"], feeds["pred_cond"], scales[:, 0], scales[:, 1], smooth=3)
        np.testing.assert_allclose(out.cpu().numpy(), expected, rtol=1e-5, atol=1e-5)
    assert results[0].data_ptr() != results[1].data_ptr()  # each call's output is its own (not the graph's buffer)


# ---------------------------------------------------------------- range (issue 9), float32


def _run(runner, u, c, scales):
    return runner.run({"pred_uncond": u, "pred_cond": c, "scales": np.asarray(scales, np.float32)})["guided"]


@pytest.mark.parametrize("combine", ["plugin", "function"])
def test_huge_delta_with_equal_scales_is_cfg(tmp_path, combine):
    # Δ ≈ 1e19: Δ² overflows float32; the energy of Δ / max|Δ| does not, so equal scales give CFG
    # (within CFG_RTOL of the float64 formula: the GPU may fuse w·Δ + u into one multiply-add).
    u, c = huge_delta_case()
    runner = make_runner(tmp_path, "float32", 3, 1, u.shape, combine)
    scales = np.array([[7.5, 7.5], [3.0, 3.0]], np.float32)
    out = _run(runner, u, c, scales)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, spec_cfg(u, c, scales[:, 0]), rtol=CFG_RTOL)


@pytest.mark.parametrize("combine", ["plugin", "function"])
def test_energy_sum_overflow_gives_the_spec_result(tmp_path, combine):
    # Every location's energy is finite in float32, the sample's sum is not.
    u, c = energy_sum_overflow_case()
    runner = make_runner(tmp_path, "float32", 0, 1, u.shape, combine)
    scales = np.array([[2.0, 8.0], [1.0, 6.0]], np.float32)
    np.testing.assert_allclose(_run(runner, u, c, scales), spec_samg_v1(u, c, scales[:, 0], scales[:, 1]), rtol=1e-5)


@pytest.mark.parametrize("combine", ["plugin", "function"])
def test_map_is_the_spec_formula_at_every_scale_of_delta(tmp_path, combine):
    # The spec's absolute ε on the energy of Δ itself: at |Δ| ~ 1e-7 it sets Ê, so a wrong max |Δ|
    # would show; 64 x 48 locations span many blocks of the plugin's peak kernel (atomic max).
    shape = (2, 4, 64, 48)
    runner = make_runner(tmp_path, "float32", 3, 1, shape, combine)
    scales = np.array([[2.0, 8.0], [1.0, 6.0]], np.float32)
    for magnitude in (1e-7, 1e-30, 1e19):
        u, c = scaled_delta_case(magnitude, shape=shape)
        out = _run(runner, u, c, scales)
        assert np.isfinite(out).all(), magnitude
        expected = spec_samg_v1(u, c, scales[:, 0], scales[:, 1], smooth=3)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max(), err_msg=str(magnitude))


@pytest.mark.parametrize("combine", ["plugin", "function"])
def test_inf_in_delta_makes_the_sample_nan(tmp_path, combine):
    # An Inf makes the sample's max |Δ| Inf and its own Δ / s Inf/Inf = NaN, which reaches the whole
    # sample through the energy sum (docs/guidance-op.md); the other sample is untouched.
    shape = (2, 4, 16, 12)
    runner = make_runner(tmp_path, "float32", 0, 1, shape, combine)
    feeds = inputs(shape, "float32")
    u, c, scales = feeds["pred_uncond"], feeds["pred_cond"], feeds["scales"]
    c[0, 1, 2, 3] = np.inf
    out = _run(runner, u, c, scales)
    assert np.isnan(out[0]).all()
    np.testing.assert_allclose(out[1:], spec_samg_v1(u[1:], c[1:], scales[1:, 0], scales[1:, 1]), rtol=1e-5, atol=1e-5)
