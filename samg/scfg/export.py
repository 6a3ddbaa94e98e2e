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


@functools.cache
def _module_class():
    torch = require("torch", "to export S-CFG")

    class ScfgDenoiser(torch.nn.Module):
        """latents [B,...], timestep [B], conditioning [2B,...], guidance_scales [B,K] -> guided."""

        def __init__(self, base, store, factors, corrected):
            super().__init__()
            self.base = base  # the exporter's Denoiser (holds the UNet and the family's call)
            self.store, self.factors, self.corrected = store, tuple(factors), bool(corrected)

        def forward(self, latents, timestep, *rest):
            from samg.scfg.op import semantic_combine

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
            return semantic_combine(pred[:batch], pred[batch:], scales, self_maps, cross_maps,
                                    factors=factors, corrected=self.corrected)

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
