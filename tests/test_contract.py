"""samg.json has one reader: every field validated once, paths confined, files checked against their hashes."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

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
        (_set("text_encoder.output_shapes", {"prompt_embeds": {"shape": 3, "dtype": "float32"}}),
         r"text_encoder\.output_shapes\.prompt_embeds\.shape must be a list"),
        (_set("text_encoder.output_shapes", {"prompt_embeds": [2, 77, 32]}),
         r"text_encoder\.output_shapes\.prompt_embeds must be an object"),
        (_set("text_encoder.output_shapes", {"prompt_embeds": {"shape": ["B", 77]}}),
         r"text_encoder\.output_shapes\.prompt_embeds\.dtype is missing"),
        (_set("text_encoder.output_shapes", ["prompt_embeds"]), r"text_encoder\.output_shapes must be an object"),
        (_set("text_encoder.compute_dtype", "int8"), r"text_encoder\.compute_dtype must be one of float32"),
        (_set("text_encoder.tokenizers.0.pad_token", 5), r"text_encoder\.tokenizers\[0\]\.pad_token must be a non-empty string"),
        (_set("validation", {"denoiser": {"checked_shapes": [3]}}),
         r"validation\.denoiser\.checked_shapes must be a list of shapes"),
        (_set("validation", {"denoiser": {"checked_shapes": [[2, "4"]]}}),
         r"validation\.denoiser\.checked_shapes must be a list of shapes"),
        (_set("validation", {"denoiser": {"checked_shapes": "2x4"}}),
         r"validation\.denoiser\.checked_shapes must be a list of shapes"),
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
        assert read_export(folder).to_json() == before


# The manifest keys docs/architecture.md documents ("Export folder"), by section.
DOCUMENTED_KEYS = {
    "": {"format", "format_version", "model", "family", "source", "prediction_type", "guidance", "combine", "latent",
         "scheduler", "vae", "text_encoder", "denoiser", "opset", "dtype", "versions", "files", "validation"},
    "source": {"kind", "path", "hub_id"},
    "latent": {"layout", "channels", "spatial_factor", "temporal_factor", "height", "width", "frames",
               "dynamic_resolution", "latent_height", "latent_width", "latent_frames", "dynamic_frames",
               "size_multiple"},
    "vae": {"file", "runtime", "scaling_factor", "shift_factor", "frames", "note", "inputs", "outputs"},
    "text_encoder": {"file", "tokenizers", "outputs", "compute_dtype", "output_shapes", "force_zeros_for_empty_prompt"},
    "denoiser": {"file", "inputs", "outputs"},
}
GUIDANCE_COMBINE_KEYS = {"domain", "op", "version", "tau", "sharpness", "smooth", "channel_axis"}
DISCRETE_SCHEDULER_KEYS = {"kind", "num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                           "timestep_spacing", "steps_offset", "rescale_betas_zero_snr"}


@pytest.mark.parametrize("guidance", ["fused", "raw", "scfg"])
def test_read_write_read_round_trip(tiny_export, tmp_path, guidance):
    """read -> write -> read gives an equal Export, written with the documented JSON keys; the typed
    fields say what the manifest says."""
    from samg.contract import GuidanceCombineAttrs, SemanticCombineAttrs, write_export

    # scfg: the export test_torch_backend_runs_an_scfg_export_like_onnxruntime uses (built once)
    scfg = {"scfg_levels": (2,), "scfg_corrected": True, "validate": False}
    folder = tiny_export("sd15", guidance, **(scfg if guidance == "scfg" else {}))
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("source"))
    first = read_export(folder)
    written = write_export(copy, first)
    second = read_export(copy)
    assert second == first == written
    manifest = json.loads((copy / MANIFEST).read_text())
    assert manifest == json.loads((folder / MANIFEST).read_text())
    for section, keys in DOCUMENTED_KEYS.items():
        node = manifest[section] if section else manifest
        assert keys <= set(node), (section, keys - set(node))
    assert manifest["guidance"] == guidance and second.mode == guidance
    assert (second.combine is not None) == (guidance != "raw") == second.fused
    if guidance == "scfg":
        assert isinstance(second.combine, SemanticCombineAttrs) and second.combine.rules == ("scfg",)
        assert manifest["combine"]["op"] == "SemanticCombine"
    else:
        assert DISCRETE_SCHEDULER_KEYS <= set(manifest["scheduler"])
        assert set(manifest["combine"]) >= GUIDANCE_COMBINE_KEYS
        attrs = second.combine if guidance == "fused" else second.host_rule_attrs
        assert isinstance(attrs, GuidanceCombineAttrs)
        assert attrs.attributes() == {k: manifest["combine"][k] for k in ("tau", "sharpness", "smooth", "channel_axis")}
    assert second.latent.channels == manifest["latent"]["channels"] == 4
    assert second.scheduler.beta_schedule == manifest["scheduler"]["beta_schedule"] == "scaled_linear"
    assert [t.file for t in second.text_encoder.tokenizers] == ["tokenizer/tokenizer.json"]
    assert set(second.files) == set(manifest["files"]) and "denoiser.onnx" in second.files


def test_extra_keys_are_kept_through_a_round_trip(export, tmp_path):
    """Extra keys stay allowed (format_version 1) and survive read -> write."""
    from samg.contract import write_export

    _edit(export, lambda m: (m.update(custom={"a": 1}), m["latent"].update(note="mine"),
                             m["scheduler"].update(variance_type="fixed_small")))
    write_export(export, read_export(export))
    manifest = json.loads((export / MANIFEST).read_text())
    assert manifest["custom"] == {"a": 1} and manifest["latent"]["note"] == "mine"
    assert manifest["scheduler"]["variance_type"] == "fixed_small"


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
    assert read_export(export, verify=False).model == "sd15"  # validation alone does not hash


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
    assert read_export(export).model == "sd15"
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

    S-CFG's masks are arg-maxes; where the reference is undecided within samg.scfg.compare's
    DECIDED_MARGIN the two may pick different regions, so the comparison is the exporter's tie-safe one:
    the graph's own masks (probe outputs) an arg-max of the torch maps, its output the torch combine
    given those masks to 1e-4 relative."""
    import numpy as np

    from samg.runtime.pipeline import Pipeline
    from samg.scfg.compare import probe_session, run_probe

    # Non-default levels and variant (shared with test_scfg_export): the runner must read both.
    folder = tiny_export("sd15", "scfg", scfg_levels=(2,), scfg_corrected=True, validate=False)
    torch_pipe = Pipeline.load(folder, backend="torch")
    graph_session = probe_session(folder / "denoiser.onnx")
    cond = torch_pipe.conditioning("a red circle", "", 1)
    height, width, frames = torch_pipe.validate_size(None, None, None)
    rng = np.random.default_rng(0)
    for t in (900.0, 500.0, 100.0):
        feeds = {"latents": rng.standard_normal(torch_pipe.latent_shape(1, height, width, frames)).astype(np.float32),
                 "timestep": np.array([t], np.float32), **cond,
                 "guidance_scales": np.array([[5.0, 5.0]], np.float32)}
        ours = torch_pipe.runners["denoiser"].run(feeds)["guided"]
        graph = run_probe(graph_session, feeds)
        assert ours.shape == graph["guided"].shape and np.isfinite(ours).all()
        module = torch_pipe.runners["denoiser"].module
        inputs = tuple(__import__("torch").from_numpy(feeds[n]) for n in torch_pipe.runners["denoiser"].input_names)
        result = module.validation_check(inputs, graph)
        assert result.invalid_locations == 0 and result.error <= 1e-4, result


