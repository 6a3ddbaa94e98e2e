"""The export folder's contract: the one writer and the one reader of `samg.json`, and of the
`samg build` engine records beside it.

The manifest is typed: `Export` (frozen dataclasses for the latent layout, the scheduler recipe, the
three graphs, the combine op's attributes, files with hashes, validation, versions and source).
`write_export(folder, export)` hashes the folder's files into `files`, checks the JSON with the same
validator the reader uses, and writes it atomically. `read_export(export_dir) -> Export` is what
every reader calls: it validates every field once (one SamgError line naming the field), confines
every path to the export folder, and checks the files the runtimes load against the hashes written
at export. Nothing outside this module reads or indexes the JSON. Hashing multi-GB models on every load would be slow, so a verified-stamp
(`.samg-verified.json`, keyed by file name, size, mtime_ns and the expected hash) remembers files
already checked; where the folder is read-only no stamp is written and files are hashed each load.

Standard library and numpy at import time (no onnx, torch or runtimes); the format is described in
docs/architecture.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Mapping, Union

from samg import EXPORT_FORMAT_VERSION
from samg.errors import SamgError
from samg.op import schema as guidance_op
from samg.scfg import op as semantic_op

MANIFEST = "samg.json"
FORMAT = "samg-export"
# Remembers which files already matched their hash (see module doc); never listed in `files`.
VERIFIED_STAMP = ".samg-verified.json"
VERIFIED_FORMAT = "samg-verified"
# Marks a folder samg is still writing (samg.io.atomic_dir: a temp folder, or an export being
# merged into by --force, then listing the files it replaces); never listed in `files`.
PARTIAL_MARKER = ".samg-partial"
# Folder of `samg build` engines inside an export.
ENGINES_DIR = "engines"
# The diffusers pipeline a --tiny export saves (source.kind == "tiny").
TINY_SOURCE_DIR = "source"

COMPONENTS = ("denoiser", "text_encoder", "vae")
LAYOUTS = ("BCHW", "BFCHW", "BCFHW")
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")
GUIDANCE_KINDS = ("fused", "raw", "scfg")
SCHEDULER_KINDS = ("discrete", "flow")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
SOURCE_KINDS = ("tiny", "path", "hub")
VAE_FRAMES = ("none", "per_frame", "joint")
DTYPES = ("float32", "float16", "bfloat16")
# A component the export does not hold as a graph (the standalone combine test exports).
NO_RUNTIME = "none"
RUNTIMES = ("onnx", NO_RUNTIME)

# Sanity bounds: far above any real model, low enough that nothing sized from them exhausts memory.
MAX_MANIFEST_BYTES = 16 << 20
MAX_TOKEN_LENGTH = 4096
MAX_TRAIN_TIMESTEPS = 100_000
MAX_CHANNELS = 4096
MAX_FACTOR = 64
MAX_PIXELS = 16384  # per side
MAX_FRAMES = 4096
MAX_OPSET = 100
# The ONNX opset samg export writes unless told otherwise (the exporter and the Export default).
DEFAULT_OPSET = 18
_HASH = re.compile(r"sha256:[0-9a-f]{64}")
_STAMP_FILES_LIMIT = 100_000


class _Fields:
    """Typed reads of one manifest (or engine record) with one-line errors naming the field and the fix."""

    def __init__(self, where: str, fix: str = "re-export the model with `samg export`"):
        self.where = where
        self.fix = fix

    def fail(self, field: str, want: str, value: Any) -> SamgError:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return SamgError(f"{self.where}: {field} must be {want}, got {shown}: {self.fix}")

    def section(self, obj: dict, key: str, prefix: str = "") -> dict:
        value = obj.get(key)
        if not isinstance(value, dict):
            raise self.fail(prefix + key, "an object" if key in obj else "present (an object)",
                            value if key in obj else "nothing")
        return value

    def _get(self, obj: dict, key: str, prefix: str, optional: bool):
        if key not in obj or (optional and obj[key] is None):
            if optional:
                return None, False
            raise SamgError(f"{self.where}: {prefix + key} is missing: {self.fix}")
        return obj[key], True

    def integer(self, obj: dict, key: str, prefix: str = "", *, lo: int = 1, hi: int | None = None,
                optional: bool = False) -> int | None:
        value, present = self._get(obj, key, prefix, optional)
        if not present:
            return None
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
        if not ok:
            want = "a positive integer" if lo == 1 else f"an integer of at least {lo}"
            raise self.fail(prefix + key, want + (f" (at most {hi})" if hi is not None else ""), value)
        return value

    def number(self, obj: dict, key: str, prefix: str = "", *, positive: bool = False, lo: float | None = None,
               below: float | None = None, optional: bool = False) -> float | None:
        value, present = self._get(obj, key, prefix, optional)
        if not present:
            return None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (not positive or value > 0) and (lo is None or value >= lo) and (below is None or value < below)
        if not ok:
            want = "a finite positive number" if positive else "a finite number"
            if lo is not None:
                want += f" of at least {lo:g}"
            if below is not None:
                want += f" below {below:g}"
            raise self.fail(prefix + key, want, value)
        return float(value)

    def choice(self, obj: dict, key: str, choices: tuple, prefix: str = "", *, optional: bool = False):
        value, present = self._get(obj, key, prefix, optional)
        if not present:
            return None
        if not isinstance(value, str) or value not in choices:
            raise self.fail(prefix + key, "one of " + ", ".join(choices), value)
        return value

    def boolean(self, obj: dict, key: str, prefix: str = "", *, optional: bool = False) -> bool | None:
        value, present = self._get(obj, key, prefix, optional)
        if present and not isinstance(value, bool):
            raise self.fail(prefix + key, "true or false", value)
        return value

    def string(self, obj: dict, key: str, prefix: str = "", *, optional: bool = False) -> str | None:
        value, present = self._get(obj, key, prefix, optional)
        if present and (not isinstance(value, str) or not value):
            raise self.fail(prefix + key, "a non-empty string", value)
        return value

    def relpath(self, obj: dict, key: str, prefix: str = "") -> str:
        """A file path inside the export folder: relative, no `..`, forward slashes."""
        value = self.string(obj, key, prefix)
        if not is_confined_name(value):
            raise SamgError(f"{self.where}: {prefix + key} {value!r} points outside the export folder (paths must be "
                            "relative, without '..'): re-export the model with `samg export`")
        return value

    def tensors(self, obj: dict, key: str, prefix: str = "", *, optional: bool = False) -> None:
        """{name: {"shape": [int | str, ...], "dtype": str}}."""
        value, present = self._get(obj, key, prefix, optional)
        if not present:
            return
        if not isinstance(value, dict):
            raise self.fail(prefix + key, "an object of tensor descriptions", value)
        for name, info in value.items():
            field = f"{prefix}{key}.{name}"
            if not isinstance(info, dict):
                raise self.fail(field, 'an object {"shape": [...], "dtype": ...}', info)
            shape = info.get("shape")
            if not isinstance(shape, list) or not all(
                (isinstance(d, int) and not isinstance(d, bool) and d >= 0) or (isinstance(d, str) and d) for d in shape
            ):
                raise self.fail(field + ".shape", "a list of sizes and symbolic names", shape)
            self.string(info, "dtype", field + ".")


def is_confined_name(name: str) -> bool:
    """True for a relative POSIX path without `..` (or backslashes, drive letters, empty parts)."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ":" not in path.parts[0] and all(p not in ("", ".", "..") for p in path.parts)


