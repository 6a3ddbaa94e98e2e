"""`samg export`: load a diffusers pipeline, trace its denoiser / text encoders / VAE decoder to ONNX,
check ONNX Runtime against torch, and write the export folder described in docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samg.contract import DEFAULT_OPSET, GUIDANCE_KINDS, MAX_FRAMES, MAX_PIXELS
from samg.errors import SamgError, check, require
from samg.export import from_pretrained
from samg.op.schema import DEFAULT_SHARPNESS, DEFAULT_TAU
from samg.models.specs import ModelSpec, get_spec

DENOISER_FILE = "denoiser.onnx"
TEXT_ENCODER_FILE = "text_encoder.onnx"
VAE_FILE = "vae_decoder.onnx"
# Protobuf's hard limit; larger models keep their weights in NAME.onnx.data.
_PROTO_LIMIT = 2**31 - 2**20
_EXTERNAL_DATA_SUFFIX = ".data"
# export dtype (the `--dtype` choices) -> tolerance of the ONNX Runtime vs torch check
TOLERANCE = {"float32": 1e-3, "float16": 5e-2}
SUPPORTED_OPSETS = range(17, 22)
TRACE_BATCH = 2


@dataclass
class ExportOptions:
    model: str
    out: str
    model_path: str | None = None
    tiny: bool = False
    guidance: str = "fused"
    opset: int = DEFAULT_OPSET
    dtype: str = "float32"
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    tau: float = DEFAULT_TAU
    sharpness: float = DEFAULT_SHARPNESS
    # samg-v1's default export smooths the scale map: at matched effective scale it came closest to
    # plain CFG's fidelity with less overshoot (benchmarks/quality/RESULTS.md). The op attribute's
    # own default stays 0 (the op contract); the export sets it explicitly.
    smooth: int = 3
    # S-CFG (--guidance scfg): UNet attention levels by downsampling factor (default: the two
    # coarsest with self- and cross-attention), and the corrected variant instead of the paper's code.
    scfg_levels: tuple[int, ...] | None = None
    scfg_corrected: bool = False
    validate: bool = True
    quiet: bool = False
    seed: int = 0
    # Export into a folder that holds files samg did not write: they are kept (see _check_out).
    force: bool = False


@dataclass
class Sizes:
    """Pixel and latent sizes the graphs are traced at."""

    height: int
    width: int
    frames: int | None
    latent_height: int
    latent_width: int
    latent_frames: int | None
    multiple: int  # pixel height/width must be multiples of this


@dataclass
class Component:
    """One exported graph: its file, the torch module it came from, and its I/O description."""

    name: str
    file: str
    module: Any
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    shapes: dict[str, list]  # symbolic shapes for the manifest
    dtypes: dict[str, str]
    make_inputs: Any  # (batch, scale) -> tuple of torch inputs; scale 0 = traced size, 1 = second size
    check_scales: tuple[int, ...] = (0,)
    validation: dict = field(default_factory=dict)


# --- progress ---------------------------------------------------------------------------------------


class _Progress:
    def __init__(self, total: int, quiet: bool):
        from tqdm import tqdm

        self._bar = tqdm(total=total, disable=quiet, file=sys.stderr, unit="step", leave=False)
        self.quiet = quiet

    def stage(self, text: str) -> None:
        self._bar.set_description(f"samg export: {text}")

    def done(self) -> None:
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()

    def log(self, text: str) -> None:
        if not self.quiet:
            self._bar.write(f"samg export: {text}", file=sys.stderr)


@contextlib.contextmanager
def _quiet_libraries():
    """Keep library chatter (deprecations, tracer warnings, loading bars) off the user's screen."""
    diffusers = require("diffusers")
    transformers = require("transformers")
    previous = (diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity())
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            diffusers.utils.logging.set_verbosity(previous[0])
            transformers.utils.logging.set_verbosity(previous[1])
            diffusers.utils.logging.enable_progress_bar()
            transformers.utils.logging.enable_progress_bar()


@contextlib.contextmanager
def _threads_for(opts: ExportOptions, torch):
    """Tiny models run single-threaded: they gain nothing from threads and lose a lot when the
    CPU is shared (several times slower under load from thread contention)."""
    previous = torch.get_num_threads()
    if opts.tiny:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --- loading ----------------------------------------------------------------------------------------


