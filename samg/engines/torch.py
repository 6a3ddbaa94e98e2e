"""Torch reference runner: runs the export's own wrapper modules (samg.export.wrappers) in eager
torch on the diffusers pipeline saved in the export's source/ folder, with the same inputs and
outputs as the ONNX graph it stands for. Used to tell exporter bugs from runtime bugs."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from samg.errors import SamgError, require


@functools.lru_cache(maxsize=2)
def _load(export_dir: Path):
    """(manifest, spec, diffusers pipeline) for an export folder, loaded once for all its graphs."""
    from samg.contract import read_export

    # verify=False: this backend runs the source pipeline, not the graphs the hashes cover.
    manifest = read_export(export_dir, verify=False)
    source = manifest["source"]
    path = export_dir / source["path"] if source["kind"] == "tiny" else Path(source.get("path") or "")
    if not (path / "model_index.json").is_file():
        raise SamgError(f"the torch backend needs the diffusers model folder ({path} not found): use --backend onnxruntime")
    torch = require("torch", "for the torch reference backend")
    from samg.export.exporter import _load_pipeline, _vae_factor
    from samg.models.specs import get_spec

    spec = get_spec(manifest["model"])
    pipe = _load_pipeline(spec, str(path), "path", torch.float32)
    return manifest, spec, pipe, _vae_factor(pipe)


class TorchRunner:
    def __init__(self, path: Path, device: str = "cpu", **_opts):
        self.torch = require("torch", "for the torch reference backend")
        from samg.export import wrappers

        path = Path(path)
        manifest, spec, pipe, factor = _load(path.parent.resolve())
        self.device = "cuda" if device == "cuda" else "cpu"
        name = path.name
        if name == manifest["denoiser"]["file"]:
            self.module = _denoiser_module(manifest, spec, pipe, factor)
            fused = manifest["guidance"] in ("fused", "scfg")  # scfg: the fused inputs and output
            self.input_names = ["latents", "timestep", *spec.conditioning] + (["guidance_scales"] if fused else [])
            self.output_names = ["guided"] if fused else ["pred_uncond", "pred_cond"]
        elif name == manifest["text_encoder"]["file"]:
            self.module = wrappers.TextEncoder([getattr(pipe, te.encoder) for te in spec.text_encoders], spec)
            self.input_names = [t["input"] for t in manifest["text_encoder"]["tokenizers"]]
            self.output_names = list(manifest["text_encoder"]["outputs"])
        elif name == manifest["vae"]["file"]:
            self.module = wrappers.VaeDecoder(pipe.vae)
            self.input_names, self.output_names = ["latents"], ["images"]
        else:
            from samg.contract import MANIFEST

            raise SamgError(f"{name} is not a graph listed in {MANIFEST}: the torch backend runs export folders only")
        self.module = self.module.eval().to(self.device)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in self.input_names]
        with torch.no_grad():
            out = self.module(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.float().cpu().numpy() for n, o in zip(self.output_names, outs)}


def _denoiser_module(manifest: dict, spec, pipe, factor: int):
    """The export's denoiser wrapper: GuidanceCombine (fused), two predictions (raw), or the S-CFG
    graph (scfg: the manifest's combine entry is SemanticCombine's, with its levels and variant)."""
    from samg.export import wrappers
    from samg.op import schema

    model = getattr(pipe, spec.denoiser_component)
    combine = manifest["combine"]
    if manifest["guidance"] != "scfg":
        attributes = {k: combine[k] for k in ("tau", "sharpness", "smooth", "channel_axis")}
        return wrappers.Denoiser(model, spec, fused=manifest["guidance"] == "fused", combine=attributes,
                                 extras={"spatial_factor": factor})
    from samg.scfg.export import scfg_denoiser

    # The base module's GuidanceCombine is replaced by the S-CFG combine; its attributes are unused.
    unused = dict(tau=schema.DEFAULT_TAU, sharpness=schema.DEFAULT_SHARPNESS, smooth=schema.DEFAULT_SMOOTH,
                  channel_axis=spec.channel_axis)
    base = wrappers.Denoiser(model, spec, fused=True, combine=unused, extras={"spatial_factor": factor})
    levels = combine.get("levels") or sorted({combine["factor_fine"], combine["factor_coarse"]})
    return scfg_denoiser(base, factors=tuple(levels), corrected=bool(combine["corrected"]))