# --- what each combine runs ----------------------------------------------------------------------------


@pytest.mark.parametrize("levels, message", [
    ([], r"combine\.levels must be a non-empty list of positive integers"),
    (["2"], r"combine\.levels must be a non-empty list of positive integers"),
    ([0], r"combine\.levels must be a non-empty list of positive integers"),
])
def test_bad_scfg_combine_levels_are_one_line(tiny_export, tmp_path, levels, message):
    scfg = tiny_export("sd15", "scfg", scfg_levels=(2,), scfg_corrected=True, validate=False)
    export = tmp_path / "scfg"
    shutil.copytree(scfg, export, ignore=shutil.ignore_patterns("source"))
    _edit(export, _set("combine.levels", levels))
    with pytest.raises(SamgError, match=message) as info:
        read_export(export)
    assert "\n" not in str(info.value)


def test_each_combine_kind_declares_the_rules_it_runs():
    """The runtime checks a request against the export's combine: GuidanceCombine runs SAMG, CFG and
    interval in the graph; SemanticCombine only S-CFG; a raw graph (None) every host-side rule."""
    from samg.contract import GuidanceCombineAttrs, SemanticCombineAttrs
    from samg.runtime.denoiser import Guidance, check_guidance_for_export

    fused, scfg = GuidanceCombineAttrs(), SemanticCombineAttrs(factor_fine=2, factor_coarse=4)
    assert GuidanceCombineAttrs.rules == ("samg", "cfg", "interval") and SemanticCombineAttrs.rules == ("scfg",)
    for rule in ("samg", "cfg", "interval"):
        check_guidance_for_export(Guidance(rule), fused)
    for rule in ("samg", "cfg", "apg", "cfgpp", "samg-bound"):
        check_guidance_for_export(Guidance(rule), None)
    check_guidance_for_export(Guidance("scfg"), scfg)
    with pytest.raises(SamgError, match=r"guidance 'apg' cannot run on a fused export.*--guidance samg, cfg or interval"):
        check_guidance_for_export(Guidance("apg"), fused)
    for rule, combine, mode in (("scfg", None, "raw"), ("scfg", fused, "fused"), ("cfg", scfg, "scfg")):
        with pytest.raises(SamgError, match=rf"S-CFG needs an export made with .*this export is '{mode}'"):
            check_guidance_for_export(Guidance(rule), combine)


# --- engine records ------------------------------------------------------------------------------------


