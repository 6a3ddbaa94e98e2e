"""User-facing errors and lazy imports of heavy backends.

A :class:`SamgError` is a mistake the user can fix (bad flag, missing file, missing package). The CLI
prints its message as one line and exits non-zero, with no traceback. Internal bugs stay ordinary
exceptions so that they keep their tracebacks.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Which extra provides each heavy module, for the one-line install hint.
_EXTRA_FOR = {
    "torch": "export",
    "diffusers": "export",
    "transformers": "export",
    "onnx": "export",
    "onnxscript": "export",
    "onnx_ir": "export",
    "safetensors": "export",
    "onnxruntime": "runtime",
    "tokenizers": "runtime",
    "imageio": "runtime",
    "PIL": "runtime",
    "tensorrt": "tensorrt",
    "tensorrt_rtx": "tensorrt",
    "polygraphy": "tensorrt",
    "onnx_graphsurgeon": "tensorrt",
    "ml_dtypes": "tensorrt",
    "cupy": "gpu",
    "sklearn": "dev",
    "matplotlib": "dev",
    "tritonclient": "serve",
}


class SamgError(Exception):
    """An error the user can fix. Its message names the problem and the fix, in one line."""


def require(module: str, purpose: str | None = None) -> ModuleType:
    """Import a heavy module on first use, or raise a SamgError with the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = _EXTRA_FOR.get(top)
        hint = f'pip install "samg[{extra}]"' if extra else f"pip install {top}"
        if top == "torch":
            hint = 'pip install torch==2.13.0 && pip install "samg[export]"'
        what = f" (needed {purpose})" if purpose else ""
        raise SamgError(f"{module} is not installed{what}: {hint}  [{exc}]") from None


def check(condition: bool, message: str) -> None:
    """Raise a SamgError with `message` unless `condition` holds (for validating user input)."""
    if not condition:
        raise SamgError(message)
