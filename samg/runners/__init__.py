"""samg.runners: run exported graphs (ONNX Runtime, torch reference, TensorRT engines, null).

Building TensorRT engines is samg.build; the TensorRT runner here only loads what it built.
"""

from samg.runners.base import BACKENDS, GraphRunner, InputDecl, Runner, open_runner

__all__ = ["BACKENDS", "GraphRunner", "InputDecl", "Runner", "open_runner"]
