"""Optimization profiles for TensorRT, derived from an export's typed manifest (samg.contract).

The user speaks in pixels and prompts (`batch`, `height`, `width`, `frames`, `tokens`); the
manifest (docs/architecture.md) says which symbolic dim of which input they drive:
`B` latent batch, `2B` conditioning batch (always twice `B`), `H`/`W` latent size, `F` latent
frames, `L` token length, `N` prompts (text encoder) or decoded latents (VAE).

`symbol_ranges()` turns the user's choice into (min, opt, max) per symbol from the export's latent
layout; `input_profiles()` maps every input dim of one component to a range: a fixed ONNX dim stays
fixed, a symbolic one takes its symbol's range (from the graph's declared input shape, the dim's own
name, or its position).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from samg.contract import Latent, TensorSpec
from samg.errors import SamgError, check

SHAPE_KEYS = ("batch", "height", "width", "frames", "tokens")
# Default minimum sizes of a dynamic range stay on the export's `size_multiple` (pixels), else on
# latent multiples of 8 (every SD-family UNet halves the latent at most three times).
LATENT_STEP = 8
DEFAULT_MAX_BATCH = 4

Range = tuple[int, int, int]


def parse_shape_spec(text: str | None, flag: str = "--opt") -> dict[str, int]:
    """`"batch=2,height=512,width=768"` -> {"batch": 2, "height": 512, "width": 768}."""
    if not text:
        return {}
    values: dict[str, int] = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        check(
            sep == "=" and key in SHAPE_KEYS and value.strip().isdigit() and int(value) > 0,
            f"{flag} {text!r}: expected comma-separated KEY=POSITIVE_INT with KEY in {', '.join(SHAPE_KEYS)} "
            "(e.g. batch=1,height=512,width=512)",
        )
        values[key] = int(value)
    return values


@dataclass(frozen=True)
class ShapeRequest:
    """What the user asked for: static (opt only) or dynamic (min/opt/max, each partial)."""

    dynamic: bool = False
    min: dict | None = None
    opt: dict | None = None
    max: dict | None = None


def _latent_frames(frames: int, temporal_factor: int) -> int:
    return (frames - 1) // temporal_factor + 1


def symbol_ranges(latent: Latent, request: ShapeRequest, default_tokens: int | None = None, *,
                  vae_frames: str = "none") -> dict[str, Range]:
    """(min, opt, max) for each symbol the export's components may use. `vae_frames` is the VAE's
    frame mode (VaeDecoderGraph.frame_mode): a per-frame VAE decodes batch x frames latents."""
    factor, temporal = latent.spatial_factor, latent.temporal_factor
    opt_user, min_user, max_user = request.opt or {}, request.min or {}, request.max or {}
    if not request.dynamic:
        check(not min_user and not max_user, "--min/--max need --dynamic (a --static build uses --opt only)")

    def pick(key: str, default_opt: int | None, default_min, default_max, resizable: bool) -> Range | None:
        opt = opt_user.get(key, default_opt)
        if opt is None:
            check(key not in min_user and key not in max_user, f"this export has no {key} dimension to set")
            return None
        if not request.dynamic:
            return (opt, opt, opt)
        if not resizable:
            for name, values in (("--min", min_user), ("--max", max_user)):
                check(
                    values.get(key, opt) == opt,
                    f"{name} {key}={values.get(key)}: this export's {key} is fixed at {opt} "
                    "(re-export with a dynamic size, or leave it out)",
                )
            return (opt, opt, opt)
        low = min_user.get(key, default_min(opt))
        high = max_user.get(key, default_max(opt))
        check(
            low <= opt <= high,
            f"{key}: need --min <= --opt <= --max, got {low} <= {opt} <= {high}",
        )
        return (low, opt, high)

    step = latent.size_multiple or factor * LATENT_STEP
    batch = pick("batch", 1, lambda o: 1, lambda o: max(o, DEFAULT_MAX_BATCH), True)
    sizes = {}
    for key in ("height", "width"):
        sizes[key] = pick(
            key,
            getattr(latent, key),
            lambda o: max(min(o, step), o // 2 // step * step),
            lambda o: 2 * o,
            latent.dynamic_resolution,
        )
    frames = pick(
        "frames",
        latent.frames,
        lambda o: o,
        lambda o: o,
        bool(latent.dynamic_frames),
    )
    tokens = pick("tokens", default_tokens, lambda o: o, lambda o: o, True)

    ranges: dict[str, Range] = {"B": batch, "2B": tuple(2 * v for v in batch)}
    for key, symbol in (("height", "H"), ("width", "W")):
        if sizes[key] is None:
            continue
        multiple = latent.pixel_multiple
        for v in sizes[key]:
            check(v % multiple == 0, f"{key}={v} is not a multiple of {multiple} (this export's size step)")
        ranges[symbol] = tuple(v // factor for v in sizes[key])
    if frames is not None:
        ranges["F"] = tuple(_latent_frames(v, temporal) for v in frames)
    if tokens is not None:
        ranges["L"] = tokens
    # Text encoder: one call encodes [negatives, positives], so 2B prompts at the optimum; a
    # dynamic engine also takes a single prompt.
    ranges["N"] = (1 if request.dynamic else 2 * batch[0], 2 * batch[1], 2 * batch[2])
    per_frame = vae_frames == "per_frame" and "F" in ranges
    frame_counts = ranges["F"] if per_frame else (1, 1, 1)
    images = tuple(b * f for b, f in zip(batch, frame_counts))
    ranges["NV"] = (1, *images[1:]) if request.dynamic else images
    return ranges


# Symbols a component's declared inputs or ONNX dims use for the global ones above: the VAE's
# `N` counts decoded latents (images, or frames for a per-frame VAE), not prompts.
_ALIASES = {"vae_decoder": {"N": "NV", "h": "H", "w": "W", "f": "F"}}


def _positional_symbols(component: str, name: str, rank: int, layout: str) -> list[str | None]:
    """Symbols by position for inputs whose shape the manifest does not declare."""
    if component == "text_encoder":
        return ["N", None][:rank] + [None] * max(0, rank - 2)
    if component == "vae_decoder":
        return {4: ["NV", None, "H", "W"], 5: ["NV", None, "F", "H", "W"]}.get(rank, [None] * rank)
    if name == "latents":
        return [{"B": "B", "C": None, "H": "H", "W": "W", "F": "F"}[ch] for ch in layout][:rank]
    if name in ("timestep", "guidance_scales"):
        return ["B"] + [None] * (rank - 1)
    # conditioning inputs: [2B, L, D] or [2B, D]
    return (["2B", "L", None] if rank == 3 else ["2B"] + [None] * (rank - 1))[:rank]


def input_profiles(
    component: str,
    onnx_inputs: dict[str, list[int | str | None]],
    ranges: dict[str, Range],
    *,
    declared: Mapping[str, TensorSpec] | None = None,
    layout: str = "BCHW",
) -> dict[str, dict[str, list[int]]]:
    """{input: {"min": [...], "opt": [...], "max": [...]}} for one component's ONNX inputs.

    `onnx_inputs` maps each input to its ONNX dims: an int for a fixed dim, the dim_param name
    (or None) for a symbolic one. `declared`: the input shapes the manifest declares for this graph
    (DenoiserGraph.inputs, VaeDecoderGraph.inputs); `layout`: the latent layout (Latent.layout).
    """
    declared = declared or {}
    profiles = {}
    for name, dims in onnx_inputs.items():
        positional = _positional_symbols(component, name, len(dims), layout)
        manifest_dims = list(declared[name].shape) if name in declared else []
        if len(manifest_dims) != len(dims):  # a declaration that does not fit the graph says nothing
            manifest_dims = []
        shape: list[Range] = []
        for axis, dim in enumerate(dims):
            if isinstance(dim, int) and dim > 0:
                shape.append((dim, dim, dim))
                continue
            candidates = [
                manifest_dims[axis] if axis < len(manifest_dims) else None,
                dim if isinstance(dim, str) else None,
                positional[axis] if axis < len(positional) else None,
            ]
            if isinstance(candidates[0], int):
                shape.append((candidates[0],) * 3)
                continue
            aliases = _ALIASES.get(component, {})
            symbols = [aliases.get(c, c) for c in candidates if isinstance(c, str)]
            symbol = next((c for c in symbols if c in ranges), None)
            if symbol is None:
                raise SamgError(
                    f"{component} input {name!r} dim {axis} ({dim!r}) is dynamic but the manifest does not say "
                    "what it is: re-export with `samg export` so samg.json declares the input shapes"
                )
            shape.append(ranges[symbol])
        profiles[name] = {key: [r[i] for r in shape] for i, key in enumerate(("min", "opt", "max"))}
    return profiles


def request_from_profiles(latent: Latent, profiles: Mapping[str, Mapping[str, list[int] | tuple[int, ...]]]) -> ShapeRequest:
    """The ShapeRequest that builds a denoiser engine with these profiles (an engine record's
    `profiles`): batch, height, width, frames from `latents` (in the export's layout), tokens from
    `encoder_hidden_states`. `samg bench` builds the raw variant's engines to match DIR's this way."""
    latents = profiles.get("latents")
    check(latents is not None, "the denoiser engine has no `latents` profile: rebuild it with `samg build`")
    factor, temporal = latent.spatial_factor, latent.temporal_factor
    to_pixels = {"B": ("batch", lambda v: v), "H": ("height", lambda v: v * factor),
                 "W": ("width", lambda v: v * factor), "F": ("frames", lambda v: (v - 1) * temporal + 1)}
    request: dict[str, dict[str, int]] = {"min": {}, "opt": {}, "max": {}}
    for point in request:
        dims = latents[point]
        check(len(dims) == len(latent.layout), f"the `latents` profile {list(dims)} does not fit the layout "
                                               f"{latent.layout}: rebuild the engine with `samg build`")
        for axis, size in zip(latent.layout, dims):
            if axis in to_pixels:
                key, convert = to_pixels[axis]
                request[point][key] = convert(size)
        tokens = (profiles.get("encoder_hidden_states") or {}).get(point)
        if tokens is not None and len(tokens) >= 2:
            request[point]["tokens"] = tokens[1]
    if request["min"] == request["opt"] == request["max"]:
        return ShapeRequest(dynamic=False, opt=request["opt"])
    return ShapeRequest(dynamic=True, **request)
