"""Contract constants of `samg::GuidanceCombine` v1 and its registration with `onnx.defs`.

Importing this module is cheap (no onnx); `register_schema()` imports onnx when called.
"""

from __future__ import annotations

import math

from samg.errors import SamgError, check, require

# The attribute defaults, ε and the smoothing weights (applied along H then W) are the reference's.
from samg.guidance.spatial import (  # noqa: F401 (re-exported: the op's contract constants)
    DEFAULT_CHANNEL_AXIS,
    DEFAULT_SHARPNESS,
    DEFAULT_SMOOTH,
    DEFAULT_TAU,
    EPS as EPSILON,
    SMOOTH_WEIGHTS,
)

DOMAIN = "samg"
OP_TYPE = "GuidanceCombine"
OP_VERSION = 1

INPUT_NAMES = ("pred_uncond", "pred_cond", "scales")
OUTPUT_NAMES = ("guided",)


SMOOTH_CHOICES = (0, 3)
CHANNEL_AXIS_CHOICES = (1, 2)
RANKS = (4, 5)
# ONNX type strings of the inputs `pred_uncond`/`pred_cond`/`guided`.
TENSOR_TYPES = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)")



def validate_attributes(*, tau: float, sharpness: float, smooth: int, channel_axis: int) -> None:
    """Raise SamgError unless the attribute values are ones the op defines."""
    check(math.isfinite(tau), f"GuidanceCombine tau must be a finite number, got {tau!r}")
    check(
        math.isfinite(sharpness),
        f"GuidanceCombine sharpness must be a finite number, got {sharpness!r}",
    )
    check(
        smooth in SMOOTH_CHOICES,
        f"GuidanceCombine smooth must be 0 (off) or 3 (3x3 smoothing), got {smooth!r}",
    )
    check(
        channel_axis in CHANNEL_AXIS_CHOICES,
        f"GuidanceCombine channel_axis must be 1 ([B,C,...]) or 2 ([B,F,C,H,W]), got {channel_axis!r}",
    )


def validate_shapes(
    u_shape: tuple, c_shape: tuple, scales_shape: tuple, *, smooth: int, channel_axis: int
) -> None:
    """Raise SamgError unless the input shapes fit the op (ints, or None for unknown dims)."""
    check(
        len(u_shape) in RANKS,
        f"GuidanceCombine needs 4-D [B,C,H,W] or 5-D video predictions, got shape {tuple(u_shape)}",
    )
    check(
        tuple(u_shape) == tuple(c_shape),
        f"GuidanceCombine pred_uncond {tuple(u_shape)} and pred_cond {tuple(c_shape)} "
        "must have the same shape",
    )
    check(
        len(scales_shape) == 2 and scales_shape[1] in (2, None) and scales_shape[0] in (u_shape[0], None),
        f"GuidanceCombine scales must be [B, 2] = (w_min, w_max) per sample with B = {u_shape[0]}, "
        f"got shape {tuple(scales_shape)}",
    )
    if channel_axis == 2:
        check(
            len(u_shape) == 5,
            "GuidanceCombine channel_axis=2 is for 5-D [B,F,C,H,W] video; use channel_axis=1 for 4-D",
        )
    if smooth:
        height, width = u_shape[-2], u_shape[-1]
        # Reflect padding by 1 needs at least 2 rows and 2 columns.
        check(
            all(d is None or d >= 2 for d in (height, width)),
            f"GuidanceCombine smooth=3 needs H and W >= 2 (reflect padding), got H={height}, "
            f"W={width}: use smooth=0 for such inputs",
        )


def _infer_output_type(ctx) -> None:
    """Shape inference for the schema: `guided` has the type and shape of `pred_uncond`."""
    onnx = require("onnx")
    ctx.set_output_type(0, ctx.get_input_type(0))
    # Attribute checks (the checker calls inference, so bad attributes fail early there).
    values = {}
    for name, default in (("smooth", DEFAULT_SMOOTH), ("channel_axis", DEFAULT_CHANNEL_AXIS)):
        attr = ctx.get_attribute(name)
        values[name] = onnx.helper.get_attribute_value(attr) if attr is not None else default
    if values["smooth"] not in SMOOTH_CHOICES or values["channel_axis"] not in CHANNEL_AXIS_CHOICES:
        raise onnx.shape_inference.InferenceError(
            f"[samg] {OP_TYPE}: smooth must be 0 or 3 and channel_axis 1 or 2, got {values}"
        )


def register_schema() -> None:
    """Register the op schema with onnx.defs (idempotent), for the checker and dynamo exporter."""
    onnx = require("onnx", "to describe the GuidanceCombine op")
    defs = onnx.defs
    if defs.has(OP_TYPE, OP_VERSION, DOMAIN):
        return
    OpSchema = defs.OpSchema
    param = OpSchema.FormalParameter

    def attr(name, default, description):
        return OpSchema.Attribute(name, onnx.helper.make_attribute(name, default), description)

    schema = OpSchema(
        OP_TYPE,
        DOMAIN,
        OP_VERSION,
        "SAMG guidance combine (samg-v1): out = u + w(p) (c - u), w from the per-location "
        "delta energy. See docs/guidance-op.md.",
        inputs=[
            param("pred_uncond", "T", "unconditional prediction [B,C,*S]"),
            param("pred_cond", "T", "conditional prediction [B,C,*S]"),
            param("scales", "tensor(float)", "(w_min, w_max) per sample, [B,2]"),
        ],
        outputs=[param("guided", "T", "guided prediction, shape and dtype of pred_uncond")],
        type_constraints=[("T", list(TENSOR_TYPES), "prediction dtype")],
        attributes=[
            attr("tau", DEFAULT_TAU, "energy threshold relative to the per-sample mean"),
            attr("sharpness", DEFAULT_SHARPNESS, "sigmoid slope k"),
            attr("smooth", DEFAULT_SMOOTH, "0: no smoothing; 3: 3x3 separable smoothing of m"),
            attr("channel_axis", DEFAULT_CHANNEL_AXIS, "1 for [B,C,...], 2 for [B,F,C,H,W]"),
        ],
    )
    schema.set_type_and_shape_inference_function(_infer_output_type)
    register_once(schema)


def register_once(schema) -> None:
    """Register an op schema with onnx.defs unless one of that name, version and domain exists."""
    defs = require("onnx", "to register op schemas").defs
    name, version, domain = schema.name, schema.since_version, schema.domain
    if defs.has(name, version, domain):
        return
    try:
        defs.register_schema(schema)
    except Exception as exc:  # a concurrent registration of the same schema is fine
        if not defs.has(name, version, domain):
            raise SamgError(f"could not register the {domain}::{name} schema with onnx: {exc}") from exc
