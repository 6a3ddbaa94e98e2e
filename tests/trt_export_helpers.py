"""A minimal export folder around the standalone GuidanceCombine model, for the TensorRT tests."""

from __future__ import annotations

from pathlib import Path


def write_export(folder: Path, dtype: str = "float32", shape=("B", 4, "H", "W"), **attributes) -> Path:
    """samg.json + denoiser.onnx = one GuidanceCombine node (`attributes` go to the node).

    `shape` is what the manifest declares for the predictions: "B" is the latent batch, "H"/"W"
    follow the manifest's 64x64 size, ints are fixed dims. The manifest is written by samg's own
    writer (samg.contract.write_export); the text encoder and VAE are declared absent
    (`"runtime": "none"`), which `samg build` accepts and the sampling pipeline refuses.
    """
    import onnx

    from samg.contract import write_export as write_manifest
    from samg.op.function import make_standalone_model
    from samg.op.schema import DEFAULT_CHANNEL_AXIS, DEFAULT_SHARPNESS, DEFAULT_SMOOTH, DEFAULT_TAU

    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(make_standalone_model(rank=len(shape), dtype=dtype, **attributes), str(folder / "denoiser.onnx"))
    prediction = {"shape": list(shape), "dtype": dtype}
    combine = {"tau": DEFAULT_TAU, "sharpness": DEFAULT_SHARPNESS, "smooth": DEFAULT_SMOOTH,
               "channel_axis": DEFAULT_CHANNEL_AXIS, **attributes}
    video = len(shape) == 5
    layout = ("BFCHW" if combine["channel_axis"] == 2 else "BCFHW") if video else "BCHW"
    frame_dim = shape[layout.index("F")] if video else None
    manifest = {
        "format": "samg-export",
        "format_version": 1,
        "model": "standalone",
        "family": "standalone",
        "source": {"kind": "hub", "path": None, "hub_id": None},
        "prediction_type": "epsilon",
        "guidance": "fused",
        "combine": {"domain": "samg", "op": "GuidanceCombine", "version": 1, **combine},
        "dtype": dtype,
        "opset": 18,
        "latent": {
            "layout": layout,
            "channels": 4,
            "spatial_factor": 8,
            "temporal_factor": 1,
            "height": 64,
            "width": 64,
            "frames": (frame_dim if isinstance(frame_dim, int) else 1) if video else None,
            "dynamic_resolution": True,
        },
        "scheduler": {"kind": "discrete", "num_train_timesteps": 1000},
        "denoiser": {
            "file": "denoiser.onnx",
            "inputs": {
                "pred_uncond": prediction,
                "pred_cond": prediction,
                "scales": {"shape": ["B", 2], "dtype": "float32"},
            },
            "outputs": {"guided": prediction},
        },
        "text_encoder": {"runtime": "none"},
        "vae": {"runtime": "none"},
    }
    write_manifest(folder, manifest, complete=False)
    return folder
