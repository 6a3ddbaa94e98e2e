"""S-CFG reference pinned against small cases computed by hand (the arithmetic: comments here and
tests/scfg_hand_case.py)."""

import pytest

torch = pytest.importorskip("torch")

from samg.errors import SamgError
from samg.scfg.reference import (
    blur3x3,
    complete_self_attention,
    scfg_combine,
    scfg_rate,
    semantic_masks,
)
from scfg_hand_case import (
    ALPHA,
    COND,
    K0,
    K1,
    RATE_ROWS,
    UNCOND,
    cross_rows,
    hand_delta,
    hand_level,
    rate_map,
    uniform_coarse_level,
)


def test_blur_weights_and_reflect_padding():
    x = torch.zeros(1, 5, 5)
    x[0, 2, 2] = 1.0
    out = blur3x3(x)[0]
    assert out[2, 2].item() == pytest.approx(K1 * K1, rel=1e-6)
    assert out[1, 2].item() == pytest.approx(K0 * K1, rel=1e-6)
    assert out[1, 1].item() == pytest.approx(K0 * K0, rel=1e-6)
    assert out.sum().item() == pytest.approx(1.0, rel=1e-6)
    # reflect (mirror without repeating the edge): a 1 at the border row gets K0 from its mirror twice
    edge = torch.zeros(1, 3, 3)
    edge[0, 0, :] = 1.0
    assert blur3x3(edge)[0, 1, 1].item() == pytest.approx(K0, rel=1e-6)
    assert blur3x3(edge)[0, 0, 1].item() == pytest.approx(K1, rel=1e-6)


def test_self_attention_completion_quirk_and_corrected():
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # P^2 = I, P^3 = P, P^4 = I
    eye = torch.eye(2)
    # the code: (S + 3 S^2)/4 = (P + 3I)/4
    assert torch.allclose(complete_self_attention(swap), (swap + 3 * eye) / 4)
    # true average of powers: (P + I + P + I)/4 = (P + I)/2
    assert torch.allclose(complete_self_attention(swap, corrected=True), (swap + eye) / 2)


# The hand case (its arithmetic: tests/scfg_hand_case.py).


def test_hand_computed_normalized_values():
    # spot-check the arithmetic of scfg_hand_case's docstring against the formula itself
    top = ((1 - ALPHA) * 0.5 + ALPHA * 0.1) / 0.3
    assert top == pytest.approx(1.1015, abs=1e-4)
    assert (0.1 * (1 - ALPHA) + 0.3 * ALPHA) / 0.2 == pytest.approx(0.9239, abs=1e-4)


@pytest.mark.parametrize("corrected, fore_row", [(False, 1), (True, 0)])
def test_token_and_foreground_masks(corrected, fore_row):
    self_, cross = hand_level()
    token_mask, fore_mask = semantic_masks([self_], [cross], (4, 4), corrected=corrected)
    assert token_mask.shape == (1, 3, 2, 2) and fore_mask.shape == (1, 1, 2, 2)
    expected_tokens = torch.zeros(1, 3, 2, 2)
    expected_tokens[0, 1, 0, :] = 1  # top row -> "cat"
    expected_tokens[0, 2, 1, :] = 1  # bottom row -> "sky"
    assert torch.equal(token_mask, expected_tokens)
    expected_fore = torch.zeros(1, 1, 2, 2)
    expected_fore[0, 0, fore_row, :] = 1  # quirk: from the uncond half; corrected: from the cond half
    assert torch.equal(fore_mask, expected_fore)


def test_a_coarser_level_that_is_uniform_does_not_move_the_masks():
    # a 1x1 level upsamples to a constant map, normalizing to 1 for every token: same argmax
    self_, cross = hand_level()
    coarse_self, coarse_cross = uniform_coarse_level()
    masks_one = semantic_masks([self_], [cross], (4, 4))
    masks_two = semantic_masks([self_, coarse_self], [cross, coarse_cross], (4, 4))
    assert all(torch.equal(a, b) for a, b in zip(masks_one, masks_two))


@pytest.mark.parametrize("corrected, scale", sorted(RATE_ROWS))
def test_rate_and_guided_output_by_hand(corrected, scale):
    self_, cross = hand_level()
    delta = hand_delta()
    u = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    c = u + delta
    out, rate = scfg_combine(u, c, [self_], [cross], scale, corrected=corrected, return_rate=True)
    expected_rate = rate_map(RATE_ROWS[(corrected, scale)])
    assert torch.allclose(rate[0, 0], expected_rate, atol=1e-5)
    assert torch.allclose(out, u + scale * expected_rate * delta, atol=1e-5)