def validate_manifest(manifest: Any, where: str = MANIFEST, *, complete: bool = True) -> dict:
    """Check every field of a parsed manifest; returns it. `complete`: all three graphs must be ONNX files."""
    f = _Fields(where)
    if not isinstance(manifest, dict):
        raise SamgError(f"{where} holds a JSON {type(manifest).__name__}, not an object: re-export the model with `samg export`")
    if manifest.get("format") != FORMAT:
        raise SamgError(f"{where} is not a samg export manifest (format {manifest.get('format')!r}): "
                        "re-export the model with `samg export`")
    version = manifest.get("format_version")
    if version != EXPORT_FORMAT_VERSION or isinstance(version, bool):
        raise SamgError(f"{where} has format_version {version!r}, this samg reads {EXPORT_FORMAT_VERSION}: "
                        "re-export the model with this samg")
    f.string(manifest, "model")
    f.string(manifest, "family")
    source = f.section(manifest, "source")
    kind = f.choice(source, "kind", SOURCE_KINDS, "source.")
    if kind == "tiny":
        f.relpath(source, "path", "source.")
    elif kind == "path":
        f.string(source, "path", "source.")
    f.string(source, "hub_id", "source.", optional=True)
    prediction = f.choice(manifest, "prediction_type", PREDICTION_TYPES)
    guidance = f.choice(manifest, "guidance", GUIDANCE_KINDS)
    latent = _validate_latent(f, f.section(manifest, "latent"))
    _validate_combine(f, f.section(manifest, "combine"), guidance, latent["layout"])
    _validate_scheduler(f, f.section(manifest, "scheduler"), prediction)
    for component in COMPONENTS:
        _validate_component(f, component, f.section(manifest, component), complete)
    f.integer(manifest, "opset", hi=MAX_OPSET)
    f.choice(manifest, "dtype", DTYPES)
    for key in ("versions", "validation"):
        if key in manifest:
            f.section(manifest, key)
    for name in manifest.get("validation", {}):
        q = f"validation.{name}."
        entry = f.section(manifest["validation"], name, "validation.")
        f.number(entry, "max_abs_err", q, lo=0.0, optional=True)
        f.number(entry, "tolerance", q, lo=0.0, optional=True)
        shapes = entry.get("checked_shapes")
        if shapes is not None and not (isinstance(shapes, list) and all(
                isinstance(s, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s)
                for s in shapes)):
            raise f.fail(q + "checked_shapes", "a list of shapes (lists of sizes)", shapes)
    files = f.section(manifest, "files")
    for name, digest in files.items():
        if not is_confined_name(name):
            raise SamgError(f"{where}: files entry {name!r} points outside the export folder: re-export the model "
                            "with `samg export`")
        if not isinstance(digest, str) or not _HASH.fullmatch(digest):
            raise f.fail(f"files.{name}", '"sha256:" and 64 hex digits', digest)
    return manifest


def _validate_latent(f: _Fields, latent: dict) -> dict:
    p = "latent."
    layout = f.choice(latent, "layout", LAYOUTS, p)
    f.integer(latent, "channels", p, hi=MAX_CHANNELS)
    f.integer(latent, "spatial_factor", p, hi=MAX_FACTOR)
    f.integer(latent, "temporal_factor", p, hi=MAX_FACTOR)
    f.integer(latent, "height", p, hi=MAX_PIXELS)
    f.integer(latent, "width", p, hi=MAX_PIXELS)
    if layout == "BCHW":
        if latent.get("frames") is not None:
            raise f.fail(p + "frames", "null for an image (BCHW) export", latent["frames"])
    else:
        f.integer(latent, "frames", p, hi=MAX_FRAMES)
    f.boolean(latent, "dynamic_resolution", p)
    f.boolean(latent, "dynamic_frames", p, optional=True)
    for key in ("latent_height", "latent_width"):
        f.integer(latent, key, p, hi=MAX_PIXELS, optional=True)
    f.integer(latent, "latent_frames", p, hi=MAX_FRAMES, optional=True)
    f.integer(latent, "size_multiple", p, hi=MAX_PIXELS, optional=True)
    return latent


def _validate_combine(f: _Fields, combine: dict, guidance: str, layout: str) -> None:
    p = "combine."
    if combine.get("domain") != guidance_op.DOMAIN:
        raise f.fail(p + "domain", repr(guidance_op.DOMAIN), combine.get("domain"))
    want_op = semantic_op.OP_TYPE if guidance == "scfg" else guidance_op.OP_TYPE
    if combine.get("op") != want_op:
        raise f.fail(p + "op", f"{want_op!r} for a {guidance} export", combine.get("op"))
    version = f.integer(combine, "version", p)
    want_version = semantic_op.OP_VERSION if guidance == "scfg" else guidance_op.OP_VERSION
    if version != want_version:
        raise f.fail(p + "version", str(want_version), version)
    if guidance == "scfg":
        f.integer(combine, "factor_fine", p, hi=MAX_FACTOR * MAX_FACTOR)
        f.integer(combine, "factor_coarse", p, hi=MAX_FACTOR * MAX_FACTOR)
        corrected = combine.get("corrected")
        if corrected not in (0, 1) or isinstance(corrected, float):
            raise f.fail(p + "corrected", "0 or 1", corrected)
        levels = combine.get("levels")  # optional: the levels asked for (the torch backend rebuilds them)
        if levels is not None and not (isinstance(levels, list) and levels and all(
                isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_FACTOR * MAX_FACTOR for n in levels)):
            raise f.fail(p + "levels", "a non-empty list of positive integers", levels)
        return
    f.number(combine, "tau", p)
    f.number(combine, "sharpness", p)
    smooth = f.integer(combine, "smooth", p, lo=0)
    axis = f.integer(combine, "channel_axis", p)
    if smooth not in guidance_op.SMOOTH_CHOICES:
        raise f.fail(p + "smooth", " or ".join(map(str, guidance_op.SMOOTH_CHOICES)), smooth)
    want_axis = channel_axis_of(layout)
    if axis != want_axis:
        raise f.fail(p + "channel_axis", f"{want_axis} for layout {layout}", axis)


