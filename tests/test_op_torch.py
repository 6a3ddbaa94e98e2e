"""Torch side of GuidanceCombine: eager op, and export to exactly one ONNX node that runs.

Both the eager op and the exported graph (run by onnxruntime) are checked against samg-v1 written
out in float64 in the test (tests/samg_expectation.py), not against the library's reference."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from samg.errors import SamgError  # noqa: E402
from samg_expectation import spec_samg_v1  # noqa: E402
from samg.op import DOMAIN, OP_TYPE, attach_function, dynamo_translation_table, guidance_combine, register_schema  # noqa: E402


class DenoiserLike(torch.nn.Module):
    """A conv over the doubled batch (uncond first, cond second) followed by the fused combine."""

    def __init__(self, channels: int, **attrs):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.attrs = attrs

    def forward(self, latents, scales):
        batch = latents.shape[0]
        pred = self.conv(torch.cat([latents, latents * 0.5]))
        return guidance_combine(pred[:batch], pred[batch:], scales, **self.attrs)


class VideoCombine(torch.nn.Module):
    def __init__(self, **attrs):
        super().__init__()
        self.attrs = attrs

    def forward(self, u, c, scales):
        return guidance_combine(u * 1.5, c - 0.25, scales, **self.attrs)


def _export(module, args, input_names, dynamic_axes):
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is "legacy"
        torch.onnx.export(
            module,
            args,
            buffer,
            dynamo=False,
            opset_version=18,
            input_names=input_names,
            output_names=["guided"],
            dynamic_axes=dynamic_axes,
        )
    return onnx.load_from_string(buffer.getvalue())


def _expected(u, c, scales, attrs):
    """samg-v1 in float64 from the spec, for torch inputs (any float dtype)."""
    as64 = lambda t: t.detach().to(torch.float64).numpy()  # noqa: E731
    s = as64(scales)
    return spec_samg_v1(as64(u), as64(c), s[:, 0], s[:, 1], **attrs)


def _assert_matches(got, expected, rtol):
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def _ort_run(model, feeds):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]


def _combine_nodes(model):
    return [n for n in model.graph.node if (n.domain, n.op_type) == (DOMAIN, OP_TYPE)]


def _check_exported(model, attrs, elem_type, rank):
    nodes = _combine_nodes(model)
    assert len(nodes) == 1
    values = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert values["smooth"] == attrs["smooth"] and values["channel_axis"] == attrs["channel_axis"]
    assert values["tau"] == pytest.approx(attrs["tau"]) and values["sharpness"] == pytest.approx(attrs["sharpness"])
    out_type = model.graph.output[0].type.tensor_type
    assert out_type.elem_type == elem_type and len(out_type.shape.dim) == rank
    assert len(model.functions) == 0  # the exporter leaves the node opaque until attach_function
    attach_function(model)
    register_schema()
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("smooth", [0, 3])
def test_torchscript_export_image_denoiser(smooth):
    attrs = dict(tau=0.8, sharpness=5.0, smooth=smooth, channel_axis=1)
    module = DenoiserLike(4, **attrs).eval()
    axes = {"latents": {0: "B", 2: "H", 3: "W"}, "scales": {0: "B"}, "guided": {0: "B", 2: "H", 3: "W"}}
    model = _export(module, (torch.randn(2, 4, 8, 8), torch.tensor([[1.0, 7.0], [2.0, 3.0]])), ["latents", "scales"], axes)
    _check_exported(model, attrs, onnx.TensorProto.FLOAT, 4)
    # Another batch and size than the traced one: the node is shape-generic.
    feeds = {"latents": torch.randn(3, 4, 6, 10), "scales": torch.tensor([[1.0, 7.5], [4.0, 4.0], [0.0, 12.0]])}
    with torch.no_grad():
        eager = module(**feeds).numpy()
        pred = module.conv(torch.cat([feeds["latents"], feeds["latents"] * 0.5]))  # the model part
    expected = _expected(pred[:3], pred[3:], feeds["scales"], attrs)
    _assert_matches(eager, expected, 1e-5)
    _assert_matches(_ort_run(model, feeds), expected, 1e-5)


@pytest.mark.parametrize(
    "channel_axis,dtype", [(1, torch.float32), (2, torch.float32), (2, torch.float16)]
)
def test_torchscript_export_video(channel_axis, dtype):
    attrs = dict(tau=1.2, sharpness=3.0, smooth=3, channel_axis=channel_axis)
    module = VideoCombine(**attrs).eval()
    shape = (1, 3, 2, 5, 6) if channel_axis == 1 else (1, 2, 3, 5, 6)
    dims = {0: "B", 1: "d1", 2: "d2", 3: "H", 4: "W"}
    axes = {"u": dims, "c": dims, "scales": {0: "B"}, "guided": dims}
    gen = torch.Generator().manual_seed(1)
    example = (torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype), torch.tensor([[1.0, 6.0]]))
    model = _export(module, example, ["u", "c", "scales"], axes)
    elem = onnx.TensorProto.FLOAT if dtype == torch.float32 else onnx.TensorProto.FLOAT16
    _check_exported(model, attrs, elem, 5)
    new_shape = (2, 3, 3, 4, 7) if channel_axis == 1 else (2, 3, 3, 4, 7)
    feeds = {
        "u": torch.randn(new_shape, generator=gen).to(dtype),
        "c": (torch.randn(new_shape, generator=gen) * 2).to(dtype),
        "scales": torch.tensor([[1.0, 6.0], [3.0, 3.0]]),
    }
    with torch.no_grad():
        eager = module(**feeds).float().numpy()
    # The op's inputs as the graph computes them (in `dtype`), then the spec in float64.
    expected = _expected(feeds["u"] * 1.5, feeds["c"] - 0.25, feeds["scales"], attrs)
    rtol = 1e-5 if dtype == torch.float32 else 2e-3  # fp16: one rounding of the output
    _assert_matches(eager, expected, rtol)
    _assert_matches(_ort_run(model, feeds).astype(np.float32), expected, rtol)


def test_dynamo_export_with_translation_table():
    attrs = dict(tau=0.8, sharpness=5.0, smooth=3, channel_axis=1)
    module = DenoiserLike(4, **attrs).eval()
    example = (torch.randn(2, 4, 8, 8), torch.tensor([[1.0, 7.0], [2.0, 3.0]]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            example,
            dynamo=True,
            opset_version=18,
            input_names=["latents", "scales"],
            output_names=["guided"],
            custom_translation_table=dynamo_translation_table(),
            verbose=False,
        )
    model = program.model_proto
    assert len(_combine_nodes(model)) == 1
    attach_function(model)
    onnx.checker.check_model(model, full_check=True)
    with torch.no_grad():
        pred = module.conv(torch.cat([example[0], example[0] * 0.5]))  # the model part
    expected = _expected(pred[:2], pred[2:], example[1], attrs)
    _assert_matches(_ort_run(model, dict(zip(["latents", "scales"], example))), expected, 1e-5)


def test_eager_matches_the_spec_and_is_differentiable():
    gen = torch.Generator().manual_seed(2)
    u = torch.randn(2, 3, 5, 5, generator=gen, requires_grad=True)
    c = torch.randn(2, 3, 5, 5, generator=gen)
    scales = torch.tensor([[1.0, 8.0], [2.0, 5.0]])
    out = guidance_combine(u, c, scales, tau=0.5, smooth=3)
    _assert_matches(out.detach().numpy(), _expected(u, c, scales, dict(tau=0.5, smooth=3)), 1e-5)
    out.sum().backward()
    assert u.grad is not None and torch.isfinite(u.grad).all()


def test_eager_hand_computed_case():
    # [1, 1, 2, 2], u = 0, Δ = (2, 1, 1, 0): max |Δ| = 2, E = (1, 1/4, 1/4, 0), mean E = 3/8,
    # Ê = (8/3, 2/3, 2/3, 0); with τ = 1, k = 4: m = sigmoid(4·(Ê − 1)); w = 6 − 4·m; out = w·Δ.
    u = torch.zeros(1, 1, 2, 2)
    c = torch.tensor([[[[2.0, 1.0], [1.0, 0.0]]]])
    out = guidance_combine(u, c, torch.tensor([[2.0, 6.0]]))
    e_hat = [8 / 3, 2 / 3, 2 / 3, 0.0]
    w = [6 - 4 / (1 + math.exp(-4 * (e - 1))) for e in e_hat]
    expected = [w[0] * 2, w[1] * 1, w[2] * 1, 0.0]
    np.testing.assert_allclose(out.reshape(-1).numpy(), expected, rtol=1e-6, atol=1e-7)


def test_eager_keeps_the_input_dtype():
    u = torch.randn(1, 4, 3, 3, dtype=torch.bfloat16)
    out = guidance_combine(u, u + 1, torch.tensor([[2.0, 4.0]]), smooth=3)
    assert out.dtype == torch.bfloat16 and out.shape == u.shape


@pytest.mark.parametrize(
    "u_shape,c_shape,scales_shape,kwargs,match",
    [
        ((1, 4, 8), (1, 4, 8), (1, 2), {}, "4-D"),
        ((1, 4, 8, 8), (1, 4, 8, 9), (1, 2), {}, "same shape"),
        ((2, 4, 8, 8), (2, 4, 8, 8), (1, 2), {}, "scales"),
        ((2, 4, 8, 8), (2, 4, 8, 8), (2, 3), {}, "scales"),
        ((1, 4, 1, 8), (1, 4, 1, 8), (1, 2), {"smooth": 3}, "H and W"),
        ((1, 4, 8, 8), (1, 4, 8, 8), (1, 2), {"channel_axis": 2}, "channel_axis"),
        ((1, 4, 8, 8), (1, 4, 8, 8), (1, 2), {"smooth": 1}, "smooth"),
        ((1, 4, 8, 8), (1, 4, 8, 8), (1, 2), {"tau": float("nan")}, "tau"),
    ],
)
def test_bad_inputs_raise_samg_errors(u_shape, c_shape, scales_shape, kwargs, match):
    with pytest.raises(SamgError, match=match):
        guidance_combine(torch.zeros(u_shape), torch.zeros(c_shape), torch.ones(scales_shape), **kwargs)


def test_mixed_dtypes_raise_a_samg_error():
    u = torch.zeros(1, 4, 4, 4)
    with pytest.raises(SamgError, match="dtype"):
        guidance_combine(u, u.half(), torch.ones(1, 2))
    with pytest.raises(SamgError, match="dtype"):
        guidance_combine(u.double(), u.double(), torch.ones(1, 2))
