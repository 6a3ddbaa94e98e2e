"""samg: deploy guided diffusion models with spatially adaptive guidance fused into the engine.

Importing the package is cheap: it pulls in no torch, onnxruntime or TensorRT. Heavy backends are
imported lazily by the modules that need them (see :func:`samg.errors.require`).
"""

__version__ = "0.1.0"

# Version of the exported-folder format written to samg.json (bump on incompatible changes).
EXPORT_FORMAT_VERSION = 1

# The serving API (samg/api.py), imported on first use so `import samg` stays light.
_API_NAMES = ("load", "SamgPipeline", "SamgOutput")


def __getattr__(name: str):
    if name in _API_NAMES:
        from samg import api

        return getattr(api, name)
    raise AttributeError(f"module 'samg' has no attribute {name!r}")
