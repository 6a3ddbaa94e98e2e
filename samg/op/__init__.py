"""The op `samg::GuidanceCombine` v1: schema, ONNX function body, torch export hook.

Importing this package is cheap: onnx and torch are imported by the functions that need them.
Contract: docs/guidance-op.md ("Op").
"""

from samg.op.function import (
    attach_function,
    function_proto,
    make_standalone_model,
    strip_function,
)
from samg.op.schema import (
    DEFAULT_CHANNEL_AXIS,
    DEFAULT_SHARPNESS,
    DEFAULT_SMOOTH,
    DEFAULT_TAU,
    DOMAIN,
    INPUT_NAMES,
    OP_TYPE,
    OP_VERSION,
    OUTPUT_NAMES,
    register_schema,
)
from samg.op.torch_op import dynamo_translation_table, guidance_combine

__all__ = [
    "DOMAIN",
    "OP_TYPE",
    "OP_VERSION",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "DEFAULT_TAU",
    "DEFAULT_SHARPNESS",
    "DEFAULT_SMOOTH",
    "DEFAULT_CHANNEL_AXIS",
    "register_schema",
    "function_proto",
    "attach_function",
    "strip_function",
    "make_standalone_model",
    "guidance_combine",
    "dynamo_translation_table",
]
