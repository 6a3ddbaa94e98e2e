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
from samg.scfg.compare import (DECIDED_MARGIN, PROBE_FORE_MASK, PROBE_TOKEN_MASK, mask_decisions, mask_probe,
                                run_probe, tie_safe_check)
from samg.scfg.export import attach_to_model, scfg_denoiser
from samg.scfg.reference import semantic_maps, semantic_masks

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
    # the graph with its own mask decisions as extra outputs (samg.scfg.compare.mask_probe)
    sess = ort.InferenceSession(mask_probe(model).SerializeToString(), providers=["CPUExecutionProvider"])
    for batch, h, w in ((2, 8, 8), (1, 16, 12)):  # second: other batch and a non-square size
        inputs = make_inputs(family, batch, h, w, seed=batch + h)
        outputs = run_probe(sess, {n: t.numpy() for n, t in zip(names, inputs)})
        added = None
        if family == "sdxl":  # what the exporter's wrapper computes: sizes in pixels, crop 0
            ids = torch.tensor([8.0 * h, 8.0 * w, 0, 0, 8.0 * h, 8.0 * w])
            added = {"text_embeds": inputs[3], "time_ids": ids.expand(2 * batch, 6)}
        with torch.no_grad():
            want, (u, c, self_maps, cross_maps) = scfg_unet_step(
                unet, module.store, factors, inputs[0], inputs[1], inputs[2], inputs[-1], added_cond_kwargs=added,
                return_parts=True)
            token_maps, fore_maps = semantic_maps(self_maps, cross_maps, (h, w), factors=factors)
        # tie-safe: the graph's masks are a valid arg-max of the reference's maps, its output the reference
        # combine given those masks (samg.scfg.compare)
        result = tie_safe_check(u, c, inputs[-1], token_maps, fore_maps, outputs[PROBE_TOKEN_MASK],
                                outputs[PROBE_FORE_MASK], outputs["guided"])
        assert result.invalid_locations == 0 and result.error < TOLERANCE, f"{family} at {batch}x{h}x{w}: {result}"
        assert result.decided_fraction > 0.2, result  # observed 0.31-0.67: the reference's choice is forced there


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
    assert 0.0 <= manifest["validation"]["denoiser"]["decided_fraction"] <= 1.0  # recorded by the tie-safe check
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


def spec_output(u, c, w, token_mask, fore_mask):
    """S-CFG's output for given masks (one sample, mask = latent resolution), written out from docs/scfg.md
    steps 7-8 in numpy: region means of ‖Δ‖, rate_k = fore mean / region mean, clamp [0.8, min(3, 15/w)],
    3x3 blur [e⁻¹, 1, e⁻¹]/(1 + 2e⁻¹) with reflect padding, u + w·rate·Δ."""
    delta = (c - u)[0].astype(np.float64)
    norm = np.sqrt((delta ** 2).sum(0))
    token_mask, fore_mask = np.asarray(token_mask)[0], np.asarray(fore_mask)[0, 0] > 0.5
    fore_mean = norm[fore_mask].sum() / (fore_mask.sum() + 1e-8)
    rate = np.zeros_like(norm)
    for region in token_mask.astype(bool):
        if region.any():
            rate += region * fore_mean / (norm[region].sum() / (region.sum() + 1e-8) + 1e-8)
    rate = np.clip(rate, 0.8, min(3.0, 15.0 / w))
    e = np.exp(-1.0)
    k = np.array([e, 1.0, e]) / (1 + 2 * e)
    padded = np.pad(rate, 1, mode="reflect")
    height, width = rate.shape
    rate = sum(k[i] * k[j] * padded[i:i + height, j:j + width] for i in range(3) for j in range(3))
    return (u + w * rate * (c - u)).astype(np.float32)