def _check_options(opts: ExportOptions, spec: ModelSpec) -> None:
    from samg.op.schema import validate_attributes

    check(opts.guidance in GUIDANCE_KINDS, f"--guidance must be {', '.join(GUIDANCE_KINDS[:-1])} or {GUIDANCE_KINDS[-1]}, "
          f"got {opts.guidance!r}")
    check(opts.dtype in TOLERANCE, f"--dtype must be {' or '.join(TOLERANCE)}, got {opts.dtype!r}")
    check(opts.opset in SUPPORTED_OPSETS, f"--opset must be between {SUPPORTED_OPSETS[0]} and {SUPPORTED_OPSETS[-1]} "
          f"(default {DEFAULT_OPSET}), got {opts.opset}")
    check(not (opts.tiny and opts.model_path), "--tiny and --model-path exclude each other: pass one of them")
    check(opts.guidance == "scfg" or (opts.scfg_levels is None and not opts.scfg_corrected),
          "--scfg-levels and --scfg-corrected apply to --guidance scfg only: add it or drop them")
    check(opts.scfg_levels is None or 1 <= len(opts.scfg_levels) <= 2,
          f"--scfg-levels takes one or two downsampling factors (e.g. 4,8), got {opts.scfg_levels}")
    validate_attributes(tau=opts.tau, sharpness=opts.sharpness, smooth=opts.smooth, channel_axis=spec.channel_axis)
    for flag, top in (("height", MAX_PIXELS), ("width", MAX_PIXELS), ("frames", MAX_FRAMES)):
        value = getattr(opts, flag)
        check(value is None or value > 0, f"--{flag} must be a positive integer, got {value}")
        check(value is None or value <= top, f"--{flag} {value} is above the limit of {top}: pass a smaller --{flag}")
    check(
        opts.frames is None or spec.is_video,
        f"--frames is for video models; {spec.name} makes images: drop --frames",
    )
    _check_latent_budget(spec, opts.height or spec.default_height, opts.width or spec.default_width,
                         opts.frames or spec.default_frames, spec.spatial_factor)
    if not opts.tiny and (opts.model_path or spec.bundled):
        _check_source_folder(spec, Path(opts.model_path or spec.default_source))


