"""The ONNX function body of `samg::GuidanceCombine` (standard ops only) and model helpers.

The body is written in the ONNX textual syntax (`onnx.parser`) so that it reads like the math in
docs/guidance-op.md. Attribute values reach the body through `Constant <value_*: ... = @attr>`
nodes (`ref_attr_name`), so one function serves every tau/sharpness/smooth/channel_axis.
"""

from __future__ import annotations

from samg.errors import check, require
from samg.op.schema import (
    DEFAULT_CHANNEL_AXIS,
    DEFAULT_SHARPNESS,
    DEFAULT_SMOOTH,
    DEFAULT_TAU,
    DOMAIN,
    EPSILON,
    INPUT_NAMES,
    OP_TYPE,
    OUTPUT_NAMES,
    RANKS,
    SMOOTH_WEIGHTS,
    GUIDANCE_COMBINE,
    validate_attributes,
)

MIN_OPSET = 13  # ReduceSum with `axes` as an input

_FLOAT = 1  # onnx.TensorProto.FLOAT
_BOOL = 9  # onnx.TensorProto.BOOL

# Steps: fp32 delta -> energy over channels of delta / max|delta| -> per-sample normalization
# (eps scaled alike) -> sigmoid membership m (flattened to [B, N] so the body is rank-agnostic) ->
# optional smoothing of m per frame -> w = w_max - (w_max - w_min) m -> out = u + w delta, cast
# back to the input dtype.
# In the text syntax `float[]` is a float tensor of unknown shape (`float` alone means a scalar).
_BODY = """
<domain: "{domain}", opset_import: ["" : {opset}]>
{op_type} <tau: float = {tau}, sharpness: float = {sharpness}, smooth: int = {smooth}, channel_axis: int = {channel_axis}>
    ({inputs}) => ({outputs})
{{
    tau_value = Constant <value_float: float = @tau> ()
    sharpness_value = Constant <value_float: float = @sharpness> ()
    smooth_value = Constant <value_int: int = @smooth> ()
    channel_axis_value = Constant <value_int: int = @channel_axis> ()
    smooth_on = Cast <to = {bool}> (smooth_value)

    u = Cast <to = {float}> (pred_uncond)
    c = Cast <to = {float}> (pred_cond)
    delta = Sub (c, u)
    # Energy of delta / s, s = the sample's max |delta| (1 where that is 0): squares and sums stay in
    # float32 range; eps is scaled to match below, so the normalized energy is the spec's.
    flat_shape = Constant <value_ints: ints = [0, -1]> ()
    delta_flat = Reshape (delta, flat_shape)
    delta_abs = Abs (delta_flat)
{peak_line}
    zero = Constant <value_float: float = 0.0> ()
    one = Constant <value_float: float = 1.0> ()
    peak_positive = Greater (delta_peak, zero)
    energy_scale = Where (peak_positive, delta_peak, one)
    scaled_flat = Div (delta_flat, energy_scale)
    delta_shape = Shape (delta)
    scaled = Reshape (scaled_flat, delta_shape)
    delta_sq = Mul (scaled, scaled)
    # TensorRT's parser needs reduce axes that are constants themselves (not derived from an
    # attribute), so each channel_axis value gets its own branch; the condition folds at build.
    two = Constant <value_int: int = 2> ()
    channel_axis_is_two = Equal (channel_axis_value, two)
    energy = If (channel_axis_is_two) <
        then_branch = channel_axis_two () => (float[] energy_axis_two) {{
            axes_two = Constant <value_ints: ints = [2]> ()
            energy_axis_two = ReduceSum <keepdims = 1> (delta_sq, axes_two)
        }},
        else_branch = channel_axis_one () => (float[] energy_axis_one) {{
            axes_one = Constant <value_ints: ints = [1]> ()
            energy_axis_one = ReduceSum <keepdims = 1> (delta_sq, axes_one)
        }}
    >
    energy_shape = Shape (energy)

    energy_flat = Reshape (energy, flat_shape)
{mean_line}
    # The spec's E / (mean E + eps) on the energy of delta itself is, on the scaled energy,
    # E / (mean E + eps / s^2): (eps / s) / s, never s^2 (which underflows for s < 1e-23).
    epsilon = Constant <value_float: float = {epsilon}> ()
    epsilon_per_scale = Div (epsilon, energy_scale)
    epsilon_scaled = Div (epsilon_per_scale, energy_scale)
    mean_eps = Add (energy_mean, epsilon_scaled)
    energy_norm = Div (energy_flat, mean_eps)
    above_tau = Sub (energy_norm, tau_value)
    logits = Mul (above_tau, sharpness_value)
    membership = Sigmoid (logits)

    membership_used = If (smooth_on) <
        then_branch = smooth_branch () => (float[] membership_smoothed) {{
            last_two_start = Constant <value_ints: ints = [-2]> ()
            last_two_end = Constant <value_ints: ints = [{int64_max}]> ()
            height_width = Slice (energy_shape, last_two_start, last_two_end)
            frames_head = Constant <value_ints: ints = [-1, 1]> ()
            frames_shape = Concat <axis = 0> (frames_head, height_width)
            frames = Reshape (membership, frames_shape)
            reflect_pads = Constant <value_ints: ints = [0, 0, 1, 1, 0, 0, 1, 1]> ()
            padded = Pad <mode = "reflect"> (frames, reflect_pads)
            kernel_h = Constant <value: tensor = float[1, 1, 3, 1] {{{w0}, {w1}, {w2}}}> ()
            kernel_w = Constant <value: tensor = float[1, 1, 1, 3] {{{w0}, {w1}, {w2}}}> ()
            smoothed_h = Conv (padded, kernel_h)
            smoothed_hw = Conv (smoothed_h, kernel_w)
            membership_flat_shape = Shape (membership)
            membership_smoothed = Reshape (smoothed_hw, membership_flat_shape)
        }},
        else_branch = plain_branch () => (float[] membership_plain) {{
            membership_plain = Identity (membership)
        }}
    >

    first = Constant <value_ints: ints = [0]> ()
    second = Constant <value_ints: ints = [1]> ()
    third = Constant <value_ints: ints = [2]> ()
    w_min = Slice (scales, first, second, second)
    w_max = Slice (scales, second, third, second)
    w_range = Sub (w_max, w_min)
    w_drop = Mul (w_range, membership_used)
    weight_flat = Sub (w_max, w_drop)
    weight = Reshape (weight_flat, energy_shape)

    guidance = Mul (weight, delta)
    out = Add (u, guidance)
    guided = CastLike (out, pred_uncond)
}}
"""



