"""Contract constants of `samg::GuidanceCombine` v1 and its registration with `onnx.defs`.

Importing this module is cheap (no onnx); `register_schema()` imports onnx when called.
"""

from __future__ import annotations

import math

from samg.errors import check, require
from samg.op.skeleton import TENSOR_TYPES, OpSpec

DOMAIN = "samg"
OP_TYPE = "GuidanceCombine"
OP_VERSION = 1

# samg-v1's attribute defaults (the spec's), defined here once: the reference rules (samg.guidance),
# the export and the manifest take them from here (this module is numpy-free, as samg.contract needs).
DEFAULT_TAU = 1.0
DEFAULT_SHARPNESS = 4.0
DEFAULT_SMOOTH = 0
DEFAULT_CHANNEL_AXIS = 1

#: ε of samg-v1 (docs/guidance-op.md, step 2): Ê = E / (mean E + EPSILON) on the energy E of Δ itself,
#: so Δ = 0 gives Ê = 0 instead of 0/0.
EPSILON = 1e-12
#: 1-D smoothing weights [e^-1, 1, e^-1] / (1 + 2 e^-1) ≈ [0.2119, 0.5761, 0.2119] (sum to 1), applied
#: along H then W (S-CFG's 3x3 Gaussian has the same weights).
_EDGE = math.exp(-1.0)
SMOOTH_WEIGHTS = (_EDGE / (1.0 + 2.0 * _EDGE), 1.0 / (1.0 + 2.0 * _EDGE), _EDGE / (1.0 + 2.0 * _EDGE))



# The guidance rules (samg.guidance.registry names) a graph holding this op runs: the op takes
# (w_min, w_max) per step, so SAMG, CFG (w_min == w_max) and interval (scales (1, 1) outside its range).
# Every other rule needs a raw export (both predictions out, combined on the host).
FUSED_RULES = ("samg", "cfg", "interval")

SMOOTH_CHOICES = (0, 3)
CHANNEL_AXIS_CHOICES = (1, 2)
RANKS = (4, 5)



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


def _function_body(opset: int):
    from samg.op.function import function_proto

    return function_proto(opset)


GUIDANCE_COMBINE = OpSpec(
    DOMAIN, OP_TYPE, OP_VERSION,
    "SAMG guidance combine (samg-v1): out = u + w(p) (c - u), w from the per-location "
    "delta energy. See docs/guidance-op.md.",
    inputs=(
        ("pred_uncond", "T", "unconditional prediction [B,C,*S]"),
        ("pred_cond", "T", "conditional prediction [B,C,*S]"),
        ("scales", "tensor(float)", "(w_min, w_max) per sample, [B,2]"),
    ),
    outputs=(("guided", "T", "guided prediction, shape and dtype of pred_uncond"),),
    type_constraints=(("T", TENSOR_TYPES, "prediction dtype"),),
    attributes=(
        ("tau", DEFAULT_TAU, "energy threshold relative to the per-sample mean"),
        ("sharpness", DEFAULT_SHARPNESS, "sigmoid slope k"),
        ("smooth", DEFAULT_SMOOTH, "0: no smoothing; 3: 3x3 separable smoothing of m"),
        ("channel_axis", DEFAULT_CHANNEL_AXIS, "1 for [B,C,...], 2 for [B,F,C,H,W]"),
    ),
    body=_function_body,
    infer=_infer_output_type,
)
INPUT_NAMES = GUIDANCE_COMBINE.input_names
OUTPUT_NAMES = GUIDANCE_COMBINE.output_names


def register_schema() -> None:
    """Register the op schema with onnx.defs (idempotent), for the checker and dynamo exporter."""
    GUIDANCE_COMBINE.register_schema()
