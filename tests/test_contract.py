"""samg.json has one reader: every field validated once, paths confined, files checked against their hashes."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest

from samg.contract import MANIFEST, VERIFIED_STAMP, read_export
from samg.errors import SamgError


@pytest.fixture(scope="module")
def sd15(tiny_export):
    return tiny_export("sd15")


@pytest.fixture
def export(sd15, tmp_path):
    """A private copy of the shared tiny SD1.5 export (without the torch source: not read here)."""
    out = tmp_path / "export"
    shutil.copytree(sd15, out, ignore=shutil.ignore_patterns("source"))
    return out


def _edit(folder, change):
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))  # json writes NaN/Infinity as a manifest could hold


def _set(path, value):
    def change(m):
        *parents, last = path.split(".")
        node = m
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[last] = value
    return change


def _drop(key):
    return lambda m: m.pop(key)


@pytest.mark.parametrize(
    "change, message",
    [
        (_drop("latent"), r"latent is missing|latent must be present"),
        (_drop("scheduler"), r"scheduler must be present"),
        (_set("latent.spatial_factor", 0), r"latent\.spatial_factor must be a positive integer.*got 0"),
        (_set("latent.spatial_factor", "8"), r"latent\.spatial_factor must be a positive integer.*got '8'"),
        (_set("latent.channels", 4.5), r"latent\.channels must be a positive integer"),
        (_set("latent.height", 10**9), r"latent\.height must be a positive integer \(at most 16384\)"),
        (_set("latent.layout", "BHWC"), r"latent\.layout must be one of BCHW, BFCHW, BCFHW"),
        (_set("latent.dynamic_resolution", "yes"), r"latent\.dynamic_resolution must be true or false"),
        (_set("scheduler.beta_start", math.nan), r"scheduler\.beta_start must be a finite number.*got nan"),
        (_set("scheduler.beta_end", math.inf), r"scheduler\.beta_end must be a finite number.*got inf"),
        (_set("scheduler.beta_start", -0.1), r"scheduler\.beta_start must be a finite number of at least 0"),
        (_set("scheduler.num_train_timesteps", 0), r"scheduler\.num_train_timesteps must be a positive integer"),
        (_set("scheduler.kind", "karras"), r"scheduler\.kind must be one of discrete, flow"),
        (_set("scheduler.beta_schedule", "cubic"), r"scheduler\.beta_schedule must be one of linear"),
        (_set("scheduler.timestep_spacing", "random"), r"scheduler\.timestep_spacing must be one of leading"),
        (_set("text_encoder.tokenizers.0.max_length", 10**9),
         r"text_encoder\.tokenizers\[0\]\.max_length must be a positive integer \(at most 4096\)"),
        (_set("text_encoder.tokenizers", []), r"text_encoder\.tokenizers must be a non-empty list"),
        (_set("text_encoder.outputs", [1]), r"text_encoder\.outputs must be a non-empty list of names"),
        (_set("prediction_type", "sample"), r"prediction_type must be one of epsilon, v_prediction, flow"),
        (_set("guidance", "both"), r"guidance must be one of fused, raw, scfg"),
        (_set("vae.scaling_factor", math.nan), r"vae\.scaling_factor must be a finite positive number"),
        (_set("vae.scaling_factor", 0), r"vae\.scaling_factor must be a finite positive number"),
        (_set("vae.shift_factor", -math.inf), r"vae\.shift_factor must be a finite number"),
        (_set("combine.smooth", "3"), r"combine\.smooth must be an integer of at least 0"),
        (_set("combine.smooth", 2), r"combine\.smooth must be 0 or 3"),
        (_set("combine.tau", "1.0"), r"combine\.tau must be a finite number"),
        (_set("combine.sharpness", True), r"combine\.sharpness must be a finite number"),
        (_set("combine.channel_axis", 2), r"combine\.channel_axis must be 1 for layout BCHW"),
        (_set("combine.op", "SemanticCombine"), r"combine\.op must be 'GuidanceCombine' for a fused export"),
        (_set("denoiser.inputs", {"latents": {"shape": "B,4", "dtype": "float32"}}),
         r"denoiser\.inputs\.latents\.shape must be a list"),
        (_set("dtype", "int8"), r"dtype must be one of float32, float16, bfloat16"),
        (_set("format_version", 2), r"format_version 2, this samg reads 1"),
        (_set("format_version", True), r"format_version True, this samg reads 1"),
        (_set("format", "other"), r"is not a samg export manifest"),
        (lambda m: m["files"].update({"denoiser.onnx": "md5:abc"}), r"files\.denoiser\.onnx must be \"sha256:\" and 64 hex digits"),
        (_set("denoiser.file", "../../x.onnx"), r"denoiser\.file '\.\./\.\./x\.onnx' points outside the export folder"),
        (_set("vae.file", "/etc/passwd"), r"vae\.file '/etc/passwd' points outside the export folder"),
        (_set("text_encoder.tokenizers.0.file", "..\\\\t.json"), r"tokenizers\[0\]\.file .* points outside"),
        (_set("source.path", "../elsewhere"), r"source\.path '\.\./elsewhere' points outside"),
    ],
)
def test_each_bad_field_is_one_line_naming_it(export, change, message):
    _edit(export, change)
    with pytest.raises(SamgError, match=message) as info:
        read_export(export)
    text = str(info.value)
    assert "\n" not in text and text.startswith(str(export / MANIFEST)) and "re-export" in text


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", r"is not valid JSON"),
        ("[1, 2]", r"holds a JSON list, not an object"),
        ("", r"is not valid JSON"),
        ('"samg"', r"holds a JSON str, not an object"),
        ("[" * 100_000 + "]" * 100_000, r"is not valid JSON|nested too deeply"),
        (b"\xff\xfe{}", r"is not valid JSON"),
    ],
)
def test_unparsable_manifest_is_one_line(export, content, message):
    path = export / MANIFEST
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SamgError, match=message) as info:
        read_export(export)
    assert "\n" not in str(info.value)


def test_missing_folder_or_manifest(tmp_path):
    with pytest.raises(SamgError, match="is not a folder"):
        read_export(tmp_path / "nope")
    with pytest.raises(SamgError, match=r"is not a samg export \(no samg\.json\): run `samg export` first"):
        read_export(tmp_path)


def test_every_family_manifest_is_accepted_as_written(sd15, tiny_export):
    """The writer and the reader agree: what `samg export` writes reads back unchanged."""
    for folder in (sd15, tiny_export("sd15", "raw")):
        before = json.loads((folder / MANIFEST).read_text())
        assert read_export(folder) == before


# --- paths and hashes --------------------------------------------------------------------------------


def test_symlink_pointing_out_is_refused(export, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(export / "vae_decoder.onnx", outside)  # same bytes: only the location is wrong
    (export / "vae_decoder.onnx").unlink()
    (export / "vae_decoder.onnx").symlink_to(outside)
    with pytest.raises(SamgError, match=r"vae_decoder\.onnx points outside the export folder"):
        read_export(export)


def test_changed_file_is_caught_and_named(export):
    path = export / "text_encoder.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(SamgError, match=r"text_encoder\.onnx does not match the hash in samg\.json .*re-export"):
        read_export(export)
    assert read_export(export, verify=False)["model"] == "sd15"  # validation alone does not hash


def test_missing_or_unlisted_file_is_refused(export):
    (export / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(SamgError, match=r"tokenizer\.json is missing from the export"):
        read_export(export)
    _edit(export, lambda m: m["files"].pop("tokenizer/tokenizer.json"))
    with pytest.raises(SamgError, match=r"lists no hash for tokenizer/tokenizer\.json"):
        read_export(export)


def _same_size_same_mtime_change(path):
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_verified_stamp_skips_rehashing_until_size_or_mtime_change(export):
    stamp = json.loads((export / VERIFIED_STAMP).read_text())["files"]
    denoiser = export / "denoiser.onnx"
    assert stamp["denoiser.onnx"]["size"] == denoiser.stat().st_size
    assert stamp["denoiser.onnx"]["mtime_ns"] == denoiser.stat().st_mtime_ns
    # The stamp's trade-off, on purpose: a change that keeps size and mtime is not re-hashed ...
    _same_size_same_mtime_change(denoiser)
    read_export(export)
    # ... and any change of mtime is.
    os.utime(denoiser, ns=(denoiser.stat().st_atime_ns, denoiser.stat().st_mtime_ns + 10**9))
    with pytest.raises(SamgError, match=r"denoiser\.onnx does not match the hash"):
        read_export(export)


def test_stamp_that_cannot_be_written_means_hashing_every_load(export):
    """A folder where the stamp cannot be written (read-only; simulated, as root ignores modes, by a
    folder in the stamp's place): loading still works, and every load hashes."""
    (export / VERIFIED_STAMP).unlink()
    (export / VERIFIED_STAMP).mkdir()
    assert read_export(export)["model"] == "sd15"
    _same_size_same_mtime_change(export / "denoiser.onnx")
    with pytest.raises(SamgError, match=r"denoiser\.onnx does not match the hash"):
        read_export(export)


def test_pipeline_load_goes_through_the_contract(export):
    from samg.runtime.pipeline import Pipeline

    _edit(export, _set("latent.spatial_factor", 0))
    with pytest.raises(SamgError, match=r"latent\.spatial_factor must be a positive integer"):
        Pipeline.load(export)


# --- the torch backend reads an scfg export's combine entry --------------------------------------------


def test_torch_backend_runs_an_scfg_export_like_onnxruntime(tiny_export):
    """One denoiser call on real conditioning at three sigmas, torch backend vs the ONNX graph.

    S-CFG's masks are arg-maxes; where the reference is undecided within samg.scfg.export's
    DECIDED_MARGIN the two may pick different regions, so the comparison is the exporter's tie-aware
    one: exact (1e-4 relative) where decided, on the S-CFG line elsewhere."""
    import numpy as np

    from samg.engines.base import open_runner
    from samg.runtime.pipeline import Pipeline

    # Non-default levels and variant (shared with test_scfg_export): the runner must read both.
    folder = tiny_export("sd15", "scfg", scfg_levels=(2,), scfg_corrected=True, validate=False)
    torch_pipe = Pipeline.load(folder, backend="torch")
    ort_runner = open_runner(folder / "denoiser.onnx", "onnxruntime", "cpu")
    cond = torch_pipe.conditioning("a red circle", "", 1)
    height, width, frames = torch_pipe.validate_size(None, None, None)
    rng = np.random.default_rng(0)
    for t in (900.0, 500.0, 100.0):
        feeds = {"latents": rng.standard_normal(torch_pipe.latent_shape(1, height, width, frames)).astype(np.float32),
                 "timestep": np.array([t], np.float32), **cond,
                 "guidance_scales": np.array([[5.0, 5.0]], np.float32)}
        ours = torch_pipe.runners["denoiser"].run(feeds)["guided"]
        graph = ort_runner.run(feeds)["guided"]
        assert ours.shape == graph.shape and np.isfinite(ours).all()
        module = torch_pipe.runners["denoiser"].module
        inputs = tuple(__import__("torch").from_numpy(feeds[n]) for n in torch_pipe.runners["denoiser"].input_names)
        assert module.validation_error(inputs, graph) <= 1e-4
