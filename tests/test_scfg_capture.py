"""Attention capture on a tiny diffusers UNet: right layers, right maps, UNet output unchanged."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from samg.errors import SamgError
from samg.scfg.capture import (
    ProbsAttnProcessor,
    choose_factors,
    install_capture,
    list_attention_layers,
    scfg_unet_step,
)


def tiny_unet(three_levels=False):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    n = 3 if three_levels else 2
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32)[:n],
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        layers_per_block=1,
        cross_attention_dim=24,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()


def test_layers_and_default_levels():
    unet = tiny_unet(three_levels=True)
    layers = list_attention_layers(unet)
    factors = {(l.name.split(".attentions")[0].split(".transformer")[0], l.factor) for l in layers}
    assert ("down_blocks.0", 1) in factors and ("down_blocks.2", 4) in factors
    assert ("mid_block", 4) in factors and ("up_blocks.0", 4) in factors and ("up_blocks.2", 1) in factors
    assert choose_factors(layers) == (2, 4)  # the two lowest resolutions, finest first
    assert choose_factors(layers, [1, 4]) == (1, 4)
    with pytest.raises(SamgError, match="not available"):
        choose_factors(layers, [8])


def test_capture_keeps_the_unet_output_and_records_probabilities():
    unet = tiny_unet()
    latents = torch.randn(1, 4, 8, 8)
    ehs = torch.randn(2, 7, 24)
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        before = unet(torch.cat([latents, latents]), t, encoder_hidden_states=ehs).sample
        original = dict(unet.attn_processors)
        store, factors = install_capture(unet)
        after = unet(torch.cat([latents, latents]), t, encoder_hidden_states=ehs).sample
    assert factors == (1, 2)
    assert torch.allclose(before, after, atol=1e-5)
    assert all(isinstance(p, ProbsAttnProcessor) for p in unet.attn_processors.values())  # every level used
    self_maps, cross_maps = store.stacks(factors)
    # factor 1: down_blocks.0 (1 layer) + up_blocks.1 (2 layers); factor 2: down 1 + mid 1 + up 2
    assert self_maps[0].shape == (2, 3, 64, 64) and cross_maps[0].shape == (2, 3, 64, 7)
    assert self_maps[1].shape == (2, 4, 16, 16) and cross_maps[1].shape == (2, 4, 16, 7)
    for m in (*self_maps, *cross_maps):
        assert torch.allclose(m.sum(-1), torch.ones(()), atol=1e-5)
    assert len(original) == len(unet.attn_processors)


def test_only_the_chosen_levels_are_replaced():
    unet = tiny_unet(three_levels=True)
    kept = {n: type(p) for n, p in unet.attn_processors.items()}
    install_capture(unet)
    for layer in list_attention_layers(unet):
        proc = unet.attn_processors[layer.name]
        assert isinstance(proc, ProbsAttnProcessor) == (layer.factor in (2, 4))
        if layer.factor == 1:
            assert type(proc) is kept[layer.name]


def test_unet_step_rates_stay_in_the_clamp_on_a_real_unet():
    unet = tiny_unet()
    store, factors = install_capture(unet)
    latents = torch.randn(2, 4, 8, 8)
    ehs = torch.randn(4, 7, 24)
    with torch.no_grad():
        out, (u, c, sm, cm) = scfg_unet_step(unet, store, factors, latents, torch.tensor([10.0, 900.0]), ehs,
                                             torch.tensor([7.5, 3.0]), return_parts=True)
    # The step's value by hand: test_scfg_reference.py::test_unet_step_gives_the_hand_computed_rate.
    rate = (out - u) / (c - u) / torch.tensor([7.5, 3.0]).view(2, 1, 1, 1)
    assert rate.min() >= 0.8 - 1e-3 and rate.max() <= 2.0 + 1e-3  # clamp [0.8, 3], cap 15/7.5 = 2