def _check_latent_budget(spec: ModelSpec, height: int, width: int, frames: int | None, factor: int) -> None:
    """One traced sample's latent must fit the runtime's per-call budget (else nothing could sample it)."""
    from samg.runtime.pipeline import MAX_LATENT_ELEMENTS

    rows, cols = -(-height // factor), -(-width // factor)
    elements = spec.latent_channels * rows * cols * (spec.latent_frames(frames) or 1)
    flags = "--height/--width" + ("/--frames" if spec.is_video else "")
    check(elements <= MAX_LATENT_ELEMENTS,
          f"{height}x{width}{f'x{frames} frames' if spec.is_video else ''} makes a latent of {elements} values, above "
          f"the limit of {MAX_LATENT_ELEMENTS}: lower {flags}")


def _export_names(spec: ModelSpec, opts: ExportOptions) -> set[str]:
    """Top-level names an export of `spec` may write in its folder."""
    from samg.contract import MANIFEST, PARTIAL_MARKER, TINY_SOURCE_DIR, VERIFIED_STAMP

    names = {MANIFEST, VERIFIED_STAMP, PARTIAL_MARKER, *(te.tokenizer for te in spec.text_encoders)}
    for graph in (DENOISER_FILE, TEXT_ENCODER_FILE, VAE_FILE):
        names |= {graph, graph + _EXTERNAL_DATA_SUFFIX}
    if opts.tiny:
        names.add(TINY_SOURCE_DIR)
    return names


def _check_out(opts: ExportOptions, spec: ModelSpec) -> bool:
    """Check --out before any work. Returns False to replace the folder whole (it is new, empty or
    holds only samg's files), or True with --force where it holds other files (the export is then
    merged into it, replacing only samg's files; every other file stays). samg.io.atomic_dir checks
    ownership again right before the folder is changed."""
    from samg.export.folder import samg_files
    from samg.io import check_output_location, present_files, recover_dir

    text = opts.out
    check(isinstance(text, str) and text.strip() != "", "--out is empty: pass a folder path for the export, e.g. --out export")
    out = Path(text)
    check(out.name not in ("", ".", ".."),
          f"--out {text} names no folder of its own: pass a new folder path, e.g. --out {out / 'export'}")
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    check(resolved != cwd and resolved not in cwd.parents,
          f"--out {text} is the current folder or one above it: pass a new folder path, e.g. --out export")
    check(not out.is_symlink(), f"--out {text} is a symbolic link: pass the folder it points to, or a new folder path")
    check(not out.exists() or out.is_dir(), f"--out {text} is a file: pass a folder path")
    check_output_location(resolved.parent, f"--out {text}")  # the swap writes next to the folder
    if not out.is_dir():
        return False
    recover_dir(out)
    foreign = sorted(present_files(out) - samg_files(out))
    if not foreign:
        return False
    if not opts.force:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise SamgError(
            f"--out {text} holds {len(foreign)} file(s) samg did not write ({shown}): pick an empty or new folder, "
            "or pass --force to export next to them (they are kept)"
        )
    reserved = _export_names(spec, opts)
    clash = [name for name in foreign if name.split("/")[0] in reserved]
    check(not clash, f"--out {text}: {clash[0] if clash else ''} was not written by samg and the export writes that "
          "name, so even --force will not replace it: move it away or pick another folder")
    return True


def _check_source_folder(spec: ModelSpec, folder: Path) -> None:
    """A local model folder must be a diffusers pipeline folder (checked before any heavy import)."""
    if spec.bundled and folder == Path(spec.default_source):
        check(
            folder.is_dir(),
            f"the bundled {spec.bundled} model is missing at {folder}: train it "
            f"(python scripts/train_{spec.name}.py) or pass --model-path DIR or --tiny",
        )
    check(folder.is_dir(), f"model folder {folder} does not exist: pass --model-path DIR of a diffusers model")
    index = folder / "model_index.json"
    check(
        index.is_file(),
        f"{folder} is not a diffusers pipeline folder (no model_index.json): "
        "pass the folder written by save_pretrained",
    )
    try:
        pipeline_class = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        raise SamgError(f"{index} is not a readable JSON object: pass a folder written by save_pretrained") from None
    if pipeline_class != spec.pipeline_class:
        from samg.models.specs import SPECS

        fits = [name for name, other in SPECS.items() if other.pipeline_class == pipeline_class]
        hint = f"pass --model {' or --model '.join(fits)}" if fits else f"pass a {spec.pipeline_class} folder"
        raise SamgError(
            f"--model {spec.name} needs a {spec.pipeline_class} folder, but {folder} holds a {pipeline_class} "
            f"(model_index.json _class_name): {hint}"
        )


def load_source_pipeline(spec: ModelSpec, source: str, kind: str, dtype):
    """The diffusers pipeline of `spec` from `source` (kind "path" or "hub"), denoiser and VAE in `dtype`."""
    diffusers = require("diffusers", "to export models")
    torch = require("torch", "to export models")
    pipeline_class = getattr(diffusers, spec.pipeline_class)
    if kind != "hub":
        _check_source_folder(spec, Path(source))
    extra = {}
    params = inspect.signature(pipeline_class.__init__).parameters
    for optional in ("safety_checker", "feature_extractor", "image_encoder"):
        if optional in params:
            extra[optional] = None  # not part of generation; skip loading them
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            pipe = from_pretrained(pipeline_class, source, torch_dtype=torch.float32, **extra)
        # --dtype applies to the denoiser and VAE; text encoders stay float32 (they run once per
        # prompt, and CLIP's float16 ONNX graph mixes types in LayerNormalization).
        getattr(pipe, spec.denoiser_component).to(dtype)
        pipe.vae.to(dtype)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad model source for the user
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        if kind == "hub":
            reason = reason.split(" (")[0]  # the loader's first clause; its details name cache internals
            raise SamgError(
                f"cannot load {spec.hub_id} from the Hugging Face hub ({reason}): pass --model-path DIR "
                "(a local diffusers folder) or --tiny (a tiny random model)"
            ) from None
        raise SamgError(
            f"cannot load a {spec.pipeline_class} from {source} ({reason}): pass a complete folder "
            "written by save_pretrained"
        ) from None
    for te in spec.text_encoders:
        check(
            getattr(pipe, te.encoder, None) is not None and getattr(pipe, te.tokenizer, None) is not None,
            f"{source} has no {te.encoder}/{te.tokenizer}: {spec.name} needs all its text encoders",
        )
    return pipe


def _config_size(spec: ModelSpec, denoiser_config, vae_factor: int) -> tuple[int, int, int | None]:
    """The model's native pixel size (from its config, so bundled/tiny models get their own)."""
    if "sample_height" in denoiser_config:  # CogVideoX
        height = denoiser_config["sample_height"] * vae_factor
        width = denoiser_config["sample_width"] * vae_factor
        return height, width, denoiser_config.get("sample_frames", spec.default_frames)
    sample = denoiser_config.get("sample_size")
    if sample is None:
        return spec.default_height, spec.default_width, spec.default_frames
    h, w = (sample, sample) if isinstance(sample, int) else tuple(sample)
    return h * vae_factor, w * vae_factor, spec.default_frames


def _denoiser_multiple(denoiser_config) -> int:
    """How many latent pixels one step of the denoiser's own grid spans."""
    if "patch_size" in denoiser_config:
        return int(denoiser_config["patch_size"])
    return 2 ** (len(denoiser_config["block_out_channels"]) - 1)


def _resolve_sizes(spec: ModelSpec, pipe, opts: ExportOptions) -> Sizes:
    denoiser = getattr(pipe, spec.denoiser_component)
    vae_factor = _vae_factor(pipe)
    native_h, native_w, native_f = _config_size(spec, denoiser.config, vae_factor)
    height = opts.height or native_h
    width = opts.width or native_w
    frames = opts.frames or native_f
    multiple = vae_factor * _denoiser_multiple(denoiser.config)
    for flag, value in (("height", height), ("width", width)):
        check(
            value % multiple == 0,
            f"--{flag} {value} is not a multiple of {multiple} ({spec.name} needs multiples of {multiple} pixels)",
        )
    latent_frames = None
    if spec.is_video:
        check(
            (frames - 1) % spec.temporal_factor == 0,
            f"--frames {frames} must be 1 + a multiple of {spec.temporal_factor} for {spec.name}",
        )
        latent_frames = spec.latent_frames(frames)
    _check_latent_budget(spec, height, width, frames if spec.is_video else None, vae_factor)
    if "pos_embed_max_size" in denoiser.config and denoiser.config["pos_embed_max_size"]:
        largest = denoiser.config["pos_embed_max_size"] * denoiser.config["patch_size"] * vae_factor
        check(
            max(height, width) <= largest,
            f"--height/--width at most {largest} for this {spec.name} model (position embedding size)",
        )
    return Sizes(height, width, frames, height // vae_factor, width // vae_factor, latent_frames, multiple)


def _vae_factor(pipe) -> int:
    factor = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", None)
    return int(factor)


# --- components ------------------------------------------------------------------------------------


def _latent_shape(spec: ModelSpec, channels: int, batch, frames, height, width) -> list:
    dims = {"B": batch, "C": channels, "F": frames, "H": height, "W": width}
    return [dims[axis] for axis in spec.layout]


def _second_size(sizes: Sizes, spec: ModelSpec) -> tuple[int, int]:
    """A different latent size (for checking dynamic resolution): one grid step larger, non-square."""
    step = sizes.multiple // (sizes.height // sizes.latent_height)
    return sizes.latent_height + 2 * step, sizes.latent_width + step


def _denoiser_component(spec, pipe, sizes: Sizes, opts: ExportOptions, torch, dtype) -> Component:
    from samg.export.wrappers import Denoiser

    model = getattr(pipe, spec.denoiser_component)
    channels = model.config["in_channels"]
    extras: dict[str, Any] = {"spatial_factor": _vae_factor(pipe)}
    if getattr(model.config, "use_rotary_positional_embeddings", False):
        # CogVideoX-5b style RoPE: constant for the (static) traced size, computed like the pipeline.
        extras["image_rotary_emb"] = pipe._prepare_rotary_positional_embeddings(
            sizes.height, sizes.width, sizes.latent_frames, torch.device("cpu")
        )
    fused = opts.guidance in ("fused", "scfg")  # scfg: same inputs/outputs, S-CFG combine in the graph
    combine = dict(tau=opts.tau, sharpness=opts.sharpness, smooth=opts.smooth, channel_axis=spec.channel_axis)
    module = Denoiser(model, spec, fused=fused, combine=combine, extras=extras).eval()
    if opts.guidance == "scfg":
        from samg.scfg.export import scfg_denoiser

        module = scfg_denoiser(module, factors=opts.scfg_levels, corrected=opts.scfg_corrected)
    dynamic_res = spec.dynamic_resolution
    cond_shapes = _conditioning_shapes(spec, pipe, torch, dtype)

    def make_inputs(batch: int, scale: int):
        gen = torch.Generator().manual_seed(1234 + 10 * scale + batch)
        lh, lw = (sizes.latent_height, sizes.latent_width) if scale == 0 else _second_size(sizes, spec)
        frames = sizes.latent_frames + 2 if scale and spec.dynamic_frames else sizes.latent_frames
        shape = _latent_shape(spec, channels, batch, frames, lh, lw)
        latents = torch.randn(shape, generator=gen).to(dtype)
        timestep = torch.rand(batch, generator=gen) * 999.0
        cond = [torch.randn([2 * batch, *s], generator=gen).to(dtype) for s in cond_shapes.values()]
        inputs = [latents, timestep, *cond]
        if fused:
            w_min = 1.0 + 4.0 * torch.rand(batch, generator=gen)
            w_max = w_min + 4.0 * torch.rand(batch, generator=gen)
            inputs.append(torch.stack([w_min, w_max], dim=1))
        return tuple(inputs)

    latent_axes = {0: "B"}
    symbolic = _latent_shape(spec, channels, "B", sizes.latent_frames, sizes.latent_height, sizes.latent_width)
    if dynamic_res:
        latent_axes.update({spec.layout.index("H"): "H", spec.layout.index("W"): "W"})
        symbolic = _latent_shape(spec, channels, "B", sizes.latent_frames, "H", "W")
    if spec.dynamic_frames:
        latent_axes[spec.layout.index("F")] = "F"
        symbolic[spec.layout.index("F")] = "F"
    names = ["latents", "timestep", *cond_shapes]
    outputs = ["guided"] if fused else ["pred_uncond", "pred_cond"]
    axes = {"latents": latent_axes, "timestep": {0: "B"}, **{n: {0: "2B"} for n in cond_shapes}}
    shapes = {"latents": symbolic, "timestep": ["B"], **{n: ["2B", *s] for n, s in cond_shapes.items()}}
    if fused:
        names.append("guidance_scales")
        axes["guidance_scales"] = {0: "B"}
        shapes["guidance_scales"] = ["B", 2]
    for out in outputs:
        axes[out] = dict(latent_axes)
        shapes[out] = list(symbolic)
    dtypes = {n: opts.dtype for n in [*names, *outputs]}
    dtypes["timestep"] = "float32"
    if fused:
        dtypes["guidance_scales"] = "float32"
    return Component(
        "denoiser", DENOISER_FILE, module, names, outputs, axes, shapes, dtypes, make_inputs,
        check_scales=(0, 1) if dynamic_res or spec.dynamic_frames else (0,),
    )


def _conditioning_shapes(spec: ModelSpec, pipe, torch, dtype) -> dict[str, list[int]]:
    """Per-prompt shapes of the text encoder outputs, found by running the text encoder once."""
    text = _text_encoder_module(spec, pipe)
    ids = [torch.zeros(1, te.max_length, dtype=torch.int64) for te in _tokenizer_entries(spec, pipe)]
    with torch.no_grad():
        outputs = text(*ids)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return {name: list(out.shape[1:]) for name, out in zip(spec.conditioning, outputs)}


@dataclass
class _TokenizerEntry:
    spec_entry: Any
    tokenizer: Any
    max_length: int
    file: str


def _tokenizer_entries(spec: ModelSpec, pipe) -> list[_TokenizerEntry]:
    entries = []
    for te in spec.text_encoders:
        tokenizer = getattr(pipe, te.tokenizer)
        limit = getattr(tokenizer, "model_max_length", None)
        # CLIP pipelines use tokenizer.model_max_length; T5 ones a fixed max_sequence_length.
        max_length = te.max_length if not limit or limit > 100_000 else min(te.max_length, int(limit))
        positions = getattr(getattr(pipe, te.encoder).config, "max_position_embeddings", None)
        if positions:  # a small bundled text encoder may know fewer positions than the family's default
            max_length = min(max_length, int(positions))
        entries.append(_TokenizerEntry(te, tokenizer, max_length, f"{te.tokenizer}/tokenizer.json"))
    return entries


def _text_encoder_module(spec: ModelSpec, pipe, out_dtype=None):
    from samg.export.wrappers import TextEncoder

    encoders = [getattr(pipe, te.encoder) for te in spec.text_encoders]
    return TextEncoder(encoders, spec, out_dtype=out_dtype).eval()


def _text_component(spec, pipe, opts: ExportOptions, torch, dtype) -> Component:
    entries = _tokenizer_entries(spec, pipe)
    module = _text_encoder_module(spec, pipe, dtype)
    names = [e.spec_entry.input_name for e in entries]
    cond_shapes = _conditioning_shapes(spec, pipe, torch, None)

    def make_inputs(batch: int, scale: int):
        gen = torch.Generator().manual_seed(99 + batch)
        return tuple(
            torch.randint(0, len(e.tokenizer), (batch, e.max_length), generator=gen, dtype=torch.int64)
            for e in entries
        )

    outputs = list(spec.conditioning)
    axes = {**{n: {0: "N"} for n in names}, **{n: {0: "N"} for n in outputs}}
    shapes = {**{e.spec_entry.input_name: ["N", e.max_length] for e in entries},
              **{n: ["N", *cond_shapes[n]] for n in outputs}}
    dtypes = {**{n: "int64" for n in names}, **{n: opts.dtype for n in outputs}}
    return Component("text_encoder", TEXT_ENCODER_FILE, module, names, outputs, axes, shapes, dtypes, make_inputs)


def _vae_component(spec, pipe, sizes: Sizes, opts: ExportOptions, torch, dtype) -> Component:
    from samg.export.wrappers import VaeDecoder

    module = VaeDecoder(pipe.vae).eval()
    channels = pipe.vae.config["latent_channels"]
    joint = spec.vae_frames == "joint"
    factor = _vae_factor(pipe)

    def make_inputs(batch: int, scale: int):
        gen = torch.Generator().manual_seed(77 + 10 * scale + batch)
        lh, lw = (sizes.latent_height, sizes.latent_width) if scale == 0 else _second_size(sizes, spec)
        shape = [batch, channels, sizes.latent_frames, lh, lw] if joint else [batch, channels, lh, lw]
        return (torch.randn(shape, generator=gen).to(dtype),)

    if joint:
        # The 3-D VAE is traced at the export size: its causal temporal convs are unrolled per frame.
        in_shape = ["N", channels, sizes.latent_frames, sizes.latent_height, sizes.latent_width]
        out_shape = ["N", 3, sizes.frames, sizes.height, sizes.width]
        in_axes, out_axes = {0: "N"}, {0: "N"}
    else:
        in_shape = ["N", channels, "h", "w"] if spec.dynamic_resolution else ["N", channels, sizes.latent_height, sizes.latent_width]
        out_shape = ["N", 3, f"h*{factor}", f"w*{factor}"] if spec.dynamic_resolution else ["N", 3, sizes.height, sizes.width]
        in_axes = {0: "N", 2: "h", 3: "w"} if spec.dynamic_resolution else {0: "N"}
        out_axes = {0: "N", 2: "height", 3: "width"} if spec.dynamic_resolution else {0: "N"}
    return Component(
        "vae_decoder", VAE_FILE, module, ["latents"], ["images"],
        {"latents": in_axes, "images": out_axes},
        {"latents": in_shape, "images": out_shape},
        {"latents": opts.dtype, "images": opts.dtype},
        make_inputs,
        check_scales=(0, 1) if spec.dynamic_resolution and not joint else (0,),
    )


# --- ONNX export and validation -------------------------------------------------------------------


def _export_onnx(component: Component, folder: Path, opts: ExportOptions, torch, onnx) -> None:
    path = folder / component.file
    # Trace into a scratch folder: for models over 2 GB the exporter writes one external file per
    # weight, which _save_onnx then gathers into a single NAME.onnx.data.
    scratch = folder / f".trace-{component.name}"
    scratch.mkdir()
    traced = scratch / component.file
    inputs = component.make_inputs(TRACE_BATCH, 0)
    with torch.no_grad():
        torch.onnx.export(
            component.module,
            inputs,
            str(traced),
            input_names=component.input_names,
            output_names=component.output_names,
            dynamic_axes=component.dynamic_axes,
            opset_version=opts.opset,
            dynamo=False,
            do_constant_folding=True,
        )
    model = onnx.load(str(traced))
    shutil.rmtree(scratch)
    if component.name == "denoiser" and opts.guidance == "fused":
        from samg.op import attach_function

        attach_function(model)
    if component.name == "denoiser" and opts.guidance == "scfg":
        from samg.scfg.export import attach_to_model

        attach_to_model(model)
    _save_onnx(model, path, onnx)


def _save_onnx(model, path: Path, onnx) -> None:
    for stale in path.parent.glob(path.name + "*"):
        stale.unlink()
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    if weight_bytes > _PROTO_LIMIT:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
            location=path.name + _EXTERNAL_DATA_SUFFIX, size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))


