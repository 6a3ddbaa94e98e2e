"""The op `samg::SemanticCombine` v1: S-CFG combine from attention maps, as one ONNX node.

Inputs (all float; internal math float32, output in the dtype of `pred_uncond`):
  pred_uncond, pred_cond `[B, C, H, W]`; scales `[B, K]` float32, K >= 1, column 0 is w (the export feeds
  `(w, w)`); self_fine `[2B, n0, N0, N0]`, cross_fine `[2B, n0, N0, T]` (level at H/factor_fine);
  self_coarse `[2B, n1, N1, N1]`, cross_coarse `[2B, n1, N1, T]` (level at H/factor_coarse).
Attributes: factor_fine (int), factor_coarse (int), corrected (int 0/1, default 0 = the official code).
Output: guided `[B, C, H, W]` = `samg.scfg.reference.scfg_combine` (contract: docs/scfg.md).

Built like `samg.op` (GuidanceCombine) on the shared skeleton `samg.op.skeleton.OpSpec` (schema
registration, function body attach/strip, standalone model, torch autograd.Function whose `symbolic`
emits the node); what is its own is the FunctionProto of standard ops in the ONNX text syntax.
"""

from __future__ import annotations

import warnings

from samg.errors import check, require
from samg.op.schema import DOMAIN  # both samg ops share the one custom domain
from samg.op.skeleton import TENSOR_TYPES, OpSpec
from samg.scfg.reference import BLUR_1D, EPS, RATE_BUDGET, RATE_MAX, RATE_MIN

OP_TYPE = "SemanticCombine"
OP_VERSION = 1
MIN_OPSET = 18  # Reduce* with axes as inputs, Pad reflect, Resize with sizes
_FLOAT, _BOOL = 1, 9
_INT64_MAX = 2**63 - 1


def _f(value: float) -> str:
    text = repr(float(value))
    return text if any(ch in text for ch in ".eEn") else text + ".0"


_KERNEL = ", ".join(_f(a * b) for a in BLUR_1D for b in BLUR_1D)

# One level: completion S~ (If on `corrected`), A = S~ @ cross, to [2B*n, T, h, w], resize to the fine
# size (coarse level only), 3x3 blur with reflect padding, then the token and foreground sums.
_LEVEL = """
    {p}_s = Cast <to = {float}> (self_{p})
    {p}_a = Cast <to = {float}> (cross_{p})
    {p}_s2 = MatMul ({p}_s, {p}_s)
    {p}_done = If (corrected_on) <
        then_branch = {p}_true_average () => (float[] {p}_avg) {{
            {p}_s3 = MatMul ({p}_s2, {p}_s)
            {p}_s4 = MatMul ({p}_s3, {p}_s)
            {p}_s12 = Add ({p}_s, {p}_s2)
            {p}_s34 = Add ({p}_s3, {p}_s4)
            {p}_sum4 = Add ({p}_s12, {p}_s34)
            {p}_avg = Mul ({p}_sum4, quarter)
        }},
        else_branch = {p}_code_quirk () => (float[] {p}_quirk) {{
            {p}_s2x3 = Mul ({p}_s2, three)
            {p}_sum2 = Add ({p}_s, {p}_s2x3)
            {p}_quirk = Mul ({p}_sum2, quarter)
        }}
    >
    {p}_maps = MatMul ({p}_done, {p}_a)
    {p}_maps_t = Transpose <perm = [0, 1, 3, 2]> ({p}_maps)
    {p}_shape = Shape ({p}_maps_t)
    {p}_lead = Slice ({p}_shape, zero1, two1)
    {p}_tokens = Slice ({p}_shape, two1, three1)
    {p}_factor = Constant <value_int: int = @factor_{p}> ()
    {p}_hw = Div (latent_hw, {p}_factor)
    {p}_grid_shape = Concat <axis = 0> (minus1, {p}_tokens, {p}_hw)
    {p}_grid = Reshape ({p}_maps_t, {p}_grid_shape)
{resize}
    {p}_flat_shape = Concat <axis = 0> (minus1, one1, fine_hw)
    {p}_flat = Reshape ({p}_at_fine, {p}_flat_shape)
    {p}_padded = Pad <mode = "reflect"> ({p}_flat, reflect_pads)
    {p}_blurred_flat = Conv ({p}_padded, blur_kernel)
    {p}_blurred_shape = Concat <axis = 0> ({p}_lead, {p}_tokens, fine_hw)
    {p}_blurred = Reshape ({p}_blurred_flat, {p}_blurred_shape)
    {p}_mean = ReduceMean <keepdims = 1> ({p}_blurred, axes34)
    {p}_mean_eps = Add ({p}_mean, eps)
    {p}_normed = Div ({p}_blurred, {p}_mean_eps)
    {p}_token_sum = ReduceSum <keepdims = 0> ({p}_normed, axis1)
    {p}_sot = Slice ({p}_blurred, zero1, one1, two1)
    {p}_rest = Slice ({p}_blurred, one1, int64_max, two1)
    {p}_rest_sum = ReduceSum <keepdims = 1> ({p}_rest, two1)
    {p}_fore = Concat <axis = 2> ({p}_sot, {p}_rest_sum)
    {p}_fore_mean = ReduceMean <keepdims = 1> ({p}_fore, axes34)
    {p}_fore_normed = Div ({p}_fore, {p}_fore_mean)
    {p}_fore_sum = ReduceSum <keepdims = 0> ({p}_fore_normed, axis1)
    {p}_count = Slice ({p}_lead, one1, two1)
"""

