"""`samg build` on a small export folder around the standalone GuidanceCombine model.

Builds run ahead of time with TensorRT-RTX on the CPU (well under a second each for this model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from samg.build.loader import available_flavours
from samg.errors import SamgError

pytestmark = pytest.mark.tensorrt
if not available_flavours():
    pytest.skip("TensorRT / TensorRT-RTX is not importable (pip install tensorrt-rtx-cu13)", allow_module_level=True)

from samg.build.engine import BuildOptions, build_export  # noqa: E402
from samg.build.profiles import ShapeRequest  # noqa: E402
from samg.runners.tensorrt import TensorRTRunner  # noqa: E402
from samg.build.engine import parse_network, plugin_layer_count  # noqa: E402
from samg.build.loader import flavour_of, link_library, load_trt, make_logger  # noqa: E402
from samg.contract import verify_engine  # noqa: E402
from trt_export_helpers import write_export  # noqa: E402


@pytest.fixture(scope="module")
def trt():
    return load_trt()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The standalone export built once with each combine path (engine folders kept apart)."""
    root = tmp_path_factory.mktemp("trt_built")
    export = write_export(root / "export")
    results = {}
    for combine in ("function", "plugin"):
        options = BuildOptions(
            combine=combine, out_dir=root / f"engines-{combine}", cache_dir=root / "cache", quiet=True
        )
        results[combine] = build_export(export, options)[0]
    return root, export, results


def test_both_combine_paths_build_with_a_record(built):
    root, export, results = built
    for combine, result in results.items():
        assert result.status == "built"
        assert result.engine_path.is_file() and result.engine_path.stat().st_size == result.record.engine_bytes
        record = json.loads(result.engine_path.with_name("denoiser.engine.json").read_text())
        assert record["combine"] == combine
        assert record["plugins"] == (["samg::GuidanceCombine"] if combine == "plugin" else [])
        assert record["trt"]["flavour"] in ("tensorrt", "tensorrt-rtx")
        assert record["compute_capability"] == ("any" if record["trt"]["flavour"] == "tensorrt-rtx" else record["compute_capability"])
        assert record["inputs"] == ["pred_uncond", "pred_cond", "scales"] and record["outputs"] == ["guided"]
        assert record["profiles"]["pred_uncond"]["opt"] == [1, 4, 8, 8]
    assert results["function"].record.key != results["plugin"].record.key
    # standard TensorRT keeps a timing cache beside the engine cache (TensorRT-RTX times nothing)
    timing = list((root / "cache").glob("timing-*.cache"))
    assert bool(timing) == (results["function"].record.trt_flavour == "tensorrt")


def test_plugin_path_network_has_exactly_one_plugin_layer(built, trt):
    _, export, _ = built
    for combine, expected in (("plugin", 1), ("function", 0)):
        logger = make_logger(trt)
        builder = trt.Builder(logger)
        network, _parser = parse_network(trt, builder, logger, export / "denoiser.onnx", combine)
        assert plugin_layer_count(trt, network) == expected
    # the stripped copy is temporary and the original keeps its function body
    assert sorted(p.name for p in export.iterdir()) == [".samg-verified.json", "denoiser.onnx", "samg.json"]
    import onnx

    assert len(onnx.load(str(export / "denoiser.onnx")).functions) == 1


def test_cache_hits_on_rebuild_and_misses_when_onnx_or_flags_change(tmp_path):
    export = write_export(tmp_path / "export")
    cache = tmp_path / "cache"

    def build(**changes):
        options = BuildOptions(cache_dir=cache, quiet=True, **changes)
        return build_export(export, options)[0]

    first = build()
    assert first.status == "built"
    assert build().status == "up-to-date"
    (export / "engines" / "denoiser.engine").unlink()
    again = build()
    assert again.status == "from-cache" and again.record.key == first.record.key
    assert build(shapes=ShapeRequest(dynamic=True)).status == "built"  # a flag changed
    write_export(export, tau=0.5)  # the ONNX content changed
    changed = build()
    assert changed.status == "built" and changed.record.onnx_sha256 != first.record.onnx_sha256
    assert build(use_cache=False).status == "built"


def test_cli_second_build_is_a_cache_hit_and_says_so(tmp_path):
    export = write_export(tmp_path / "export")
    env = {**os.environ, "SAMG_CACHE_DIR": str(tmp_path / "samg-cache")}
    command = [sys.executable, "-m", "samg", "build", str(export), "--combine", "plugin"]
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "denoiser: built" in first.stderr
    second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "cache hit" in second.stderr and "0 built, 1 cache hit" in second.stderr


