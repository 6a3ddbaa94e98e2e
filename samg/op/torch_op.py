"""Torch entry point of `samg::GuidanceCombine`: eager reference, one ONNX node when exported.

- Eager: `guidance_combine` calls the reference `samg.guidance.samg_v1` (differentiable).
- TorchScript exporter (`torch.onnx.export(..., dynamo=False)`): while tracing, the call goes
  through a `torch.autograd.Function` whose `symbolic` emits exactly one GuidanceCombine node.
- Dynamo exporter (optional path): while `torch.export` traces, the call goes through the torch
  custom op `samg::guidance_combine`; pass `dynamo_translation_table()` as
  `custom_translation_table=` so it becomes one GuidanceCombine node.
After either export, `samg.op.attach_function(model)` adds the body so any runtime can run it.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

from samg.errors import check, require
from samg.op.schema import (
    DEFAULT_CHANNEL_AXIS,
    DEFAULT_SHARPNESS,
    DEFAULT_SMOOTH,
    DEFAULT_TAU,
    DOMAIN,
    GUIDANCE_COMBINE,
    OP_VERSION,
    validate_attributes,
    validate_shapes,
)

TORCH_OP_NAME = "samg::guidance_combine"
_TORCH_OP_SCHEMA = (
    "(Tensor u, Tensor c, Tensor scales, float tau, float sharpness, int smooth, int channel_axis) -> Tensor"
)


def _reference(u, c, scales, tau, sharpness, smooth, channel_axis):
    from samg.guidance import samg_v1

    return samg_v1(
        u, c, scales[:, 0], scales[:, 1],
        tau=tau, sharpness=sharpness, smooth=smooth, channel_axis=channel_axis,
    )


@contextlib.contextmanager
def _quiet_tracer(torch):
    """Silence TracerWarnings from shape checks: the traced forward is replaced by one ONNX node."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def _export_function():
    """The autograd.Function used under the TorchScript exporter: eager = the reference, traced = one node."""
    return GUIDANCE_COMBINE.export_function(_reference)


@functools.cache
def _custom_op():
    """The torch custom op `samg::guidance_combine` for the dynamo exporter (registered once)."""
    torch = require("torch", "to export GuidanceCombine")

    # Explicit schema: the annotations would be strings here (postponed evaluation).
    @torch.library.custom_op(TORCH_OP_NAME, mutates_args=(), schema=_TORCH_OP_SCHEMA)
    def guidance_combine_op(u, c, scales, tau, sharpness, smooth, channel_axis):
        return _reference(u, c, scales, tau, sharpness, smooth, channel_axis)

    @guidance_combine_op.register_fake
    def _(u, c, scales, tau, sharpness, smooth, channel_axis):
        return torch.empty_like(u)

    return guidance_combine_op


def dynamo_translation_table() -> dict:
    """`custom_translation_table` for `torch.onnx.export(..., dynamo=True)`: custom op -> one node."""
    torch = require("torch", "to export GuidanceCombine")
    onnxscript = require("onnxscript", "to export GuidanceCombine with the dynamo exporter")
    from samg.op.schema import register_schema

    register_schema()
    _custom_op()
    samg_opset = onnxscript.values.Opset(DOMAIN, OP_VERSION)

    def translate(u, c, scales, tau: float, sharpness: float, smooth: int, channel_axis: int):
        return samg_opset.GuidanceCombine(
            u, c, scales, tau=tau, sharpness=sharpness, smooth=smooth, channel_axis=channel_axis
        )

    return {torch.ops.samg.guidance_combine.default: translate}


def _validate_tensors(torch, u, c, scales, smooth, channel_axis) -> None:
    for name, t in (("pred_uncond", u), ("pred_cond", c), ("scales", scales)):
        check(isinstance(t, torch.Tensor), f"guidance_combine {name} must be a torch.Tensor, got {type(t).__name__}")
    allowed = (torch.float32, torch.float16, torch.bfloat16)
    check(
        u.dtype in allowed and c.dtype == u.dtype,
        f"guidance_combine needs pred_uncond and pred_cond of one dtype among float32/float16/bfloat16, "
        f"got {u.dtype} and {c.dtype}: cast them with .to(torch.float32)",
    )
    check(scales.is_floating_point(), f"guidance_combine scales must be float32 [B, 2], got {scales.dtype}")
    validate_shapes(tuple(u.shape), tuple(c.shape), tuple(scales.shape), smooth=smooth, channel_axis=channel_axis)


def guidance_combine(
    u,
    c,
    scales,
    *,
    tau: float = DEFAULT_TAU,
    sharpness: float = DEFAULT_SHARPNESS,
    smooth: int = DEFAULT_SMOOTH,
    channel_axis: int = DEFAULT_CHANNEL_AXIS,
):
    """SAMG v1 combine of torch predictions `u`, `c` [B,C,*S] with `scales` [B,2] = (w_min, w_max).

    Returns `u + w(p)(c - u)` in the dtype of `u`. Exported by TorchScript as one
    `samg::GuidanceCombine` node (and by dynamo as one node with `dynamo_translation_table()`).
    """
    torch = require("torch", "for guidance_combine")
    validate_attributes(tau=tau, sharpness=sharpness, smooth=smooth, channel_axis=channel_axis)
    args = (float(tau), float(sharpness), int(smooth), int(channel_axis))
    # The op's scales input is float32; a float32 tensor passes `.to` with no extra graph node.
    if torch.jit.is_tracing():
        with _quiet_tracer(torch):
            _validate_tensors(torch, u, c, scales, smooth, channel_axis)
            return _export_function().apply(u, c, scales.to(torch.float32), *args)
    _validate_tensors(torch, u, c, scales, smooth, channel_axis)
    scales = scales.to(torch.float32)
    if torch.compiler.is_exporting():
        return _custom_op()(u, c, scales, *args)
    return _reference(u, c, scales, *args)
