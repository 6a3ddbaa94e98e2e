"""S-CFG (Shen et al., CVPR 2024) reference combine, in torch, written to match the official code.

Inputs are the head-averaged attention probabilities of the UNet's self- and cross-attention layers,
captured in the same forward pass that produced `u` (unconditional) and `c` (conditional) — see
`samg.scfg.capture` for how they are captured. Everything here is a pure function of tensors.

Attention maps are given per *level* (one UNet resolution), finest level first:
  self_maps[l]  `[2B, n_l, h_l*w_l, h_l*w_l]`   (the n_l self-attention layers of that level, stacked)
  cross_maps[l] `[2B, n_l, h_l*w_l, T]`         (the matching cross-attention layers, same order)
The batch is "unconditional first, conditional second", like the UNet input. Level 0 sets the mask
resolution `h_0 x w_0`; coarser levels are upsampled to it (bilinear), as the code does for 8x8 -> 16x16.

Quirks of the official code reproduced by default (`corrected=False`):
  * self-attention completion is `(S + 3*S@S) / 4` (its loop meant the average of S, S^2, S^3, S^4);
  * token masks come from the conditional half, the foreground map from the unconditional half.
`corrected=True` uses the true average of powers and takes the foreground from the conditional half.
"""

from __future__ import annotations

import math
from typing import Sequence

from samg.errors import SamgError, check
from samg.op.schema import SMOOTH_WEIGHTS

RATE_MIN = 0.8
RATE_MAX = 3.0
RATE_BUDGET = 15.0  # rate is also capped at RATE_BUDGET / w
EPS = 1e-8  # the code's epsilon in every normalization that has one

# 3x3 Gaussian of the code (sigma 0.5 with its exp(-(x/(2 sigma))^2) form): 1-D weights [e^-1, 1, e^-1]
# normalized, the same weights as samg-v1's smoothing
BLUR_1D = SMOOTH_WEIGHTS


def blur3x3(x):
    """3x3 Gaussian of the code over the last two axes, reflect padding. x: `[..., H, W]` float."""
    import torch
    import torch.nn.functional as F

    lead, (h, w) = x.shape[:-2], x.shape[-2:]
    k1 = torch.tensor(BLUR_1D, dtype=x.dtype, device=x.device)
    kernel = (k1[:, None] * k1[None, :]).view(1, 1, 3, 3)
    flat = F.pad(x.reshape(-1, 1, h, w), (1, 1, 1, 1), mode="reflect")
    return F.conv2d(flat, kernel).reshape(*lead, h, w)


def complete_self_attention(self_maps, corrected: bool = False):
    """S~ from S `[..., N, N]`: the code's `(S + 3 S^2)/4`, or `(S + S^2 + S^3 + S^4)/4` if corrected."""
    s2 = self_maps @ self_maps
    if not corrected:
        return (self_maps + 3.0 * s2) / 4.0
    s3 = s2 @ self_maps
    return (self_maps + s2 + s3 + s3 @ self_maps) / 4.0


def _level_size(level_tokens: int, latent_hw: tuple[int, int], factor: int | None) -> tuple[int, int]:
    """(h, w) of a level with `level_tokens` = h*w locations, from its downsampling factor."""
    height, width = latent_hw
    if factor is None:  # square-pixel UNet: factor^2 = H*W / (h*w)
        factor = round(math.sqrt(height * width / level_tokens))
    h, w = height // max(factor, 1), width // max(factor, 1)
    check(
        factor >= 1 and h * factor == height and w * factor == width and h * w == level_tokens,
        f"S-CFG: an attention map with {level_tokens} locations does not fit the latent size "
        f"{height}x{width} at factor {factor}: pass the level factors of the captured layers",
    )
    return h, w


def semantic_maps(self_maps: Sequence, cross_maps: Sequence, latent_hw, *, factors=None, corrected=False):
    """Aggregated, normalized token maps and foreground maps of both batch halves.

    Returns `(token_maps [2B, T, h0, w0], fore_maps [2B, 2, h0, w0])`, each summed over all layers of
    all levels and divided by the layer count, as `get_mask` in the official code. `fore_maps` holds
    the start-of-text map and the sum of all other token maps, each normalized by its spatial mean.
    """
    import torch
    import torch.nn.functional as F

    check(len(self_maps) == len(cross_maps) and len(self_maps) > 0,
          "S-CFG: give one self- and one cross-attention stack per level, at least one level")
    factors = list(factors) if factors is not None else [None] * len(self_maps)
    check(len(factors) == len(self_maps), "S-CFG: give one factor per level")
    mask_hw = None
    token_sum = fore_sum = 0
    layer_count = 0
    for sa, ca, factor in zip(self_maps, cross_maps, factors):
        sa, ca = sa.float(), ca.float()
        check(sa.ndim == 4 and ca.ndim == 4 and sa.shape[:3] == ca.shape[:3] and sa.shape[2] == sa.shape[3],
              f"S-CFG: attention stacks must be [2B, n, N, N] and [2B, n, N, T], got {tuple(sa.shape)} "
              f"and {tuple(ca.shape)}")
        batch2, n, tokens, text_len = ca.shape
        h, w = _level_size(tokens, latent_hw, factor)
        if mask_hw is None:
            mask_hw = (h, w)
        maps = complete_self_attention(sa, corrected) @ ca  # [2B, n, hw, T]
        maps = maps.transpose(-1, -2).reshape(batch2 * n, text_len, h, w)
        if (h, w) != mask_hw:
            maps = F.interpolate(maps, size=mask_hw, mode="bilinear", align_corners=False)
        maps = blur3x3(maps)
        normed = maps / (maps.mean(dim=(2, 3), keepdim=True) + EPS)
        token_sum = token_sum + normed.reshape(batch2, n, text_len, *mask_hw).sum(1)
        fore = torch.stack([maps[:, 0], maps[:, 1:].sum(dim=1)], dim=1)
        fore = fore / fore.mean(dim=(2, 3), keepdim=True)  # the code has no epsilon here
        fore_sum = fore_sum + fore.reshape(batch2, n, 2, *mask_hw).sum(1)
        layer_count += n
    return token_sum / layer_count, fore_sum / layer_count


