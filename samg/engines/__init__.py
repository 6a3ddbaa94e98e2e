"""samg.engines: runners that execute exported graphs (ONNX Runtime, torch reference, TensorRT, null)."""

from samg.engines.base import BACKENDS, Runner, open_runner

__all__ = ["BACKENDS", "Runner", "open_runner"]