def _validate_scheduler(f: _Fields, scheduler: dict, prediction: str) -> None:
    p = "scheduler."
    kind = f.choice(scheduler, "kind", SCHEDULER_KINDS, p)
    if (kind == "flow") != (prediction == "flow"):
        raise f.fail(p + "kind", f"{'flow' if prediction == 'flow' else 'discrete'} for prediction_type {prediction}", kind)
    train = f.integer(scheduler, "num_train_timesteps", p, hi=MAX_TRAIN_TIMESTEPS, optional=True)
    if kind == "flow":
        f.number(scheduler, "shift", p, positive=True, optional=True)
        return
    # Betas are probabilities; the runtime takes cumulative products of 1 - beta.
    f.number(scheduler, "beta_start", p, lo=0.0, below=1.0, optional=True)
    f.number(scheduler, "beta_end", p, lo=0.0, below=1.0, optional=True)
    f.choice(scheduler, "beta_schedule", BETA_SCHEDULES, p, optional=True)
    f.choice(scheduler, "timestep_spacing", TIMESTEP_SPACINGS, p, optional=True)
    f.integer(scheduler, "steps_offset", p, lo=0, hi=(train or 1000) - 1, optional=True)
    for key in ("rescale_betas_zero_snr", "set_alpha_to_one", "clip_sample"):
        f.boolean(scheduler, key, p, optional=True)
    f.number(scheduler, "snr_shift_scale", p, positive=True, optional=True)
    f.choice(scheduler, "prediction_type", PREDICTION_TYPES, p, optional=True)


def _validate_component(f: _Fields, name: str, section: dict, complete: bool) -> None:
    p = name + "."
    runtime = f.choice(section, "runtime", RUNTIMES, p, optional=True) or "onnx"
    if runtime == NO_RUNTIME:
        if complete or name == "denoiser":
            raise SamgError(f"{f.where}: this export has no {name} graph ({p}runtime is {NO_RUNTIME!r}), which "
                            "this command needs: export the full model with `samg export`")
        return
    f.relpath(section, "file", p)
    if name == "denoiser":
        f.tensors(section, "inputs", p)
        f.tensors(section, "outputs", p)
    elif name == "vae":
        f.number(section, "scaling_factor", p, positive=True)  # the runtime divides latents by it
        f.number(section, "shift_factor", p, optional=True)
        f.choice(section, "frames", VAE_FRAMES, p, optional=True)
        f.tensors(section, "inputs", p, optional=True)
        f.tensors(section, "outputs", p, optional=True)
    else:
        tokenizers = section.get("tokenizers")
        if not isinstance(tokenizers, list) or not tokenizers:
            raise f.fail(p + "tokenizers", "a non-empty list", tokenizers)
        for i, entry in enumerate(tokenizers):
            q = f"{p}tokenizers[{i}]."
            if not isinstance(entry, dict):
                raise f.fail(q[:-1], "an object", entry)
            f.relpath(entry, "file", q)
            f.integer(entry, "max_length", q, hi=MAX_TOKEN_LENGTH)
            f.integer(entry, "pad_id", q, lo=0, optional=True)
            f.string(entry, "pad_token", q, optional=True)
            f.string(entry, "input", q, optional=True)
        outputs = section.get("outputs")
        if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) and o for o in outputs):
            raise f.fail(p + "outputs", "a non-empty list of names", outputs)
        f.boolean(section, "force_zeros_for_empty_prompt", p, optional=True)
        f.choice(section, "compute_dtype", DTYPES, p, optional=True)
        f.tensors(section, "output_shapes", p, optional=True)


# --- the typed export ---------------------------------------------------------------------------------
# Built from a manifest `validate_manifest` accepted (read_export), or by `samg export`; `to_json()`
# gives the format_version 1 JSON back. Keys samg does not know are kept in `extra` and written back.


def channel_axis_of(layout: str) -> int:
    """The channel axis of a latent layout: 2 for [B, F, C, H, W], else 1."""
    return 2 if layout == "BFCHW" else 1


def _extra(obj: Mapping[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in known}


def _present(**values: Any) -> dict[str, Any]:
    """The optional JSON keys that have a value (None: the key is absent)."""
    return {k: v for k, v in values.items() if v is not None}


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: shape of sizes and symbolic names (B, 2B, H, W, F, L, N), dtype."""

    shape: tuple[int | str, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}


def _tensors(obj: Mapping[str, Any] | None) -> dict[str, TensorSpec] | None:
    if obj is None:
        return None
    return {name: TensorSpec(tuple(info["shape"]), info["dtype"]) for name, info in obj.items()}


def _tensors_json(tensors: Mapping[str, TensorSpec] | None) -> dict[str, Any] | None:
    return None if tensors is None else {name: t.to_json() for name, t in tensors.items()}


@dataclass(frozen=True)
class Source:
    """Where the exported model came from: a --tiny pipeline saved in the folder, a path, or a hub id."""

    kind: str  # SOURCE_KINDS
    path: str | None = None  # "tiny": relative to the export folder
    hub_id: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS: ClassVar = ("kind", "path", "hub_id")

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "Source":
        return cls(obj["kind"], obj.get("path"), obj.get("hub_id"), _extra(obj, cls._KEYS))

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "hub_id": self.hub_id, **self.extra}

    def model_dir(self, export_dir: str | os.PathLike) -> Path | None:
        """The diffusers model folder the export was made from: the tiny pipeline saved in the export,
        the local path it was exported from, or None for a hub id (nothing on disk to point at)."""
        if self.kind == "tiny":
            return Path(export_dir) / self.path
        if self.kind == "path":
            return Path(self.path)
        return None


@dataclass(frozen=True)
class Latent:
    """Latent layout and the traced sizes (`height`, `width`, `frames` in pixels; `latent_*` in latents)."""

    layout: str  # LAYOUTS
    channels: int
    spatial_factor: int
    temporal_factor: int
    height: int
    width: int
    frames: int | None  # None for images (BCHW)
    dynamic_resolution: bool
    dynamic_frames: bool | None = None
    latent_height: int | None = None
    latent_width: int | None = None
    latent_frames: int | None = None
    size_multiple: int | None = None  # pixel sizes must be multiples (None: spatial_factor)
    extra: Mapping[str, Any] = field(default_factory=dict)

    _REQUIRED: ClassVar = ("layout", "channels", "spatial_factor", "temporal_factor", "height", "width", "frames",
                           "dynamic_resolution")
    _OPTIONAL: ClassVar = ("dynamic_frames", "latent_height", "latent_width", "latent_frames", "size_multiple")

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "Latent":
        return cls(**{k: obj.get(k) for k in cls._REQUIRED + cls._OPTIONAL},
                   extra=_extra(obj, cls._REQUIRED + cls._OPTIONAL))

    def to_json(self) -> dict[str, Any]:
        # every key written, null where unknown (an image's latent_frames), as samg export always has
        return {**{k: getattr(self, k) for k in self._REQUIRED + self._OPTIONAL}, **self.extra}

    @property
    def is_video(self) -> bool:
        return self.layout != "BCHW"

    @property
    def channel_axis(self) -> int:
        return channel_axis_of(self.layout)

    @property
    def pixel_multiple(self) -> int:
        """What pixel height and width must be multiples of (the denoiser may need more than the VAE factor)."""
        return self.size_multiple or self.spatial_factor


@dataclass(frozen=True)
class DiscreteScheduler:
    """A DDPM-family recipe (diffusers' DDPM/DDIM/Euler/DPM-Solver schedulers' config). None: the key
    is absent and samg.runtime.schedules uses diffusers' default for the sampler's scheduler.
    `snr_shift_scale` is CogVideoXDDIMScheduler's: alpha_bar shifted as SD3 before any rescale."""

    num_train_timesteps: int | None = None
    beta_start: float | None = None
    beta_end: float | None = None
    beta_schedule: str | None = None  # BETA_SCHEDULES
    timestep_spacing: str | None = None  # TIMESTEP_SPACINGS
    steps_offset: int | None = None
    rescale_betas_zero_snr: bool | None = None
    set_alpha_to_one: bool | None = None
    clip_sample: bool | None = None
    snr_shift_scale: float | None = None
    prediction_type: str | None = None
    scheduler_class: str | None = None  # "class": the diffusers class of the source
    extra: Mapping[str, Any] = field(default_factory=dict)

    kind: ClassVar = "discrete"
    _KEYS: ClassVar = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "timestep_spacing",
                       "steps_offset", "rescale_betas_zero_snr", "set_alpha_to_one", "clip_sample",
                       "snr_shift_scale", "prediction_type")

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "DiscreteScheduler":
        return cls(**{k: obj.get(k) for k in cls._KEYS}, scheduler_class=obj.get("class"),
                   extra=_extra(obj, ("kind", "class") + cls._KEYS))

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **_present(**{k: getattr(self, k) for k in self._KEYS}),
                **_present(**{"class": self.scheduler_class}), **self.extra}


