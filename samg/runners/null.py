"""A runner that does no model work, for testing the sampling loop and measuring its overhead.

It needs numpy only (no onnxruntime, no torch): the graph's inputs and outputs come from the typed
manifest. The denoiser returns a copy of the latents for each output; the VAE returns zeros of the
image shape (latents upsampled by the export's spatial factor, 3 channels); the text encoder returns
zeros of its declared output shapes with the batch of the feeds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from samg.errors import SamgError
from samg.runners.base import GraphRunner, export_graph


class NullRunner(GraphRunner):
    def __init__(self, path: Path, device: str = "cpu", **_opts):
        self.path = Path(path)
        if not self.path.is_file():
            raise SamgError(f"model file not found: {self.path}: check the export folder or re-export")
        export, self._role, self.inputs, self.output_names = export_graph(self.path)
        self._spatial_factor = export.latent.spatial_factor
        self._output_shapes = {}
        if self._role == "text_encoder":
            shapes = export.text_encoder.output_shapes or {}
            missing = [n for n in self.output_names if n not in shapes]
            if missing:
                raise SamgError(f"{self.path.parent} does not declare the shape of text encoder output {missing[0]!r}: "
                                "re-export the model with this samg version")
            self._output_shapes = {n: list(shapes[n].shape) for n in self.output_names}

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._role == "denoiser":
            latents = np.asarray(feeds["latents"], dtype=np.float32)
            return {name: latents.copy() for name in self.output_names}
        if self._role == "vae":
            latents = np.asarray(feeds["latents"])
            shape = list(latents.shape)
            shape[1] = 3
            shape[-2] *= self._spatial_factor
            shape[-1] *= self._spatial_factor
            return {name: np.zeros(shape, np.float32) for name in self.output_names}
        batch = len(next(iter(feeds.values())))
        out = {}
        for name, shape in self._output_shapes.items():
            dims = [d if isinstance(d, int) else batch for d in shape]
            dims[0] = batch
            out[name] = np.zeros(dims, np.float32)
        return out