def _tie_case():
    """Hand-built maps at 6x6 (mask = latent resolution), tokens 0 (start of text) .. 3, w = 3.

    Token 3 wins columns 0-2, token 1 columns 3-5, decided by a factor 2 everywhere except at (0, 5),
    where tokens 1 and 2 are 1e-6 apart (a tie to float rounding). Foreground everywhere, decided by a
    factor 2. Returns (u, c, w, token_maps, fore_maps), the reference's assignment (token per location)
    and the masks of an assignment.
    """
    token = np.ones((2, 4, 6, 6))  # [2B, T, h, w], unconditional half first (unused for the token masks)
    token[:, 0] = 0.5
    token[1, 3, :, :3] = 2.0
    token[1, 1, :, 3:] = 2.0
    token[1, 2, 0, 5] = 2.0 * (1 - 1e-6)
    fore = np.stack([np.ones((2, 6, 6)), 2 * np.ones((2, 6, 6))], axis=1)  # others beat start of text
    rng = np.random.default_rng(0)
    u = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    c = (u + rng.standard_normal((1, 4, 6, 6)) * np.linspace(1.2, 0.6, 6)).astype(np.float32)  # rates differ

    def masks(assignment, foreground=None):
        token_mask = (np.arange(4)[:, None, None] == assignment[None])[None].astype(np.float32)
        foreground = np.ones((6, 6), bool) if foreground is None else foreground
        return token_mask, foreground[None, None].astype(np.float32)

    assignment = np.where(np.arange(6)[None, :] < 3, 3, 1).repeat(6, 0)
    return (u, c, 3.0, token, fore), assignment, masks


def test_tie_safe_check_accepts_either_decision_of_a_tie_and_nothing_else():
    (u, c, w, token, fore), assignment, masks = _tie_case()
    assert 1e-6 < DECIDED_MARGIN < 1.0  # the hand-made tie is a tie, the factor-2 gaps are decided
    invalid, decided = mask_decisions(token, fore, *masks(assignment))
    assert not invalid.any()
    expected_decided = np.ones((1, 6, 6), bool)
    expected_decided[0, 0, 5] = False
    np.testing.assert_array_equal(decided, expected_decided)
    want = spec_output(u, c, w, *masks(assignment))
    result = tie_safe_check(u, c, w, token, fore, *masks(assignment), want)
    assert result.error < 1e-5 and result.invalid_locations == 0 and result.decided_fraction == pytest.approx(35 / 36)

    other = assignment.copy()
    other[0, 5] = 2  # the tie decided the other way: a valid S-CFG output, different from the reference's
    alt = spec_output(u, c, w, *masks(other))
    assert np.abs(alt - want).max() > 1e-2  # so comparing outputs alone would refuse it
    assert tie_safe_check(u, c, w, token, fore, *masks(other), alt).error < 1e-5
    assert tie_safe_check(u, c, w, token, fore, *masks(assignment), alt).error > 1e-2  # not what its masks give

    flipped = assignment.copy()
    flipped[5, 0] = 1  # a decided location (token 3 by a factor 2) put in another region, output consistent
    result = tie_safe_check(u, c, w, token, fore, *masks(flipped), spec_output(u, c, w, *masks(flipped)))
    assert result.invalid_locations == 1 and result.error == np.inf
    cfg = u + w * (c - u)  # plain CFG: on the S-CFG line with s = w inside the clamps, but not these rates
    assert tie_safe_check(u, c, w, token, fore, *masks(assignment), cfg).error > 1e-2
    no_token, fore_mask = masks(assignment)
    no_token[0, :, 2, 2] = 0  # a location in no region
    assert tie_safe_check(u, c, w, token, fore, no_token, fore_mask, want).invalid_locations == 1


def test_identical_token_columns_are_one_choice():
    # Several <pad> tokens with identical maps tie everywhere they win; choosing any of them is the same
    # decision, so those locations count as decided and another token there is still refused.
    (u, c, w, token, fore), assignment, masks = _tie_case()
    token = token.copy()
    token[1, 2] = token[1, 3]  # token 2 identical to token 3 (the (0, 5) tie is gone with it)
    both, fore_mask = masks(assignment)
    both[0, 2] = both[0, 3]  # the reference's `== max` puts both at their locations
    invalid, decided = mask_decisions(token, fore, both, fore_mask)
    assert not invalid.any() and decided.all()
    assert not mask_decisions(token, fore, *masks(assignment))[0].any()  # token 3 alone: the same choice
    result = tie_safe_check(u, c, w, token, fore, both, fore_mask, spec_output(u, c, w, both, fore_mask))
    assert result.error < 1e-5 and result.decided_fraction == 1.0
    wrong = assignment.copy()
    wrong[3, 1] = 1
    assert mask_decisions(token, fore, *masks(wrong))[0].sum() == 1