_RESIZE_FINE = "    fine_at_fine = Identity (fine_grid)"
# bilinear, align_corners=False in torch is half_pixel here (identical for upsampling by >= 2)
_RESIZE_COARSE = """\
    coarse_grid_dims = Shape (coarse_grid)
    coarse_grid_lead = Slice (coarse_grid_dims, zero1, two1)
    coarse_sizes = Concat <axis = 0> (coarse_grid_lead, fine_hw)
    coarse_at_fine = Resize <mode = "linear", coordinate_transformation_mode = "half_pixel"> (coarse_grid, , , coarse_sizes)"""

_BODY = """
<domain: "{domain}", opset_import: ["" : {opset}]>
{op_type} <factor_fine: int = 4, factor_coarse: int = 8, corrected: int = 0>
    ({inputs}) => ({outputs})
{{
    zero1 = Constant <value_ints: ints = [0]> ()
    one1 = Constant <value_ints: ints = [1]> ()
    two1 = Constant <value_ints: ints = [2]> ()
    three1 = Constant <value_ints: ints = [3]> ()
    four1 = Constant <value_ints: ints = [4]> ()
    minus1 = Constant <value_ints: ints = [-1]> ()
    int64_max = Constant <value_ints: ints = [{int64_max}]> ()
    axis1 = Constant <value_ints: ints = [1]> ()
    axes23 = Constant <value_ints: ints = [2, 3]> ()
    axes34 = Constant <value_ints: ints = [3, 4]> ()
    quarter = Constant <value_float: float = 0.25> ()
    three = Constant <value_float: float = 3.0> ()
    eps = Constant <value_float: float = {eps}> ()
    one_f = Constant <value_float: float = 1.0> ()
    zero_f = Constant <value_float: float = 0.0> ()
    reflect_pads = Constant <value_ints: ints = [0, 0, 1, 1, 0, 0, 1, 1]> ()
    blur_kernel = Constant <value: tensor = float[1, 1, 3, 3] {{{kernel}}}> ()
    corrected_value = Constant <value_int: int = @corrected> ()
    corrected_on = Cast <to = {bool}> (corrected_value)

    u = Cast <to = {float}> (pred_uncond)
    c = Cast <to = {float}> (pred_cond)
    delta = Sub (c, u)
    latent_shape = Shape (u)
    batch = Slice (latent_shape, zero1, one1)
    latent_hw = Slice (latent_shape, two1, four1)
{levels}
    token_total = Add (fine_token_sum, coarse_token_sum)
    fore_total = Add (fine_fore_sum, coarse_fore_sum)
    layer_count_int = Add (fine_count, coarse_count)
    layer_count = Cast <to = {float}> (layer_count_int)
    token_maps = Div (token_total, layer_count)
    fore_maps = Div (fore_total, layer_count)

    # token masks from the conditional half; foreground from the unconditional half (corrected: conditional)
    cond_tokens = Slice (token_maps, batch, int64_max, zero1)
    token_max = ReduceMax <keepdims = 1> (cond_tokens, axis1)
    token_is_max = Equal (cond_tokens, token_max)
    token_mask = Cast <to = {float}> (token_is_max)
    fore_start = Mul (batch, corrected_value)
    fore_end = Add (fore_start, batch)
    fore_half = Slice (fore_maps, fore_start, fore_end, zero1)
    fore_sot = Slice (fore_half, zero1, one1, one1)
    fore_max = ReduceMax <keepdims = 1> (fore_half, axis1)
    sot_wins = Equal (fore_sot, fore_max)
    sot_wins_f = Cast <to = {float}> (sot_wins)
    fore_mask = Sub (one_f, sot_wins_f)

    # per-region rate at the latent size (masks upsampled nearest, as the code does)
    delta_sq = Mul (delta, delta)
    energy = ReduceSum <keepdims = 1> (delta_sq, axis1)
    norm = Sqrt (energy)
    token_shape = Shape (token_mask)
    token_lead = Slice (token_shape, zero1, two1)
    token_sizes = Concat <axis = 0> (token_lead, latent_hw)
    nearest = Resize <mode = "nearest", coordinate_transformation_mode = "asymmetric", nearest_mode = "floor"> (token_mask, , , token_sizes)
    fore_sizes = Concat <axis = 0> (batch, one1, latent_hw)
    fore_nearest = Resize <mode = "nearest", coordinate_transformation_mode = "asymmetric", nearest_mode = "floor"> (fore_mask, , , fore_sizes)
    region_weighted = Mul (norm, nearest)
    region_sum = ReduceSum <keepdims = 0> (region_weighted, axes23)
    region_count = ReduceSum <keepdims = 0> (nearest, axes23)
    region_count_eps = Add (region_count, eps)
    region_norm = Div (region_sum, region_count_eps)
    fore_weighted = Mul (norm, fore_nearest)
    fore_sum = ReduceSum <keepdims = 0> (fore_weighted, axes23)
    fore_count = ReduceSum <keepdims = 0> (fore_nearest, axes23)
    fore_count_eps = Add (fore_count, eps)
    fore_norm = Div (fore_sum, fore_count_eps)
    present = Greater (region_count, zero_f)
    present_f = Cast <to = {float}> (present)
    rate_up = Mul (fore_norm, present_f)
    region_norm_eps = Add (region_norm, eps)
    rate_k = Div (rate_up, region_norm_eps)
    rate_k4 = Unsqueeze (rate_k, axes23)
    rate_parts = Mul (rate_k4, nearest)
    rate_raw = ReduceSum <keepdims = 1> (rate_parts, axis1)
    rate_lo = Constant <value_float: float = {rate_min}> ()
    rate_hi = Constant <value_float: float = {rate_max}> ()
    rate_clipped = Clip (rate_raw, rate_lo, rate_hi)
    w_column = Slice (scales, zero1, one1, one1)
    w = Unsqueeze (w_column, axes23)
    budget = Constant <value_float: float = {budget}> ()
    w_cap = Div (budget, w)
    rate_capped = Min (rate_clipped, w_cap)
    rate_padded = Pad <mode = "reflect"> (rate_capped, reflect_pads)
    rate = Conv (rate_padded, blur_kernel)

    w_rate = Mul (w, rate)
    guidance = Mul (w_rate, delta)
    out = Add (u, guidance)
    guided = CastLike (out, pred_uncond)
}}
"""