@dataclass(frozen=True)
class FlowScheduler:
    """A flow-matching recipe (FlowMatchEulerDiscreteScheduler, static shift)."""

    shift: float | None = None
    num_train_timesteps: int | None = None
    scheduler_class: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    kind: ClassVar = "flow"
    _KEYS: ClassVar = ("shift", "num_train_timesteps")

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "FlowScheduler":
        return cls(**{k: obj.get(k) for k in cls._KEYS}, scheduler_class=obj.get("class"),
                   extra=_extra(obj, ("kind", "class") + cls._KEYS))

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **_present(**{k: getattr(self, k) for k in self._KEYS}),
                **_present(**{"class": self.scheduler_class}), **self.extra}


SchedulerRecipe = Union[DiscreteScheduler, FlowScheduler]


def scheduler_recipe(obj: Mapping[str, Any]) -> SchedulerRecipe:
    """The typed recipe of a manifest's `scheduler` object (no `kind`: discrete). Unchecked: read_export
    validates the manifest before it builds one."""
    return FlowScheduler.from_json(obj) if obj.get("kind") == "flow" else DiscreteScheduler.from_json(obj)


@dataclass(frozen=True)
class GuidanceCombineAttrs:
    """`samg::GuidanceCombine`'s attributes in a fused graph (or, in a raw export, the defaults the
    host-side SAMG rules take: Export.host_rule_attrs). The graph takes (w_min, w_max) per step, so it
    runs the rules that are such a pair: SAMG, CFG (w_min == w_max) and interval (1, 1 outside)."""

    tau: float = guidance_op.DEFAULT_TAU
    sharpness: float = guidance_op.DEFAULT_SHARPNESS
    smooth: int = guidance_op.DEFAULT_SMOOTH
    channel_axis: int = guidance_op.DEFAULT_CHANNEL_AXIS
    extra: Mapping[str, Any] = field(default_factory=dict)

    rules: ClassVar[tuple[str, ...]] = guidance_op.FUSED_RULES
    export_mode: ClassVar = "fused"  # samg.json's `guidance` for a graph holding this op
    _KEYS: ClassVar = ("tau", "sharpness", "smooth", "channel_axis")

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "GuidanceCombineAttrs":
        return cls(**{k: obj[k] for k in cls._KEYS}, extra=_extra(obj, ("domain", "op", "version") + cls._KEYS))

    def to_json(self) -> dict[str, Any]:
        return {"domain": guidance_op.DOMAIN, "op": guidance_op.OP_TYPE, "version": guidance_op.OP_VERSION,
                **{k: getattr(self, k) for k in self._KEYS}, **self.extra}

    def attributes(self) -> dict[str, Any]:
        """The op's attributes by name (tau, sharpness, smooth, channel_axis)."""
        return {k: getattr(self, k) for k in self._KEYS}


@dataclass(frozen=True)
class SemanticCombineAttrs:
    """`samg::SemanticCombine` (S-CFG, docs/scfg.md) in the graph: the two attention levels by
    downsampling factor and the variant. `guidance_scales[:, 0]` is w (the runtime feeds (w, w))."""

    factor_fine: int
    factor_coarse: int
    corrected: bool = False
    levels: tuple[int, ...] | None = None  # the levels asked for (one level is fed twice)
    extra: Mapping[str, Any] = field(default_factory=dict)

    rules: ClassVar[tuple[str, ...]] = ("scfg",)
    export_mode: ClassVar = "scfg"
    SCALES_NOTE: ClassVar = "guidance_scales[:, 0] is w; feed (w, w)"
    _KEYS: ClassVar = ("factor_fine", "factor_coarse", "corrected", "levels", "scales")

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "SemanticCombineAttrs":
        levels = obj.get("levels")
        return cls(obj["factor_fine"], obj["factor_coarse"], bool(obj["corrected"]),
                   tuple(levels) if isinstance(levels, list) else None,
                   _extra(obj, ("domain", "op", "version") + cls._KEYS))

    def to_json(self) -> dict[str, Any]:
        return {"domain": semantic_op.DOMAIN, "op": semantic_op.OP_TYPE, "version": semantic_op.OP_VERSION,
                "factor_fine": self.factor_fine, "factor_coarse": self.factor_coarse, "corrected": int(self.corrected),
                **_present(levels=None if self.levels is None else list(self.levels)),
                "scales": self.SCALES_NOTE, **self.extra}


Combine = Union[GuidanceCombineAttrs, SemanticCombineAttrs]
RAW_MODE = "raw"  # samg.json's `guidance` for a graph that returns both predictions


def export_mode(combine: Combine | None) -> str:
    """samg.json's `guidance` string for a graph with this combine (None: a raw graph)."""
    return RAW_MODE if combine is None else combine.export_mode


@dataclass(frozen=True)
class TokenizerEntry:
    """One tokenizer: its `tokenizers` JSON file (already padding and truncating to max_length) and
    the text encoder graph input it feeds."""

    file: str
    max_length: int
    pad_id: int | None = None
    pad_token: str | None = None
    input: str | None = None  # None: "input_ids"
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS: ClassVar = ("file", "max_length", "pad_id", "pad_token", "input")

    @property
    def input_name(self) -> str:
        return self.input or "input_ids"

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "TokenizerEntry":
        return cls(**{k: obj.get(k) for k in cls._KEYS}, extra=_extra(obj, cls._KEYS))

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "max_length": self.max_length,
                **_present(pad_id=self.pad_id, pad_token=self.pad_token, input=self.input), **self.extra}


