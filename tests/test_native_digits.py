"""The C++ runtime (samg-run) against the Python runtime on the bundled real model, samg-digits.

Same inputs end to end: the conditioning comes from `samg encode` (Python text encoder, written as
.npy), both sides start from the same seeded standard normal noise, and the Python side runs the
public `Pipeline.__call__(..., latents=noise, output="latents")`. Final latents agree to
LATENT_RTOL of their largest magnitude (measured: ~1e-6; the two differ only in float rounding
order), and the decoded PNGs to within PIXEL_TOLERANCE levels of 255.
"""

from __future__ import annotations

import argparse
import json
import subprocess

import numpy as np
import pytest


pytestmark = pytest.mark.native

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
pytest.importorskip("diffusers")

PROMPT, NEGATIVE = "a handwritten 7", ""
STEPS = 8
BATCH = 2
LATENT_RTOL = 1e-4  # of max |latent|
PIXEL_TOLERANCE = 1  # levels of 255: rounding at a .5 boundary may differ
SCALES = {"samg": (2.0, 5.0), "cfg": (4.0, 4.0)}
TIMEOUT_S = 120  # per samg-run call: the old runtime ran `--steps 1e9` for hours; a timeout fails such a case


@pytest.fixture(scope="module")
def pipeline(digits_export):
    from samg.runtime.pipeline import Pipeline

    return Pipeline.load(digits_export)


@pytest.fixture(scope="module")
def inputs(digits_export, pipeline, tmp_path_factory):
    from samg.runtime import encode_cli

    folder = tmp_path_factory.mktemp("native-digits-inputs")
    encode_cli.run(argparse.Namespace(export_dir=str(digits_export), prompt=PROMPT, negative_prompt=NEGATIVE,
                                      backend="onnxruntime", out=str(folder)))
    shape = pipeline.latent_shape(BATCH, 16, 16, None)
    noise = np.random.default_rng(7).standard_normal(shape, dtype=np.float32)
    np.save(folder / "noise.npy", noise)
    return folder, noise


