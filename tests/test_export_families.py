"""Every family exports with --tiny: manifest complete and true to the files, graphs shaped as the
contract in docs/architecture.md says, the fused graph holding exactly one samg::GuidanceCombine."""

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from samg.io import sha256_file
from samg.models.specs import SPECS, get_spec

FAMILIES = ["sd15", "sd21", "sdxl", "sd35-medium", "modelscope-t2v", "cogvideox"]
MANIFEST_KEYS = {
    "format", "format_version", "model", "family", "source", "prediction_type", "guidance", "combine",
    "latent", "scheduler", "vae", "text_encoder", "denoiser", "opset", "dtype", "versions", "files",
    "validation",
}
EXTRA_CONDITIONING = {"sdxl": ["text_embeds"], "sd35-medium": ["pooled_projections"]}


def _manifest(folder):
    return json.loads((folder / "samg.json").read_text())


@pytest.mark.parametrize("name", FAMILIES)
def test_manifest_complete_and_matches_files(tiny_export, name):
    folder = tiny_export(name)
    m = _manifest(folder)
    spec = get_spec(name)
    assert MANIFEST_KEYS <= set(m)
    assert (m["format"], m["format_version"], m["model"], m["guidance"]) == ("samg-export", 1, name, "fused")
    assert m["source"]["kind"] == "tiny" and (folder / m["source"]["path"] / "model_index.json").is_file()
    assert m["prediction_type"] == spec.prediction_type
    assert m["combine"]["domain"] == "samg" and m["combine"]["op"] == "GuidanceCombine"
    assert m["combine"]["channel_axis"] == spec.channel_axis
    assert m["latent"]["layout"] == spec.layout and m["latent"]["dynamic_resolution"] == spec.dynamic_resolution
    assert m["scheduler"]["kind"] == ("flow" if spec.prediction_type == "flow" else "discrete")
    assert {"torch", "diffusers", "onnx", "samg"} <= set(m["versions"])
    # Every file listed is there with its hash, and every graph/tokenizer is listed.
    for rel, digest in m["files"].items():
        assert sha256_file(folder / rel) == digest
    listed = {m["denoiser"]["file"], m["text_encoder"]["file"], m["vae"]["file"]}
    listed |= {t["file"] for t in m["text_encoder"]["tokenizers"]}
    assert listed <= set(m["files"])
    for component in ("denoiser", "text_encoder", "vae_decoder"):
        v = m["validation"][component]
        assert 0 <= v["max_abs_err"] <= v["tolerance"]
    checked = m["validation"]["denoiser"]["checked_shapes"]
    assert len(checked) == (2 if spec.dynamic_resolution else 1)


@pytest.mark.parametrize("name", FAMILIES)
def test_graph_io_follows_contract(tiny_export, name):
    folder = tiny_export(name)
    m = _manifest(folder)
    spec = get_spec(name)
    conditioning = ["encoder_hidden_states", *EXTRA_CONDITIONING.get(name, [])]
    den = onnx.load(str(folder / "denoiser.onnx"), load_external_data=False)
    assert [i.name for i in den.graph.input] == ["latents", "timestep", *conditioning, "guidance_scales"]
    assert [o.name for o in den.graph.output] == ["guided"]
    assert list(m["denoiser"]["inputs"]) == ["latents", "timestep", *conditioning, "guidance_scales"]
    assert m["denoiser"]["inputs"]["encoder_hidden_states"]["shape"][0] == "2B"
    assert m["denoiser"]["inputs"]["latents"]["shape"][spec.channel_axis] == m["latent"]["channels"]

    text = onnx.load(str(folder / "text_encoder.onnx"))
    tokenizers = m["text_encoder"]["tokenizers"]
    assert [i.name for i in text.graph.input] == [t["input"] for t in tokenizers]
    assert [t["input"] for t in tokenizers] == ["input_ids", "input_ids_2", "input_ids_3"][: len(spec.text_encoders)]
    assert [o.name for o in text.graph.output] == conditioning == m["text_encoder"]["outputs"]
    # The text encoder's output shapes are the denoiser's conditioning shapes (per prompt).
    for name_ in conditioning:
        assert m["text_encoder"]["output_shapes"][name_]["shape"][1:] == m["denoiser"]["inputs"][name_]["shape"][1:]
    for t in tokenizers:
        assert (folder / t["file"]).is_file() and t["max_length"] > 0 and isinstance(t["pad_id"], int)

    vae = onnx.load(str(folder / "vae_decoder.onnx"))
    assert [i.name for i in vae.graph.input] == ["latents"] and [o.name for o in vae.graph.output] == ["images"]
    assert m["vae"]["runtime"] == "onnx" and m["vae"]["frames"] == spec.vae_frames