def _reduce_over_axis_one(op: str, output: str, data: str, opset: int) -> str:
    """`output = op(data)` over axis 1 of a [B, N] tensor, keepdims: ReduceMean and ReduceMax took
    `axes` as an attribute before opset 18 and as an input from 18 on."""
    if opset >= 18:
        return (
            f"    {output}_axes = Constant <value_ints: ints = [1]> ()\n"
            f"    {output} = {op} <keepdims = 1> ({data}, {output}_axes)"
        )
    return f"    {output} = {op} <keepdims = 1, axes = [1]> ({data})"


def _float_literal(value: float) -> str:
    """A float in a form the ONNX text parser reads back exactly (always with a dot or exponent)."""
    text = repr(float(value))
    return text if any(ch in text for ch in ".eEn") else text + ".0"


def function_proto(opset: int = 18):
    """The op's FunctionProto (standard ops of the default domain at `opset`, fp32 math inside)."""
    onnx = require("onnx", "to build the GuidanceCombine function body")
    check(
        isinstance(opset, int) and opset >= MIN_OPSET,
        f"GuidanceCombine function body needs ONNX opset >= {MIN_OPSET}, got {opset!r}: export with opset 17 or 18",
    )
    text = _BODY.format(
        domain=DOMAIN,
        opset=opset,
        op_type=OP_TYPE,
        tau=_float_literal(DEFAULT_TAU),
        sharpness=_float_literal(DEFAULT_SHARPNESS),
        smooth=DEFAULT_SMOOTH,
        channel_axis=DEFAULT_CHANNEL_AXIS,
        inputs=", ".join(INPUT_NAMES),
        outputs=", ".join(OUTPUT_NAMES),
        peak_line=_reduce_over_axis_one("ReduceMax", "delta_peak", "delta_abs", opset),
        mean_line=_reduce_over_axis_one("ReduceMean", "energy_mean", "energy_flat", opset),
        epsilon=_float_literal(EPSILON),
        int64_max=2**63 - 1,
        w0=_float_literal(SMOOTH_WEIGHTS[0]),
        w1=_float_literal(SMOOTH_WEIGHTS[1]),
        w2=_float_literal(SMOOTH_WEIGHTS[2]),
        float=_FLOAT,
        bool=_BOOL,
    )
    return onnx.parser.parse_function(text)


