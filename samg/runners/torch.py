"""Torch reference runner: runs the export's own wrapper modules (samg.export.wrappers) in eager
torch on the diffusers pipeline saved in the export's source/ folder, with the same inputs and
outputs as the ONNX graph it stands for. Used to tell exporter bugs from runtime bugs."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from samg.errors import SamgError, require
from samg.runners.base import GraphRunner, export_graph


def _load(export_dir: Path):
    """(spec, diffusers pipeline, VAE factor) for an export folder, loaded once for all its graphs.
    Cached per manifest as written (its inode, size and mtime): a re-export into the same folder
    rewrites samg.json, so the next runner loads the new source instead of the stale pipeline."""
    from samg.contract import MANIFEST

    try:
        stat = (export_dir / MANIFEST).stat()
        written = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    except OSError:
        written = None  # read_export names the missing manifest
    return _load_written(export_dir, written)


@functools.lru_cache(maxsize=2)
def _load_written(export_dir: Path, written):  # `written` (the manifest's stat) is only part of the cache key
    from samg.contract import read_export

    export = read_export(export_dir, verify=False)  # this backend runs the source, not the graphs
    path = export.source.model_dir(export_dir)
    if path is None or not (path / "model_index.json").is_file():
        where = f"{path} not found" if path is not None else f"the export came from the hub id {export.source.hub_id}"
        raise SamgError(f"the torch backend needs the diffusers model folder ({where}): use --backend onnxruntime")
    torch = require("torch", "for the torch reference backend")
    from samg.export import load_source_pipeline, vae_spatial_factor
    from samg.models.specs import get_spec

    spec = get_spec(export.model)
    pipe = load_source_pipeline(spec, str(path), "path", torch.float32)
    return spec, pipe, vae_spatial_factor(pipe)


class TorchRunner(GraphRunner):
    def __init__(self, path: Path, device: str = "cpu", **_opts):
        self.torch = require("torch", "for the torch reference backend")
        from samg.export import wrappers

        self.path = Path(path)
        # The modules compute in float32 whatever the export's dtype: float feeds are cast to it.
        export, role, self.inputs, self.output_names = export_graph(self.path, float_dtype="float32")
        spec, pipe, factor = _load(self.path.parent.resolve())
        self.device = "cuda" if device == "cuda" else "cpu"
        if role == "denoiser":
            self.module = _denoiser_module(export, spec, pipe, factor)
        elif role == "text_encoder":
            self.module = wrappers.TextEncoder([getattr(pipe, te.encoder) for te in spec.text_encoders], spec)
        else:
            self.module = wrappers.VaeDecoder(pipe.vae)
        self.module = self.module.eval().to(self.device)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in self.input_names]
        with torch.no_grad():
            out = self.module(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.float().cpu().numpy() for n, o in zip(self.output_names, outs)}


def _denoiser_module(export, spec, pipe, factor: int):
    """The export's denoiser wrapper: GuidanceCombine (fused), two predictions (raw), or the S-CFG
    graph (scfg: the combine is SemanticCombine's, with its levels and variant)."""
    from samg.contract import SemanticCombineAttrs
    from samg.export import wrappers

    model = getattr(pipe, spec.denoiser_component)
    combine = export.combine
    if not isinstance(combine, SemanticCombineAttrs):
        attributes = (combine or export.host_rule_attrs).attributes()
        return wrappers.Denoiser(model, spec, fused=combine is not None, combine=attributes,
                                 extras={"spatial_factor": factor})
    from samg.contract import GuidanceCombineAttrs
    from samg.scfg.export import scfg_denoiser

    # The base module's GuidanceCombine is replaced by the S-CFG combine; its attributes are unused.
    unused = {**GuidanceCombineAttrs().attributes(), "channel_axis": spec.channel_axis}
    base = wrappers.Denoiser(model, spec, fused=True, combine=unused, extras={"spatial_factor": factor})
    levels = combine.levels or tuple(sorted({combine.factor_fine, combine.factor_coarse}))
    return scfg_denoiser(base, factors=tuple(levels), corrected=bool(combine.corrected))
