"""samg::SemanticCombine: the ONNX function body run by ONNX Runtime equals the torch reference."""

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from samg.errors import SamgError
from samg.scfg.op import DOMAIN, OP_TYPE, function_proto, make_standalone_model, semantic_combine
from samg.scfg.compare import PROBE_FORE_MASK, PROBE_TOKEN_MASK, mask_probe, run_probe, tie_safe_check
from samg.scfg.reference import scfg_combine, semantic_maps
from scfg_hand_case import RATE_ROWS, hand_delta, hand_level, rate_map, uniform_coarse_level

ATOL = RTOL = 1e-5  # float32 op body vs torch reference, given the same masks


def assert_matches_reference(outputs, u, c, scales, self_maps, cross_maps, latent_hw, factors, corrected=False):
    """ORT (`outputs` of the mask probe: guided and the graph's masks) vs the torch reference, tie-safe
    (samg.scfg.compare): the graph's masks an arg-max of the reference's maps (the reference's where
    decided), its output the reference combine given those masks. Returns the decided fraction."""
    token_maps, fore_maps = semantic_maps(self_maps, cross_maps, latent_hw, factors=factors, corrected=corrected)
    result = tie_safe_check(u, c, scales, token_maps, fore_maps, outputs[PROBE_TOKEN_MASK], outputs[PROBE_FORE_MASK],
                            outputs["guided"], corrected=corrected)
    assert result.invalid_locations == 0 and result.error < ATOL, result
    return result.decided_fraction


def random_maps(batch, tokens, fine_hw, coarse_hw, layers=(2, 1), seed=0, peaky=4.0):
    """Row-stochastic attention stacks (softmax of random logits) for two levels, batch 2B."""
    gen = torch.Generator().manual_seed(seed)

    def probs(*shape):
        return torch.softmax(peaky * torch.randn(*shape, generator=gen), dim=-1)

    n0, n1 = (fine_hw[0] * fine_hw[1]), (coarse_hw[0] * coarse_hw[1])
    self_maps = [probs(2 * batch, layers[0], n0, n0), probs(2 * batch, layers[1], n1, n1)]
    cross_maps = [probs(2 * batch, layers[0], n0, tokens), probs(2 * batch, layers[1], n1, tokens)]
    return self_maps, cross_maps


def run_ort(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})[0]