def semantic_masks(self_maps, cross_maps, latent_hw, *, factors=None, corrected=False):
    """`(token_mask [B, T, h0, w0], fore_mask [B, 1, h0, w0])`, 0/1 float32.

    Each location belongs to the token(s) whose normalized map is largest (ties: all of them, as the
    code's `== max`). Foreground: where the summed non-start tokens' map beats the start-of-text map.
    """
    token_maps, fore_maps = semantic_maps(self_maps, cross_maps, latent_hw, factors=factors, corrected=corrected)
    uncond_tokens, cond_tokens = token_maps.chunk(2, dim=0)
    uncond_fore, cond_fore = fore_maps.chunk(2, dim=0)
    token_mask = (cond_tokens == cond_tokens.max(dim=1, keepdim=True).values).float()
    fore = cond_fore if corrected else uncond_fore
    fore_mask = 1.0 - (fore[:, :1] == fore.max(dim=1, keepdim=True).values).float()
    return token_mask, fore_mask


def _scale_column(scale, batch: int, device):
    """Per-sample w as `[B, 1, 1, 1]` float32 from a float, `[B]`, `[B, 1]` or `[B, 2]` (first column)."""
    import torch

    w = torch.as_tensor(scale, dtype=torch.float32, device=device)
    if w.ndim == 2:
        w = w[:, 0]
    w = w.reshape(-1)
    check(w.numel() in (1, batch), f"S-CFG: scale must be one value or one per sample ({batch}), got {w.numel()}")
    return w.expand(batch).reshape(batch, 1, 1, 1)


def scfg_rate(delta, token_mask, fore_mask, scale):
    """Per-location rate `[B, 1, H, W]` (float32) from the delta score `[B, C, H, W]` and the masks."""
    import torch.nn.functional as F

    delta = delta.float()
    batch, _, height, width = delta.shape
    check(height % token_mask.shape[-2] == 0 and width % token_mask.shape[-1] == 0,
          "S-CFG: the latent size must be a multiple of the mask size")
    mask_t = F.interpolate(token_mask, size=(height, width), mode="nearest")
    mask_fore = F.interpolate(fore_mask, size=(height, width), mode="nearest")
    norm = delta.norm(dim=1, keepdim=True)  # [B, 1, H, W]
    region_norm = (norm * mask_t).sum((2, 3)) / (mask_t.sum((2, 3)) + EPS)  # [B, T]
    fore_norm = (norm * mask_fore).sum((2, 3)) / (mask_fore.sum((2, 3)) + EPS)  # [B, 1]
    present = (mask_t.sum((2, 3)) > 0).float()
    rate_k = fore_norm * present / (region_norm + EPS)  # [B, T]
    rate = (rate_k[:, :, None, None] * mask_t).sum(dim=1, keepdim=True)
    w = _scale_column(scale, batch, delta.device)
    rate = rate.clamp(RATE_MIN, RATE_MAX)
    rate = rate.minimum(RATE_BUDGET / w)
    return blur3x3(rate)


def scfg_combine(u, c, self_maps, cross_maps, scale, *, factors=None, corrected=False, return_rate=False):
    """S-CFG guided prediction `u + w * rate(p) * (c - u)`, dtype of `u`, math in float32.

    `scale` is w (diffusers convention): a float or one value per sample (`[B]`, `[B,1]`, or `[B,2]`
    whose first column is used). `factors` are the levels' downsampling factors (finest first); by
    default inferred from the map sizes assuming square latent pixels per level.
    """
    check(tuple(u.shape) == tuple(c.shape) and u.ndim == 4,
          f"S-CFG: pred_uncond and pred_cond must both be [B, C, H, W], got {tuple(u.shape)}, {tuple(c.shape)}")
    batch, _, height, width = u.shape
    if self_maps and self_maps[0].shape[0] != 2 * batch:
        raise SamgError(f"S-CFG: attention maps must have batch 2B = {2 * batch} (uncond first), "
                        f"got {self_maps[0].shape[0]}")
    token_mask, fore_mask = semantic_masks(self_maps, cross_maps, (height, width), factors=factors, corrected=corrected)
    return combine_with_masks(u, c, token_mask, fore_mask, scale, return_rate=return_rate)


def combine_with_masks(u, c, token_mask, fore_mask, scale, *, return_rate=False):
    """`u + w * rate(p) * (c - u)` for given masks (`semantic_masks`' outputs, or another implementation's
    decisions: `samg.scfg.compare` recomputes a graph's output from its own masks), dtype of `u`."""
    check(tuple(u.shape) == tuple(c.shape) and u.ndim == 4,
          f"S-CFG: pred_uncond and pred_cond must both be [B, C, H, W], got {tuple(u.shape)}, {tuple(c.shape)}")
    uf, cf = u.float(), c.float()
    delta = cf - uf
    rate = scfg_rate(delta, token_mask.float(), fore_mask.float(), scale)
    out = (uf + _scale_column(scale, u.shape[0], u.device) * rate * delta).to(u.dtype)
    return (out, rate) if return_rate else out