def _component_json(runtime: str | None, file: str | None) -> dict[str, Any]:
    return _present(file=file, runtime=runtime)


@dataclass(frozen=True)
class DenoiserGraph:
    file: str | None  # None when runtime is "none"
    inputs: Mapping[str, TensorSpec] | None = None
    outputs: Mapping[str, TensorSpec] | None = None
    runtime: str | None = None  # RUNTIMES; None: "onnx"
    model_class: str | None = None  # "class": the diffusers denoiser class
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS: ClassVar = ("file", "runtime", "class", "inputs", "outputs")

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "DenoiserGraph":
        return cls(obj.get("file"), _tensors(obj.get("inputs")), _tensors(obj.get("outputs")), obj.get("runtime"),
                   obj.get("class"), _extra(obj, cls._KEYS))

    def to_json(self) -> dict[str, Any]:
        return {**_component_json(self.runtime, self.file), **_present(**{"class": self.model_class}),
                **_present(inputs=_tensors_json(self.inputs), outputs=_tensors_json(self.outputs)), **self.extra}


@dataclass(frozen=True)
class TextEncoderGraph:
    """ONE graph: the token ids of every tokenizer in, the denoiser's conditioning inputs out."""

    file: str | None
    tokenizers: tuple[TokenizerEntry, ...] = ()
    outputs: tuple[str, ...] = ()
    runtime: str | None = None
    force_zeros_for_empty_prompt: bool | None = None  # SDXL: zeros, not the encoded "", for no negative
    compute_dtype: str | None = None
    output_shapes: Mapping[str, TensorSpec] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS: ClassVar = ("file", "runtime", "compute_dtype", "tokenizers", "outputs", "output_shapes",
                       "force_zeros_for_empty_prompt")

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "TextEncoderGraph":
        return cls(obj.get("file"), tuple(TokenizerEntry.from_json(t) for t in obj.get("tokenizers", ())),
                   tuple(obj.get("outputs", ())), obj.get("runtime"), obj.get("force_zeros_for_empty_prompt"),
                   obj.get("compute_dtype"), _tensors(obj.get("output_shapes")), _extra(obj, cls._KEYS))

    def to_json(self) -> dict[str, Any]:
        graph = {}
        if self.runtime != NO_RUNTIME:
            graph = {"tokenizers": [t.to_json() for t in self.tokenizers], "outputs": list(self.outputs)}
        return {**_component_json(self.runtime, self.file), **_present(compute_dtype=self.compute_dtype), **graph,
                **_present(output_shapes=_tensors_json(self.output_shapes),
                           force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt), **self.extra}


@dataclass(frozen=True)
class VaeDecoderGraph:
    """Latents (already divided by scaling_factor, plus shift_factor) in, images in [-1, 1] out."""

    file: str | None
    scaling_factor: float = 1.0
    shift_factor: float | None = None  # None: 0
    frames: str | None = None  # VAE_FRAMES; None: "none"
    runtime: str | None = None
    note: str | None = None
    inputs: Mapping[str, TensorSpec] | None = None
    outputs: Mapping[str, TensorSpec] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS: ClassVar = ("file", "runtime", "scaling_factor", "shift_factor", "frames", "note", "inputs", "outputs")

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "VaeDecoderGraph":
        return cls(obj.get("file"), obj.get("scaling_factor", 1.0), obj.get("shift_factor"), obj.get("frames"),
                   obj.get("runtime"), obj.get("note"), _tensors(obj.get("inputs")), _tensors(obj.get("outputs")),
                   _extra(obj, cls._KEYS))

    def to_json(self) -> dict[str, Any]:
        graph = {}
        if self.runtime != NO_RUNTIME:
            graph = {"scaling_factor": self.scaling_factor,
                     **_present(shift_factor=self.shift_factor, frames=self.frames, note=self.note)}
        return {**_component_json(self.runtime, self.file), **graph,
                **_present(inputs=_tensors_json(self.inputs), outputs=_tensors_json(self.outputs)), **self.extra}

    @property
    def frame_mode(self) -> str:
        return self.frames or "none"


@dataclass(frozen=True)
class ValidationRecord:
    """How a graph compared with torch at export (`samg export` fails above the tolerance)."""

    max_abs_err: float | None = None
    tolerance: float | None = None
    checked_shapes: tuple[tuple[int, ...], ...] | None = None  # first-input shapes checked
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS: ClassVar = ("max_abs_err", "tolerance", "checked_shapes")

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "ValidationRecord":
        shapes = obj.get("checked_shapes")
        shapes = tuple(tuple(s) for s in shapes) if isinstance(shapes, list) else None
        return cls(obj.get("max_abs_err"), obj.get("tolerance"), shapes, _extra(obj, cls._KEYS))

    def to_json(self) -> dict[str, Any]:
        shapes = None if self.checked_shapes is None else [list(s) for s in self.checked_shapes]
        return {**_present(max_abs_err=self.max_abs_err, tolerance=self.tolerance, checked_shapes=shapes),
                **self.extra}


