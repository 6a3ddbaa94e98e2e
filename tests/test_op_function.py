"""The GuidanceCombine ONNX function body, run by onnxruntime (CPU), against the Python reference."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from samg.errors import SamgError  # noqa: E402
from samg.guidance import samg_v1  # noqa: E402
from samg.op import (  # noqa: E402
    DOMAIN,
    OP_TYPE,
    attach_function,
    function_proto,
    make_standalone_model,
    register_schema,
    strip_function,
)
from samg.op.schema import EPSILON, SMOOTH_WEIGHTS  # noqa: E402
from samg_expectation import (  # noqa: E402
    CFG_RTOL,
    energy_sum_overflow_case,
    huge_delta_case,
    scaled_delta_case,
    spec_cfg,
    spec_samg_v1,
)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _session(model):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=64)
def _cached_session(rank, dtype, tau, sharpness, smooth, channel_axis, opset=18):
    return _session(make_standalone_model(rank, dtype, tau, sharpness, smooth, channel_axis, opset=opset))


def run_body(u, c, scales, *, tau=1.0, sharpness=4.0, smooth=0, channel_axis=1, opset=18):
    session = _cached_session(u.ndim, str(u.dtype), tau, sharpness, smooth, channel_axis, opset)
    return session.run(None, {"pred_uncond": u, "pred_cond": c, "scales": scales})[0]


def reference(u, c, scales, **attrs):
    return samg_v1(u, c, scales[:, 0], scales[:, 1], **attrs)


def _shape(rank, channel_axis, batch, channels, frames, height, width):
    if rank == 4:
        return (batch, channels, height, width)
    if channel_axis == 1:
        return (batch, channels, frames, height, width)
    return (batch, frames, channels, height, width)


@st.composite
def cases(draw, dtypes=("float32", "float16")):
    rank = draw(st.sampled_from([4, 5]))
    channel_axis = draw(st.sampled_from([1, 2])) if rank == 5 else 1
    shape = _shape(
        rank,
        channel_axis,
        batch=draw(st.integers(1, 3)),
        channels=draw(st.integers(1, 4)),
        frames=draw(st.integers(1, 3)),
        height=draw(st.integers(2, 7)),
        width=draw(st.integers(2, 7)),
    )
    dtype = draw(st.sampled_from(dtypes))
    attrs = dict(
        tau=draw(st.floats(0.0, 3.0)),
        sharpness=draw(st.floats(0.1, 20.0)),
        smooth=draw(st.sampled_from([0, 3])),
        channel_axis=channel_axis,
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    u = rng.standard_normal(shape).astype(dtype)
    # Energy that varies over space, so the scale map is not flat.
    c = (u + rng.standard_normal(shape) * rng.uniform(0.0, 3.0, shape)).astype(dtype)
    scales = rng.uniform(0.0, 10.0, (shape[0], 2)).astype(np.float32)
    return u, c, scales, attrs


def _assert_close(got, want, rtol):
    assert got.dtype == want.dtype and got.shape == want.shape
    got32, want32 = got.astype(np.float32), want.astype(np.float32)
    np.testing.assert_allclose(got32, want32, rtol=rtol, atol=rtol * max(1.0, float(np.abs(want32).max())))


@FAST
@given(cases())
def test_body_matches_reference(case):
    u, c, scales, attrs = case
    got = run_body(u, c, scales, **attrs)
    # fp16: both sides compute in fp32 and round once at the end; allow one fp16 rounding step.
    _assert_close(got, reference(u, c, scales, **attrs), rtol=1e-5 if u.dtype == np.float32 else 1e-3)


@settings(max_examples=15, deadline=None)
@given(cases(dtypes=("float32",)))
def test_body_at_opset_17_matches_reference(case):
    # Before opset 18 ReduceMean takes axes as an attribute: the body switches forms.
    u, c, scales, attrs = case
    _assert_close(run_body(u, c, scales, opset=17, **attrs), reference(u, c, scales, **attrs), rtol=1e-5)


def _bf16_run(session, u, c, scales):
    """Run a bfloat16 model: numpy has no bfloat16, so bind raw 16-bit buffers (ml_dtypes views)."""
    binding = session.io_binding()
    bf16 = onnx.TensorProto.BFLOAT16
    binding.bind_ortvalue_input("pred_uncond", ort.OrtValue.ortvalue_from_numpy_with_onnx_type(u.view(np.uint16), bf16))
    binding.bind_ortvalue_input("pred_cond", ort.OrtValue.ortvalue_from_numpy_with_onnx_type(c.view(np.uint16), bf16))
    binding.bind_cpu_input("scales", scales)
    out = np.zeros(u.shape, np.uint16)
    binding.bind_ortvalue_output("guided", ort.OrtValue.ortvalue_from_numpy_with_onnx_type(out, bf16))
    session.run_with_iobinding(binding)
    return out.view(u.dtype)


@pytest.mark.parametrize("smooth", [0, 3])
def test_bfloat16_runs_in_onnxruntime(smooth):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    u = rng.standard_normal((2, 4, 5, 6)).astype(ml_dtypes.bfloat16)
    c = (rng.standard_normal((2, 4, 5, 6)) * 2).astype(ml_dtypes.bfloat16)
    scales = np.array([[1.0, 7.5], [3.0, 3.0]], np.float32)
    got = _bf16_run(_session(make_standalone_model(4, "bfloat16", 1.0, 4.0, smooth, 1)), u, c, scales)
    # The reference on torch bfloat16 tensors (numpy cannot hold bfloat16 natively).
    want = reference(
        torch.from_numpy(u.astype(np.float32)).bfloat16(),
        torch.from_numpy(c.astype(np.float32)).bfloat16(),
        torch.from_numpy(scales),
        smooth=smooth,
    )
    _assert_close(got.astype(np.float32), want.float().numpy(), rtol=1e-2)


@FAST
@given(cases(dtypes=("float32",)))
def test_equal_scales_is_plain_cfg(case):
    u, c, scales, attrs = case
    scales[:, 1] = scales[:, 0]
    w = scales[:, 0].reshape((-1,) + (1,) * (u.ndim - 1))
    cfg = u + w * (c - u)
    _assert_close(run_body(u, c, scales, **attrs), cfg, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(cases())
def test_zero_delta_gives_uncond(case):
    u, _, scales, attrs = case
    np.testing.assert_array_equal(run_body(u, u.copy(), scales, **attrs), u)


@pytest.mark.parametrize("channel_axis,shape", [(1, (1, 3, 2, 2)), (1, (1, 2, 3, 2, 5)), (2, (1, 2, 3, 5, 2))])
def test_smallest_smoothable_maps(channel_axis, shape):
    # H or W = 2 is the smallest size reflect padding accepts; batch 1.
    rng = np.random.default_rng(0)
    u, c = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    scales = np.array([[2.0, 9.0]], np.float32)
    attrs = dict(smooth=3, channel_axis=channel_axis, tau=0.5, sharpness=6.0)
    _assert_close(run_body(u, c, scales, **attrs), reference(u, c, scales, **attrs), rtol=1e-5)


def test_smoothing_changes_the_result():
    # Guards against a body whose If always takes one branch.
    rng = np.random.default_rng(1)
    u, c = rng.standard_normal((1, 2, 6, 6)).astype(np.float32), rng.standard_normal((1, 2, 6, 6)).astype(np.float32)
    scales = np.array([[1.0, 9.0]], np.float32)
    assert np.abs(run_body(u, c, scales, smooth=3) - run_body(u, c, scales, smooth=0)).max() > 1e-3


def test_height_one_without_smoothing_is_defined_and_with_smoothing_is_an_error():
    rng = np.random.default_rng(2)
    u, c = rng.standard_normal((2, 3, 1, 5)).astype(np.float32), rng.standard_normal((2, 3, 1, 5)).astype(np.float32)
    scales = np.array([[1.0, 5.0], [2.0, 2.0]], np.float32)
    _assert_close(run_body(u, c, scales, smooth=0), reference(u, c, scales, smooth=0), rtol=1e-5)
    # Reflect padding needs 2 rows: the runtime refuses, as the reference does.
    with pytest.raises(Exception, match="(?i)pad|reflect"):
        run_body(u, c, scales, smooth=3)
    with pytest.raises(SamgError):
        reference(u, c, scales, smooth=3)


@pytest.mark.parametrize("smooth", [0, 3])
def test_non_finite_inputs_stay_non_finite(smooth):
    rng = np.random.default_rng(4)
    u = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    c = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    c[0, 1, 2, 3] = np.nan
    c[1, 0, 1, 1] = np.inf
    scales = np.array([[1.0, 6.0], [1.0, 6.0]], np.float32)
    got = run_body(u, c, scales, smooth=smooth)
    assert not np.isfinite(got[0, :, 2, 3]).any()
    assert not np.isfinite(got[1, :, 1, 1]).any()
    want = reference(u, c, scales, smooth=smooth)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("smooth", [0, 3])
def test_huge_delta_with_equal_scales_is_cfg(smooth, opset):
    # Δ ≈ 1e19: Δ² overflows float32. The energy is taken on Δ / max|Δ|, so the map stays finite
    # and equal scales give u + w·Δ (the unscaled body returned NaN): Sub, Mul, Add in float32,
    # nothing fused, so bit for bit the float32 formula.
    u, c = huge_delta_case()
    scales = np.array([[7.5, 7.5], [3.0, 3.0]], np.float32)
    got = run_body(u, c, scales, smooth=smooth, opset=opset)
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, spec_cfg(u, c, scales[:, 0], np.float32))
    np.testing.assert_allclose(got, spec_cfg(u, c, scales[:, 0]), rtol=CFG_RTOL)


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("magnitude", [1e-7, 1e-30, 1e19])
def test_map_is_the_spec_formula_at_every_scale_of_delta(magnitude, opset):
    # The spec's absolute ε: at |Δ| ~ 1e-7 it sets Ê (mean E ~ 1e-14); at 1e-30, (ε/s)/s is +Inf
    # in float32 (Ê = 0, the spec's ~1e-48); at 1e19 the result stays finite.
    u, c = scaled_delta_case(magnitude)
    scales = np.array([[2.0, 8.0], [1.0, 6.0]], np.float32)
    got = run_body(u, c, scales, smooth=3, opset=opset)
    assert np.isfinite(got).all()
    expected = spec_samg_v1(u, c, scales[:, 0], scales[:, 1], smooth=3)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("smooth", [0, 3])
def test_energy_sum_overflow_gives_the_spec_result(smooth, opset):
    # Every location's energy is finite in float32, the sample's sum is not.
    u, c = energy_sum_overflow_case()
    scales = np.array([[2.0, 8.0], [1.0, 6.0]], np.float32)
    got = run_body(u, c, scales, smooth=smooth, opset=opset)
    expected = spec_samg_v1(u, c, scales[:, 0], scales[:, 1], smooth=smooth)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_node_without_attributes_uses_the_defaults():
    model = make_standalone_model(4, "float32")
    del model.graph.node[0].attribute[:]
    rng = np.random.default_rng(5)
    u, c = rng.standard_normal((2, 3, 4, 5)).astype(np.float32), rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    scales = np.array([[1.0, 6.0], [2.0, 4.0]], np.float32)
    got = _session(model).run(None, {"pred_uncond": u, "pred_cond": c, "scales": scales})[0]
    _assert_close(got, reference(u, c, scales), rtol=1e-5)


def test_constants_match_the_reference():
    from samg.guidance.spatial import EPS, SMOOTH_WEIGHTS as REFERENCE_WEIGHTS

    assert EPSILON == EPS
    np.testing.assert_allclose(SMOOTH_WEIGHTS, REFERENCE_WEIGHTS, rtol=1e-15)


@pytest.mark.parametrize("rank,channel_axis,dtype", [(4, 1, "float32"), (5, 2, "float16"), (5, 1, "bfloat16")])
def test_standalone_model_passes_the_full_checker(rank, channel_axis, dtype):
    model = make_standalone_model(rank, dtype, 0.5, 8.0, 3, channel_axis)
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 10
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    out_type = inferred.graph.output[0].type.tensor_type
    assert out_type.elem_type == model.graph.input[0].type.tensor_type.elem_type
    assert len(out_type.shape.dim) == rank


def test_checker_rejects_undefined_attribute_values():
    model = make_standalone_model(4, "float32")
    for attribute in model.graph.node[0].attribute:
        if attribute.name == "channel_axis":
            attribute.i = 3
    with pytest.raises(Exception, match="channel_axis"):
        onnx.checker.check_model(model, full_check=True)


def test_attach_is_idempotent_and_strip_removes_the_body():
    model = make_standalone_model(4, "float32", with_function=False)
    assert len(model.functions) == 0
    attach_function(model)
    attach_function(model)
    assert [(f.domain, f.name) for f in model.functions] == [(DOMAIN, OP_TYPE)]
    assert sum(1 for entry in model.opset_import if entry.domain == DOMAIN) == 1
    strip_function(model)
    assert len(model.functions) == 0
    # Without the body (and with no custom op library) ONNX Runtime cannot run the node.
    with pytest.raises(Exception, match=OP_TYPE):
        _session(model)


def test_function_uses_standard_ops_and_attribute_references():
    function = function_proto(18)
    assert (function.domain, function.name) == (DOMAIN, OP_TYPE)
    assert {node.domain for node in function.node} == {""}
    referenced = {a.ref_attr_name for node in function.node for a in node.attribute if a.ref_attr_name}
    assert referenced == {"tau", "sharpness", "smooth", "channel_axis"}
    assert {a.name for a in function.attribute_proto} == referenced


def test_bad_arguments_raise_samg_errors():
    with pytest.raises(SamgError, match="smooth"):
        make_standalone_model(4, "float32", smooth=2)
    with pytest.raises(SamgError, match="channel_axis"):
        make_standalone_model(4, "float32", channel_axis=2)
    with pytest.raises(SamgError, match="dtype"):
        make_standalone_model(4, "float64")
    with pytest.raises(SamgError, match="opset"):
        function_proto(11)


def test_register_schema_is_idempotent():
    register_schema()
    register_schema()
    schema = onnx.defs.get_schema(OP_TYPE, 1, DOMAIN)
    assert [p.name for p in schema.inputs] == ["pred_uncond", "pred_cond", "scales"]
    assert set(schema.attributes) == {"tau", "sharpness", "smooth", "channel_axis"}


@pytest.mark.tensorrt
@pytest.mark.parametrize("rank,channel_axis,dtype,smooth", [(4, 1, "float32", 0), (5, 2, "float16", 3)])
def test_tensorrt_rtx_parses_and_builds_the_body(rank, channel_axis, dtype, smooth):
    # Ahead-of-time build works without a GPU; running the engine needs one (not tested here).
    trt = pytest.importorskip("tensorrt_rtx")
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    model = make_standalone_model(rank, dtype, 0.5, 6.0, smooth, channel_axis)
    assert parser.parse(model.SerializeToString()), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    shape = _shape(rank, channel_axis, batch=1, channels=3, frames=2, height=4, width=4)
    largest = tuple(2 * d if axis != channel_axis else d for axis, d in enumerate(shape))
    profile = builder.create_optimization_profile()
    for name in ("pred_uncond", "pred_cond"):
        profile.set_shape(name, shape, shape, largest)
    profile.set_shape("scales", (1, 2), (1, 2), (2, 2))
    config = builder.create_builder_config()
    config.add_optimization_profile(profile)
    assert builder.build_serialized_network(network, config) is not None