def run_probe_ort(model, feeds):
    """The graph's outputs and its mask decisions (samg.scfg.compare.mask_probe), by name."""
    sess = ort.InferenceSession(mask_probe(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return run_probe(sess, {k: v.numpy() for k, v in feeds.items()})


@pytest.mark.parametrize("corrected", [False, True])
@pytest.mark.parametrize("latent_hw, factors", [((16, 16), (4, 8)), ((8, 12), (2, 4))])
def test_function_body_matches_reference(corrected, latent_hw, factors):
    batch, tokens = 2, 6
    h, w = latent_hw
    fine = (h // factors[0], w // factors[0])
    coarse = (h // factors[1], w // factors[1])
    self_maps, cross_maps = random_maps(batch, tokens, fine, coarse, seed=int(corrected))
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(batch, 4, h, w, generator=gen)
    c = u + torch.randn(batch, 4, h, w, generator=gen) * torch.linspace(0.2, 3, w)  # uneven delta energy
    scales = torch.tensor([[7.5, 7.5], [3.0, 3.0]])
    expected = scfg_combine(u, c, self_maps, cross_maps, scales, factors=factors, corrected=corrected)
    model = make_standalone_model(factors=factors, corrected=corrected)
    feeds = dict(pred_uncond=u, pred_cond=c, scales=scales, self_fine=self_maps[0], cross_fine=cross_maps[0],
                 self_coarse=self_maps[1], cross_coarse=cross_maps[1])
    decided = assert_matches_reference(run_probe_ort(model, feeds), u, c, scales, self_maps, cross_maps, latent_hw,
                                       factors, corrected)
    assert decided > 0.5  # random peaky maps: at most locations the graph must take the reference's masks
    # the guidance really is spatially varying here, so the comparison is not trivially CFG
    rate = (expected - u) / (c - u) / scales[:, :1, None, None]
    assert rate.std() > 0.05


def test_scale_column_one_and_fp16_dtype_of_output():
    self_maps, cross_maps = random_maps(1, 5, (4, 4), (2, 2))
    u = torch.randn(1, 4, 16, 16)
    c = u + torch.randn(1, 4, 16, 16)
    model = make_standalone_model(factors=(4, 8))
    feeds = dict(pred_uncond=u, pred_cond=c, scales=torch.tensor([[5.0]]), self_fine=self_maps[0],
                 cross_fine=cross_maps[0], self_coarse=self_maps[1], cross_coarse=cross_maps[1])
    assert_matches_reference(run_probe_ort(model, feeds), u, c, 5.0, self_maps, cross_maps, (16, 16), (4, 8))


def test_torch_export_emits_one_node_and_runs():
    class Combine(torch.nn.Module):
        def forward(self, u, c, scales, s0, a0, s1, a1):
            return semantic_combine(u, c, scales, [s0, s1], [a0, a1], factors=(4, 8))

    self_maps, cross_maps = random_maps(1, 5, (4, 4), (2, 2))
    u = torch.randn(1, 4, 16, 16)
    c = u + torch.randn(1, 4, 16, 16)
    scales = torch.tensor([[7.5, 7.5]])
    args = (u, c, scales, self_maps[0], cross_maps[0], self_maps[1], cross_maps[1])
    buf = io.BytesIO()
    torch.onnx.export(Combine(), args, buf, dynamo=False, opset_version=18,
                      input_names=["u", "c", "scales", "s0", "a0", "s1", "a1"], output_names=["guided"])
    model = onnx.load_from_string(buf.getvalue())
    nodes = [n for n in model.graph.node if n.domain == DOMAIN]
    assert [n.op_type for n in nodes] == [OP_TYPE] and len(model.graph.node) == 1
    from samg.scfg.op import attach_function

    attach_function(model)
    sess = ort.InferenceSession(mask_probe(model).SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = run_probe(sess, dict(zip(["u", "c", "scales", "s0", "a0", "s1", "a1"], [a.numpy() for a in args])))
    assert_matches_reference(outputs, u, c, scales, self_maps, cross_maps, (16, 16), (4, 8))


def test_bad_input_is_a_samg_error():
    with pytest.raises(SamgError, match="opset"):
        function_proto(17)
    self_maps, cross_maps = random_maps(1, 5, (4, 4), (2, 2))
    u = torch.zeros(1, 4, 16, 16)
    with pytest.raises(SamgError, match="two attention levels"):
        semantic_combine(u, u, torch.ones(1, 2), self_maps[:1], cross_maps[:1], factors=(4,))


# The hand case (tests/scfg_hand_case.py) plus a uniform 1x1 coarse level, which adds the same
# constant to every token's and both foreground maps (no mask moves).
@pytest.mark.parametrize("corrected, scale", sorted(RATE_ROWS))
def test_eager_op_and_function_body_give_the_hand_computed_rate(corrected, scale):
    self_fine, cross_fine = hand_level()
    self_coarse, cross_coarse = uniform_coarse_level()
    delta = hand_delta()
    u = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    c = u + delta
    scales = torch.tensor([[scale, scale]])
    expected = (u + scale * rate_map(RATE_ROWS[(corrected, scale)]) * delta).numpy()
    eager = semantic_combine(u, c, scales, [self_fine, self_coarse], [cross_fine, cross_coarse], factors=(2, 4),
                             corrected=corrected)
    np.testing.assert_allclose(eager.numpy(), expected, rtol=1e-5, atol=1e-5)
    feeds = dict(pred_uncond=u, pred_cond=c, scales=scales, self_fine=self_fine, cross_fine=cross_fine,
                 self_coarse=self_coarse, cross_coarse=cross_coarse)
    got = run_ort(make_standalone_model(factors=(2, 4), corrected=corrected), feeds)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