def _validate(component: Component, folder: Path, opts: ExportOptions, torch, ort, progress: _Progress) -> None:
    import numpy as np

    session_options = ort.SessionOptions()
    if opts.tiny:
        session_options.intra_op_num_threads = 1
    # S-CFG: a session whose graph also outputs its mask decisions (samg.scfg.compare)
    open_session = getattr(component.module, "validation_session", ort.InferenceSession)
    session = open_session(str(folder / component.file), session_options, providers=["CPUExecutionProvider"])
    worst = 0.0
    decided = None  # S-CFG: smallest share of mask locations where the reference's masks are decided
    checked = []
    tolerance = TOLERANCE[opts.dtype]
    for scale in component.check_scales:
        batch = TRACE_BATCH if scale == 0 else 1
        for b in sorted({batch, 3}) if component.name == "text_encoder" else (batch,):
            inputs = component.make_inputs(b, scale)
            with torch.no_grad():
                expected = component.module(*inputs)
            expected = expected if isinstance(expected, tuple) else (expected,)
            feeds = {n: t.numpy() for n, t in zip(component.input_names, inputs)}
            outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
            got = [outputs[n] for n in component.output_names]
            for name, want, have in zip(component.output_names, expected, got):
                want = want.float().numpy()
                check(
                    tuple(have.shape) == tuple(want.shape),
                    f"exported {component.name} gives {name} of shape {have.shape}, torch {want.shape}: "
                    "this model cannot be exported at this size; try the model's native --height/--width",
                )
                err = float(np.max(np.abs(have.astype(np.float32) - want))) if want.size else 0.0
                # Relative to the output's magnitude, so large-valued outputs are judged fairly.
                err /= max(1.0, float(np.max(np.abs(want))))
                if hasattr(component.module, "validation_check"):  # S-CFG: tie-safe, from the graph's own masks
                    result = component.module.validation_check(inputs, outputs)
                    check(result.invalid_locations == 0,
                          f"exported {component.name} puts {result.invalid_locations} S-CFG mask locations where "
                          "the torch reference's maps are decided otherwise: report this model")
                    err = result.error
                    decided = min(result.decided_fraction, 1.0 if decided is None else decided)
                worst = max(worst, err)
            checked.append([list(t.shape) for t in inputs[:1]][0])
    component.validation = {"max_abs_err": worst, "tolerance": tolerance, "checked_shapes": checked,
                            **({} if decided is None else {"decided_fraction": decided})}
    progress.log(f"{component.name}: ONNX Runtime vs torch max error {worst:.2e} (tolerance {tolerance:g})")
    check(
        np.isfinite(worst) and worst <= tolerance,
        f"exported {component.name} differs from torch by {worst:.3g} (tolerance {tolerance:g}): "
        "export with --dtype float32, or report this model",
    )


