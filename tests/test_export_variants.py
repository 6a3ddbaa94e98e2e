"""Export variants: float16, weights in external data, and a digits-style model (word-level
PreTrainedTokenizerFast, short token length, small native size) loaded from a local folder."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")

from samg.export import exporter
from samg.export.exporter import ExportOptions, export
from samg.models.specs import get_spec


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: threads only add contention on the shared CPU."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _input_types(path):
    model = onnx.load(str(path), load_external_data=False)
    elem = {i.name: i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.output]}
    return {k: onnx.helper.tensor_dtype_to_np_dtype(v).name for k, v in elem.items()}


def test_float16_export(tiny_export):
    folder = tiny_export("sd15", dtype="float16")
    m = json.loads((folder / "samg.json").read_text())
    assert m["dtype"] == "float16" and m["validation"]["denoiser"]["tolerance"] == exporter.TOLERANCE["float16"]
    types = _input_types(folder / "denoiser.onnx")
    assert types == {"latents": "float16", "timestep": "float32", "encoder_hidden_states": "float16",
                     "guidance_scales": "float32", "guided": "float16"}
    assert _input_types(folder / "text_encoder.onnx")["encoder_hidden_states"] == "float16"
    assert _input_types(folder / "vae_decoder.onnx") == {"latents": "float16", "images": "float16"}
    assert m["denoiser"]["inputs"]["latents"]["dtype"] == "float16"
    model = onnx.load(str(folder / "denoiser.onnx"))
    assert [n.op_type for n in model.graph.node if n.domain == "samg"] == ["GuidanceCombine"]


def test_large_weights_go_to_one_external_data_file(tmp_path, monkeypatch):
    monkeypatch.setattr(exporter, "_PROTO_LIMIT", 10_000)  # pretend the tiny UNet is over 2 GB
    out = export(ExportOptions(model="sd15", tiny=True, out=str(tmp_path / "big"), quiet=True))
    m = json.loads((out / "samg.json").read_text())
    for name in ("denoiser.onnx", "text_encoder.onnx", "vae_decoder.onnx"):
        assert (out / f"{name}.data").is_file() and f"{name}.data" in m["files"]
    # One data file per graph, no stray per-weight files or scratch folders.
    top = {p.name for p in out.iterdir()}
    assert top == {"samg.json", ".samg-verified.json", "source", "tokenizer", "denoiser.onnx", "denoiser.onnx.data", "text_encoder.onnx",
                   "text_encoder.onnx.data", "vae_decoder.onnx", "vae_decoder.onnx.data"}
    assert m["validation"]["denoiser"]["max_abs_err"] <= m["validation"]["denoiser"]["tolerance"]


def _digits_like_pipeline(folder):
    """StableDiffusionPipeline with a word-level tokenizer and an 8-token text encoder (like samg-digits)."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    spec = get_spec("digits")
    pipe = spec.build_tiny(seed=5)
    words = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "digit", "zero", "one", "two", "three"]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        bos_token="[BOS]", eos_token="[EOS]", model_max_length=8)
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(5)
    config = CLIPTextConfig(vocab_size=len(words), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=8, eos_token_id=3, bos_token_id=2,
                            pad_token_id=0)
    pipe.tokenizer, pipe.text_encoder = tokenizer, CLIPTextModel(config).eval()
    pipe.register_modules(tokenizer=tokenizer, text_encoder=pipe.text_encoder)
    pipe.unet.register_to_config(sample_size=4)  # native 32 px, read from the config at export
    pipe.save_pretrained(str(folder))


def test_digits_style_model_from_path(tmp_path):
    import tokenizers

    _digits_like_pipeline(tmp_path / "digits")
    out = export(ExportOptions(model="digits", model_path=str(tmp_path / "digits"), out=str(tmp_path / "out"),
                               quiet=True))
    m = json.loads((out / "samg.json").read_text())
    assert (m["model"], m["family"], m["source"]["kind"]) == ("digits", "sd15", "path")
    assert (m["latent"]["height"], m["latent"]["width"], m["latent"]["latent_height"]) == (32, 32, 4)
    (entry,) = m["text_encoder"]["tokenizers"]
    assert (entry["max_length"], entry["pad_id"]) == (8, 0)
    tok = tokenizers.Tokenizer.from_file(str(out / entry["file"]))
    assert tok.encode("digit three").ids == [2, 4, 8, 3, 0, 0, 0, 0]
    assert m["text_encoder"]["output_shapes"]["encoder_hidden_states"]["shape"] == ["N", 8, 32]
    assert m["denoiser"]["inputs"]["encoder_hidden_states"]["shape"] == ["2B", 8, 32]
    sess = ort.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    (ehs,) = sess.run(None, {"input_ids": np.array([tok.encode("digit one").ids], dtype=np.int64)})
    assert ehs.shape == (1, 8, 32) and np.isfinite(ehs).all()
