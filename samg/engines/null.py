"""A runner that does no model work, for testing the sampling loop and measuring its overhead.

It returns outputs of the right shapes: graphs whose input is `latents` (denoiser, VAE) give
outputs shaped from the latents (denoiser: a copy; VAE images: latents upsampled by the export's
spatial factor, 3 channels); other graphs (text encoder) give zeros with the static dims the ONNX
file declares and the batch of the feeds. Shapes are read with ONNX Runtime once, at open time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from samg.errors import SamgError, require

# VAE upsampling for a graph opened outside an export folder (the common latent-diffusion factor).
DEFAULT_SPATIAL_FACTOR = 8


class NullRunner:
    def __init__(self, path: Path, device: str = "cpu", **_opts):
        path = Path(path)
        if not path.is_file():
            raise SamgError(f"model file not found: {path}: check the export folder or re-export")
        ort = require("onnxruntime", "to read graph shapes for the null runner")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self._output_shapes = {o.name: list(o.shape) for o in session.get_outputs()}
        from samg.contract import MANIFEST, read_export

        self._spatial_factor = DEFAULT_SPATIAL_FACTOR
        if (path.parent / MANIFEST).is_file():  # verify=False: this runner loads no weights
            self._spatial_factor = read_export(path.parent, verify=False)["latent"]["spatial_factor"]
        self._is_vae = "images" in self.output_names
        del session

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "latents" in feeds:
            latents = np.asarray(feeds["latents"], dtype=np.float32)
            if self._is_vae:
                f = self._spatial_factor
                shape = list(latents.shape)
                shape[1] = 3
                shape[-2] *= f
                shape[-1] *= f
                return {"images": np.zeros(shape, np.float32)}
            return {name: latents.copy() for name in self.output_names}
        batch = len(next(iter(feeds.values())))
        out = {}
        for name, shape in self._output_shapes.items():
            dims = [d if isinstance(d, int) else batch for d in shape]
            dims[0] = batch
            out[name] = np.zeros(dims, np.float32)
        return out