# --- manifest -------------------------------------------------------------------------------------


def _scheduler_recipe(spec: ModelSpec, pipe):
    """The family's recipe keys (spec.scheduler) with the source scheduler's own values."""
    from samg.contract import scheduler_recipe

    config = dict(pipe.scheduler.config)
    recipe = {"kind": spec.scheduler["kind"]}
    for key, default in spec.scheduler.items():
        if key != "kind":
            value = config.get(key, default)
            recipe[key] = value if value is not None else default
    recipe["class"] = type(pipe.scheduler).__name__
    if spec.prediction_type != "flow":
        recipe["prediction_type"] = config.get("prediction_type", spec.prediction_type)
    return scheduler_recipe(recipe)


def _versions() -> dict:
    import samg

    versions = {"samg": samg.__version__}
    for module in ("torch", "diffusers", "transformers", "onnx", "onnxruntime"):
        versions[module] = getattr(sys.modules.get(module) or require(module), "__version__", "unknown")
    return versions


def _manifest(spec, pipe, opts, sizes, source, components, tokenizers, combine):
    """The typed manifest without `files` (samg.contract.write_export hashes the folder). `combine`:
    the denoiser graph's combine (None: a raw graph)."""
    from samg import contract

    denoiser, text, vae = components

    def tensors(c, names):
        return {n: contract.TensorSpec(tuple(c.shapes[n]), c.dtypes[n]) for n in names}

    vae_note = {
        "none": "image VAE: input [N, C, h, w]",
        "per_frame": "2-D image VAE run per frame: the runtime moves frames into the batch ([B*F, C, h, w])",
        "joint": "3-D VAE over the whole clip at the exported size: input [N, C, F, h, w] "
        "(the runtime permutes [B, F, C, H, W] latents to [B, C, F, H, W])",
    }[spec.vae_frames]
    prediction = spec.prediction_type
    if prediction != "flow":
        prediction = pipe.scheduler.config.get("prediction_type", prediction)
    return contract.Export(
        model=spec.name,
        family=spec.family,
        source=source,
        prediction_type=prediction,
        combine=combine,
        # host-side SAMG rules of a raw export default to the export's own settings
        host_rule_attrs=_guidance_attrs(opts, spec) if combine is None else None,
        latent=contract.Latent(
            layout=spec.layout,
            channels=getattr(pipe, spec.denoiser_component).config["in_channels"],
            spatial_factor=_vae_factor(pipe),
            temporal_factor=spec.temporal_factor,
            height=sizes.height,
            width=sizes.width,
            frames=sizes.frames,
            dynamic_resolution=spec.dynamic_resolution,
            dynamic_frames=spec.dynamic_frames,
            latent_height=sizes.latent_height,
            latent_width=sizes.latent_width,
            latent_frames=sizes.latent_frames,
            size_multiple=sizes.multiple,
        ),
        scheduler=_scheduler_recipe(spec, pipe),
        vae=contract.VaeDecoderGraph(
            file=VAE_FILE,
            runtime="onnx",
            scaling_factor=float(pipe.vae.config.get("scaling_factor") or spec.vae_scaling_factor),
            shift_factor=float(pipe.vae.config.get("shift_factor") or 0.0),
            frames=spec.vae_frames,
            note=vae_note,
            inputs=tensors(vae, vae.input_names),
            outputs=tensors(vae, vae.output_names),
        ),
        text_encoder=contract.TextEncoderGraph(
            file=TEXT_ENCODER_FILE,
            compute_dtype="float32",
            tokenizers=tuple(tokenizers),
            outputs=tuple(spec.conditioning),
            output_shapes=tensors(text, text.output_names),
            force_zeros_for_empty_prompt=bool(
                getattr(pipe.config, "force_zeros_for_empty_prompt", spec.force_zeros_for_empty_prompt)
                if spec.force_zeros_for_empty_prompt else False
            ),
        ),
        denoiser=contract.DenoiserGraph(
            file=DENOISER_FILE,
            model_class=spec.denoiser_class,
            inputs=tensors(denoiser, denoiser.input_names),
            outputs=tensors(denoiser, denoiser.output_names),
        ),
        opset=opts.opset,
        dtype=opts.dtype,
        versions=_versions(),
        validation={c.name: contract.ValidationRecord.from_json(c.validation) for c in components if c.validation},
    )