def _engine_record(engine, **changes):
    import dataclasses
    import hashlib

    from samg.contract import EngineRecord

    data = engine.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    record = EngineRecord(
        key="0123abcd", component="denoiser", onnx_sha256=("sha256:" + "0" * 64,), trt_flavour="tensorrt",
        trt_version="10.9.0", compute_capability="sm_90", precision="fp16", combine="plugin",
        profiles={"latents": {"min": (1, 4, 8, 8), "opt": (1, 4, 8, 8), "max": (2, 4, 16, 16)}},
        inputs=("latents", "timestep"), outputs=("guided",), plugins=("samg::GuidanceCombine",),
        engine_bytes=len(data), engine_sha256=digest, onnx="denoiser.onnx", build_seconds=1.5, samg_version="0.1",
    )
    return dataclasses.replace(record, **changes)


def test_engine_record_round_trip_and_verification(tmp_path):
    from samg.contract import engine_record_path, read_engine_record, verify_engine, write_engine_record

    engine = tmp_path / "denoiser.engine"
    engine.write_bytes(b"serialized engine")
    record = _engine_record(engine)
    assert write_engine_record(engine, record) == tmp_path / "denoiser.engine.json" == engine_record_path(engine)
    assert read_engine_record(engine) == record
    written = json.loads((tmp_path / "denoiser.engine.json").read_text())
    assert (written["format"], written["format_version"], written["trt"]) == ("samg-engine", 1,
                                                                             {"flavour": "tensorrt", "version": "10.9.0"})
    assert written["profiles"]["latents"]["max"] == [2, 4, 16, 16] and written["plugins"] == ["samg::GuidanceCombine"]
    assert verify_engine(engine, trt_flavour="tensorrt", trt_version="10.9.0", gpu_capability="sm_90") == record
    with pytest.raises(SamgError, match=r"built with tensorrt 10\.9\.0 but this is tensorrt 10\.10: rebuild"):
        verify_engine(engine, trt_flavour="tensorrt", trt_version="10.10")
    with pytest.raises(SamgError, match=r"built for sm_90 but this GPU is sm_80: rebuild it on this machine"):
        verify_engine(engine, gpu_capability="sm_80")
    write_engine_record(engine, _engine_record(engine, compute_capability="any"))
    verify_engine(engine, gpu_capability="sm_80")  # TensorRT-RTX engines run on any GPU
    engine.write_bytes(b"serialized engine, longer")
    with pytest.raises(SamgError, match=r"is 25 bytes but was built as 17: .*rebuild it with `samg build`"):
        verify_engine(engine)
    engine.write_bytes(b"serialized engine"[::-1])
    with pytest.raises(SamgError, match=r"does not match its build record \(hash differs\)"):
        verify_engine(engine)


def test_verify_engine_checks_against_a_record_already_read(tmp_path):
    from samg.contract import verify_engine, write_engine_record

    engine = tmp_path / "denoiser.engine"
    engine.write_bytes(b"serialized engine")
    record = _engine_record(engine)
    write_engine_record(engine, record)
    (tmp_path / "denoiser.engine.json").unlink()  # the record given is used, not read again
    assert verify_engine(engine, trt_flavour="tensorrt", trt_version="10.9.0", record=record) == record
    engine.write_bytes(b"serialized engine"[::-1])
    with pytest.raises(SamgError, match=r"does not match its build record \(hash differs\)"):
        verify_engine(engine, record=record)


def test_source_model_dir_is_the_diffusers_folder_of_each_source_kind(tmp_path):
    from samg.contract import Source

    assert Source("tiny", "source").model_dir(tmp_path) == tmp_path / "source"
    # a local model: its own folder (not the export's source/), relative paths as given
    assert Source("path", "/models/sd15").model_dir(tmp_path) == Path("/models/sd15")
    assert Source("path", "models/sd15").model_dir(str(tmp_path)) == Path("models/sd15")
    assert Source("hub", hub_id="runwayml/stable-diffusion-v1-5").model_dir(tmp_path) is None


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(format_version=2), r"not a samg engine record of version 1"),
    (lambda r: r.update(combine="both"), r"combine must be one of function, plugin, none"),
    (lambda r: r.update(engine_bytes="17"), r"engine_bytes must be an integer of at least 0"),
    (lambda r: r.update(engine_sha256="md5:x"), r"engine_sha256 must be \"sha256:\" and 64 hex digits"),
    (lambda r: r["profiles"]["latents"].pop("opt"), r"profiles\.latents must be an object"),
    (lambda r: r.pop("trt"), r"trt must be present"),
    (lambda r: r.update(inputs="latents"), r"inputs must be a list of names"),
])
def test_bad_engine_record_field_is_one_line(tmp_path, change, message):
    from samg.contract import read_engine_record, write_engine_record

    engine = tmp_path / "denoiser.engine"
    engine.write_bytes(b"serialized engine")
    path = write_engine_record(engine, _engine_record(engine))
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))
    with pytest.raises(SamgError, match=message) as info:
        read_engine_record(engine)
    assert "\n" not in str(info.value) and "samg build" in str(info.value)
    path.unlink()
    with pytest.raises(SamgError, match=r"has no build record denoiser\.engine\.json beside it"):
        read_engine_record(engine)
