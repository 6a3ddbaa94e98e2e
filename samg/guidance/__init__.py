"""samg.guidance: pure reference guidance rules for numpy arrays and torch tensors.

These are the truth every native implementation (ONNX function body, ORT custom op, TensorRT
plugin, CUDA kernel) is tested against; the formulas are written out in docs/guidance-op.md
("Rules"). Each rule takes ``(pred_uncond, pred_cond, ...)``, computes in float32 and returns the
input's array type and dtype. Importing this package does not import torch.

Main entry points::

    samg_v1(u, c, w_min, w_max, *, tau=1.0, sharpness=4.0, smooth=0, channel_axis=1)
    samg_scale_map(...)  -> w(p), float32, shape [B, 1, *S] (channel axis of size 1)
    cfg(u, c, scale)
    get_rule(name)(u, c, step=..., sigma=..., state=..., **params)
    get_rule(name).apply(StepInputs(u, c, x, sigma, step, prediction_type), state, **params) -> StepResult
    effective_scale(name, u, c, **params) -> mean_p w(p) per sample, [B]
"""

from samg.guidance.apg import APGState, apg
from samg.guidance.registry import (
    DEFAULT_GUIDANCE_SCALE,
    MAX_GUIDANCE_SCALE,
    SPATIAL_RULES,
    REQUIRED,
    RULES,
    GuidanceRule,
    check_scale,
    effective_scale,
    get_rule,
    rule_names,
)
from samg.guidance.rules import (
    CfgppOutput,
    cfg,
    cfg_rescale,
    cfg_zero_star,
    cfgpp,
    cfgpp_ddim_step,
    guidance_interval,
)
from samg.guidance.schedules import (
    INTERVAL_SIGMA_HI,
    INTERVAL_SIGMA_LO,
    SCHEDULES,
    get_schedule,
    in_guidance_interval,
    scheduled,
    step_scales,
)
from samg.guidance.spatial import (
    DEFAULT_CHANNEL_AXIS,
    DEFAULT_SHARPNESS,
    DEFAULT_SMOOTH,
    DEFAULT_TAU,
    EPS,
    SMOOTH_WEIGHTS,
    bound_scale_map,
    linear_scale_map,
    quantile_scale_map,
    samg_bound,
    samg_linear,
    samg_quantile,
    samg_scale_map,
    samg_v1,
    smooth3x3,
)
from samg.guidance.step import PREDICTION_TYPES, StepInputs, StepResult, applied_scales, x0_from_prediction

__all__ = [
    "DEFAULT_GUIDANCE_SCALE", "SPATIAL_RULES", "INTERVAL_SIGMA_HI", "INTERVAL_SIGMA_LO", "step_scales",
    "DEFAULT_CHANNEL_AXIS", "DEFAULT_SHARPNESS", "DEFAULT_SMOOTH", "DEFAULT_TAU", "PREDICTION_TYPES",
    "StepInputs", "StepResult", "applied_scales", "x0_from_prediction",
    "APGState", "apg", "MAX_GUIDANCE_SCALE", "check_scale", "REQUIRED", "RULES", "GuidanceRule", "effective_scale", "get_rule", "rule_names",
    "CfgppOutput", "cfg", "cfg_rescale", "cfg_zero_star", "cfgpp", "cfgpp_ddim_step", "guidance_interval",
    "in_guidance_interval", "SCHEDULES", "get_schedule", "scheduled", "EPS", "SMOOTH_WEIGHTS",
    "bound_scale_map", "linear_scale_map", "quantile_scale_map", "samg_bound", "samg_linear",
    "samg_quantile", "samg_scale_map", "samg_v1", "smooth3x3",
]