def _graph_combine(opts: ExportOptions, spec: ModelSpec, denoiser_module):
    """The combine op the denoiser graph holds (None: a raw graph that returns both predictions)."""
    if opts.guidance == "scfg":
        return denoiser_module.combine_attrs()
    return _guidance_attrs(opts, spec) if opts.guidance == "fused" else None


def _guidance_attrs(opts: ExportOptions, spec: ModelSpec):
    """GuidanceCombine's attributes from --tau/--sharpness/--smooth and the layout's channel axis."""
    from samg.contract import GuidanceCombineAttrs

    return GuidanceCombineAttrs(tau=opts.tau, sharpness=opts.sharpness, smooth=opts.smooth,
                                channel_axis=spec.channel_axis)


def _save_tokenizers(spec: ModelSpec, pipe, folder: Path) -> list:
    from samg.contract import TokenizerEntry

    tokenizers = require("tokenizers", "to save tokenizers")
    saved = []
    for entry in _tokenizer_entries(spec, pipe):
        tok = entry.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        check(
            backend is not None,
            f"{spec.name} {entry.spec_entry.tokenizer} is a slow tokenizer: save the model with a fast "
            "(tokenizers-backed) tokenizer",
        )
        # A copy that pads and truncates like the pipeline, so runtimes only call encode().
        copy = tokenizers.Tokenizer.from_str(backend.to_str())
        copy.enable_truncation(entry.max_length)
        copy.enable_padding(length=entry.max_length, pad_id=tok.pad_token_id, pad_token=tok.pad_token)
        path = folder / entry.file
        path.parent.mkdir(parents=True, exist_ok=True)
        copy.save(str(path))
        saved.append(TokenizerEntry(file=entry.file, max_length=entry.max_length, pad_id=int(tok.pad_token_id),
                                    pad_token=tok.pad_token, input=entry.spec_entry.input_name))
    return saved