@dataclass(frozen=True)
class Export:
    """An export folder's manifest (docs/architecture.md, "Export folder"), typed.

    `combine` is the op the denoiser graph combines the two predictions with; None for a raw graph,
    which returns both (so "fused" is `combine is not None`). `host_rule_attrs` (raw exports only) are
    the GuidanceCombine attributes host-side SAMG rules default to; format_version 1 keeps them in
    `combine`. `files` maps every file of the export to its "sha256:..." (filled by write_export)."""

    model: str
    family: str
    source: Source
    prediction_type: str  # PREDICTION_TYPES
    latent: Latent
    scheduler: SchedulerRecipe
    denoiser: DenoiserGraph
    text_encoder: TextEncoderGraph
    vae: VaeDecoderGraph
    combine: Combine | None
    host_rule_attrs: GuidanceCombineAttrs | None = None
    opset: int = DEFAULT_OPSET
    dtype: str = "float32"  # DTYPES: the denoiser's and VAE's
    versions: Mapping[str, Any] | None = None
    validation: Mapping[str, ValidationRecord] | None = None
    files: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS: ClassVar = ("format", "format_version", "model", "family", "source", "prediction_type", "guidance",
                       "combine", "latent", "scheduler", "vae", "text_encoder", "denoiser", "opset", "dtype",
                       "versions", "files", "validation")

    @property
    def fused(self) -> bool:
        """The graph combines the predictions itself (feed guidance_scales, read `guided`)."""
        return self.combine is not None

    @property
    def mode(self) -> str:
        """samg.json's `guidance`: fused, raw or scfg (for messages; decide on `combine`)."""
        return export_mode(self.combine)

    @classmethod
    def from_json(cls, manifest: Mapping[str, Any]) -> "Export":
        """The typed form of a manifest validate_manifest accepted."""
        raw = manifest["guidance"] == RAW_MODE
        combine_json = manifest["combine"]
        if raw:
            combine, host_attrs = None, GuidanceCombineAttrs.from_json(combine_json)
        elif combine_json["op"] == semantic_op.OP_TYPE:
            combine, host_attrs = SemanticCombineAttrs.from_json(combine_json), None
        else:
            combine, host_attrs = GuidanceCombineAttrs.from_json(combine_json), None
        validation = manifest.get("validation")
        return cls(
            model=manifest["model"], family=manifest["family"], source=Source.from_json(manifest["source"]),
            prediction_type=manifest["prediction_type"], latent=Latent.from_json(manifest["latent"]),
            scheduler=scheduler_recipe(manifest["scheduler"]), denoiser=DenoiserGraph.from_json(manifest["denoiser"]),
            text_encoder=TextEncoderGraph.from_json(manifest["text_encoder"]),
            vae=VaeDecoderGraph.from_json(manifest["vae"]), combine=combine, host_rule_attrs=host_attrs,
            opset=manifest["opset"], dtype=manifest["dtype"], versions=manifest.get("versions"),
            validation=None if validation is None else {k: ValidationRecord.from_json(v) for k, v in validation.items()},
            files=dict(manifest["files"]), extra=_extra(manifest, cls._KEYS),
        )

    def to_json(self) -> dict[str, Any]:
        """The manifest JSON (format_version 1) this export is written as."""
        combine = self.combine if self.combine is not None else self.host_rule_attrs
        if combine is None:
            raise SamgError(f"the {self.model} export is raw but has no host_rule_attrs (format_version 1 stores them "
                            "in `combine`): build the Export with host_rule_attrs=GuidanceCombineAttrs(...)")
        validation = None if self.validation is None else {k: v.to_json() for k, v in self.validation.items()}
        return {
            "format": FORMAT, "format_version": EXPORT_FORMAT_VERSION, "model": self.model, "family": self.family,
            "source": self.source.to_json(), "prediction_type": self.prediction_type, "guidance": self.mode,
            "combine": combine.to_json(), "latent": self.latent.to_json(), "scheduler": self.scheduler.to_json(),
            "vae": self.vae.to_json(), "text_encoder": self.text_encoder.to_json(),
            "denoiser": self.denoiser.to_json(), "opset": self.opset, "dtype": self.dtype,
            **_present(versions=self.versions), "files": dict(self.files), **_present(validation=validation),
            **self.extra,
        }

    def loaded_files(self) -> list[str]:
        """The files (relative to the export folder) the runtimes open: graphs and tokenizers."""
        graphs = (self.denoiser, self.text_encoder, self.vae)
        names = [g.file for g in graphs if g.runtime != NO_RUNTIME and g.file is not None]
        return names + [t.file for t in self.text_encoder.tokenizers]


# --- reading ------------------------------------------------------------------------------------------


def read_export(export_dir: str | os.PathLike, verify: bool = True, *, complete: bool = True) -> Export:
    """The validated, typed manifest of an export folder (SamgError naming the problem otherwise).

    verify: also check every file listed in `files` against its hash (through the verified-stamp).
    complete: the text encoder and VAE must be graphs too (False for `samg build`, which builds what
    there is)."""
    from samg.io import recover_dir

    export_dir = Path(export_dir)
    recover_dir(export_dir)  # a folder swap killed halfway: put the previous export back first
    path = export_dir / MANIFEST
    if not export_dir.is_dir():
        raise SamgError(f"{export_dir} is not a folder: pass an export folder written by `samg export`")
    if not path.is_file():
        raise SamgError(f"{export_dir} is not a samg export (no {MANIFEST}): run `samg export` first")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise SamgError(f"{path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB, not a samg manifest: re-export the model")
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SamgError(f"{path} is not valid JSON ({reason}): re-export the model with `samg export`") from None
    except OSError as exc:
        raise SamgError(f"cannot read {path} ({exc.strerror}): check the folder's permissions") from None
    except RecursionError:
        raise SamgError(f"{path} is nested too deeply to be a samg manifest: re-export the model") from None
    validate_manifest(manifest, str(path), complete=complete)
    export = Export.from_json(manifest)
    check_confined(export_dir, export)
    if verify:
        verify_files(export_dir, export)
    return export


# --- what a folder claims, read leniently ------------------------------------------------------------
# `samg export` may replace only what samg wrote (samg.export.folder). A manifest that no longer
# validates still names the files samg wrote, so these readers are lenient where read_export is strict.

# Larger records are not samg's (a real one is a few KiB).
_MAX_ENGINE_RECORD_BYTES = 1 << 20


@dataclass(frozen=True)
class ManifestClaims:
    files: frozenset[str]  # the names listed in `files`
    tiny_source: bool  # source.kind == "tiny": the saved tiny pipeline (TINY_SOURCE_DIR) is samg's
    valid: bool  # the whole manifest validates (only then are engines beside it samg's)


def _lenient_json(path: Path, max_bytes: int) -> Any:
    try:
        if path.is_symlink() or path.stat().st_size > max_bytes:
            return None
        return json.loads(path.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None


def manifest_claims(folder: str | os.PathLike) -> ManifestClaims | None:
    """What the samg manifest in `folder` says samg wrote; None when there is no samg manifest."""
    manifest = _lenient_json(Path(folder) / MANIFEST, MAX_MANIFEST_BYTES)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    files = manifest.get("files")
    source = manifest.get("source")
    try:
        validate_manifest(json.loads(json.dumps(manifest)), str(Path(folder) / MANIFEST), complete=False)
        valid = True
    except (SamgError, ValueError, TypeError, RecursionError):
        valid = False
    return ManifestClaims(
        files=frozenset(n for n in (files if isinstance(files, dict) else {}) if isinstance(n, str)),
        tiny_source=isinstance(source, dict) and source.get("kind") == "tiny",
        valid=valid,
    )


def engine_record_claims(record_path: str | os.PathLike) -> tuple[Any, Any] | None:
    """(engine_bytes, engine_sha256) from a file that is a samg engine record by its format; None
    otherwise. Lenient: ownership needs only these two, not a record the runner would accept."""
    record = _lenient_json(Path(record_path), _MAX_ENGINE_RECORD_BYTES)
    if not isinstance(record, dict) or record.get("format") != ENGINE_FORMAT:
        return None
    return record.get("engine_bytes"), record.get("engine_sha256")


def check_confined(export_dir: Path, export: Export) -> None:
    """Every path the manifest names resolves inside the export folder (symbolic links included)."""
    root = export_dir.resolve()
    names = export.loaded_files() + list(export.files)
    if export.source.kind == "tiny":
        names.append(export.source.path)
    for name in names:
        target = (export_dir / name).resolve()
        if target != root and root not in target.parents:
            raise SamgError(f"{export_dir / name} points outside the export folder (to {target}): re-export the "
                            "model with `samg export`, or copy the file into the folder")


def _read_stamp(export_dir: Path) -> dict:
    try:
        stamp = json.loads((export_dir / VERIFIED_STAMP).read_text())
        files = stamp["files"] if stamp.get("format") == VERIFIED_FORMAT else {}
        return files if isinstance(files, dict) and len(files) < _STAMP_FILES_LIMIT else {}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return {}  # no stamp, or not one samg can use: verify from scratch


def _stamp_entry(stat: os.stat_result, digest: str) -> dict:
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}


