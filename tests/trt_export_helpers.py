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

    from samg import contract
    from samg.op.function import make_standalone_model

    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(make_standalone_model(rank=len(shape), dtype=dtype, **attributes), str(folder / "denoiser.onnx"))
    prediction = contract.TensorSpec(tuple(shape), dtype)
    combine = contract.GuidanceCombineAttrs(**attributes)  # the op's defaults for what is not given
    video = len(shape) == 5
    layout = ("BFCHW" if combine.channel_axis == 2 else "BCFHW") if video else "BCHW"
    frame_dim = shape[layout.index("F")] if video else None
    export = contract.Export(
        model="standalone",
        family="standalone",
        source=contract.Source("hub", None, None),
        prediction_type="epsilon",
        combine=combine,
        dtype=dtype,
        opset=18,
        latent=contract.Latent(
            layout=layout,
            channels=4,
            spatial_factor=8,
            temporal_factor=1,
            height=64,
            width=64,
            frames=(frame_dim if isinstance(frame_dim, int) else 1) if video else None,
            dynamic_resolution=True,
        ),
        scheduler=contract.DiscreteScheduler(num_train_timesteps=1000),
        denoiser=contract.DenoiserGraph(
            file="denoiser.onnx",
            inputs={"pred_uncond": prediction, "pred_cond": prediction,
                    "scales": contract.TensorSpec(("B", 2), "float32")},
            outputs={"guided": prediction},
        ),
        text_encoder=contract.TextEncoderGraph(file=None, runtime=contract.NO_RUNTIME),
        vae=contract.VaeDecoderGraph(file=None, runtime=contract.NO_RUNTIME),
    )
    contract.write_export(folder, export, complete=False)
    return folder
