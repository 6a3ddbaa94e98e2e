"""Torch reference runner: runs the export's own wrapper modules (samg.export.wrappers) in eager
torch on the diffusers pipeline saved in the export's source/ folder, with the same inputs and
outputs as the ONNX graph it stands for. Used to tell exporter bugs from runtime bugs."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from samg.errors import SamgError, require


@functools.lru_cache(maxsize=2)
def _load(export_dir: Path):
    """(manifest, spec, diffusers pipeline) for an export folder, loaded once for all its graphs."""
    manifest = json.loads((export_dir / "samg.json").read_text())
    source = manifest.get("source", {})
    path = export_dir / source["path"] if source.get("kind") == "tiny" else Path(source.get("path") or "")
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
            combine = {k: manifest["combine"][k] for k in ("tau", "sharpness", "smooth", "channel_axis")}
            fused = manifest["guidance"] == "fused"
            self.module = wrappers.Denoiser(getattr(pipe, spec.denoiser_component), spec, fused=fused,
                                            combine=combine, extras={"spatial_factor": factor})
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
            raise SamgError(f"{name} is not a graph listed in samg.json: the torch backend runs export folders only")
        self.module = self.module.eval().to(self.device)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in self.input_names]
        with torch.no_grad():
            out = self.module(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.float().cpu().numpy() for n, o in zip(self.output_names, outs)}
