"""samg.export: `samg export` (trace the denoiser, text encoders and VAE to ONNX, write the manifest).

Public API for other parts of samg (the torch reference runner) and for scripts; torch and
diffusers are imported when called, not here.
"""


def from_pretrained(pipeline_class, source, **kwargs):
    """`pipeline_class.from_pretrained(source, **kwargs)` with samg's own component classes importable:
    diffusers loads a class a model_index.json names (samg-shapes' UNet) only from a module already
    imported, so every samg path that loads a diffusers folder goes through here."""
    import samg.bundled.positional_unet  # noqa: F401

    return pipeline_class.from_pretrained(source, **kwargs)


def load_source_pipeline(spec, source: str, kind: str, dtype):
    """The diffusers pipeline of a ModelSpec from a local folder (kind "path") or the hub ("hub")."""
    from samg.export.exporter import load_source_pipeline as load

    return load(spec, source, kind, dtype)


def vae_spatial_factor(pipe) -> int:
    """Pixels per latent along height and width of a loaded diffusers pipeline."""
    from samg.export.exporter import _vae_factor

    return _vae_factor(pipe)


__all__ = ["from_pretrained", "load_source_pipeline", "vae_spatial_factor"]