def function_proto(opset: int = 18):
    """The op's FunctionProto: standard ops of the default domain at `opset` (>= 18), fp32 inside."""
    onnx = require("onnx", "to build the SemanticCombine function body")
    check(isinstance(opset, int) and opset >= MIN_OPSET,
          f"SemanticCombine function body needs ONNX opset >= {MIN_OPSET}, got {opset!r}: export with --opset 18")
    levels = []
    for p in ("fine", "coarse"):
        resize = _RESIZE_FINE if p == "fine" else _RESIZE_COARSE
        levels.append(_LEVEL.format(p=p, float=_FLOAT, resize=resize))
    text = _BODY.format(
        domain=DOMAIN, opset=opset, op_type=OP_TYPE, inputs=", ".join(INPUT_NAMES), outputs=", ".join(OUTPUT_NAMES),
        int64_max=_INT64_MAX, eps=_f(EPS), kernel=_KERNEL, float=_FLOAT, bool=_BOOL, levels="".join(levels),
        rate_min=_f(RATE_MIN), rate_max=_f(RATE_MAX), budget=_f(RATE_BUDGET),
    )
    return onnx.parser.parse_function(text)


def _infer(ctx) -> None:
    ctx.set_output_type(0, ctx.get_input_type(0))


def _reference(u, c, scales, s0, a0, s1, a1, factor_fine, factor_coarse, corrected):
    from samg.scfg.reference import scfg_combine

    return scfg_combine(u, c, [s0, s1], [a0, a1], scales, factors=(factor_fine, factor_coarse), corrected=bool(corrected))