def test_a_tied_foreground_may_go_either_way_and_a_decided_one_may_not():
    (u, c, w, token, fore), assignment, masks = _tie_case()
    fore = fore.copy()
    fore[0, 1, 3, 3] = fore[0, 0, 3, 3] * (1 + 1e-7)  # the (unconditional) foreground is tied at (3, 3)
    background = np.ones((6, 6), bool)
    background[3, 3] = False  # the tie decided as background (what the reference's `==` would give at equality)
    for foreground in (np.ones((6, 6), bool), background):
        token_mask, fore_mask = masks(assignment, foreground)
        result = tie_safe_check(u, c, w, token, fore, token_mask, fore_mask,
                                spec_output(u, c, w, token_mask, fore_mask))
        assert result.error < 1e-5 and result.decided_fraction < 35 / 36  # (0, 5) and (3, 3) undecided
    background[1, 1] = False  # a decided foreground location taken as background
    assert mask_decisions(token, fore, *masks(assignment, background))[0].sum() == 1
    # corrected: the foreground comes from the conditional half, which is decided at (3, 3)
    assert mask_decisions(token, fore, *masks(assignment, background), corrected=True)[0].sum() == 2


def test_mask_probe_outputs_the_graph_decisions_and_the_same_guided():
    # The probe graph's masks are the reference's where decided (random maps: most locations), and its
    # guided output is the plain graph's (same body, extra outputs only)
    from samg.scfg.op import make_standalone_model

    gen = torch.Generator().manual_seed(0)
    probs = lambda *shape: torch.softmax(4 * torch.randn(*shape, generator=gen), dim=-1)  # noqa: E731
    self_maps, cross_maps = [probs(2, 2, 16, 16), probs(2, 1, 4, 4)], [probs(2, 2, 16, 5), probs(2, 1, 4, 5)]
    u = torch.randn(1, 4, 8, 8, generator=gen)
    c = u + torch.randn(1, 4, 8, 8, generator=gen)
    feeds = dict(pred_uncond=u, pred_cond=c, scales=torch.tensor([[5.0, 5.0]]), self_fine=self_maps[0],
                 cross_fine=cross_maps[0], self_coarse=self_maps[1], cross_coarse=cross_maps[1])
    feeds = {k: v.numpy() for k, v in feeds.items()}
    model = make_standalone_model(factors=(2, 4))
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    probe = ort.InferenceSession(mask_probe(model).SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = run_probe(probe, feeds)
    assert set(outputs) == {"guided", PROBE_TOKEN_MASK, PROBE_FORE_MASK}
    np.testing.assert_array_equal(outputs["guided"], plain)
    token_mask, fore_mask = semantic_masks(self_maps, cross_maps, (8, 8), factors=(2, 4))
    token_maps, fore_maps = semantic_maps(self_maps, cross_maps, (8, 8), factors=(2, 4))
    invalid, decided = mask_decisions(token_maps, fore_maps, outputs[PROBE_TOKEN_MASK], outputs[PROBE_FORE_MASK])
    assert not invalid.any() and decided.mean() > 0.5
    np.testing.assert_array_equal(outputs[PROBE_TOKEN_MASK].argmax(1)[decided], token_mask.argmax(1).numpy()[decided])
    np.testing.assert_array_equal(outputs[PROBE_FORE_MASK][:, 0][decided], fore_mask[:, 0].numpy()[decided])
    with pytest.raises(SamgError, match="--guidance scfg"):
        mask_probe(onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], [])))


def test_probe_session_reads_external_weights_in_place_and_leaves_nothing(tmp_path):
    # A model whose tensors live in an external file (as large exports do): the probe graph is written next
    # to it only while the session is created, then removed; the folder holds what it held before.
    from samg.scfg.compare import probe_session
    from samg.scfg.op import make_standalone_model

    model = make_standalone_model(factors=(2, 4))
    big = onnx.numpy_helper.from_array(np.ones(4, np.float32), "scale_weight")
    model.graph.initializer.append(big)  # unused by the body, but stored externally like a weight
    onnx.save_model(model, str(tmp_path / "denoiser.onnx"), save_as_external_data=True, location="weights.bin",
                    size_threshold=0)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert before == ["denoiser.onnx", "weights.bin"]
    session = probe_session(tmp_path / "denoiser.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert {PROBE_TOKEN_MASK, PROBE_FORE_MASK, "guided"} <= {o.name for o in session.get_outputs()}
