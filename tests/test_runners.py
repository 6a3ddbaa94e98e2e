"""The runners (samg.runners): feeds checked against the graph's declared inputs by every backend,
a null runner that needs numpy only, and a TensorRT runner that does not import the builder."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from samg.errors import SamgError
from samg.runners import InputDecl, open_runner


def _good_feeds(runner) -> dict:
    """Feeds that fit the runner's declared inputs (free dims: batch 1, 2 where the graph pairs the
    batch, 8 for sizes)."""
    feeds = {}
    for name, decl in runner.inputs.items():
        dims = [d if isinstance(d, int) else 2 if d == "2B" else 1 if axis == 0 else 8 for axis, d in enumerate(decl.dims)]
        feeds[name] = np.zeros(dims, decl.dtype)
    return feeds


def _assert_refuses_bad_feeds(runner) -> None:
    feeds = _good_feeds(runner)
    first = runner.input_names[0]
    with pytest.raises(SamgError, match=f"input '{first}' is missing") as missing:
        runner.run({k: v for k, v in feeds.items() if k != first})
    assert "\n" not in str(missing.value)  # one line
    with pytest.raises(SamgError, match="input 'surplus' is not an input of this graph"):
        runner.run({**feeds, "surplus": np.zeros(1, np.float32)})
    wrong_kind = np.int64 if runner.inputs[first].dtype.kind == "f" else np.float32
    with pytest.raises(SamgError, match=f"input '{first}' has dtype {np.dtype(wrong_kind)}, the graph takes"):
        runner.run({**feeds, first: feeds[first].astype(wrong_kind)})
    with pytest.raises(SamgError, match=f"input '{first}' has shape .* \\(rank {feeds[first].ndim + 1}\\)"):
        runner.run({**feeds, first: feeds[first][None]})


@pytest.fixture(scope="module")
def sd15(tiny_export):
    return tiny_export("sd15")


@pytest.mark.parametrize("backend", ["onnxruntime", "null", "torch"])
@pytest.mark.parametrize("graph", ["denoiser.onnx", "text_encoder.onnx", "vae_decoder.onnx"])
def test_every_runner_refuses_missing_extra_wrong_dtype_and_wrong_rank_inputs(sd15, backend, graph):
    runner = open_runner(sd15 / graph, backend=backend)
    _assert_refuses_bad_feeds(runner)
    assert set(runner.run(_good_feeds(runner))) == set(runner.output_names)  # good feeds run


def test_torch_backend_reloads_the_source_after_a_re_export(sd15, tmp_path):
    import os
    import shutil

    from samg.contract import MANIFEST
    from samg.runners.torch import _load

    folder = tmp_path / "export"
    shutil.copytree(sd15, folder)
    first = _load(folder)
    assert _load(folder) is first  # loaded once for all the folder's graphs
    manifest = folder / MANIFEST
    rewritten = folder / "rewritten.json"  # a re-export writes samg.json anew (atomically: a new file)
    rewritten.write_bytes(manifest.read_bytes())
    os.replace(rewritten, manifest)
    again = _load(folder)
    assert again is not first and again[1] is not first[1]


def test_torch_backend_names_a_hub_export_it_cannot_run(sd15, tmp_path):
    import json
    import shutil

    from samg.contract import MANIFEST
    from samg.runners.torch import _load

    folder = tmp_path / "export"
    shutil.copytree(sd15, folder, ignore=shutil.ignore_patterns("source"))
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["source"] = {"kind": "hub", "path": None, "hub_id": "someone/model"}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SamgError, match=r"needs the diffusers model folder \(the export came from the hub id "
                                        r"someone/model\): use --backend onnxruntime"):
        _load(folder)


def test_runners_declare_the_same_inputs_as_the_onnx_graph(sd15):
    for graph in ("denoiser.onnx", "text_encoder.onnx", "vae_decoder.onnx"):
        ort = open_runner(sd15 / graph)
        null = open_runner(sd15 / graph, backend="null")
        assert null.input_names == ort.input_names
        for name, decl in ort.inputs.items():
            assert len(null.inputs[name].dims) == len(decl.dims)
            assert null.inputs[name].dtype.kind == decl.dtype.kind


def test_fixed_dims_are_checked_and_float_feeds_cast_within_their_kind(sd15):
    runner = open_runner(sd15 / "text_encoder.onnx")
    decl = runner.inputs["input_ids"]
    fixed = next(axis for axis, d in enumerate(decl.dims) if isinstance(d, int))
    feeds = _good_feeds(runner)
    wrong = list(feeds["input_ids"].shape)
    wrong[fixed] += 1
    with pytest.raises(SamgError, match=f"fixes dim {fixed} to {decl.dims[fixed]}"):
        runner.run({"input_ids": np.zeros(wrong, np.int64)})
    denoiser = open_runner(sd15 / "denoiser.onnx")
    feeds = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in _good_feeds(denoiser).items()}
    assert all(v.dtype == np.float32 for v in denoiser.checked_feeds(feeds).values() if v.dtype.kind == "f")


def test_tensorrt_runner_checks_feeds_before_touching_the_gpu(tmp_path):
    from samg.runners.tensorrt import TensorRTRunner

    runner = TensorRTRunner.__new__(TensorRTRunner)  # no engine or GPU here: the declared inputs alone
    runner.path = tmp_path / "denoiser.engine"
    runner.inputs = {"latents": InputDecl(np.dtype(np.float16), (None, 4, None, None))}
    runner.output_names = ["guided"]
    _assert_refuses_bad_feeds(runner)
    with pytest.raises(SamgError, match="has dtype int64"):
        runner.run_device({"latents": np.zeros((1, 4, 8, 8), np.int64)})


def test_importing_the_tensorrt_runner_imports_neither_the_builder_nor_tensorrt():
    code = textwrap.dedent(
        """
        import sys
        import samg.runners.tensorrt
        loaded = sorted(m for m in sys.modules
                        if m in ("samg.build.engine", "samg.build.profiles", "samg.build.cli", "onnx",
                                 "tensorrt", "tensorrt_rtx", "polygraphy"))
        print(loaded)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_null_backend_generates_with_numpy_only(sd15):
    # onnxruntime and torch are made unimportable; a full generation over the null runner still runs
    code = textwrap.dedent(
        f"""
        import sys
        for blocked in ("onnxruntime", "torch"):
            sys.modules[blocked] = None
        from samg.runtime.pipeline import Pipeline
        pipe = Pipeline.load({str(sd15)!r}, backend="null")
        images = pipe("a red square", steps=2, seed=3)
        print(images.shape, images.dtype)
        assert "onnxruntime" not in [m for m in sys.modules if sys.modules[m] is not None]
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "(1, 64, 64, 3) uint8"


def test_null_runner_outside_an_export_folder_says_so(tmp_path):
    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"")
    with pytest.raises(SamgError, match="has no samg.json: this backend runs the graphs of an export folder only"):
        open_runner(graph, backend="null")