def _cpp(samg_run, export_dir, folder, out_dir, rule, sampler):
    w_min, w_max = SCALES[rule]
    result = subprocess.run(
        [samg_run, str(export_dir), "--cond", str(folder), "--noise", str(folder / "noise.npy"), "--steps", str(STEPS),
         "--sampler", sampler, "--guidance", rule, "--w-min", str(w_min), "--w-max", str(w_max), "--timing",
         "--out-latents", str(out_dir / "latents.npy"), "--out-image", str(out_dir / "image.png")],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return np.load(out_dir / "latents.npy"), json.loads(result.stdout)


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize("rule", ["samg", "cfg"])
def test_cpp_matches_python_on_samg_digits(samg_run, digits_export, pipeline, inputs, tmp_path, rule, sampler):
    from PIL import Image

    folder, noise = inputs
    w_min, w_max = SCALES[rule]
    expected = pipeline(PROMPT, NEGATIVE, guidance=rule, w_min=w_min, w_max=w_max, steps=STEPS, sampler=sampler,
                        num_images=BATCH, latents=noise, output="latents")
    actual, timing = _cpp(samg_run, digits_export, folder, tmp_path, rule, sampler)

    assert actual.shape == expected.shape == (BATCH, 4, 8, 8)
    scale = float(np.abs(expected).max())
    assert scale > 0.1  # a real sample, not a collapsed one
    np.testing.assert_allclose(actual, expected, rtol=0, atol=LATENT_RTOL * scale)
    # The tolerance tells guidance settings apart: another scale lands far outside it.
    other = pipeline(PROMPT, NEGATIVE, guidance=rule, w_min=w_min + 1, w_max=w_max + 1, steps=STEPS, sampler=sampler,
                     num_images=BATCH, latents=noise, output="latents")
    assert np.abs(actual - other).max() > 100 * LATENT_RTOL * scale

    expected_images = pipeline.decode(expected)
    for n in range(BATCH):
        with Image.open(tmp_path / f"image-{n}.png") as png:
            assert png.size == (16, 16) and png.mode == "RGB"
            pixels = np.asarray(png).astype(np.int16)
        assert np.abs(pixels - expected_images[n].astype(np.int16)).max() <= PIXEL_TOLERANCE
        assert pixels.std() > 10  # a digit on a background, not a flat image

    (run,) = timing["runs"]
    assert run["denoiser_calls"] == STEPS and 0 < run["denoiser_run_s"] <= run["loop_s"]



# -- same seed, same sample; the embedding example ------------------------------------------------

@pytest.mark.parametrize("args,scales", [
    (["--w-min", "2", "--w-max", "5"], {"w_min": 2.0, "w_max": 5.0}),
    # --scale W as `samg generate`: SAMG spans ((1 + W) / 2, W) for W >= 1, and below 1 there is no
    # guidance above 1 to halve, so w_min = w_max = W (hand-derived values, not samg's resolver)
    (["--scale", "6"], {"w_min": 3.5, "w_max": 6.0}),
    (["--scale", "0.5"], {"w_min": 0.5, "w_max": 0.5}),
])
def test_samg_run_seed_draws_the_same_noise_as_samg_generate(samg_run, digits_export, pipeline, inputs, tmp_path,
                                                             args, scales):
    folder, _ = inputs
    out = tmp_path / "latents.npy"
    result = subprocess.run([samg_run, str(digits_export), "--cond", str(folder), "--seed", "11", "--num-images", "2",
                             "--steps", str(STEPS), *args, "--out-latents", str(out)],
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    expected = pipeline(PROMPT, NEGATIVE, guidance="samg", steps=STEPS, sampler="euler", num_images=2, seed=11,
                        output="latents", **scales)
    actual = np.load(out)
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=0, atol=LATENT_RTOL * scale)
    other_seed = pipeline(PROMPT, NEGATIVE, guidance="samg", steps=STEPS, sampler="euler", num_images=2, seed=12,
                          output="latents", **scales)
    assert np.abs(actual - other_seed).max() > 100 * LATENT_RTOL * scale
    if "--scale" in args:  # and `samg generate --scale W` (Python's resolve_scales) lands on the same sample
        generate = pipeline(PROMPT, NEGATIVE, guidance="samg", steps=STEPS, sampler="euler", num_images=2, seed=11,
                            output="latents", scale=float(args[1]))
        np.testing.assert_allclose(actual, generate, rtol=0, atol=LATENT_RTOL * scale)


def test_embedding_example_samples_from_a_seed(samg_run, digits_export, pipeline, inputs, tmp_path):
    from pathlib import Path

    folder, _ = inputs
    out = tmp_path / "latents.npy"
    example = Path(samg_run).parent / "samg-embed-example"
    result = subprocess.run([str(example), str(digits_export), str(folder), "5", str(out)], capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    # what the example documents: one 20-step Euler SAMG (2..5) sample at the export's size
    expected = pipeline(PROMPT, NEGATIVE, guidance="samg", w_min=2.0, w_max=5.0, steps=20, sampler="euler",
                        num_images=1, seed=5, output="latents")
    actual = np.load(out)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=LATENT_RTOL * float(np.abs(expected).max()))


# -- bad input: one line, exit 2, nothing written, never a crash -----------------------------------

def _run(samg_run, export_dir, folder, *args):
    return subprocess.run([samg_run, str(export_dir), "--cond", str(folder), *args], capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def _one_line_error(result, code=2):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, (result.returncode, result.stderr)  # a signal would be negative
    assert len(lines) == 1 and lines[0].startswith("samg-run: "), result.stderr
    return lines[0]


def _broken_export(digits_export, tmp_path, mutate=None, text=None):
    """A copy of the export (model files hard-linked) whose samg.json has one field broken."""
    import os
    import shutil

    folder = tmp_path / "broken"
    folder.mkdir()
    for path in digits_export.glob("*.onnx*"):
        try:
            os.link(path, folder / path.name)
        except OSError:
            shutil.copy(path, folder / path.name)
    if text is None:
        manifest = json.loads((digits_export / "samg.json").read_text())
        mutate(manifest)
        text = json.dumps(manifest)  # NaN/Infinity as Python writes them
    (folder / "samg.json").write_text(text)
    return folder


def _set(*path_and_value):
    *path, value = path_and_value

    def mutate(manifest):
        node = manifest
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


def _delete(key):
    return lambda manifest: manifest.pop(key)


def _zero_snr(manifest):  # CogVideoX's shifted zero-terminal-SNR schedule on an epsilon model
    manifest["scheduler"].update(snr_shift_scale=3.0, rescale_betas_zero_snr=True, timestep_spacing="trailing")


BAD_MANIFESTS = [
    # (case, mutate or raw text, words the one line must hold)
    ("invalid-json", '{"format": "samg-export", ', "not valid JSON"),
    ("a-list", "[1, 2, 3]", "must be a JSON object"),
    ("missing-latent", _delete("latent"), "latent is missing"),
    ("missing-scheduler", _delete("scheduler"), "scheduler is missing"),
    ("latent-a-list", _set("latent", [4, 8]), "latent must be an object"),
    ("channels-a-string", _set("latent", "channels", "4"), "latent.channels must be"),
    ("spatial-factor-0", _set("latent", "spatial_factor", 0), "latent.spatial_factor must be"),
    ("nan-beta", _set("scheduler", "beta_start", float("nan")), "scheduler.beta_start must be a finite number"),
    ("infinite-beta", _set("scheduler", "beta_end", float("inf")), "scheduler.beta_end must be a finite number"),
    ("train-timesteps-0", _set("scheduler", "num_train_timesteps", 0), "scheduler.num_train_timesteps must be"),
    ("huge-height", _set("latent", "height", 10**12), "latent.height must be"),
    ("unknown-prediction", _set("prediction_type", "sample"), "prediction_type must be one of"),
    ("unknown-spacing", _set("scheduler", "timestep_spacing", "random"), "scheduler.timestep_spacing must be one of"),
    ("smooth-5", _set("combine", "smooth", 5), "combine.smooth must be"),
    ("parent-path", _set("denoiser", "file", "../samg-digits/denoiser.onnx"), "denoiser.file must stay inside"),
    ("absolute-path", _set("vae", "file", "/etc/passwd"), "vae.file must be a path relative"),
    ("missing-file", _set("vae", "file", "nothing.onnx"), "vae.file names nothing.onnx"),
    ("conditioning-path", _set("text_encoder", "outputs", ["../../etc/x"]), "text_encoder.outputs must hold plain"),
    ("raw-but-fused-graph", _set("guidance", "raw"), "a raw export's denoiser has"),
    ("wrong-channels", _set("latent", "channels", 3), "latent.channels is 3 but the denoiser"),
    ("zero-scaling", _set("vae", "scaling_factor", 0), "vae.scaling_factor must be"),
    ("snr-shift-0", _set("scheduler", "snr_shift_scale", 0), "scheduler.snr_shift_scale must be a finite number in (0"),
    ("zero-snr-epsilon", _zero_snr, "starts at zero SNR (infinite sigma), where a epsilon model cannot predict x0"),
    ("no-files", _delete("files"), "samg.json: files is missing"),
    ("bad-hash", _set("files", "denoiser.onnx", "md5:0"), "files.denoiser.onnx must be \"sha256:\""),
]


@pytest.mark.parametrize("case,broken,words", BAD_MANIFESTS, ids=[c[0] for c in BAD_MANIFESTS])
def test_a_broken_manifest_is_one_line_exit_2(samg_run, digits_export, inputs, tmp_path, case, broken, words):
    folder, _ = inputs
    export = _broken_export(digits_export, tmp_path, **({"text": broken} if isinstance(broken, str) else {"mutate": broken}))
    out = tmp_path / "latents.npy"
    result = _run(samg_run, export, folder, "--noise", str(folder / "noise.npy"), "--steps", "2",
                  "--out-latents", str(out))
    line = _one_line_error(result)
    assert words in line
    assert not out.exists()


BAD_ARGUMENTS = [
    (["--scale", "nan"], "--scale must be a finite number from 0 to 100"),
    (["--scale", "-5"], "--scale must be a finite number from 0 to 100"),
    (["--scale", "1e30"], "--scale must be a finite number from 0 to 100"),
    (["--w-min", "5", "--w-max", "inf"], "--w-max must be a finite number"),
    (["--w-min", "5", "--w-max", "2"], "--w-min (5.000000) is above --w-max (2.000000): swap them"),
    (["--steps", "0"], "--steps must be a whole number from 1"),
    (["--steps", "1e9"], "--steps must be a whole number from 1"),
    (["--steps", "1001"], "steps must be from 1 to the model's num_train_timesteps (1000), got 1001"),
    (["--seed", "-1"], "--seed must be a whole number from 0"),
    (["--seed", "1", "--num-images", "100000"], "--num-images must be a whole number from 1 to 64"),
    (["--seed", "1", "--height", "18"], "height and width must be positive multiples of 4"),
    (["--seed", "1", "--noise", "x.npy"], "pass --seed N (samg's generator) or --noise noise.npy, one of them"),
]


@pytest.mark.parametrize("args,words", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_one_line_exit_2(samg_run, digits_export, inputs, tmp_path, args, words):
    folder, _ = inputs
    source = [] if "--seed" in args else ["--noise", str(folder / "noise.npy")]
    out = tmp_path / "latents.npy"
    result = _run(samg_run, digits_export, folder, *source, *args, "--out-latents", str(out))
    assert words in _one_line_error(result)
    assert not out.exists()


def test_output_locations_are_checked_before_the_work(samg_run, digits_export, inputs, tmp_path):
    folder, _ = inputs
    target = tmp_path / "out.png"
    target.mkdir()  # --out-image names a folder: refused up front, nothing left beside it
    result = _run(samg_run, digits_export, folder, "--seed", "1", "--out-image", str(target))
    assert "--out-image" in _one_line_error(result) and "is a folder" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"] and not any(target.iterdir())
    result = _run(samg_run, digits_export, folder, "--seed", "1", "--out-latents", str(tmp_path / "no" / "x.npy"))
    assert "does not exist" in _one_line_error(result)


def _write_npy_header(path, shape, data_bytes):
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * ((64 - (10 + len(header) + 1) % 64) % 64) + b"\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * data_bytes)


def test_noise_files_are_bounded_before_allocating(samg_run, digits_export, inputs, tmp_path):
    folder, noise = inputs
    huge = tmp_path / "huge.npy"
    _write_npy_header(huge, (100000, 100000, 100), 64)  # declares 4 TB, holds 64 bytes
    result = _run(samg_run, digits_export, folder, "--noise", str(huge), "--out-latents", str(tmp_path / "x.npy"))
    assert "huge.npy declares shape [100000, 100000, 100]" in _one_line_error(result)
    short = tmp_path / "short.npy"
    _write_npy_header(short, (2, 4, 8, 8), 100)
    result = _run(samg_run, digits_export, folder, "--noise", str(short), "--out-latents", str(tmp_path / "x.npy"))
    assert "the file is damaged" in _one_line_error(result)
    bad = tmp_path / "nan.npy"
    np.save(bad, np.where(np.arange(noise.size).reshape(noise.shape) == 5, np.nan, noise).astype(np.float32))
    result = _run(samg_run, digits_export, folder, "--noise", str(bad), "--out-latents", str(tmp_path / "x.npy"))
    assert "the noise holds non-finite values" in _one_line_error(result)


@pytest.mark.parametrize("factor,words", [(1e30, "beyond any prediction"), (float("nan"), "non-finite values")])
def test_runaway_model_outputs_stop_the_loop(samg_run, digits_export, inputs, tmp_path, factor, words):
    """A denoiser whose output is latents x 1e30 (finite) or x NaN: an error, never a flat image with exit 0."""
    import onnx
    from onnx import TensorProto, helper

    folder, _ = inputs
    export = _broken_export(digits_export, tmp_path, mutate=lambda m: None)
    inputs_ = [helper.make_tensor_value_info("latents", TensorProto.FLOAT, ["B", 4, "H", "W"]),
               helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["B"]),
               helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, ["B2", 8, 64]),
               helper.make_tensor_value_info("guidance_scales", TensorProto.FLOAT, ["B", 2])]
    graph = helper.make_graph(
        [helper.make_node("Mul", ["latents", "factor"], ["guided"])], "runaway", inputs_,
        [helper.make_tensor_value_info("guided", TensorProto.FLOAT, ["B", 4, "H", "W"])],
        initializer=[helper.make_tensor("factor", TensorProto.FLOAT, [], [factor])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    (export / "denoiser.onnx").unlink()  # a hard link: replace, do not write through
    onnx.save(model, str(export / "denoiser.onnx"))
    _rehash(export, "denoiser.onnx")  # a model broken on purpose, not a corrupted file
    image = tmp_path / "flat.png"
    result = _run(samg_run, export, folder, "--seed", "1", "--steps", "4", "--out-image", str(image))
    assert words in _one_line_error(result, code=1)
    assert not image.exists() and not list(tmp_path.glob("*.tmp*"))


# -- what is loaded is what was exported (samg.json `files`, the verified-stamp) --------------------

def _rehash(export, name):
    import hashlib

    manifest = json.loads((export / "samg.json").read_text())
    manifest["files"][name] = "sha256:" + hashlib.sha256((export / name).read_bytes()).hexdigest()
    (export / "samg.json").write_text(json.dumps(manifest))


def _copied_export(digits_export, tmp_path):
    """A copy of the export with its verified-stamp, model files copied with their mtimes."""
    import shutil

    folder = tmp_path / "copy"
    folder.mkdir()
    for path in [*digits_export.glob("*.onnx*"), digits_export / "samg.json", digits_export / ".samg-verified.json"]:
        if path.exists():
            shutil.copy2(path, folder / path.name)
    return folder


def _flip_a_byte(path, keep_mtime=False):
    import os

    before = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the weights: the graph still loads, only the hash tells
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    else:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))  # touched
    assert path.stat().st_size == before.st_size


@pytest.mark.parametrize("name", ["denoiser.onnx", "vae_decoder.onnx"])
def test_a_changed_model_file_is_refused(samg_run, digits_export, inputs, tmp_path, name):
    """One byte changed, size kept, mtime touched: the stamp no longer vouches for it, its sha256
    differs from samg.json's, and samg-run refuses it in one line naming the file."""
    folder, _ = inputs
    export = _copied_export(digits_export, tmp_path)
    out = tmp_path / "latents.npy"
    args = ("--noise", str(folder / "noise.npy"), "--steps", "2", "--out-latents", str(out))
    assert _run(samg_run, export, folder, *args).returncode == 0  # the intact copy runs
    out.unlink()
    _flip_a_byte(export / name)
    line = _one_line_error(_run(samg_run, export, folder, *args))
    assert f"{export / name} does not match its sha256 in samg.json" in line and "re-export" in line
    assert not out.exists()


def test_the_verified_stamp_spares_rehashing(samg_run, digits_export, inputs, tmp_path):
    """The stamp the Python side wrote is read: a file whose size and mtime_ns still match its entry is
    not hashed again (so a change that restores the mtime goes unseen, as in samg/contract.py); without
    the stamp the same file is hashed and refused."""
    folder, _ = inputs
    export = _copied_export(digits_export, tmp_path)
    stamp = json.loads((export / ".samg-verified.json").read_text())
    assert stamp["format"] == "samg-verified" and "denoiser.onnx" in stamp["files"]
    _flip_a_byte(export / "denoiser.onnx", keep_mtime=True)
    args = ("--noise", str(folder / "noise.npy"), "--steps", "2", "--out-latents", str(tmp_path / "x.npy"))
    assert _run(samg_run, export, folder, *args).returncode == 0
    (export / ".samg-verified.json").unlink()
    assert "denoiser.onnx does not match its sha256" in _one_line_error(_run(samg_run, export, folder, *args))


def test_unlisted_loaded_files_are_refused(samg_run, digits_export, inputs, tmp_path):
    folder, _ = inputs
    args = ("--noise", str(folder / "noise.npy"), "--steps", "2", "--out-latents", str(tmp_path / "x.npy"))
    export = _copied_export(digits_export, tmp_path)
    manifest = json.loads((export / "samg.json").read_text())
    del manifest["files"]["vae_decoder.onnx"]
    (export / "samg.json").write_text(json.dumps(manifest))
    assert "samg.json lists no hash for vae_decoder.onnx" in _one_line_error(_run(samg_run, export, folder, *args))
    # external weights ONNX Runtime would read beside the graph must be listed too
    del manifest["files"]["denoiser.onnx"]
    manifest["files"]["vae_decoder.onnx"] = json.loads((digits_export / "samg.json").read_text())["files"]["vae_decoder.onnx"]
    (export / "samg.json").write_text(json.dumps(manifest))
    _rehash(export, "denoiser.onnx")
    (export / "denoiser.onnx.data").write_bytes(b"weights from elsewhere")
    assert "samg.json lists no hash for denoiser.onnx.data" in _one_line_error(_run(samg_run, export, folder, *args))
