"""Serving benchmark: `samg serve` on NVIDIA Triton Inference Server (see bench.py, docs/serving.md)."""
