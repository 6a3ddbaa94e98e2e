"""A minimal export folder around the standalone GuidanceCombine model, for the TensorRT tests."""

from __future__ import annotations

import json
from pathlib import Path


def write_export(folder: Path, dtype: str = "float32", shape=("B", 4, "H", "W"), **attributes) -> Path:
    """samg.json + denoiser.onnx = one GuidanceCombine node (`attributes` go to the node).

    `shape` is what the manifest declares for the predictions: "B" is the latent batch, "H"/"W"
    follow the manifest's 64x64 size, ints are fixed dims.
    """
    import onnx

    from samg.op.function import make_standalone_model

    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(make_standalone_model(rank=len(shape), dtype=dtype, **attributes), str(folder / "denoiser.onnx"))
    prediction = {"shape": list(shape), "dtype": dtype}
    manifest = {
        "format": "samg-export",
        "format_version": 1,
        "model": "standalone",
        "guidance": "fused",
        "dtype": dtype,
        "latent": {
            "layout": "BCHW",
            "channels": 4,
            "spatial_factor": 8,
            "temporal_factor": 1,
            "height": 64,
            "width": 64,
            "frames": None,
            "dynamic_resolution": True,
        },
        "denoiser": {
            "file": "denoiser.onnx",
            "inputs": {
                "pred_uncond": prediction,
                "pred_cond": prediction,
                "scales": {"shape": ["B", 2], "dtype": "float32"},
            },
            "outputs": {"guided": prediction},
        },
        "text_encoder": {},
        "vae": {},
    }
    (folder / "samg.json").write_text(json.dumps(manifest))
    return folder
