"""Torch entry point of `samg::GuidanceCombine`: eager reference, one ONNX node when exported.

- Eager: `guidance_combine` calls the reference `samg.guidance.samg_v1` (differentiable).
- TorchScript exporter (`torch.onnx.export(..., dynamo=False)`): while tracing, the call goes
  through a `torch.autograd.Function` whose `symbolic` emits exactly one GuidanceCombine node.
- Dynamo exporter (optional path): while `torch.export` traces, the call goes through the torch
  custom op `samg::guidance_combine`; pass `dynamo_translation_table()` as
  `custom_translation_table=` so it becomes one GuidanceCombine node.
- Running (the torch runner, torch.compile, CUDA graphs): without autograd the call is the custom
  op `samg::guidance_combine`, ONE op with a fake (meta) implementation, so torch.compile keeps it
  whole and a CUDA graph captures it. Its CUDA kernel is plugins/cuda/guidance_combine.cu (compiled
  by NVRTC through CuPy, samg.build.plugin) launched on torch's current stream; its CPU kernel is
  the reference rule. Where gradients are needed the reference runs directly (differentiable).
After either export, `samg.op.attach_function(model)` adds the body so any runtime can run it.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from typing import Any

from samg.errors import check, require
from samg.op.schema import (
    DEFAULT_CHANNEL_AXIS,
    DEFAULT_SHARPNESS,
    DEFAULT_SMOOTH,
    DEFAULT_TAU,
    DOMAIN,
    GUIDANCE_COMBINE,
    OP_VERSION,
    validate_attributes,
    validate_shapes,
)

TORCH_OP_NAME = "samg::guidance_combine"
_TORCH_OP_SCHEMA = (
    "(Tensor u, Tensor c, Tensor scales, float tau, float sharpness, int smooth, int channel_axis) -> Tensor"
)


def _reference(u, c, scales, tau, sharpness, smooth, channel_axis):
    from samg.guidance import samg_v1

    return samg_v1(
        u, c, scales[:, 0], scales[:, 1],
        tau=tau, sharpness=sharpness, smooth=smooth, channel_axis=channel_axis,
    )


@contextlib.contextmanager
def _quiet_tracer(torch):
    """Silence TracerWarnings from shape checks: the traced forward is replaced by one ONNX node."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def _export_function():
    """The autograd.Function used under the TorchScript exporter: eager = the reference, traced = one node."""
    return GUIDANCE_COMBINE.export_function(_reference)


# device index -> why the op's CUDA kernels could not be had there (absent: they are, or not asked yet)
_KERNEL_PROBLEMS: dict[int, str] = {}


@functools.cache
def _cuda_launcher(device_index: int = 0) -> Any:
    """The compiled CUDA kernels for one GPU (samg.build.plugin's CuPy launcher, compiled and loaded
    on that device), or None where they cannot be had: no CuPy, no CUDA headers, no libnvrtc, an
    NVRTC compile error, no usable device. The CUDA op then runs the reference rule on the GPU, said
    once on stderr. Cached either way: a failed compile is not retried on every call (nor inside a
    CUDA-graph capture, which it would break)."""
    try:
        from samg.build import plugin

        cp = require("cupy", "for the CUDA kernel of samg::guidance_combine (pip install cupy-cuda13x, or cupy-cuda12x "
                            "on CUDA 12)")
        with cp.cuda.Device(device_index):  # the launcher's module is loaded on the current device
            return plugin.shared_launcher()
    except Exception as exc:  # noqa: BLE001 - any failure to get the kernels means the reference runs instead
        problem = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
        _KERNEL_PROBLEMS[device_index] = problem
        print(f"samg: samg::guidance_combine runs the reference rule on cuda:{device_index}, not its CUDA kernel "
              f"({problem})", file=sys.stderr)
        return None


def cuda_kernel_problem(device_index: int = 0) -> str | None:
    """Why the op's CUDA kernels cannot run on GPU `device_index` (trying to get them once), or
    None when they can."""
    return None if _cuda_launcher(device_index) is not None else _KERNEL_PROBLEMS.get(device_index, "unknown")


def _cuda_combine(u, c, scales, tau, sharpness, smooth, channel_axis):
    """The op's CUDA kernel: guidance_combine.cu's kernels on torch's current stream, so the launch
    orders with the surrounding torch work and is captured by a CUDA graph (compile it before a
    capture: the first call on a GPU compiles)."""
    torch = require("torch", "for guidance_combine")
    launcher = _cuda_launcher(u.device.index or 0)
    if launcher is None:
        return _reference(u, c, scales, tau, sharpness, smooth, channel_axis)
    from samg.build.plugin import workspace_bytes

    u, c = u.contiguous(), c.contiguous()
    scales = scales.to(torch.float32).contiguous()
    out = torch.empty_like(u)
    dims = tuple(u.shape)
    workspace = torch.empty(workspace_bytes(dims, channel_axis), dtype=torch.uint8, device=u.device)
    values = {"tau": tau, "sharpness": sharpness, "smooth": smooth, "channel_axis": channel_axis}
    element = str(u.dtype).removeprefix("torch.")  # float32/float16/bfloat16 (checked above): ELEMENT_TYPES' keys
    with torch.cuda.device(u.device):
        stream = torch.cuda.current_stream(u.device).cuda_stream
        launcher.launch(values, dims, element, (u.data_ptr(), c.data_ptr(), scales.data_ptr()), out.data_ptr(),
                        workspace.data_ptr(), stream)
    return out