def test_rate_from_masks_matches_the_direct_function():
    token_mask = torch.zeros(1, 3, 2, 2)
    token_mask[0, 1, 0], token_mask[0, 2, 1] = 1, 1
    fore = torch.zeros(1, 1, 2, 2)
    fore[0, 0, 1] = 1
    rate = scfg_rate(hand_delta(), token_mask, fore, 7.5)
    assert torch.allclose(rate[0, 0], rate_map(RATE_ROWS[(False, 7.5)]), atol=1e-6)


def test_per_sample_scales_and_dtype():
    self_, cross = hand_level()
    self2, cross2 = (torch.cat([t[:1], t[:1], t[1:], t[1:]]) for t in (self_, cross))  # B = 2
    delta = hand_delta().expand(2, 2, 4, 4)
    u = torch.zeros(2, 2, 4, 4, dtype=torch.float16)
    out = scfg_combine(u, u + delta.half(), [self2], [cross2], torch.tensor([[7.5, 7.5], [2.0, 2.0]]))
    assert out.dtype == torch.float16
    assert torch.allclose(out[0].float(), 7.5 * rate_map(RATE_ROWS[(False, 7.5)]) * delta[0], atol=2e-2)
    assert torch.allclose(out[1].float(), 2.0 * rate_map(RATE_ROWS[(False, 2.0)]) * delta[1], atol=2e-2)


def test_zero_delta_returns_uncond_and_bad_shapes_raise():
    self_, cross = hand_level()
    u = torch.randn(1, 2, 4, 4)
    assert torch.equal(scfg_combine(u, u.clone(), [self_], [cross], 7.5), u)
    with pytest.raises(SamgError, match="does not fit"):
        scfg_combine(torch.zeros(1, 2, 6, 6), torch.zeros(1, 2, 6, 6), [self_], [cross], 7.5, factors=[2])
    with pytest.raises(SamgError, match="batch 2B"):
        scfg_combine(torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 4, 4), [self_], [cross], 7.5)


class _HandModel:
    """Stands in for the UNet in `scfg_unet_step`: known predictions and attention maps.

    Each batch row's conditioning carries a flag (encoder_hidden_states[:, 0, 0]: 0 = unconditional,
    1 = conditional); the row predicts u = x/2 or c = u + Δ and records the UNCOND or COND maps of
    the hand case (scfg_hand_case) at factor 2 (a 2x2 level of a 4x4 latent), as the capture
    processors would.
    """

    def __init__(self, store, delta):
        self.store, self.delta, self.calls = store, delta, 0

    def __call__(self, x, t, *, encoder_hidden_states, added_cond_kwargs=None, return_dict=True):
        self.calls += 1
        flags = encoder_hidden_states[:, 0, 0]
        assert x.shape[0] == flags.shape[0] == t.shape[0]
        self_maps, cross_maps, preds = [], [], []
        for row, flag in enumerate(flags.tolist()):
            top, bottom = COND if flag == 1 else UNCOND
            self_maps.append(torch.eye(4))
            cross_maps.append(cross_rows(top, bottom))
            preds.append(x[row] / 2 + (self.delta[0] if flag == 1 else 0))
        self.store.add(2, "self", torch.stack(self_maps))
        self.store.add(2, "cross", torch.stack(cross_maps))
        return (torch.stack(preds),)


@pytest.mark.parametrize("corrected, scale", [(False, 7.5), (True, 7.5)])
def test_unet_step_gives_the_hand_computed_rate(corrected, scale):
    # The full step (model on [uncond; cond], capture, masks, rates) against the rates worked out by
    # hand (scfg_hand_case.RATE_ROWS), not against scfg_combine.
    from samg.scfg.capture import AttentionMapStore, scfg_unet_step

    store = AttentionMapStore()
    delta = hand_delta()
    model = _HandModel(store, delta)
    latents = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    flags = torch.tensor([0.0, 1.0]).view(2, 1, 1).expand(2, 3, 5)  # unconditional first
    out = scfg_unet_step(model, store, (2,), latents, torch.tensor([500.0]), flags, torch.tensor([scale]),
                         corrected=corrected)
    assert model.calls == 1
    u = latents / 2
    assert torch.allclose(out, u + scale * rate_map(RATE_ROWS[(corrected, scale)]) * delta, atol=1e-5)
