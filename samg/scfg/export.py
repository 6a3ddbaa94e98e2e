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

from samg.errors import check, require

UNET_CLASSES = ("UNet2DConditionModel",)
DECIDED_MARGIN = 1e-4  # relative top-2 gap above which float rounding cannot change a mask


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
            """Error of the exported graph's `guided` output `got` against this module, for `samg export`.

            S-CFG's masks are arg-maxes over token maps that are often equal to a few float ulps (measured on
            samg-digits: smallest top-2 gap ~1e-7..1e-6 relative), so ONNX Runtime and torch, whose attention
            probabilities differ by rounding, may put a location in another region and change every rate.
            Samples whose masks are decided by more than `DECIDED_MARGIN` are compared exactly; the others
            must lie on the S-CFG line `u + s(p)·Δ` with s within the rate clamps (checks u, c and the form,
            not which region a tied location joined). Relative to max(1, max|reference|) per sample.
            """
            import numpy as np

            from samg.scfg.reference import RATE_BUDGET, RATE_MAX, RATE_MIN, semantic_maps

            with torch.no_grad():
                u, c, scales, self_maps, cross_maps, factors = self.parts(*inputs)
                want = self.forward(*inputs).float().numpy()
                token_maps, fore_maps = semantic_maps(self_maps, cross_maps, tuple(u.shape[-2:]), factors=factors,
                                                      corrected=self.corrected)
            batch = u.shape[0]
            token = token_maps[batch:].topk(2, dim=1).values if token_maps.shape[1] > 1 else None
            fore = fore_maps[batch:] if self.corrected else fore_maps[:batch]
            got = np.asarray(got, np.float32)
            u, c = u.float().numpy(), c.float().numpy()
            w = scales.float().numpy().reshape(batch, -1)[:, 0]
            worst = 0.0
            for b in range(batch):
                gaps = [(fore[b, 0] - fore[b, 1]).abs() / fore[b].abs().amax(0).clamp_min(1e-30)]
                if token is not None:
                    gaps.append((token[b, 0] - token[b, 1]) / token[b, 0].abs().clamp_min(1e-30))
                decided = min(float(g.min()) for g in gaps) > DECIDED_MARGIN
                norm = max(1.0, float(np.abs(want[b]).max()))
                if decided:
                    worst = max(worst, float(np.abs(got[b] - want[b]).max()) / norm)
                    continue
                delta, step = c[b] - u[b], got[b] - u[b]  # [C, H, W]
                energy = np.maximum((delta * delta).sum(0), 1e-30)
                s = (step * delta).sum(0) / energy
                off_line = np.abs(step - s * delta).max()
                lo, hi = min(RATE_MIN, RATE_BUDGET / w[b]) * w[b], min(RATE_MAX, RATE_BUDGET / w[b]) * w[b]
                outside = (np.maximum(lo - s, 0) + np.maximum(s - hi, 0)) * np.sqrt(energy)
                worst = max(worst, float(max(off_line, outside.max())) / norm)
            return worst

        def manifest_combine(self) -> dict:
            """The manifest's `combine` entry for this export."""
            from samg.scfg.op import DOMAIN, OP_TYPE, OP_VERSION

            factors = self.factors * 2 if len(self.factors) == 1 else self.factors
            return {"domain": DOMAIN, "op": OP_TYPE, "version": OP_VERSION,
                    "factor_fine": factors[0], "factor_coarse": factors[1], "corrected": int(self.corrected),
                    "levels": list(self.factors), "scales": "guidance_scales[:, 0] is w; feed (w, w)"}

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