# --- entry point ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _output_folder(out: Path, merge: bool):
    """samg.io.atomic_dir, with a folder that cannot be created or written as one SamgError line."""
    from samg.export.folder import samg_files
    from samg.io import atomic_dir

    try:
        with atomic_dir(out, owned=samg_files, merge=merge) as folder:
            yield folder
    except OSError as exc:
        parent = out.resolve().parent
        target = Path(os.fsdecode(exc.filename)).resolve() if exc.filename is not None else None
        if target is None or not (target == parent or parent in target.parents or target in parent.parents):
            raise
        raise SamgError(f"cannot write the export to {out} ({exc.strerror}): pick a folder you can write to") from None


def _internal_manifest_error(exc: SamgError, folder: Path, out: Path) -> str:
    """A manifest samg itself built failed validation: samg's bug, not the user's export to redo."""
    detail = str(exc).replace(f"manifest for {folder}: ", "").replace(str(folder), str(out))
    detail = detail.removesuffix(": re-export the model with `samg export`")
    return (f"internal error in samg export: the manifest written for {out} is invalid ({detail}); {out} was left "
            "as it was: please report this as a samg bug")


def export(opts: ExportOptions) -> Path:
    """Run the whole export; returns the output folder. Raises SamgError with nothing left behind."""
    from samg.contract import TINY_SOURCE_DIR, Source, write_export

    spec = get_spec(opts.model)
    _check_options(opts, spec)
    merge = _check_out(opts, spec)  # before the heavy imports and the (long) work
    torch = require("torch", "to export models")
    onnx = require("onnx", "to export models")
    ort = require("onnxruntime", "to validate exported models")
    dtype = {"float32": torch.float32, "float16": torch.float16}[opts.dtype]
    out = Path(opts.out)
    progress = _Progress(total=6 + (3 if opts.validate else 0), quiet=opts.quiet)
    try:
        with _quiet_libraries(), _threads_for(opts, torch), _output_folder(out, merge) as folder:
            if opts.tiny:
                progress.stage("building tiny model")
                tiny = spec.build_tiny(opts.seed)
                tiny.save_pretrained(str(folder / TINY_SOURCE_DIR))
                source = Source("tiny", TINY_SOURCE_DIR, spec.hub_id)
                load_from, kind = str(folder / TINY_SOURCE_DIR), "tiny"
            elif opts.model_path or spec.bundled:
                load_from = str(Path(opts.model_path or spec.default_source).resolve())
                source = Source("path", load_from, spec.hub_id)
                kind = "path"
            else:
                load_from, kind = spec.hub_id, "hub"
                source = Source("hub", None, spec.hub_id)
            progress.done()
            progress.stage("loading pipeline")
            pipe = load_source_pipeline(spec, load_from, kind, dtype)
            sizes = _resolve_sizes(spec, pipe, opts)
            progress.done()
            components = [
                _denoiser_component(spec, pipe, sizes, opts, torch, dtype),
                _text_component(spec, pipe, opts, torch, dtype),
                _vae_component(spec, pipe, sizes, opts, torch, dtype),
            ]
            for component in components:
                progress.stage(f"exporting {component.name}")
                _export_onnx(component, folder, opts, torch, onnx)
                progress.done()
            tokenizers = _save_tokenizers(spec, pipe, folder)
            if opts.validate:
                for component in components:
                    progress.stage(f"validating {component.name}")
                    _validate(component, folder, opts, torch, ort, progress)
                    progress.done()
            progress.stage("writing manifest")
            combine = _graph_combine(opts, spec, components[0].module)
            try:
                write_export(folder, _manifest(spec, pipe, opts, sizes, source, components, tokenizers, combine))
            except SamgError as exc:
                raise SamgError(_internal_manifest_error(exc, folder, out)) from None
            progress.done()
    finally:
        progress.close()
    if not opts.quiet:
        print(f"samg export: wrote {out} ({spec.name}, {opts.guidance} guidance)", file=sys.stderr)
    return out
