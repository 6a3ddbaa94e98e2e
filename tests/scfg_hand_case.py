"""The S-CFG case computed by hand, shared by the reference, capture and op tests.

One 2x2 attention level of a 4x4 latent, one layer, identity self-attention (S~ = I in both modes,
so A = cross). Tokens: 0 = start of text, 1 = "cat", 2 = "sky"; every map is constant along the
width, so only the vertical blur acts: a map [a, b] with mean m normalizes to
[((1-ALPHA)a + ALPHA b)/m, ...].
  cond tokens: SOT [.4,.6] -> [.970, 1.030]; cat [.5,.1] -> [1.102, .898]; sky [.1,.3] -> [.924, 1.076]
    => top row: cat, bottom row: sky.
  uncond fore: SOT [.9,.2] -> [1.097, .903]; others [.1,.8] -> [.882, 1.118] => foreground = bottom row.
  cond fore:   SOT [.4,.6] -> [.970, 1.030]; others [.6,.4] -> [1.030, .970] => foreground = top row.
Δ has norm 1 in the top half of the latent and 5 in the bottom half; the foreground comes from the
unconditional half (the official code's quirk) or the conditional half (corrected).
"""

from __future__ import annotations

import math

import torch

E = math.exp(-1.0)
K0, K1 = E / (1 + 2 * E), 1 / (1 + 2 * E)  # 1-D blur weights: [K0, K1, K0]
ALPHA = 2 * K0  # on a length-2 axis with reflect padding, blur maps [a, b] -> [(1-ALPHA)a + ALPHA b, ...]

UNCOND = ([0.9, 0.05, 0.05], [0.2, 0.4, 0.4])  # (top row, bottom row) cross-attention probs per token
COND = ([0.4, 0.5, 0.1], [0.6, 0.1, 0.3])

#: (corrected, w) -> the rate per latent row after the vertical blur [K0, K1, K0] (reflect padding).
RATE_ROWS = {
    # quirk, fore = bottom (norm 5): rate_cat = 5/1 -> clamp 3 -> cap 15/7.5 = 2; rate_sky = 5/5 = 1.
    # rows [2, 2, 1, 1] -> [2, 2 - K0, 1 + K0, 1]
    (False, 7.5): [2.0, 2 - K0, 1 + K0, 1.0],
    # quirk, w = 2: the cap 15/2 = 7.5 is loose, so rate_cat = 3: rows [3, 3, 1, 1]
    (False, 2.0): [3.0, 3 - 2 * K0, 1 + 2 * K0, 1.0],
    # corrected, fore = top (norm 1): rate_cat = 1/1, rate_sky = 1/5 -> clamp 0.8: rows [1, 1, .8, .8]
    (True, 7.5): [1.0, 1 - 0.2 * K0, 0.8 + 0.2 * K0, 0.8],
}


def cross_rows(top, bottom):
    """Cross-attention probs of a 2x2 level whose rows are constant: [N=4, T] (row-major locations)."""
    return torch.tensor([top, top, bottom, bottom])


def hand_level():
    """(self, cross) of the level, batch [uncond, cond]: [2, 1, 4, 4] and [2, 1, 4, 3]."""
    cross = torch.stack([cross_rows(*UNCOND), cross_rows(*COND)])[:, None]
    return torch.eye(4).expand(2, 1, 4, 4).clone(), cross


def uniform_coarse_level():
    """A 1x1 level: it upsamples to a constant map, adding the same to every token's normalized map."""
    return torch.ones(2, 1, 1, 1), torch.full((2, 1, 1, 3), 1 / 3)


def hand_delta():
    """Δ [1, 2, 4, 4]: norm 1 in the top half (channel 0 = 1), 5 in the bottom half (3, 4)."""
    delta = torch.zeros(1, 2, 4, 4)
    delta[0, 0, :2] = 1.0
    delta[0, 0, 2:], delta[0, 1, 2:] = 3.0, 4.0
    return delta


def rate_map(rows):
    """A 4x4 rate map holding `rows[i]` along latent row i."""
    return torch.tensor(rows, dtype=torch.float32)[:, None].expand(4, 4)