SEMANTIC_COMBINE = OpSpec(
    DOMAIN, OP_TYPE, OP_VERSION,
    "S-CFG combine: out = u + w rate(p) (c - u), rate from semantic regions of the attention maps. "
    "See docs/scfg.md.",
    inputs=(
        ("pred_uncond", "T", "unconditional prediction [B,C,H,W]"),
        ("pred_cond", "T", "conditional prediction [B,C,H,W]"),
        ("scales", "tensor(float)", "[B,K], column 0 is the guidance scale w"),
        ("self_fine", "A", "self-attention probs of the fine level [2B,n0,N0,N0]"),
        ("cross_fine", "A", "cross-attention probs of the fine level [2B,n0,N0,T]"),
        ("self_coarse", "A", "self-attention probs of the coarse level [2B,n1,N1,N1]"),
        ("cross_coarse", "A", "cross-attention probs of the coarse level [2B,n1,N1,T]"),
    ),
    outputs=(("guided", "T", "guided prediction, shape and dtype of pred_uncond"),),
    type_constraints=(("T", TENSOR_TYPES, "prediction dtype"), ("A", TENSOR_TYPES, "map dtype")),
    attributes=(
        ("factor_fine", 4, "downsampling factor of the fine level relative to the latent"),
        ("factor_coarse", 8, "downsampling factor of the coarse level relative to the latent"),
        ("corrected", 0, "0: the official code's quirks; 1: true power average, cond foreground"),
    ),
    body=lambda opset: function_proto(opset),
    infer=_infer,
)
INPUT_NAMES = SEMANTIC_COMBINE.input_names
OUTPUT_NAMES = SEMANTIC_COMBINE.output_names


def register_schema() -> None:
    """Register the op schema with onnx.defs (idempotent)."""
    SEMANTIC_COMBINE.register_schema()


def attach_function(model) -> None:
    """Add the SemanticCombine body and the `samg` opset import to `model` in place (idempotent)."""
    SEMANTIC_COMBINE.attach_function(model)


def strip_function(model) -> None:
    SEMANTIC_COMBINE.strip_function(model)


def make_standalone_model(*, factors=(4, 8), corrected: bool = False, opset: int = 18):
    """A model holding one SemanticCombine node (float32, dynamic dims), with its body attached."""
    onnx = require("onnx", "to build a SemanticCombine model")
    helper, F = onnx.helper, onnx.TensorProto.FLOAT
    shapes = {
        "pred_uncond": ["B", "C", "H", "W"], "pred_cond": ["B", "C", "H", "W"], "scales": ["B", "K"],
        "self_fine": ["B2", "n0", "N0", "N0"], "cross_fine": ["B2", "n0", "N0", "T"],
        "self_coarse": ["B2", "n1", "N1", "N1"], "cross_coarse": ["B2", "n1", "N1", "T"],
    }
    inputs = [helper.make_tensor_value_info(n, F, shapes[n]) for n in INPUT_NAMES]
    output = helper.make_tensor_value_info("guided", F, ["B", "C", "H", "W"])
    return SEMANTIC_COMBINE.standalone_model(inputs, [output], opset=opset, node_name="semantic_combine",
                                             factor_fine=int(factors[0]), factor_coarse=int(factors[1]),
                                             corrected=int(corrected))


def _export_function():
    """autograd.Function: eager = reference; under the TorchScript exporter = one SemanticCombine node.
    Its forward runs untraced: recording the reference's many ops as the node's subgraph trips
    TorchScript's peephole pass."""
    return SEMANTIC_COMBINE.export_function(_reference, untraced=True)


def semantic_combine(u, c, scales, self_maps, cross_maps, *, factors, corrected: bool = False):
    """S-CFG combine with exactly two levels (fine, coarse); one ONNX node when traced for export.

    `scales` `[B, K]` float (column 0 = w); `self_maps`/`cross_maps` two stacks each, finest first;
    `factors` the two levels' downsampling factors (finest first).
    """
    torch = require("torch", "for semantic_combine")
    check(len(self_maps) == 2 and len(cross_maps) == 2 and len(factors) == 2,
          f"SemanticCombine takes exactly two attention levels (fine, coarse), got {len(self_maps)}: "
          "pick two levels with scfg_levels")
    # equal factors: one level given twice (a UNet with a single attention level), exact as one level
    check(int(factors[0]) < int(factors[1]) or (int(factors[0]) == int(factors[1]) and self_maps[0] is self_maps[1]),
          f"SemanticCombine factors must be (fine, coarse) with fine < coarse, got {tuple(factors)}")
    if scales.dtype != torch.float32:  # (a float32 tensor passes through with no Cast node)
        scales = scales.to(torch.float32)
    args = (u, c, scales, self_maps[0], cross_maps[0], self_maps[1], cross_maps[1],
            int(factors[0]), int(factors[1]), int(bool(corrected)))
    with warnings.catch_warnings():  # shape checks inside the reference warn while tracing
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return _export_function().apply(*args)


__all__ = ["DOMAIN", "OP_TYPE", "OP_VERSION", "INPUT_NAMES", "OUTPUT_NAMES", "function_proto", "register_schema",
           "attach_function", "strip_function", "make_standalone_model", "semantic_combine"]