def write_stamp(export_dir: Path, entries: dict) -> bool:
    """Write the verified-stamp atomically; False where the folder cannot be written (then every
    load verifies again)."""
    from samg.io import atomic_write_json

    try:
        atomic_write_json(export_dir / VERIFIED_STAMP, {"format": VERIFIED_FORMAT, "files": entries})
        return True
    except OSError:
        return False


def verify_files(export_dir: Path, export: Export) -> None:
    """Each file in `files` matches its hash; each file the runtimes load is listed there."""
    from samg.io import sha256_file

    files = export.files
    unlisted = [name for name in export.loaded_files() if name not in files]
    if unlisted:
        raise SamgError(f"{export_dir / MANIFEST} lists no hash for {unlisted[0]}, so it cannot be verified: "
                        "re-export the model with `samg export`")
    stamp = _read_stamp(export_dir)
    fresh = {}
    for name, digest in sorted(files.items()):
        path = export_dir / name
        try:
            stat = path.stat()
        except OSError:
            raise SamgError(f"{path} is missing from the export (listed in {MANIFEST}): re-export the model with "
                            "`samg export`") from None
        entry = _stamp_entry(stat, digest)
        if stamp.get(name) != entry:
            try:
                actual = sha256_file(path)
            except OSError as exc:
                raise SamgError(f"cannot read {path} ({exc.strerror}): check the file's permissions") from None
            if actual != digest:
                raise SamgError(f"{path} does not match the hash in {MANIFEST} (changed or corrupted since export): "
                                "re-export the model with `samg export`")
        fresh[name] = entry
    if fresh != stamp:
        write_stamp(export_dir, fresh)


# --- writing ------------------------------------------------------------------------------------------


def _private(name: str) -> bool:
    return name in (MANIFEST, VERIFIED_STAMP, PARTIAL_MARKER)


