"""The native samg::GuidanceCombine (CPU kernel behind the ORT custom-op library) vs the reference.

Builds the library through samg.native on first use; skips with the build command when cmake or a
C++ compiler is missing.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

import samg.native
from samg.guidance import samg_v1
from samg_expectation import (
    CFG_RTOL,
    energy_sum_overflow_case,
    huge_delta_case,
    scaled_delta_case,
    spec_cfg,
    spec_samg_v1,
)

pytestmark = pytest.mark.native

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from samg.op import make_standalone_model, strip_function  # noqa: E402  (needs onnx)


@pytest.fixture(scope="module")
def library() -> str:
    if samg.native.missing_build_tools():
        pytest.skip(f"cmake/c++ missing: install them and run {samg.native.BUILD_COMMAND}")
    path = samg.native.ort_custom_op_library(build_if_missing=True)
    assert path is not None
    return path


def _session(model, library: str | None):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if library:
        options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run_custom_op(library, u, c, scales, *, dtype="float32", **attributes):
    model = make_standalone_model(rank=u.ndim, dtype=dtype, with_function=False, **attributes)
    return _session(model, library).run(None, {"pred_uncond": u, "pred_cond": c, "scales": scales})[0]


def _inputs(rng, shape, dtype=np.float32, batch_scales=None):
    u = rng.standard_normal(shape).astype(dtype)
    # A few high-energy spots so that the scale map is far from uniform.
    c = (u.astype(np.float32) + rng.standard_normal(shape) * rng.gamma(0.5, 1.0, shape)).astype(dtype)
    if batch_scales is None:
        w_min = rng.uniform(1.0, 4.0, shape[0])
        batch_scales = np.stack([w_min, w_min + rng.uniform(0.0, 6.0, shape[0])], axis=1)
    return u, c, np.asarray(batch_scales, np.float32)


def _assert_close_fp32(actual, expected):
    # 1e-5 relative, with an absolute floor at 1e-5 of the output's scale for values near zero
    # (u + w·Δ cancels there, so a pure relative test would judge rounding noise).
    scale = float(np.abs(expected).max()) or 1.0
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale)


LAYOUTS = [  # (shape, channel_axis)
    ((2, 4, 16, 16), 1),
    ((3, 3, 7, 11), 1),
    ((1, 16, 5, 2), 1),
    ((2, 4, 3, 6, 9), 1),  # [B, C, F, H, W]
    ((2, 3, 5, 8, 6), 2),  # [B, F, C, H, W]
    ((2, 4, 96, 96), 1),  # large enough for several threads
]


@pytest.mark.parametrize("shape,channel_axis", LAYOUTS)
@pytest.mark.parametrize("smooth", [0, 3])
def test_custom_op_matches_reference_fp32(library, shape, channel_axis, smooth):
    rng = np.random.default_rng(abs(hash((shape, channel_axis, smooth))) % 2**32)
    u, c, scales = _inputs(rng, shape)
    tau, sharpness = float(rng.uniform(0.5, 2.0)), float(rng.uniform(1.0, 10.0))
    attributes = dict(tau=tau, sharpness=sharpness, smooth=smooth, channel_axis=channel_axis)
    out = _run_custom_op(library, u, c, scales, **attributes)
    expected = samg_v1(u, c, scales[:, 0], scales[:, 1], **attributes)
    assert out.dtype == np.float32 and out.shape == shape
    _assert_close_fp32(out, expected)
    # The map really varies: the result is neither plain CFG at w_min nor at w_max.
    for w in (scales[:, 0], scales[:, 1]):
        cfg = u + w.reshape((-1,) + (1,) * (u.ndim - 1)) * (c - u)
        assert not np.allclose(out, cfg, rtol=1e-4, atol=1e-4)


def test_random_shapes_and_threads(library, monkeypatch):
    rng = np.random.default_rng(7)
    for threads in ("1", "3"):
        monkeypatch.setenv("SAMG_NUM_THREADS", threads)
        for _ in range(4):
            rank5 = bool(rng.integers(2))
            channel_axis = int(rng.integers(1, 3)) if rank5 else 1
            dims = [int(rng.integers(1, 4))] + [int(rng.integers(2, 13)) for _ in range(4 if rank5 else 3)]
            u, c, scales = _inputs(rng, tuple(dims))
            smooth = int(rng.choice([0, 3]))
            out = _run_custom_op(library, u, c, scales, smooth=smooth, channel_axis=channel_axis)
            expected = samg_v1(u, c, scales[:, 0], scales[:, 1], smooth=smooth, channel_axis=channel_axis)
            _assert_close_fp32(out, expected)


@pytest.mark.parametrize("smooth", [0, 3])
def test_equal_scales_is_cfg(library, smooth):
    rng = np.random.default_rng(1)
    u, c, _ = _inputs(rng, (2, 4, 9, 10))
    scales = np.array([[7.5, 7.5], [3.0, 3.0]], np.float32)
    out = _run_custom_op(library, u, c, scales, smooth=smooth)
    cfg = u + scales[:, :1, None, None] * (c - u)
    np.testing.assert_allclose(out, cfg, rtol=1e-6, atol=1e-6)


def test_zero_delta_gives_uncond(library):
    rng = np.random.default_rng(2)
    u = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    out = _run_custom_op(library, u, u.copy(), np.array([[1, 9], [2, 5]], np.float32), smooth=3)
    np.testing.assert_array_equal(out, u)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_is_not_hidden(library, bad):
    rng = np.random.default_rng(3)
    u, c, scales = _inputs(rng, (2, 4, 6, 6))
    c[0, 1, 2, 3] = bad
    out = _run_custom_op(library, u, c, scales)
    # NaN enters sample 0's mean energy; Inf makes its scale max|Δ| infinite (docs/guidance-op.md)
    assert np.isnan(out[0]).all()
    assert np.isfinite(out[1]).all()


@pytest.mark.parametrize("smooth", [0, 3])
def test_huge_delta_with_equal_scales_is_cfg(library, smooth):
    # Δ ≈ 1e19: Δ² overflows float32; the energy of Δ / max|Δ| does not, so equal scales give
    # u + w·Δ (the unscaled kernel returned NaN). Within CFG_RTOL, not bit for bit: a build with
    # -march=native may fuse w·Δ + u into one multiply-add.
    u, c = huge_delta_case()
    scales = np.array([[7.5, 7.5], [3.0, 3.0]], np.float32)
    out = _run_custom_op(library, u, c, scales, smooth=smooth)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, spec_cfg(u, c, scales[:, 0]), rtol=CFG_RTOL)


@pytest.mark.parametrize("magnitude", [1e-7, 1e-30, 1e19])
def test_map_is_the_spec_formula_at_every_scale_of_delta(library, magnitude):
    # The spec's absolute ε = 1e-12 on the energy of Δ itself: at |Δ| ~ 1e-7 it sets Ê (mean E ~
    # 1e-14; an ε relative to max|Δ| gave Δ·1e7's map); at 1e-30 Ê ≈ 0; at 1e19 finite.
    u, c = scaled_delta_case(magnitude)
    scales = np.array([[2.0, 8.0], [1.0, 6.0]], np.float32)
    out = _run_custom_op(library, u, c, scales, smooth=3)
    assert np.isfinite(out).all()
    expected = spec_samg_v1(u, c, scales[:, 0], scales[:, 1], smooth=3)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("smooth", [0, 3])
def test_energy_sum_overflow_gives_the_spec_result(library, smooth):
    # Every location's energy is finite in float32, the sample's sum is not (in float32).
    u, c = energy_sum_overflow_case()
    scales = np.array([[2.0, 8.0], [1.0, 6.0]], np.float32)
    out = _run_custom_op(library, u, c, scales, smooth=smooth)
    np.testing.assert_allclose(out, spec_samg_v1(u, c, scales[:, 0], scales[:, 1], smooth=smooth), rtol=1e-5)


def test_fp16_matches_reference(library):
    rng = np.random.default_rng(4)
    u, c, scales = _inputs(rng, (2, 4, 12, 10), dtype=np.float16)
    out = _run_custom_op(library, u, c, scales, dtype="float16", smooth=3)
    expected = samg_v1(u, c, scales[:, 0], scales[:, 1], smooth=3)
    assert out.dtype == np.float16
    # Both compute in float32 and round once to float16: at most one float16 step apart.
    np.testing.assert_allclose(out.astype(np.float32), expected.astype(np.float32), rtol=1e-3, atol=1e-3)


def _to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    bits = x.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def test_bfloat16_through_c_api(library):
    """numpy has no bfloat16: call the kernel's exported C function on the raw bits."""
    kernel = ctypes.CDLL(library)
    kernel.samg_guidance_combine_cpu.restype = ctypes.c_char_p

    class Params(ctypes.Structure):
        _fields_ = [("tau", ctypes.c_float), ("sharpness", ctypes.c_float), ("smooth", ctypes.c_int),
                    ("channel_axis", ctypes.c_int)]

    rng = np.random.default_rng(5)
    shape = (2, 4, 3, 8, 8)
    u32, c32, scales = _inputs(rng, shape)
    u_bits, c_bits = _to_bfloat16_bits(u32), _to_bfloat16_bits(c32)
    out_bits = np.empty_like(u_bits)
    dims = np.array(shape, np.int64)
    error = kernel.samg_guidance_combine_cpu(
        u_bits.ctypes.data_as(ctypes.c_void_p), c_bits.ctypes.data_as(ctypes.c_void_p),
        scales.ctypes.data_as(ctypes.c_void_p), out_bits.ctypes.data_as(ctypes.c_void_p),
        2, dims.ctypes.data_as(ctypes.c_void_p), len(shape), ctypes.byref(Params(1.0, 4.0, 3, 1)), 0)
    assert error is None
    as_float = lambda bits: (bits.astype(np.uint32) << 16).view(np.float32)  # noqa: E731
    expected = samg_v1(as_float(u_bits), as_float(c_bits), scales[:, 0], scales[:, 1], smooth=3)
    np.testing.assert_allclose(as_float(out_bits), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("shape,channel_axis,smooth", [((2, 4, 10, 12), 1, 3), ((1, 3, 4, 6, 5), 2, 0)])
def test_custom_op_equals_inlined_function_body(library, shape, channel_axis, smooth):
    rng = np.random.default_rng(6)
    u, c, scales = _inputs(rng, shape)
    feeds = {"pred_uncond": u, "pred_cond": c, "scales": scales}
    model = make_standalone_model(rank=len(shape), smooth=smooth, channel_axis=channel_axis, tau=1.3)
    with_body = _session(model, None).run(None, feeds)[0]
    strip_function(model)
    assert len(model.functions) == 0
    fused = _session(model, library).run(None, feeds)[0]
    _assert_close_fp32(fused, with_body)


def _error_of(library, model, feeds=None) -> str:
    with pytest.raises(Exception) as caught:
        session = _session(model, library)
        session.run(None, feeds)
    return str(caught.value)


def _raw_model(rank=4, elem=None, scales_elem=None, **attributes):
    """A single-node model built by hand, so that attributes the op rejects can be written."""
    helper, tp = onnx.helper, onnx.TensorProto
    elem = elem or tp.FLOAT
    dims = ["B"] + [f"d{i}" for i in range(1, rank)]
    inputs = [helper.make_tensor_value_info("pred_uncond", elem, dims),
              helper.make_tensor_value_info("pred_cond", elem, dims),
              helper.make_tensor_value_info("scales", scales_elem or tp.FLOAT, None)]
    node = helper.make_node("GuidanceCombine", ["pred_uncond", "pred_cond", "scales"], ["guided"], domain="samg",
                            **attributes)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("guided", elem, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("samg", 1)])
    model.ir_version = 10
    return model