def attach_function(model) -> None:
    """Add the GuidanceCombine body (built for the model's own opset) and the `samg` opset import."""
    GUIDANCE_COMBINE.attach_function(model)


def strip_function(model) -> None:
    """Remove the GuidanceCombine body so runtimes use their plugin/custom op instead (in place)."""
    GUIDANCE_COMBINE.strip_function(model)


def make_standalone_model(
    rank: int = 4,
    dtype: str = "float32",
    tau: float = DEFAULT_TAU,
    sharpness: float = DEFAULT_SHARPNESS,
    smooth: int = DEFAULT_SMOOTH,
    channel_axis: int = DEFAULT_CHANNEL_AXIS,
    *,
    opset: int = 18,
    with_function: bool = True,
):
    """A model with one GuidanceCombine node and dynamic dims (for tests, custom ops and plugins).

    Inputs `pred_uncond`, `pred_cond` (`dtype`, rank `rank`), `scales` [B, 2] float32; output
    `guided`. `with_function=False` leaves the body out (plugin / custom-op library path).
    """
    onnx = require("onnx", "to build a GuidanceCombine model")
    helper = onnx.helper
    validate_attributes(tau=tau, sharpness=sharpness, smooth=smooth, channel_axis=channel_axis)
    check(rank in RANKS, f"GuidanceCombine models are rank 4 or 5, got rank={rank!r}")
    check(
        not (channel_axis == 2 and rank != 5),
        "GuidanceCombine channel_axis=2 needs rank 5 ([B,F,C,H,W])",
    )
    elem_types = {
        "float32": onnx.TensorProto.FLOAT,
        "float16": onnx.TensorProto.FLOAT16,
        "bfloat16": onnx.TensorProto.BFLOAT16,
    }
    check(dtype in elem_types, f"GuidanceCombine dtype must be one of {sorted(elem_types)}, got {dtype!r}")
    dims = ["B"] + [f"d{i}" for i in range(1, rank)]
    u_info = helper.make_tensor_value_info(INPUT_NAMES[0], elem_types[dtype], dims)
    c_info = helper.make_tensor_value_info(INPUT_NAMES[1], elem_types[dtype], dims)
    scales_info = helper.make_tensor_value_info(INPUT_NAMES[2], onnx.TensorProto.FLOAT, ["B", 2])
    out_info = helper.make_tensor_value_info(OUTPUT_NAMES[0], elem_types[dtype], dims)
    return GUIDANCE_COMBINE.standalone_model(
        [u_info, c_info, scales_info], [out_info], opset=opset, with_function=with_function,
        node_name="guidance_combine", tau=float(tau), sharpness=float(sharpness), smooth=int(smooth),
        channel_axis=int(channel_axis))