def write_export(folder: str | os.PathLike, export: Export, *, complete: bool = True) -> Export:
    """The one writer of samg.json. Hashes the folder's files into `files` (all but the tiny source/,
    engines/ and samg's own bookkeeping), validates the JSON as `read_export` will, writes the
    verified-stamp and then `samg.json` (atomically, last). Returns the export as written."""
    from samg.io import atomic_write_json, sha256_file

    folder = Path(folder)
    files, stamp = {}, {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if _private(name) or name.split("/")[0] in (TINY_SOURCE_DIR, ENGINES_DIR):
            continue  # the torch backend's source and `samg build` output are not the export's graphs
        files[name] = sha256_file(path)
        stamp[name] = _stamp_entry(path.stat(), files[name])
    export = replace(export, files=files)
    manifest = export.to_json()
    validate_manifest(manifest, f"manifest for {folder}", complete=complete)
    check_confined(folder, export)
    write_stamp(folder, stamp)
    atomic_write_json(folder / MANIFEST, manifest)
    return export


# --- engine records -----------------------------------------------------------------------------------
# `samg build` writes DIR/engines/<component>.engine and, last, its record <component>.engine.json
# (docs/architecture.md, "Engines folder"). An engine is loaded only when its record reads back here
# and the engine's size and hash match it.

ENGINE_FORMAT = "samg-engine"
ENGINE_FORMAT_VERSION = 1
ENGINE_COMPONENTS = ("text_encoder", "denoiser", "vae_decoder")  # engines/<component>.engine
ENGINE_COMBINE_PATHS = ("function", "plugin", "none")  # how the denoiser engine runs GuidanceCombine
_REBUILD = "rebuild it with `samg build`"
# What an engine is built from: the fields its cache key hashes.
ENGINE_BUILD_INPUTS = ("component", "onnx_sha256", "trt_flavour", "trt_version", "compute_capability", "precision",
                       "combine", "profiles", "build_flags")


def engine_key_fields(*, component: str, onnx_sha256, trt_flavour: str, trt_version: str, compute_capability: str,
                      precision: str, combine: str, profiles: Mapping[str, Mapping[str, Any]],
                      build_flags=()) -> dict[str, Any]:
    """The build inputs as the record writes them (and the cache key hashes them). `build_flags`:
    TensorRT builder flags set beyond the defaults (e.g. REQUIRE_USER_ALLOCATION); written only when
    there are some, so records from before the field keep their key."""
    return {"format_version": ENGINE_FORMAT_VERSION, "component": component, "onnx_sha256": list(onnx_sha256),
            "trt": {"flavour": trt_flavour, "version": trt_version}, "compute_capability": compute_capability,
            "precision": precision, "combine": combine,
            "profiles": {name: {k: list(v) for k, v in p.items()} for name, p in profiles.items()},
            **({"build_flags": sorted(build_flags)} if build_flags else {})}


def engine_cache_key(**build_inputs: Any) -> str:
    """The cache key of an engine built from `build_inputs` (ENGINE_BUILD_INPUTS): equal keys, same engine."""
    fields = engine_key_fields(**build_inputs)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class EngineRecord:
    """What an engine was built from and for. The cache key hashes `key_fields()`."""

    key: str
    component: str
    onnx_sha256: tuple[str, ...]  # the ONNX file and its external data files
    trt_flavour: str  # "tensorrt" | "tensorrt-rtx"
    trt_version: str
    compute_capability: str  # "sm_XY"; "any" (TensorRT-RTX) or "unknown": not checked on load
    precision: str
    combine: str  # ENGINE_COMBINE_PATHS
    profiles: Mapping[str, Mapping[str, tuple[int, ...]]]  # input -> {"min", "opt", "max"}
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    plugins: tuple[str, ...]  # plugin ids to register before deserializing
    engine_bytes: int
    engine_sha256: str
    onnx: str | None = None  # the ONNX file's name
    build_seconds: float | None = None
    samg_version: str | None = None
    build_flags: tuple[str, ...] = ()  # TensorRT builder flags beyond the defaults (part of the key)
    extra: Mapping[str, Any] = field(default_factory=dict)

    _KEYS: ClassVar = ("format", "format_version", "key", "component", "onnx_sha256", "trt", "compute_capability",
                       "precision", "combine", "profiles", "onnx", "inputs", "outputs", "plugins", "engine_bytes",
                       "engine_sha256", "build_seconds", "samg_version", "build_flags")

    def key_fields(self) -> dict[str, Any]:
        """The build inputs the cache key is a hash of (engine_cache_key)."""
        return engine_key_fields(**{name: getattr(self, name) for name in ENGINE_BUILD_INPUTS})

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "EngineRecord":
        """The typed form of a record validate_engine_record accepted."""
        return cls(
            key=obj["key"], component=obj["component"], onnx_sha256=tuple(obj["onnx_sha256"]),
            trt_flavour=obj["trt"]["flavour"], trt_version=obj["trt"]["version"],
            compute_capability=obj["compute_capability"], precision=obj["precision"], combine=obj["combine"],
            profiles={name: {k: tuple(v) for k, v in p.items()} for name, p in obj["profiles"].items()},
            inputs=tuple(obj["inputs"]), outputs=tuple(obj["outputs"]), plugins=tuple(obj["plugins"]),
            engine_bytes=obj["engine_bytes"], engine_sha256=obj["engine_sha256"], onnx=obj.get("onnx"),
            build_seconds=obj.get("build_seconds"), samg_version=obj.get("samg_version"),
            build_flags=tuple(sorted(obj.get("build_flags", ()))), extra=_extra(obj, cls._KEYS),
        )

    def to_json(self) -> dict[str, Any]:
        return {"format": ENGINE_FORMAT, "key": self.key, **self.key_fields(), **_present(onnx=self.onnx),
                "inputs": list(self.inputs), "outputs": list(self.outputs), "plugins": list(self.plugins),
                "engine_bytes": self.engine_bytes, "engine_sha256": self.engine_sha256,
                **_present(build_seconds=self.build_seconds, samg_version=self.samg_version), **self.extra}


def engine_record_path(engine_path: str | os.PathLike) -> Path:
    """`<component>.engine.json` beside `<component>.engine`."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def validate_engine_record(record: Any, where: str) -> dict:
    """Check every field of a parsed engine record; returns it (SamgError naming the field otherwise)."""
    f = _Fields(where, _REBUILD)
    if not isinstance(record, dict) or record.get("format") != ENGINE_FORMAT:
        raise SamgError(f"{where} is not a samg engine record: {_REBUILD}")
    version = record.get("format_version")
    if version != ENGINE_FORMAT_VERSION or isinstance(version, bool):
        raise SamgError(f"{where} is not a samg engine record of version {ENGINE_FORMAT_VERSION} (it has "
                        f"{version!r}): {_REBUILD}")
    for key in ("key", "component", "compute_capability", "precision"):
        f.string(record, key)
    f.choice(record, "combine", ENGINE_COMBINE_PATHS)
    trt = f.section(record, "trt")
    f.string(trt, "flavour", "trt.")
    f.string(trt, "version", "trt.")
    for key in ("onnx_sha256", "inputs", "outputs", "plugins", "build_flags"):
        if key == "build_flags" and key not in record:
            continue  # optional: records from before the field
        names = record.get(key)
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise f.fail(key, "a list of names", names)
    hashes = [(f"onnx_sha256[{i}]", digest) for i, digest in enumerate(record["onnx_sha256"])]
    for name, digest in hashes + [("engine_sha256", record.get("engine_sha256"))]:
        if not isinstance(digest, str) or not _HASH.fullmatch(digest):
            raise f.fail(name, '"sha256:" and 64 hex digits', digest)
    f.integer(record, "engine_bytes", lo=0)
    profiles = f.section(record, "profiles")
    for name, profile in profiles.items():
        ok = isinstance(profile, dict) and set(profile) == {"min", "opt", "max"} and all(
            isinstance(dims, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims)
            for dims in profile.values())
        if not ok:
            raise f.fail(f"profiles.{name}", 'an object {"min", "opt", "max"} of shapes', profile)
    f.string(record, "onnx", optional=True)
    f.number(record, "build_seconds", lo=0.0, optional=True)
    f.string(record, "samg_version", optional=True)
    return record


def read_engine_record(engine_path: str | os.PathLike) -> EngineRecord:
    """The validated record beside an engine (SamgError naming the problem and the fix otherwise)."""
    engine_path = Path(engine_path)
    record_path = engine_record_path(engine_path)
    if not engine_path.is_file():
        raise SamgError(f"{engine_path} does not exist: build it with `samg build EXPORT_DIR`")
    if not record_path.is_file():
        raise SamgError(f"{engine_path} has no build record {record_path.name} beside it: {_REBUILD}")
    if record_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise SamgError(f"{record_path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB, not a samg engine record: {_REBUILD}")
    try:
        record = json.loads(record_path.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SamgError(f"{record_path} is not valid JSON ({reason}): {_REBUILD}") from None
    except OSError as exc:
        raise SamgError(f"cannot read {record_path} ({exc.strerror}): check the folder's permissions") from None
    return EngineRecord.from_json(validate_engine_record(record, str(record_path)))


def write_engine_record(engine_path: str | os.PathLike, record: EngineRecord) -> Path:
    """Write the record beside its engine, atomically (write the engine first: a record is what makes
    an engine valid). Returns the record's path."""
    from samg.io import atomic_write_json

    path = engine_record_path(engine_path)
    manifest = record.to_json()
    validate_engine_record(manifest, f"engine record for {engine_path}")
    atomic_write_json(path, manifest)
    return path


def verify_engine(engine_path: str | os.PathLike, *, trt_flavour: str | None = None, trt_version: str | None = None,
                  gpu_capability: str | None = None, record: EngineRecord | None = None) -> EngineRecord:
    """The engine's record, after checking the engine against it: size and hash always; the TensorRT
    flavour and version when given (the installed ones); the compute capability when the record names
    one and `gpu_capability` (this GPU's "sm_XY") is given. SamgError naming the fix otherwise.
    `record`: the engine's record as read_engine_record already returned it (not read again)."""
    from samg.io import sha256_file

    engine_path = Path(engine_path)
    record = read_engine_record(engine_path) if record is None else record
    size = engine_path.stat().st_size
    if size != record.engine_bytes:
        raise SamgError(f"{engine_path} is {size} bytes but was built as {record.engine_bytes}: the file is "
                        f"truncated or replaced; {_REBUILD}")
    if sha256_file(engine_path) != record.engine_sha256:
        raise SamgError(f"{engine_path} does not match its build record (hash differs): the file is corrupt; {_REBUILD}")
    if trt_flavour is not None and (record.trt_flavour, record.trt_version) != (trt_flavour, trt_version):
        raise SamgError(f"{engine_path} was built with {record.trt_flavour} {record.trt_version} but this is "
                        f"{trt_flavour} {trt_version}: rebuild it with `samg build --trt {trt_flavour}`")
    wanted = record.compute_capability
    if wanted not in ("any", "unknown") and gpu_capability not in (None, wanted):
        raise SamgError(f"{engine_path} was built for {wanted} but this GPU is {gpu_capability}: rebuild it on "
                        "this machine")
    return record