def test_bad_attributes_are_ort_errors(library):
    assert "smooth=5" in _error_of(library, _raw_model(smooth=5))
    assert "channel_axis=3" in _error_of(library, _raw_model(channel_axis=3))
    assert "tau must be a float" in _error_of(library, _raw_model(tau=1))


def test_bad_shapes_are_ort_errors(library):
    rng = np.random.default_rng(8)
    u, c, scales = _inputs(rng, (2, 4, 6, 6))
    model = _raw_model()
    message = _error_of(library, model, {"pred_uncond": u, "pred_cond": c[:, :3], "scales": scales})
    assert "samg::GuidanceCombine" in message and "same shape" in message
    message = _error_of(library, model, {"pred_uncond": u, "pred_cond": c, "scales": scales[:1]})
    assert "scales shape [1, 2] must be [B, 2] with B = 2" in message
    flat = _raw_model(rank=3)
    message = _error_of(library, flat, {"pred_uncond": u[0], "pred_cond": c[0], "scales": np.ones((4, 2), np.float32)})
    assert "4-D" in message
    axis2 = _raw_model(channel_axis=2)
    assert "channel_axis" in _error_of(library, axis2, {"pred_uncond": u, "pred_cond": c, "scales": scales})
    smooth = _raw_model(smooth=3)
    thin = {"pred_uncond": u[..., :1], "pred_cond": c[..., :1], "scales": scales}
    assert "H and W of at least 2" in _error_of(library, smooth, thin)


def test_bad_dtypes_are_ort_errors(library):
    tp = onnx.TensorProto
    message = _error_of(library, _raw_model(elem=tp.DOUBLE))
    assert "GuidanceCombine" in message
    message = _error_of(library, _raw_model(scales_elem=tp.FLOAT16))
    assert "GuidanceCombine" in message or "scales" in message