@pytest.mark.parametrize("name", FAMILIES)
def test_fused_graph_has_one_combine_node_with_function_body(tiny_export, name):
    model = onnx.load(str(tiny_export(name) / "denoiser.onnx"))
    combines = [n for n in model.graph.node if n.domain == "samg"]
    assert [n.op_type for n in combines] == ["GuidanceCombine"]
    assert [(f.domain, f.name) for f in model.functions] == [("samg", "GuidanceCombine")]
    assert all(n.domain in ("", "ai.onnx") for n in model.functions[0].node)
    axis = next(a.i for a in combines[0].attribute if a.name == "channel_axis")
    assert axis == get_spec(name).channel_axis
    onnx.checker.check_model(model)


def test_tokenizer_json_matches_pipeline_tokenizer(tiny_export):
    """The saved tokenizer.json pads and truncates like the diffusers pipeline's tokenizer."""
    import tokenizers
    from transformers import AutoTokenizer

    folder = tiny_export("sd35-medium")
    m = _manifest(folder)
    prompts = ["a photo of a red cat", "zebra " * 300, ""]
    for entry, sub in zip(m["text_encoder"]["tokenizers"], ["tokenizer", "tokenizer_2", "tokenizer_3"]):
        fast = tokenizers.Tokenizer.from_file(str(folder / entry["file"]))
        hf = AutoTokenizer.from_pretrained(str(folder / "source" / sub))
        for prompt in prompts:
            want = hf(prompt, padding="max_length", max_length=entry["max_length"], truncation=True).input_ids
            assert fast.encode(prompt).ids == want
        assert fast.encode("").ids[-1] == entry["pad_id"]


def test_video_latent_layouts(tiny_export):
    cog = _manifest(tiny_export("cogvideox"))
    shape = cog["denoiser"]["inputs"]["latents"]["shape"]
    assert shape[0] == "B" and all(isinstance(d, int) for d in shape[1:])  # resolution baked: static
    assert shape[2] == cog["latent"]["channels"] and shape[1] == cog["latent"]["latent_frames"]
    assert cog["scheduler"]["rescale_betas_zero_snr"] is True and cog["scheduler"]["timestep_spacing"] == "trailing"
    assert cog["vae"]["frames"] == "joint" and cog["vae"]["inputs"]["latents"]["shape"][2] == shape[1]
    ms = _manifest(tiny_export("modelscope-t2v"))
    assert ms["denoiser"]["inputs"]["latents"]["shape"] == ["B", 4, "F", "H", "W"]
    assert ms["vae"]["frames"] == "per_frame"


def test_specs_are_data():
    assert set(SPECS) == {"sd15", "sd21", "sdxl", "sd35-medium", "cogvideox", "modelscope-t2v", "digits", "shapes"}
    for spec in SPECS.values():
        assert spec.conditioning[0] == "encoder_hidden_states"
        assert spec.layout in ("BCHW", "BFCHW", "BCFHW")
        assert (spec.default_frames is not None) == spec.is_video
    assert get_spec("cogvideox").channel_axis == 2 and get_spec("modelscope-t2v").channel_axis == 1
    with pytest.raises(AttributeError):
        get_spec("sd15").hub_id = "x"  # frozen


def test_tiny_builder_is_deterministic():
    torch = pytest.importorskip("torch")
    a = get_spec("sd15").build_tiny(seed=3).unet.state_dict()
    b = get_spec("sd15").build_tiny(seed=3).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = get_spec("sd15").build_tiny(seed=4).unet.state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert np.isfinite(float(next(iter(a.values())).sum()))
