"""Bad input to `samg export` gives a one-line SamgError (exit 2 from the CLI) and leaves no folder."""

import json

import pytest

from samg.cli import main
from samg.errors import SamgError

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from samg.export.exporter import ExportOptions, export


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: threads only add contention on the shared CPU."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _nothing_left(parent, name):
    return not any(p.name == name or p.name.startswith(f".{name}.") for p in parent.iterdir())


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(model="sd16", tiny=True), "unknown model 'sd16': choose one of sd15, sd21"),
        (dict(model="sd15", tiny=True, height=72), "--height 72 is not a multiple of 16"),
        (dict(model="sd15", tiny=True, width=-64), "--width must be a positive integer"),
        (dict(model="sd15", tiny=True, frames=8), "--frames is for video models"),
        (dict(model="cogvideox", tiny=True, frames=8), "--frames 8 must be 1 \\+ a multiple of 4"),
        (dict(model="sd15", tiny=True, guidance="both"), "--guidance must be fused, raw"),
        (dict(model="sd15", tiny=True, smooth=2), "smooth must be 0"),
        (dict(model="sd15", tiny=True, opset=11), "--opset must be between 17 and 21"),
        (dict(model="sd15", tiny=True, model_path="x"), "--tiny and --model-path exclude each other"),
        (dict(model="sd15", model_path="/nonexistent/model"), "model folder /nonexistent/model does not exist"),
        (dict(model="sd15"), "cannot load stable-diffusion-v1-5/stable-diffusion-v1-5 from the Hugging Face hub.*--model-path DIR.*--tiny"),
        (dict(model="sd35-medium", tiny=True, height=512), "at most 256"),
    ],
)
def test_bad_options_raise_and_leave_nothing(tmp_path, options, message):
    with pytest.raises(SamgError, match=message):
        export(ExportOptions(out=str(tmp_path / "out"), quiet=True, **options))
    assert _nothing_left(tmp_path, "out")


def test_folder_without_model_index(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "unet").mkdir()
    with pytest.raises(SamgError, match="not a diffusers pipeline folder"):
        export(ExportOptions(model="sd15", model_path=str(tmp_path / "model"), out=str(tmp_path / "out"), quiet=True))
    assert _nothing_left(tmp_path, "out")


def test_corrupt_model_folder(tmp_path, tiny_export):
    """A copy of a real tiny pipeline with its UNet weights truncated: a clear error, no traceback."""
    import shutil

    source = tiny_export("sd15") / "source"
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SamgError, match=f"cannot load a StableDiffusionPipeline from {broken}"):
        export(ExportOptions(model="sd15", model_path=str(broken), out=str(tmp_path / "out"), quiet=True))
    assert _nothing_left(tmp_path, "out")
    # A pipeline folder of another family (no tokenizer_2/text_encoder_2) is refused for sdxl.
    with pytest.raises(SamgError):
        export(ExportOptions(model="sdxl", model_path=str(source), out=str(tmp_path / "out2"), quiet=True))
    assert _nothing_left(tmp_path, "out2")


def test_model_path_export_records_source(tmp_path, tiny_export):
    """Loading from a local folder (the real from_pretrained path), at a non-default size."""
    source = tiny_export("sd15") / "source"
    out = export(ExportOptions(model="sd15", model_path=str(source), out=str(tmp_path / "out"), quiet=True,
                               height=96, width=64, validate=False))
    m = json.loads((out / "samg.json").read_text())
    assert m["source"] == {"kind": "path", "path": str(source.resolve()), "hub_id": get_hub("sd15")}
    assert (m["latent"]["height"], m["latent"]["width"], m["latent"]["latent_height"]) == (96, 64, 12)
    assert not (out / "source").exists() and m["validation"] == {}


def get_hub(name):
    from samg.models.specs import get_spec

    return get_spec(name).hub_id


def test_cli_exit_code_and_one_line(tmp_path, capsys):
    code = main(["export", "--model", "nope", "--tiny", "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "unknown model 'nope'" in err


def test_cli_help_lists_options(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model-path", "--tiny", "--guidance", "--opset", "--dtype", "--frames", "--no-validate", "--force"):
        assert flag in out


def test_unreadable_model_index(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{broken")
    with pytest.raises(SamgError, match=r"model_index\.json is not a readable JSON object"):
        export(ExportOptions(model="sd15", model_path=str(tmp_path / "model"), out=str(tmp_path / "out"), quiet=True))
    assert _nothing_left(tmp_path, "out")


def test_manifest_written_by_the_contract_writer(tiny_export):
    """`files` hashes exactly the graphs and tokenizers (not source/, not samg's bookkeeping)."""
    import hashlib

    folder = tiny_export("sd15")
    m = json.loads((folder / "samg.json").read_text())
    assert sorted(m["files"]) == ["denoiser.onnx", "text_encoder.onnx", "tokenizer/tokenizer.json", "vae_decoder.onnx"]
    for name, digest in m["files"].items():
        assert digest == "sha256:" + hashlib.sha256((folder / name).read_bytes()).hexdigest()


def test_the_test_session_never_downloads():
    """The hub case above must fail the same way with network access: tests/conftest.py sets
    HF_HUB_OFFLINE before huggingface_hub is imported (it reads the variable at import)."""
    import os

    import huggingface_hub.constants

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert huggingface_hub.constants.is_offline_mode()