_OP_REGISTERED = False  # set by _custom_op


@functools.cache
def _custom_op():
    """The torch custom op `samg::guidance_combine` (registered once): the reference on CPU (and
    any device without its own kernel), the CUDA kernel on CUDA, a fake for tracing."""
    global _OP_REGISTERED
    torch = require("torch", "for the torch op samg::guidance_combine")

    # Explicit schema: the annotations would be strings here (postponed evaluation).
    @torch.library.custom_op(TORCH_OP_NAME, mutates_args=(), schema=_TORCH_OP_SCHEMA)
    def guidance_combine_op(u, c, scales, tau, sharpness, smooth, channel_axis):
        return _reference(u, c, scales, tau, sharpness, smooth, channel_axis)

    guidance_combine_op.register_kernel("cuda")(_cuda_combine)

    @guidance_combine_op.register_fake
    def _(u, c, scales, tau, sharpness, smooth, channel_axis):
        return torch.empty_like(u)

    _OP_REGISTERED = True
    return guidance_combine_op


def combine_op():
    """The registered torch op `torch.ops.samg.guidance_combine` (u, c, scales, tau, sharpness,
    smooth, channel_axis), registering it on first use."""
    return _custom_op()


def dynamo_translation_table() -> dict:
    """`custom_translation_table` for `torch.onnx.export(..., dynamo=True)`: custom op -> one node."""
    torch = require("torch", "to export GuidanceCombine")
    onnxscript = require("onnxscript", "to export GuidanceCombine with the dynamo exporter")
    from samg.op.schema import register_schema

    register_schema()
    _custom_op()
    samg_opset = onnxscript.values.Opset(DOMAIN, OP_VERSION)

    def translate(u, c, scales, tau: float, sharpness: float, smooth: int, channel_axis: int):
        return samg_opset.GuidanceCombine(
            u, c, scales, tau=tau, sharpness=sharpness, smooth=smooth, channel_axis=channel_axis
        )

    return {torch.ops.samg.guidance_combine.default: translate}


def _validate_tensors(torch, u, c, scales, smooth, channel_axis) -> None:
    for name, t in (("pred_uncond", u), ("pred_cond", c), ("scales", scales)):
        check(isinstance(t, torch.Tensor), f"guidance_combine {name} must be a torch.Tensor, got {type(t).__name__}")
    allowed = (torch.float32, torch.float16, torch.bfloat16)
    check(
        u.dtype in allowed and c.dtype == u.dtype,
        f"guidance_combine needs pred_uncond and pred_cond of one dtype among float32/float16/bfloat16, "
        f"got {u.dtype} and {c.dtype}: cast them with .to(torch.float32)",
    )
    check(scales.is_floating_point(), f"guidance_combine scales must be float32 [B, 2], got {scales.dtype}")
    validate_shapes(tuple(u.shape), tuple(c.shape), tuple(scales.shape), smooth=smooth, channel_axis=channel_axis)


def guidance_combine(
    u,
    c,
    scales,
    *,
    tau: float = DEFAULT_TAU,
    sharpness: float = DEFAULT_SHARPNESS,
    smooth: int = DEFAULT_SMOOTH,
    channel_axis: int = DEFAULT_CHANNEL_AXIS,
):
    """SAMG v1 combine of torch predictions `u`, `c` [B,C,*S] with `scales` [B,2] = (w_min, w_max).

    Returns `u + w(p)(c - u)` in the dtype of `u`. Exported by TorchScript as one
    `samg::GuidanceCombine` node (and by dynamo as one node with `dynamo_translation_table()`).
    """
    try:  # a plain import (not `require`): torch.compile traces this function, and tensors mean torch is there
        import torch
    except ImportError:
        torch = require("torch", "for guidance_combine")
    validate_attributes(tau=tau, sharpness=sharpness, smooth=smooth, channel_axis=channel_axis)
    args = (float(tau), float(sharpness), int(smooth), int(channel_axis))
    # The op's scales input is float32; a float32 tensor passes `.to` with no extra graph node.
    if torch.jit.is_tracing():
        with _quiet_tracer(torch):
            _validate_tensors(torch, u, c, scales, smooth, channel_axis)
            return _export_function().apply(u, c, scales.to(torch.float32), *args)
    _validate_tensors(torch, u, c, scales, smooth, channel_axis)
    scales = scales.to(torch.float32)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (u, c, scales))
    if needs_grad and not torch.compiler.is_exporting():  # the op has no backward: the reference has
        return _reference(u, c, scales, *args)
    if not _OP_REGISTERED:  # once, outside any tracing in practice (compiled code then only reads the flag)
        _custom_op()
    return torch.ops.samg.guidance_combine.default(u, c, scales, *args)
