"""`samg export --guidance scfg`: a guided denoiser whose graph computes S-CFG itself.

The exporter builds its usual fused `Denoiser` (inputs `latents`, `timestep`, conditioning `[2B, ...]`,
`guidance_scales`; output `guided`) and hands it to `scfg_denoiser`, which
  * puts `ProbsAttnProcessor` (explicit softmax(QK^T), no SDPA) on the self/cross attention layers of the
    two lowest attention resolutions only, so their head-averaged probabilities are graph tensors;
  * replaces the GuidanceCombine call by one `samg::SemanticCombine` node fed with those maps.
`guidance_scales` keeps its `[B, 2]` shape; column 0 is w (the runtime feeds `(w, w)`).
After export, `attach_to_model` adds the op's function body so any ONNX runtime runs it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from samg.errors import check, require

UNET_CLASSES = ("UNet2DConditionModel",)
# Relative top-2 gap of the normalized maps above which float rounding cannot change a mask. The maps
# are sums of positive terms (softmax, S·S, S·A over <= ~100 entries each, token sums, means), so two
# float32 implementations differ by at most ~n·2^-24 ~ 1e-5 relative in the worst case whatever the
# summation order or instruction set (measured on samg-digits, ORT vs torch: 2.4e-7). A gap above 1e-4
# cannot close; one below may be decided either way.
DECIDED_MARGIN = 1e-4


class TieCheck(NamedTuple):
    error: float  # largest error, relative to max(1, max|reference|) per sample
    decided_fraction: float  # share of output locations compared exactly


def undecided_locations(token_maps, fore_maps, latent_hw, *, corrected: bool = False, margin: float | None = None):
    """`[B, H, W]` bool: where S-CFG's output may change if tied masks are decided the other way.

    `token_maps [2B, T, h, w]`, `fore_maps [2B, 2, h, w]` from `samg.scfg.reference.semantic_maps`.
    A mask location is tied when its two largest maps lie within `margin` (relative; default
    `DECIDED_MARGIN`). A tie moves a location between regions, which changes the rates of every
    token it could join (region means) and, for the foreground, of all tokens (the foreground mean is
    in every rate). So a location is undecided if it is tied, if its token could gain or lose a tied
    location, or if any foreground location is tied; then the 3x3 blur of the rate spreads that by one.
    """
    import numpy as np

    margin = DECIDED_MARGIN if margin is None else margin
    token_maps, fore_maps = (np.asarray(m, np.float64) for m in (token_maps, fore_maps))
    batch = token_maps.shape[0] // 2
    cond = token_maps[batch:]
    fore = fore_maps[batch:] if corrected else fore_maps[:batch]
    top = cond.max(axis=1, keepdims=True)
    tied = (top - cond) <= margin * np.abs(top)  # [B, T, h, w]: the winner and every token within the margin
    tied_here = tied.sum(axis=1) > 1  # [B, h, w]
    token_affected = (tied & tied_here[:, None]).any(axis=(2, 3))  # [B, T]: could gain or lose a location
    unsure = tied_here | (tied & token_affected[:, :, None, None]).any(axis=1)
    fore_tied = np.abs(fore[:, 0] - fore[:, 1]) <= margin * np.abs(fore).max(axis=1)
    unsure |= fore_tied.any(axis=(1, 2))[:, None, None]
    height, width = latent_hw
    h, w = unsure.shape[1:]
    unsure = unsure.repeat(height // h, axis=1).repeat(width // w, axis=2)  # masks are upsampled (nearest)
    padded = np.pad(unsure, ((0, 0), (1, 1), (1, 1)))
    return np.any([padded[:, i:i + height, j:j + width] for i in range(3) for j in range(3)], axis=0)


def tie_aware_check(u, c, scale, token_maps, fore_maps, got, want, *, corrected: bool = False,
                    margin: float | None = None) -> TieCheck:
    """Compare an S-CFG output `got` with the reference `want` (`[B, C, H, W]`), aware of mask ties.

    The one comparison every S-CFG check uses (export validation, tests, benchmarks). S-CFG's masks are
    arg-maxes over maps that can be equal to float rounding (samg-digits: top-2 gaps ~1e-7..1e-6
    relative), so two correct implementations may decide a tie differently. Where the reference is
    decided (`undecided_locations` is False) `got` must equal `want`; elsewhere it must be a valid S-CFG
    output for some tie decision: on the S-CFG line `u + s(p)·Δ` (Δ = c − u, so u and c are checked)
    with s within the rate clamps `[min(0.8, 15/w)·w, min(3, 15/w)·w]`. `u`, `c`: the reference's two
    predictions; `scale`: w as a float, `[B]` or `[B, K]` (column 0).
    """
    import numpy as np

    from samg.scfg.reference import RATE_BUDGET, RATE_MAX, RATE_MIN

    u, c, got, want = (np.asarray(a, np.float32) for a in (u, c, got, want))
    batch = u.shape[0]
    w = np.asarray(scale, np.float32)
    w = np.broadcast_to(w.reshape(batch, -1)[:, 0] if w.ndim == 2 else w.reshape(-1), (batch,))
    unsure = undecided_locations(token_maps, fore_maps, u.shape[-2:], corrected=corrected, margin=margin)
    worst = 0.0
    for b in range(batch):
        norm = max(1.0, float(np.abs(want[b]).max()))
        exact = np.where(unsure[b], 0.0, np.abs(got[b] - want[b]).max(axis=0))
        delta, step = c[b] - u[b], got[b] - u[b]  # [C, H, W]
        energy = np.maximum((delta * delta).sum(0), 1e-30)
        s = (step * delta).sum(0) / energy
        off_line = np.abs(step - s * delta).max(axis=0)
        lo, hi = min(RATE_MIN, RATE_BUDGET / w[b]) * w[b], min(RATE_MAX, RATE_BUDGET / w[b]) * w[b]
        outside = (np.maximum(lo - s, 0) + np.maximum(s - hi, 0)) * np.sqrt(energy)
        line = np.where(unsure[b], np.maximum(off_line, outside), 0.0)
        worst = max(worst, float(np.maximum(exact, line).max()) / norm)
    return TieCheck(worst, float(1.0 - unsure.mean()))


@functools.cache
def _module_class():
    torch = require("torch", "to export S-CFG")

    class ScfgDenoiser(torch.nn.Module):
        """latents [B,...], timestep [B], conditioning [2B,...], guidance_scales [B,K] -> guided."""

        def __init__(self, base, store, factors, corrected):
            super().__init__()
            self.base = base  # the exporter's Denoiser (holds the UNet and the family's call)
            self.store, self.factors, self.corrected = store, tuple(factors), bool(corrected)

        def parts(self, latents, timestep, *rest):
            """(u, c, scales, self_maps, cross_maps, factors): everything the combine node receives."""
            base = self.base
            names = base.spec.conditioning
            cond = dict(zip(names, rest[: len(names)]))
            (scales,) = rest[len(names):]
            batch = latents.shape[0]
            self.store.clear()
            x = torch.cat([latents, latents])
            t = torch.cat([timestep, timestep])
            pred = base._call(base.model, x, t, cond, base.extras).to(latents.dtype)
            self_maps, cross_maps = self.store.stacks(self.factors)
            factors = self.factors
            if len(factors) == 1:
                # A UNet with one attention level (tiny test configs): feeding that level twice gives
                # exactly the one-level result ((a + a) / (n + n) == a / n in floating point).
                self_maps, cross_maps, factors = self_maps * 2, cross_maps * 2, factors * 2
            return pred[:batch], pred[batch:], scales, self_maps, cross_maps, factors

        def forward(self, latents, timestep, *rest):
            from samg.scfg.op import semantic_combine

            u, c, scales, self_maps, cross_maps, factors = self.parts(latents, timestep, *rest)
            return semantic_combine(u, c, scales, self_maps, cross_maps, factors=factors, corrected=self.corrected)

        def validation_error(self, inputs, got) -> float:
            """Error of the exported graph's `guided` output `got` against this module, for `samg export`:
            `tie_aware_check` (exact where the masks are decided, on the S-CFG line where they are tied)."""
            from samg.scfg.reference import semantic_maps

            with torch.no_grad():
                u, c, scales, self_maps, cross_maps, factors = self.parts(*inputs)
                want = self.forward(*inputs)
                token_maps, fore_maps = semantic_maps(self_maps, cross_maps, tuple(u.shape[-2:]), factors=factors,
                                                      corrected=self.corrected)
            return tie_aware_check(u.float(), c.float(), scales.float(), token_maps, fore_maps, got, want.float(),
                                   corrected=self.corrected).error

        def combine_attrs(self):
            """The manifest's combine for this export (samg.contract.SemanticCombineAttrs)."""
            from samg.contract import SemanticCombineAttrs

            factors = self.factors * 2 if len(self.factors) == 1 else self.factors
            return SemanticCombineAttrs(factor_fine=factors[0], factor_coarse=factors[1], corrected=self.corrected,
                                        levels=tuple(self.factors))

    return ScfgDenoiser


def scfg_denoiser(denoiser, *, factors=None, corrected: bool = False):
    """Wrap the exporter's fused `Denoiser` so that its graph computes S-CFG (see module doc)."""
    from samg.scfg.capture import install_capture

    check(denoiser.spec.denoiser_class in UNET_CLASSES,
          f"--guidance scfg needs a UNet with cross-attention (SD1.5, SD2.1, SDXL); {denoiser.spec.name} has a "
          f"{denoiser.spec.denoiser_class}: use --guidance fused or raw")
    store, chosen = install_capture(denoiser.model, factors)
    return _module_class()(denoiser, store, chosen, corrected).eval()


def attach_to_model(model) -> None:
    """Add the SemanticCombine function body to an exported ONNX model (in place)."""
    from samg.scfg.op import attach_function

    attach_function(model)
