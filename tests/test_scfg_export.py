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
from samg.scfg.export import DECIDED_MARGIN, attach_to_model, scfg_denoiser, tie_aware_check, undecided_locations
from samg.scfg.reference import scfg_rate, semantic_maps

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
            want, (u, c, self_maps, cross_maps) = scfg_unet_step(
                unet, module.store, factors, inputs[0], inputs[1], inputs[2], inputs[-1], added_cond_kwargs=added,
                return_parts=True)
            token_maps, fore_maps = semantic_maps(self_maps, cross_maps, (h, w), factors=factors)
        # tie-aware: exact where the reference's masks are decided, on the S-CFG line where they are tied
        err = tie_aware_check(u, c, inputs[-1], token_maps, fore_maps, got, want).error
        assert err < TOLERANCE, f"{family} at {batch}x{h}x{w}: error {err:.2e}"


def test_only_scfg_levels_lose_sdpa_and_transformers_are_refused():
    spec = get_spec("sd15")
    unet = sd15_like_unet()
    module = scfg_denoiser(Denoiser(unet, spec, fused=True, combine={}, extras={"spatial_factor": 8}))
    explicit = [n for n, p in unet.attn_processors.items() if isinstance(p, ProbsAttnProcessor)]
    assert explicit and all(not n.startswith(("down_blocks.0", "up_blocks.2")) for n in explicit)
    assert module.combine_attrs().to_json()["op"] == "SemanticCombine"

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


def _tie_case():
    """Hand-built maps at 6x6 (mask = latent resolution), tokens 0 (start of text) .. 3, w = 3.

    Token 3 wins columns 0-2, token 1 columns 3-5, decided by a factor 2 everywhere except at (0, 5),
    where tokens 1 and 2 are 1e-6 apart (a tie to float rounding). Foreground everywhere, decided.
    Returns the inputs of `tie_aware_check` and a function giving S-CFG's output for a token assignment.
    """
    token = np.ones((2, 4, 6, 6))  # [2B, T, h, w], unconditional half first (unused for the token masks)
    token[:, 0] = 0.5
    token[1, 3, :, :3] = 2.0
    token[1, 1, :, 3:] = 2.0
    token[1, 2, 0, 5] = 2.0 * (1 - 1e-6)
    fore = np.stack([np.ones((2, 6, 6)), 2 * np.ones((2, 6, 6))], axis=1)  # others beat start of text
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(1, 4, 6, 6, generator=gen)
    c = u + torch.randn(1, 4, 6, 6, generator=gen) * torch.linspace(1.2, 0.6, 6)  # rates differ, unclamped
    w = 3.0

    def scfg_output(assignment):  # [6, 6] token index per location -> u + w·rate(p)·Δ (reference rate)
        mask = torch.nn.functional.one_hot(torch.as_tensor(assignment), 4).permute(2, 0, 1)[None].float()
        rate = scfg_rate(c - u, mask, torch.ones(1, 1, 6, 6), w)
        return (u + w * rate * (c - u)).numpy()

    assignment = np.where(np.arange(6)[None, :] < 3, 3, 1).repeat(6, 0)
    return (u.numpy(), c.numpy(), w, token, fore), assignment, scfg_output


def test_tie_aware_check_accepts_the_other_tie_decision_and_nothing_else():
    args, assignment, scfg_output = _tie_case()
    u, c, w, token, fore = args
    assert 1e-6 < DECIDED_MARGIN < 1.0  # the hand-made tie is a tie, the factor-2 gaps are decided
    want = scfg_output(assignment)
    unsure = undecided_locations(token, fore, (6, 6))
    # tied (0, 5) -> tokens 1 and 2 may change region -> all of token 1's columns, plus the blur's reach
    expected_unsure = np.zeros((1, 6, 6), bool)
    expected_unsure[:, :, 2:] = True
    np.testing.assert_array_equal(unsure, expected_unsure)
    check = tie_aware_check(u, c, w, token, fore, want, want)
    assert check.error < 1e-6 and check.decided_fraction == pytest.approx(12 / 36)

    other = assignment.copy()
    other[0, 5] = 2  # the tie decided the other way: a valid S-CFG output, different from the reference
    alt = scfg_output(other)
    assert np.abs(alt - want).max() > 1e-2
    assert tie_aware_check(u, c, w, token, fore, alt, want).error < 1e-6

    flipped = assignment.copy()
    flipped[5, 0] = 1  # a decided location (token 3 by a factor 2) put in another region: refused
    wrong = scfg_output(flipped)
    assert tie_aware_check(u, c, w, token, fore, wrong, want).error > 1e-2
    cfg = u + w * (c - u)  # on the S-CFG line with s = w inside the clamps, but wrong where decided
    assert tie_aware_check(u, c, w, token, fore, cfg, want).error > 1e-2
    too_strong = alt.copy()
    too_strong[..., :, 4:] = (u + 4 * w * (c - u))[..., :, 4:]  # rate 4 > clamp 3 where tied: refused
    assert tie_aware_check(u, c, w, token, fore, too_strong, want).error > 1e-2


def test_a_tied_foreground_makes_every_location_undecided():
    args, _, _ = _tie_case()
    u, c, w, token, fore = args
    token = token.copy()
    token[1, 2, 0, 5] = 1.0  # no token tie left: all decided
    assert not undecided_locations(token, fore, (6, 6)).any()
    fore = fore.copy()
    fore[0, 1, 3, 3] = fore[0, 0, 3, 3] * (1 + 1e-7)  # the (unconditional) foreground is tied at one location
    assert undecided_locations(token, fore, (6, 6)).all()
    assert not undecided_locations(token, fore, (6, 6), corrected=True).any()  # corrected: conditional half
