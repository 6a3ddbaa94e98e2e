"""The `samg` model's KServe v2 (Open Inference Protocol) tensors, and the request parser.

One table (INPUTS, and the outputs below it) is the protocol: the repository writer turns it into
config.pbtxt, the Triton model parses requests with it, docs/serving.md shows it. An input's name is
the `SamgPipeline.submit` keyword it feeds, so the API's errors ("guidance_scale= must be ...")
already name the tensor. Absent optional inputs take the export's defaults (the API's).

Standard library and numpy only: the Triton model, the CLI and the tests import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from samg.errors import SamgError
from samg.guidance.registry import DEFAULT_GUIDANCE_SCALE
from samg.runtime.pipeline import DEFAULT_STEPS


@dataclass(frozen=True)
class TensorSpec:
    name: str  # the tensor's name, and the SamgPipeline.submit keyword an input feeds
    datatype: str  # KServe v2 datatype
    required: bool
    help: str


INPUTS = (
    TensorSpec("prompt", "BYTES", True, "the prompt, UTF-8"),
    TensorSpec("negative_prompt", "BYTES", False, "the negative prompt (default empty)"),
    TensorSpec("guidance", "BYTES", False, "guidance rule: samg, cfg, ... (default: the export's first)"),
    TensorSpec("guidance_scale", "FP32", False, f"guidance scale W (default {DEFAULT_GUIDANCE_SCALE:g}); spatial rules: w_max"),
    TensorSpec("guidance_min", "FP32", False, "spatial rules: w_min (default (1 + W) / 2, as `samg generate --scale W`)"),
    TensorSpec("num_inference_steps", "INT32", False, f"sampling steps (default {DEFAULT_STEPS}, at most the model's own)"),
    TensorSpec("seed", "INT64", False, "noise seed, 0..2^63-1 (default: random, returned in `seed`)"),
    TensorSpec("height", "INT32", False, "image height in pixels (default: the export's)"),
    TensorSpec("width", "INT32", False, "image width in pixels (default: the export's)"),
    TensorSpec("num_frames", "INT32", False, "video models: frames (default: the export's)"),
)
INPUT_NAMES = tuple(spec.name for spec in INPUTS)
IMAGE_OUTPUT = "image"  # UINT8 [H, W, 3], image models
VIDEO_OUTPUT = "frames"  # UINT8 [F, H, W, 3], video models
SEED_OUTPUT = "seed"  # INT64 [1]: the seed used (the one drawn when none was sent)
PIXEL_CHANNELS = 3

# KServe v2 datatype -> (Triton config data_type, numpy dtype kind accepted when parsing).
DATATYPES = {
    "BYTES": ("TYPE_STRING", "OSU"),
    "FP32": ("TYPE_FP32", "f"),
    "INT32": ("TYPE_INT32", "iu"),
    "INT64": ("TYPE_INT64", "iu"),
    "UINT8": ("TYPE_UINT8", "u"),
}
_EXAMPLE = {"BYTES": '"a cat"', "FP32": "7.5", "INT32": "20", "INT64": "42"}


def image_output_name(is_video: bool) -> str:
    return VIDEO_OUTPUT if is_video else IMAGE_OUTPUT


def _value(spec: TensorSpec, array: Any, rows: int, batched: bool) -> list[Any]:
    """The `rows` values of one input tensor, checked (shape, type, UTF-8, finite)."""
    array = np.asarray(array)
    want = (rows, 1) if batched else (1,)
    shape = "[batch, 1]" if batched else "[1]"
    if array.shape != want:
        raise SamgError(f"input {spec.name} has shape {list(array.shape)}, expected {list(want)}: send one "
                        f"{spec.datatype} value per request as shape {shape}, e.g. {spec.name} = [{_EXAMPLE[spec.datatype]}]")
    kinds = DATATYPES[spec.datatype][1]
    if array.dtype.kind not in kinds:
        raise SamgError(f"input {spec.name} must be {spec.datatype}, got {array.dtype}: send it as {spec.datatype}")
    values = []
    for item in array.reshape(-1).tolist():
        if spec.datatype == "BYTES":
            if isinstance(item, (bytes, bytearray)):
                try:
                    item = bytes(item).decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise SamgError(f"input {spec.name} is not UTF-8 text (byte 0x{bytes(item)[exc.start]:02x} at "
                                    f"{exc.start}): send the text UTF-8 encoded") from None
            elif not isinstance(item, str):
                raise SamgError(f"input {spec.name} must be BYTES (text), got {type(item).__name__}")
        elif spec.datatype == "FP32":
            item = float(item)
            if not math.isfinite(item):
                raise SamgError(f"input {spec.name} is {item}, not a finite number: send e.g. {spec.name} = "
                                f"[{_EXAMPLE['FP32']}]")
        else:
            item = int(item)
        values.append(item)
    return values


def parse_request(tensors: Mapping[str, Any], *, batched: bool = False) -> list[dict[str, Any]]:
    """SamgPipeline.submit keywords (prompt included) for each request row of one inference request.

    `tensors`: input name -> numpy array as Triton hands them over (BYTES as an object array of
    bytes). Unbatched models take shape [1] per input and give one row; a model with Triton's
    batching (`batched`) takes [batch, 1] and gives `batch` rows. A SamgError names the input."""
    unknown = sorted(set(tensors) - set(INPUT_NAMES))
    if unknown:
        raise SamgError(f"unknown input {', '.join(unknown)}: the inputs are {', '.join(INPUT_NAMES)}")
    if "prompt" not in tensors:
        raise SamgError("input prompt is missing: send prompt as BYTES [1], e.g. prompt = [\"a cat\"]")
    prompt = np.asarray(tensors["prompt"])
    rows = int(prompt.shape[0]) if batched and prompt.ndim == 2 and prompt.shape[0] >= 1 else 1
    requests: list[dict[str, Any]] = [{} for _ in range(rows)]
    for spec in INPUTS:
        if spec.name not in tensors:
            continue
        for request, value in zip(requests, _value(spec, tensors[spec.name], rows, batched)):
            request[spec.name] = value
    for request in requests:
        if not request["prompt"].strip():
            raise SamgError("input prompt is empty: send the text of the prompt, e.g. prompt = [\"a cat\"]")
    return requests
