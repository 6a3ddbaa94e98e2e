"""Capture the UNet attention probabilities S-CFG needs, in the same forward pass as u and c.

Only the layers of the chosen levels get `ProbsAttnProcessor` (explicit softmax(QK^T), so that the
probabilities exist as tensors); every other layer keeps its processor (SDPA). Each processor appends
its head-averaged probabilities `[2B, N, N_kv]` to a shared `AttentionMapStore`.

Level choice: the official code, for SD1.5 at 512 px (latent 64), uses the 16x16 and 8x8 maps, i.e. the
UNet's two lowest attention resolutions (downsampling factors 4 and 8). We generalise this as "the two
largest factors that have both self- and cross-attention layers" (`choose_factors`), which is that
choice for SD1.5/SD2.x at any size, factors (2, 4) for SDXL, and whatever exists in tiny test UNets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from samg.errors import check

_NAME = re.compile(r"^(down_blocks\.(\d+)|mid_block|up_blocks\.(\d+))\..*\.(attn1|attn2)\.processor$")


@dataclass(frozen=True)
class AttnLayer:
    name: str  # processor name, as in `unet.attn_processors`
    kind: str  # "self" (attn1) or "cross" (attn2)
    factor: int  # downsampling factor of its resolution relative to the latent


def _block_factors(unet) -> tuple[list[int], int, list[int]]:
    """Downsampling factor of each down block, the mid block and each up block (from the modules)."""
    down, f = [], 1
    for block in unet.down_blocks:
        down.append(f)
        if getattr(block, "downsamplers", None):
            f *= 2
    mid = f
    up = []
    for block in unet.up_blocks:
        up.append(f)
        if getattr(block, "upsamplers", None):
            f //= 2
    return down, mid, up


def list_attention_layers(unet) -> list[AttnLayer]:
    """Every transformer-block self/cross attention layer of a diffusers UNet2DConditionModel."""
    down, mid, up = _block_factors(unet)
    layers = []
    for name in unet.attn_processors:
        m = _NAME.match(name)
        if not m:
            continue
        factor = down[int(m.group(2))] if m.group(2) else up[int(m.group(3))] if m.group(3) else mid
        layers.append(AttnLayer(name, "self" if m.group(4) == "attn1" else "cross", factor))
    return layers


def choose_factors(layers: list[AttnLayer], factors=None) -> tuple[int, ...]:
    """Levels S-CFG uses, finest first: given `factors`, or the two largest with self+cross layers."""
    usable = sorted({l.factor for l in layers if l.kind == "self"} & {l.factor for l in layers if l.kind == "cross"})
    check(usable, "S-CFG: this UNet has no level with both self- and cross-attention layers")
    if factors is None:
        return tuple(usable[-2:])
    chosen = tuple(sorted(int(f) for f in factors))
    check(all(f in usable for f in chosen) and len(set(chosen)) == len(chosen),
          f"S-CFG: levels {list(factors)} not available; this UNet has attention at factors {usable}")
    return chosen


@dataclass
class AttentionMapStore:
    """Head-averaged attention probabilities of one forward pass, in call order per (factor, kind)."""

    maps: dict = field(default_factory=dict)

    def add(self, factor: int, kind: str, probs) -> None:
        self.maps.setdefault((factor, kind), []).append(probs)

    def clear(self) -> None:
        self.maps.clear()

    def stacks(self, factors) -> tuple[list, list]:
        """`(self_maps, cross_maps)` per level (finest first), each `[2B, n, N, N_kv]`."""
        import torch

        self_maps, cross_maps = [], []
        for f in factors:
            sa, ca = self.maps.get((f, "self"), []), self.maps.get((f, "cross"), [])
            check(sa and len(sa) == len(ca),
                  f"S-CFG: captured {len(sa)} self and {len(ca)} cross maps at factor {f}; run the UNet first")
            self_maps.append(torch.stack(sa, dim=1))
            cross_maps.append(torch.stack(ca, dim=1))
        return self_maps, cross_maps


class ProbsAttnProcessor:
    """Attention with explicit softmax(Q K^T * scale) that records the head-averaged probabilities."""

    def __init__(self, store: AttentionMapStore, factor: int, kind: str):
        self.store, self.factor, self.kind = store, factor, kind

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        import torch

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        b = query.shape[0]
        heads = attn.heads
        # [B, heads, N, d]
        query, key, value = (t.reshape(b, t.shape[1], heads, -1).transpose(1, 2) for t in (query, key, value))
        dtype = query.dtype
        if attn.upcast_attention:
            query, key = query.float(), key.float()
        scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, key.shape[2], b)
            scores = scores + mask.reshape(b, heads, -1, key.shape[2])
        if attn.upcast_softmax:
            scores = scores.float()
        probs = scores.softmax(dim=-1).to(dtype)
        self.store.add(self.factor, self.kind, probs.mean(dim=1))
        hidden_states = torch.matmul(probs, value).transpose(1, 2).reshape(b, -1, heads * value.shape[-1])
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_capture(unet, factors=None) -> tuple[AttentionMapStore, tuple[int, ...]]:
    """Put `ProbsAttnProcessor` on the layers of the chosen levels only; return (store, factors)."""
    layers = list_attention_layers(unet)
    factors = choose_factors(layers, factors)
    store = AttentionMapStore()
    processors = dict(unet.attn_processors)  # keep every other layer's processor as it is
    for layer in layers:
        if layer.factor in factors:
            processors[layer.name] = ProbsAttnProcessor(store, layer.factor, layer.kind)
    unet.set_attn_processor(processors)
    return store, factors


def scfg_unet_step(unet, store, factors, latents, timestep, encoder_hidden_states, scale, *,
                   added_cond_kwargs=None, corrected=False, return_parts=False):
    """One S-CFG denoiser evaluation in torch: UNet on [uncond; cond], then `scfg_combine`.

    `latents` `[B, C, H, W]`; `encoder_hidden_states` `[2B, L, D]` unconditional first. Returns the
    guided prediction (and `(u, c, self_maps, cross_maps)` with `return_parts`).
    """
    import torch

    from samg.scfg.reference import scfg_combine

    store.clear()
    x = torch.cat([latents, latents])
    t = timestep.reshape(-1)
    t = torch.cat([t, t]) if t.numel() == latents.shape[0] else t.expand(x.shape[0])
    pred = unet(x, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                return_dict=False)[0]
    u, c = pred.chunk(2)
    self_maps, cross_maps = store.stacks(factors)
    out = scfg_combine(u, c, self_maps, cross_maps, scale, factors=factors, corrected=corrected)
    return (out, (u, c, self_maps, cross_maps)) if return_parts else out