def test_precision_must_match_the_export_dtype(tmp_path):
    export = write_export(tmp_path / "export")
    with pytest.raises(SamgError, match=r"samg export --dtype float16"):
        build_export(export, BuildOptions(precision="fp16", quiet=True))


def test_plugin_builds_float16_and_bfloat16(tmp_path):
    # The plugin launches guidance_combine.cu's kernels, which have float, half and bfloat16 versions.
    for dtype, precision in (("float16", "fp16"), ("bfloat16", "bf16")):
        export = write_export(tmp_path / dtype, dtype=dtype)
        result = build_export(export, BuildOptions(combine="plugin", cache_dir=tmp_path / "c", quiet=True))[0]
        assert result.status == "built" and result.record.precision == precision
        assert result.record.plugins == ("samg::GuidanceCombine",)


def test_parse_failure_passes_the_parser_messages_through(tmp_path, trt):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="nowhere")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("nowhere", 1)])
    model.ir_version = 10
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    logger = make_logger(trt)
    with pytest.raises(SamgError, match=r"(?s)could not parse bad\.onnx:.*\[parser\] node .*\(Frobnicate\): .*[Pp]lugin not found"):
        parse_network(trt, trt.Builder(logger), logger, path, "function")


def corrupt_copy(built, tmp_path, name="denoiser.engine") -> Path:
    _, _, results = built
    source = results["function"].engine_path
    engine = tmp_path / name
    engine.write_bytes(source.read_bytes())
    engine.with_name(name + ".json").write_text(source.with_name(source.name + ".json").read_text())
    return engine


def verify_installed(engine, trt):
    """The checks the TensorRT runner makes against the installed TensorRT."""
    return verify_engine(engine, trt_flavour=flavour_of(trt), trt_version=trt.__version__)


def test_broken_or_mismatched_engine_files_are_refused(built, tmp_path, trt):
    engine = corrupt_copy(built, tmp_path)
    assert verify_installed(engine, trt).combine == "function"
    record_path = engine.with_name("denoiser.engine.json")

    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    with pytest.raises(SamgError, match="corrupt"):
        verify_installed(engine, trt)

    engine.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(SamgError, match="truncated"):
        verify_installed(engine, trt)

    engine = corrupt_copy(built, tmp_path)
    record = json.loads(record_path.read_text())
    record["trt"] = {"flavour": record["trt"]["flavour"], "version": "0.0.1"}  # no such release
    record_path.write_text(json.dumps(record))
    with pytest.raises(SamgError, match=r"was built with .* 0\.0\.1 .*rebuild"):
        verify_installed(engine, trt)

    record_path.write_text("{not json")
    with pytest.raises(SamgError, match="not valid JSON"):
        verify_engine(engine)
    record_path.unlink()
    with pytest.raises(SamgError, match="no build record"):
        verify_engine(engine)
    with pytest.raises(SamgError, match="does not exist"):
        verify_engine(tmp_path / "missing.engine")


def test_runner_refuses_cpu_and_broken_engines_before_touching_the_gpu(built, tmp_path):
    engine = corrupt_copy(built, tmp_path)
    with pytest.raises(SamgError, match="GPU only"):
        TensorRTRunner(engine, device="cpu")
    engine.write_bytes(b"not an engine")
    with pytest.raises(SamgError, match="truncated or replaced"):
        TensorRTRunner(engine, device="cuda")
    with pytest.raises(SamgError, match="run `samg build"):
        TensorRTRunner(tmp_path / "denoiser.onnx", device="cuda")


def test_library_link_next_to_the_library_or_in_the_cache(tmp_path, monkeypatch):
    lib = tmp_path / "libs"
    lib.mkdir()
    (lib / "libx.so.1").write_bytes(b"\x7fELF")
    fallback = tmp_path / "cache" / "lib"
    assert link_library(lib, "libx.so.1", "libx.so", fallback, "") == ("ok", lib)
    assert os.readlink(lib / "libx.so") == "libx.so.1"  # relative: survives moving the folder

    # A read-only library folder: the link goes to the cache folder, which must be on the path.
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    (readonly / "libx.so.1").write_bytes(b"\x7fELF")
    real_symlink = os.symlink

    def refuse_in_readonly(target, link, *args, **kwargs):
        if Path(link).parent == readonly:
            raise PermissionError(13, "Permission denied", str(link))
        return real_symlink(target, link, *args, **kwargs)

    monkeypatch.setattr(os, "symlink", refuse_in_readonly)
    assert link_library(readonly, "libx.so.1", "libx.so", fallback, "") == ("needs-env", fallback)
    assert os.readlink(fallback / "libx.so") == str(readonly / "libx.so.1")
    assert link_library(readonly, "libx.so.1", "libx.so", fallback, f"/nope:{fallback}") == ("ok", fallback)
