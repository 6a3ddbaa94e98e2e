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

        @staticmethod
        def validation_session(path, session_options=None, providers=("CPUExecutionProvider",)):
            """ONNX Runtime session for `samg export`'s validation: the graph plus its mask decisions."""
            from samg.scfg.compare import probe_session

            return probe_session(path, session_options, providers)

        def validation_check(self, inputs, outputs):
            """`samg.scfg.compare.tie_safe_check` of a graph run on `inputs` (`outputs`: the run of a
            `validation_session` by name: `guided` and the graph's masks) against this module."""
            from samg.scfg.compare import PROBE_FORE_MASK, PROBE_TOKEN_MASK, tie_safe_check
            from samg.scfg.reference import semantic_maps

            with torch.no_grad():
                u, c, scales, self_maps, cross_maps, factors = self.parts(*inputs)
                token_maps, fore_maps = semantic_maps(self_maps, cross_maps, tuple(u.shape[-2:]), factors=factors,
                                                      corrected=self.corrected)
            return tie_safe_check(u.float(), c.float(), scales.float(), token_maps, fore_maps,
                                  outputs[PROBE_TOKEN_MASK], outputs[PROBE_FORE_MASK], outputs["guided"],
                                  corrected=self.corrected)

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
