"""The exported S-CFG denoiser (ONNX Runtime) equals the torch reference, SD1.5- and SDXL-shaped UNets."""

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")

from samg.errors import SamgError
from samg.export.wrappers import Denoiser
from samg.models.specs import get_spec
from samg.scfg.capture import ProbsAttnProcessor, scfg_unet_step
from samg.scfg.export import attach_to_model, scfg_denoiser

TOLERANCE = 1e-4  # max |ORT - torch| relative to max(1, max |torch|), float32


def sd15_like_unet():
    """SD1.5 layout in small: attention at factors 1 and 2, the coarsest level (4) only in the mid block."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    ).eval()


def sdxl_like_unet():
    """SDXL layout in small: no attention at factor 1, attention at 2 and 4, text_time conditioning."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(1)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, use_linear_projection=True, norm_num_groups=4,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 8,
        transformer_layers_per_block=(1, 1, 2),
    ).eval()


def make_inputs(family, batch, h, w, seed):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, h, w, generator=gen)
    timestep = torch.rand(batch, generator=gen) * 999
    width = 16 if family == "sd15" else 32
    cond = [torch.randn(2 * batch, 7, width, generator=gen)]
    if family == "sdxl":
        cond.append(torch.randn(2 * batch, 8, generator=gen))
    scales = torch.stack([torch.tensor([7.5, 3.0][:batch])] * 2, dim=1)
    return (latents, timestep, *cond, scales)


@pytest.mark.parametrize("family, factors", [("sd15", (2, 4)), ("sdxl", (2, 4))])
def test_exported_graph_equals_torch_reference(family, factors):
    spec = get_spec(family)
    unet = sd15_like_unet() if family == "sd15" else sdxl_like_unet()
    base = Denoiser(unet, spec, fused=True, combine={}, extras={"spatial_factor": 8}).eval()
    module = scfg_denoiser(base)
    assert module.factors == factors
    cond_names = list(spec.conditioning)
    names = ["latents", "timestep", *cond_names, "guidance_scales"]
    axes = {"latents": {0: "B", 2: "H", 3: "W"}, "timestep": {0: "B"}, "guidance_scales": {0: "B"},
            **{n: {0: "2B"} for n in cond_names}, "guided": {0: "B", 2: "H", 3: "W"}}
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, make_inputs(family, 2, 8, 8, 0), buf, input_names=names, output_names=["guided"],
                          dynamic_axes=axes, opset_version=18, dynamo=False)
    model = onnx.load_from_string(buf.getvalue())
    attach_to_model(model)
    assert sum(n.op_type == "SemanticCombine" and n.domain == "samg" for n in model.graph.node) == 1
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch, h, w in ((2, 8, 8), (1, 16, 12)):  # second: other batch and a non-square size
        inputs = make_inputs(family, batch, h, w, seed=batch + h)
        got = sess.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0]
        added = None
        if family == "sdxl":  # what the exporter's wrapper computes: sizes in pixels, crop 0
            ids = torch.tensor([8.0 * h, 8.0 * w, 0, 0, 8.0 * h, 8.0 * w])
            added = {"text_embeds": inputs[3], "time_ids": ids.expand(2 * batch, 6)}
        with torch.no_grad():
            want = scfg_unet_step(unet, module.store, factors, inputs[0], inputs[1], inputs[2], inputs[-1],
                                  added_cond_kwargs=added)
        err = np.abs(got - want.numpy()).max() / max(1.0, float(want.abs().max()))
        assert err < TOLERANCE, f"{family} at {batch}x{h}x{w}: error {err:.2e}"


def test_only_scfg_levels_lose_sdpa_and_transformers_are_refused():
    spec = get_spec("sd15")
    unet = sd15_like_unet()
    module = scfg_denoiser(Denoiser(unet, spec, fused=True, combine={}, extras={"spatial_factor": 8}))
    explicit = [n for n, p in unet.attn_processors.items() if isinstance(p, ProbsAttnProcessor)]
    assert explicit and all(not n.startswith(("down_blocks.0", "up_blocks.2")) for n in explicit)
    assert module.manifest_combine()["op"] == "SemanticCombine"

    class FakeDenoiser:
        spec = get_spec("sd35-medium")

    with pytest.raises(SamgError, match="needs a UNet"):
        scfg_denoiser(FakeDenoiser())


@pytest.mark.slow
def test_cli_export_and_generate(tmp_path):
    """The acceptance commands: samg export --guidance scfg, then samg generate --guidance scfg."""
    import json

    from samg.cli import main

    out = tmp_path / "scfg"
    assert main(["export", "--model", "sd15", "--tiny", "--guidance", "scfg", "--out", str(out), "--quiet"]) == 0
    manifest = json.loads((out / "samg.json").read_text())
    assert manifest["guidance"] == "scfg" and manifest["combine"]["op"] == "SemanticCombine"
    assert manifest["validation"]["denoiser"]["max_abs_err"] < 1e-4
    png = tmp_path / "scfg.png"
    assert main(["generate", str(out), "--prompt", "a cat", "--guidance", "scfg", "--scale", "7.5",
                 "--steps", "4", "--out", str(png)]) == 0
    assert png.stat().st_size > 0
    assert main(["generate", str(out), "--prompt", "a cat", "--guidance", "cfg", "--steps", "1",
                 "--out", str(png)]) == 2  # an S-CFG export refuses other rules with a one-line error


def test_export_options_choose_levels_and_variant(tiny_export):
    """--scfg-levels/--scfg-corrected reach the graph's SemanticCombine node and the manifest."""
    import json

    import onnx

    folder = tiny_export("sd15", "scfg", scfg_levels=(2,), scfg_corrected=True, validate=False)
    combine = json.loads((folder / "samg.json").read_text())["combine"]
    assert (combine["levels"], combine["factor_fine"], combine["factor_coarse"], combine["corrected"]) == ([2], 2, 2, 1)
    node = next(n for n in onnx.load(str(folder / "denoiser.onnx"), load_external_data=False).graph.node
                if n.op_type == "SemanticCombine")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs.get("corrected") == 1


@pytest.mark.parametrize("options,match", [
    (dict(guidance="fused", scfg_levels=(4,)), "apply to --guidance scfg only"),
    (dict(guidance="scfg", scfg_levels=(1, 2, 4)), "one or two downsampling factors"),
    (dict(guidance="scfg", scfg_levels=(16,)), "not available"),
])
def test_bad_scfg_options_are_one_line_errors(tmp_path, options, match):
    from samg.export.exporter import ExportOptions, export

    with pytest.raises(SamgError, match=match):
        export(ExportOptions(model="sd15", out=str(tmp_path / "x"), tiny=True, quiet=True, **options))
    assert not (tmp_path / "x").exists()
