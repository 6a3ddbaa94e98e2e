"""Torch runner: runs the export's own wrapper modules (samg.export.wrappers) in eager torch on the
diffusers pipeline the export came from, with the same inputs and outputs as the ONNX graph it
stands for. On the CPU it is the float32 reference (to tell exporter bugs from runtime bugs); on
CUDA it runs the denoiser and VAE in the export's dtype (or `dtype=` "float16"/"bfloat16"), the
fused combine as the one torch op samg::guidance_combine (its CUDA kernel), and takes and returns
device tensors (`tensor_device`), so the sampling loop stays on the GPU.

Numpy feeds give numpy outputs; torch feeds give float32 torch outputs on the runner's device."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from samg.errors import SamgError, require
from samg.guidance._xp import is_torch
from samg.runners.base import GraphRunner, export_graph

# Inputs that stay float32 whatever the model computes in (the export contract: timestep, guidance_scales).
FLOAT32_INPUTS = ("timestep", "guidance_scales")
# Graphs that compute in the export's (or the asked) dtype; the text encoders stay float32 (as exported).
HALF_CAPABLE_ROLES = ("denoiser", "vae")
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


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
    def __init__(self, path: Path, device: str = "cpu", *, dtype: str | None = None,
                 device_tensors: bool | None = None, **_opts):
        """dtype: what the denoiser and VAE compute in (COMPUTE_DTYPES); default float32 on the CPU,
        the export's dtype on CUDA. The text encoder computes in float32, as exported.
        device_tensors: the sampling loop hands this runner tensors on its device (default: on CUDA)."""
        self.torch = require("torch", "for the torch backend")
        from samg.export import wrappers

        self.path = Path(path)
        # Feeds are checked as float32 (numpy has no bfloat16) and cast to the compute dtype here.
        export, role, self.inputs, self.output_names = export_graph(self.path, float_dtype="float32")
        if dtype is not None and dtype not in COMPUTE_DTYPES:
            raise SamgError(f"the torch backend computes in {', '.join(COMPUTE_DTYPES)}, not {dtype!r}: "
                            "pass one of those")
        spec, pipe, factor = _load(self.path.parent.resolve())
        self.device = "cuda" if device == "cuda" else "cpu"
        self.device_tensors = self.device == "cuda" if device_tensors is None else bool(device_tensors)
        if self.device == "cuda" and not self.torch.cuda.is_available():
            raise SamgError("torch sees no CUDA GPU here: use --device cpu, or install a CUDA build of torch")
        if role not in HALF_CAPABLE_ROLES:
            dtype = "float32"
        elif dtype is None:
            dtype = export.dtype if self.device == "cuda" else "float32"
        if role == "denoiser":
            module = _denoiser_module(export, spec, pipe, factor)
        elif role == "text_encoder":
            module = wrappers.TextEncoder([getattr(pipe, te.encoder) for te in spec.text_encoders], spec)
        else:
            module = wrappers.VaeDecoder(pipe.vae)
        self._take(module, dtype)

    @classmethod
    def for_module(cls, module, inputs: dict, output_names: list[str], *, device: str = "cpu",
                   dtype: str = "float32", name: str = "denoiser.onnx") -> "TorchRunner":
        """A runner over a module already built with a graph's inputs (`{name: InputDecl}`, in the
        module's argument order) and outputs: the same feeds, casts and tensor handling as a runner
        opened on an export folder (stand-in models in tests; embedding)."""
        self = cls.__new__(cls)
        self.torch = require("torch", "for the torch backend")
        self.path, self.inputs, self.output_names = Path(name), dict(inputs), list(output_names)
        self.device = "cuda" if device == "cuda" else "cpu"
        self.device_tensors = self.device == "cuda"
        self._take(module, dtype)
        return self

    def _take(self, module, dtype: str) -> None:
        """Run `module`, in eval mode, on this runner's device in `dtype`."""
        self.dtype = getattr(self.torch, dtype)
        self.module = module.eval().to(self.device)
        if self.dtype != self.torch.float32:  # the source loads in float32 (and diffusers warns on any dtype move)
            self.module = self.module.to(self.dtype)

    @property
    def graph_capturable(self) -> bool:
        """A CUDA graph can capture this runner's calls (samg.runtime.graph_loop): torch on CUDA,
        taking the loop's device tensors."""
        return self.device == "cuda" and self.device_tensors

    @property
    def tensor_device(self) -> str | None:
        """Where this runner takes and returns torch tensors for a loop that stays on the device
        (samg.runtime.denoiser): "cuda" on a GPU; None on the CPU (the loop keeps numpy) unless
        device_tensors asked for CPU tensors."""
        return self.device if self.device_tensors else None

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        args = [self._placed(name, feeds[name]) for name in self.input_names]
        with torch.no_grad():
            out = self.module(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if any(is_torch(v) for v in feeds.values()):  # tensors in, float32 tensors out (on this device)
            return {n: o.float() for n, o in zip(self.output_names, outs)}
        return {n: o.float().cpu().numpy() for n, o in zip(self.output_names, outs)}

    def _placed(self, name: str, value):
        """A feed as a tensor on this runner's device, floats in the compute dtype (FLOAT32_INPUTS
        stay float32); a tensor already there in that dtype is used as is."""
        torch = self.torch
        if not is_torch(value):
            value = np.ascontiguousarray(value)
            value = torch.from_numpy(value if value.flags.writeable else value.copy())
        value = value.to(self.device)
        if value.is_floating_point():
            value = value.to(torch.float32 if name in FLOAT32_INPUTS else self.dtype)
        return value


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
