"""The export folder's contract: the one writer and the one reader of `samg.json`.

`write_export(folder, manifest)` hashes the folder's files into `files`, checks the manifest with the
same validator the reader uses, and writes it atomically. `read_export(export_dir)` is what every
reader calls: it validates every field once (one SamgError line naming the field), confines every
path to the export folder, and checks the files the runtimes load against the hashes written at
export. Hashing multi-GB models on every load would be slow, so a verified-stamp
(`.samg-verified.json`, keyed by file name, size, mtime_ns and the expected hash) remembers files
already checked; where the folder is read-only no stamp is written and files are hashed each load.

Standard library (and numpy-free) at import time; the format is described in docs/architecture.md.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

from samg import EXPORT_FORMAT_VERSION
from samg.errors import SamgError

MANIFEST = "samg.json"
FORMAT = "samg-export"
# Remembers which files already matched their hash (see module doc); never listed in `files`.
VERIFIED_STAMP = ".samg-verified.json"
VERIFIED_FORMAT = "samg-verified"
# Marks a folder samg is still writing (samg.io.atomic_dir: a temp folder, or an export being
# merged into by --force, then listing the files it replaces); never listed in `files`.
PARTIAL_MARKER = ".samg-partial"
# Folder of `samg build` engines inside an export, and the endings of what it writes there.
ENGINES_DIR = "engines"
ENGINE_SUFFIXES = (".engine", ".engine.json")
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
_HASH = re.compile(r"sha256:[0-9a-f]{64}")
_STAMP_FILES_LIMIT = 100_000


class _Fields:
    """Typed reads of one manifest with one-line errors naming the field."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, want: str, value: Any) -> SamgError:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return SamgError(f"{self.where}: {field} must be {want}, got {shown}: re-export the model with `samg export`")

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
            raise SamgError(f"{self.where}: {prefix + key} is missing: re-export the model with `samg export`")
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
    from samg.op import schema
    from samg.scfg import op as scfg_op

    p = "combine."
    if combine.get("domain") != schema.DOMAIN:
        raise f.fail(p + "domain", repr(schema.DOMAIN), combine.get("domain"))
    want_op = scfg_op.OP_TYPE if guidance == "scfg" else schema.OP_TYPE
    if combine.get("op") != want_op:
        raise f.fail(p + "op", f"{want_op!r} for a {guidance} export", combine.get("op"))
    version = f.integer(combine, "version", p)
    want_version = scfg_op.OP_VERSION if guidance == "scfg" else schema.OP_VERSION
    if version != want_version:
        raise f.fail(p + "version", str(want_version), version)
    if guidance == "scfg":
        f.integer(combine, "factor_fine", p, hi=MAX_FACTOR * MAX_FACTOR)
        f.integer(combine, "factor_coarse", p, hi=MAX_FACTOR * MAX_FACTOR)
        corrected = combine.get("corrected")
        if corrected not in (0, 1) or isinstance(corrected, float):
            raise f.fail(p + "corrected", "0 or 1", corrected)
        return
    f.number(combine, "tau", p)
    f.number(combine, "sharpness", p)
    smooth = f.integer(combine, "smooth", p, lo=0)
    axis = f.integer(combine, "channel_axis", p)
    if smooth not in schema.SMOOTH_CHOICES:
        raise f.fail(p + "smooth", " or ".join(map(str, schema.SMOOTH_CHOICES)), smooth)
    want_axis = 2 if layout == "BFCHW" else 1
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
            f.string(entry, "input", q, optional=True)
        outputs = section.get("outputs")
        if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) and o for o in outputs):
            raise f.fail(p + "outputs", "a non-empty list of names", outputs)
        f.boolean(section, "force_zeros_for_empty_prompt", p, optional=True)


def loaded_files(manifest: dict) -> list[str]:
    """The files (relative to the export folder) the runtimes open: graphs and tokenizers."""
    names = []
    for component in COMPONENTS:
        section = manifest[component]
        if section.get("runtime", "onnx") != NO_RUNTIME:
            names.append(section["file"])
    names += [entry["file"] for entry in manifest["text_encoder"].get("tokenizers", [])]
    return names


# --- reading ------------------------------------------------------------------------------------------


def read_export(export_dir: str | os.PathLike, verify: bool = True, *, complete: bool = True) -> dict:
    """The validated manifest of an export folder (SamgError naming the problem otherwise).

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
    check_confined(export_dir, manifest)
    if verify:
        verify_files(export_dir, manifest)
    return manifest


def check_confined(export_dir: Path, manifest: dict) -> None:
    """Every path the manifest names resolves inside the export folder (symbolic links included)."""
    root = export_dir.resolve()
    names = loaded_files(manifest) + list(manifest["files"])
    if manifest["source"]["kind"] == "tiny":
        names.append(manifest["source"]["path"])
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


def verify_files(export_dir: Path, manifest: dict) -> None:
    """Each file in `files` matches its hash; each file the runtimes load is listed there."""
    from samg.io import sha256_file

    files = manifest["files"]
    unlisted = [name for name in loaded_files(manifest) if name not in files]
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


def write_export(folder: str | os.PathLike, manifest: dict, *, complete: bool = True) -> Path:
    """Hash the folder's files into `manifest["files"]` (all but the tiny source/, engines/ and
    samg's own bookkeeping), validate the manifest as `read_export` will, write the verified-stamp and then
    `samg.json` (atomically, last). Returns the manifest's path."""
    from samg.io import atomic_write_json, sha256_file

    folder = Path(folder)
    files, stamp = {}, {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if _private(name) or name.split("/")[0] in (TINY_SOURCE_DIR, ENGINES_DIR):
            continue  # the torch backend's source and `samg build` output are not the export's graphs
        files[name] = sha256_file(path)
        stamp[name] = _stamp_entry(path.stat(), files[name])
    manifest["files"] = files
    validate_manifest(manifest, f"manifest for {folder}", complete=complete)
    check_confined(folder, manifest)
    write_stamp(folder, stamp)
    atomic_write_json(folder / MANIFEST, manifest)
    return folder / MANIFEST


# --- ownership ----------------------------------------------------------------------------------------


def samg_files(folder: Path) -> set[str]:
    """Files in `folder` (relative POSIX paths) that samg wrote: those of the export its manifest
    describes, samg's bookkeeping, `samg build` engines, and those a killed `--force` export was
    writing (listed in its partial marker). Nothing else may be replaced or deleted."""
    owned: set[str] = set()
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = None
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}
    if isinstance(manifest, dict) and manifest.get("format") == FORMAT:
        owned.add(MANIFEST)
        files = manifest.get("files")
        owned.update(n for n in (files if isinstance(files, dict) else {}) if isinstance(n, str))
        source = manifest.get("source")
        if isinstance(source, dict) and source.get("kind") == "tiny":
            owned.update(n for n in present if n.split("/")[0] == TINY_SOURCE_DIR)
    try:
        partial = json.loads((folder / PARTIAL_MARKER).read_text())
        listed = partial.get("files", []) if isinstance(partial, dict) else []
        owned.update(n for n in listed if isinstance(n, str))
        owned.add(PARTIAL_MARKER)
    except (OSError, ValueError):
        pass
    owned.update(n for n in present if n.split("/")[0] == ENGINES_DIR and n.endswith(ENGINE_SUFFIXES)
                 and n.count("/") == 1)
    if owned:
        owned.add(VERIFIED_STAMP)
    return owned & present
