"""A tiny array-namespace shim so the guidance rules and the sampling loop (samplers, denoiser)
have ONE code path for numpy arrays and torch tensors on any device.

`ops_for(x)` returns `NUMPY` for numpy arrays and `TORCH` for torch tensors. torch is never
imported here: a tensor can only exist if the caller already imported torch, so we look it up in
`sys.modules`. Every reduction keeps its dimensions (keepdims) so results broadcast back.
(This shim rather than array-api-compat: the rules need a dozen operations, several with numpy's
warning control or torch-only scalar handling, and no new dependency for the numpy-only install.)

Scalars never become tensors: on torch a Python-float parameter is used as a float32 scalar
(`param`), so a rule call copies nothing host -> device (and stays capturable in a CUDA graph);
device-resident parameters are passed as tensors. `upload` / `to_host` are the loop's only
transfers (noise and conditioning once per request, the final latents once).

Only what the callers need is here; add an operation to both classes when one needs it.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import numpy as np

from samg.errors import SamgError


def is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


class _NumpyOps:
    name = "numpy"

    def is_float(self, x) -> bool:
        return isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating)

    def f32(self, x):
        return np.asarray(x, dtype=np.float32)

    def cast(self, x, dtype):
        return np.asarray(x).astype(dtype, copy=False)

    def param(self, value, like):
        """A python float or per-sample vector [B] as float32, shaped [B, 1, ...] to broadcast."""
        if is_torch(value):
            value = value.detach().cpu().numpy()
        return _shape_param(np.asarray(value, dtype=np.float32), like.shape)

    def sum(self, x, axes):
        return np.sum(x, axis=tuple(axes), keepdims=True, dtype=np.float32)

    def mean(self, x, axes):
        return np.mean(x, axis=tuple(axes), keepdims=True, dtype=np.float32)

    def amax(self, x, axes):
        return np.max(x, axis=tuple(axes), keepdims=True)

    def amin(self, x, axes):
        return np.min(x, axis=tuple(axes), keepdims=True)

    def max_abs(self, x, axes):
        """max |x| over `axes` (0 for an empty reduction); NaN propagates."""
        return np.max(np.abs(x), axis=tuple(axes), keepdims=True, initial=0.0)

    def quiet_divide(self, a, b):
        """a / b where an Inf/Inf (NaN) or an overflow to Inf is the intended result: no warning."""
        with np.errstate(invalid="ignore", over="ignore"):
            return np.divide(a, b)

    def std(self, x, axes, correction):
        return np.std(x, axis=tuple(axes), keepdims=True, ddof=correction, dtype=np.float32)

    def sigmoid(self, x):
        # exp overflows to inf for very negative x, and 1/(1+inf) = 0 is the right limit.
        with np.errstate(over="ignore"):
            return (1.0 / (1.0 + np.exp(-x))).astype(np.float32, copy=False)

    def sqrt(self, x):
        return np.sqrt(x)

    def where(self, cond, a, b):
        return np.where(cond, a, b)

    def maximum(self, a, b):
        return np.maximum(a, b)  # propagates NaN

    def minimum(self, a, b):
        return np.minimum(a, b)  # propagates NaN

    def concat(self, xs: Sequence, axis: int):
        return np.concatenate(xs, axis=axis)

    def kth_largest(self, x2d, k: int):
        """k-th largest value of each row of a [B, N] array, shape [B] (k >= 1)."""
        n = x2d.shape[1]
        return np.partition(x2d, n - k, axis=1)[:, n - k]

    def zeros_like(self, x):
        return np.zeros_like(x)

    def clamp_min(self, x, value: float):
        return np.maximum(x, np.asarray(value, dtype=x.dtype))  # propagates NaN

    def clamp_max(self, x, value: float):
        return np.minimum(x, np.asarray(value, dtype=x.dtype))  # propagates NaN

    def sum_native(self, x, axes):
        """Sum in x's own dtype (float64 for the APG projection)."""
        return np.sum(x, axis=tuple(axes), keepdims=True)

    def broadcast(self, x, like):
        return np.array(np.broadcast_to(x, like.shape))

    def float64(self, x):
        return np.asarray(x, dtype=np.float64)

    # -- the sampling loop's placement and checks ------------------------------------------------
    def upload(self, array, like):
        """A host array where `like` lives: numpy arrays stay as they are."""
        return np.asarray(array)

    def upload_as(self, array, like):
        """A host array in `like`'s dtype where `like` lives (numpy's astype)."""
        return np.asarray(array).astype(like.dtype, copy=False)

    def to_host(self, x):
        return np.asarray(x)

    def count_nonfinite(self, x) -> int:
        """How many NaN/Inf values x holds, as a Python int (host arrays are checked at once)."""
        return int(x.size - np.count_nonzero(np.isfinite(x))) if x.dtype.kind in "fc" else 0

    def peak(self, x) -> float:
        """max |x| as a Python float (0 for an empty array)."""
        return float(np.abs(x).max(initial=0.0))


class _TorchOps:
    name = "torch"

    @property
    def torch(self):
        return sys.modules["torch"]

    def is_float(self, x) -> bool:
        return x.is_floating_point()

    def f32(self, x):
        return x.to(self.torch.float32)

    def cast(self, x, dtype):
        return x.to(dtype)

    def param(self, value, like):
        """A tensor parameter (0-d or [B], already on the device) shaped [B, 1, ...]; a Python or numpy
        scalar stays a float32 scalar (no tensor, no host -> device copy; torch computes `tensor op
        scalar` in the tensor's float32, as with a float32 tensor); a host vector [B] is uploaded."""
        torch = self.torch
        if is_torch(value):
            t = value.to(device=like.device, dtype=torch.float32)
        elif np.ndim(value) == 0:
            return np.float32(value)
        else:
            t = self.upload(np.asarray(value, dtype=np.float32), like)
        return _shape_param(t, like.shape)

    def sum(self, x, axes):
        return x.sum(dim=tuple(axes), keepdim=True, dtype=self.torch.float32)

    def mean(self, x, axes):
        return x.mean(dim=tuple(axes), keepdim=True, dtype=self.torch.float32)

    def amax(self, x, axes):
        return x.amax(dim=tuple(axes), keepdim=True)

    def amin(self, x, axes):
        return x.amin(dim=tuple(axes), keepdim=True)

    def max_abs(self, x, axes):
        """max |x| over `axes` (0 for an empty reduction, which amax refuses); NaN propagates."""
        if x.numel() == 0:
            shape = [1 if axis in axes else size for axis, size in enumerate(x.shape)]
            return x.new_zeros(shape)
        return x.abs().amax(dim=tuple(axes), keepdim=True)

    def quiet_divide(self, a, b):
        """a / b (torch does not warn on Inf/Inf or overflow). A scalar numerator is filled into a 0-d
        tensor on b's device: `scalar / tensor` would be torch's reciprocal-then-multiply."""
        if not is_torch(a):
            a = b.new_full((), float(a), dtype=self.torch.float32)
        return a / b

    def std(self, x, axes, correction):
        return x.std(dim=tuple(axes), keepdim=True, correction=correction)

    def sigmoid(self, x):
        return self.torch.sigmoid(x)

    def sqrt(self, x):
        return self.torch.sqrt(x)

    def where(self, cond, a, b):
        torch = self.torch
        if not is_torch(a) and not is_torch(b):  # two scalars: a float32 tensor like cond, filled in place
            return torch.where(cond, cond.new_full((), float(a), dtype=torch.float32), float(b))
        # a scalar operand is passed as a scalar (torch.where takes one): no tensor made from it
        return torch.where(cond, a if is_torch(a) else float(a), b if is_torch(b) else float(b))

    def maximum(self, a, b):
        """Elementwise max (propagates NaN); a scalar side (a float32 parameter) clamps instead."""
        if not is_torch(b):
            return a.clamp_min(float(b))
        if not is_torch(a):
            return b.clamp_min(float(a))
        return self.torch.maximum(a, b)

    def minimum(self, a, b):
        """Elementwise min (propagates NaN); a scalar side (a float32 parameter) clamps instead."""
        if not is_torch(b):
            return a.clamp_max(float(b))
        if not is_torch(a):
            return b.clamp_max(float(a))
        return self.torch.minimum(a, b)

    def concat(self, xs: Sequence, axis: int):
        return self.torch.cat(list(xs), dim=axis)

    def kth_largest(self, x2d, k: int):
        n = x2d.shape[1]
        return self.torch.kthvalue(x2d, n - k + 1, dim=1).values

    def zeros_like(self, x):
        return self.torch.zeros_like(x)

    def clamp_min(self, x, value: float):
        return x.clamp_min(value)  # propagates NaN

    def clamp_max(self, x, value: float):
        return x.clamp_max(value)  # propagates NaN

    def sum_native(self, x, axes):
        return x.sum(dim=tuple(axes), keepdim=True)

    def broadcast(self, x, like):
        if not is_torch(x):  # a scalar parameter: filled on the device, not copied there
            return like.new_full(tuple(like.shape), float(x), dtype=self.torch.float32)
        return x.expand(like.shape).clone()

    def float64(self, x):
        return x.to(self.torch.float64)

    # -- the sampling loop's placement and checks ------------------------------------------------
    def upload(self, array, like):
        """A host array (its own dtype) as a tensor on `like`'s device: one copy. To a GPU the copy
        goes through pinned memory, asynchronously (a pageable copy would make the host wait for
        the device); torch keeps the pinned buffer until the copy is done. A tensor is moved if it
        lives elsewhere."""
        if is_torch(array):
            return array.to(like.device)
        host = np.asarray(array)
        if not host.flags.c_contiguous:
            host = np.ascontiguousarray(host)  # a new, writeable array
        elif not host.flags.writeable:  # from_numpy shares (and warns on) read-only memory
            host = host.copy()
        tensor = self.torch.from_numpy(host)
        if like.device.type == "cuda":
            return tensor.pin_memory().to(like.device, non_blocking=True)
        return tensor.to(like.device)

    def upload_as(self, array, like):
        """A host array as a tensor of `like`'s dtype on its device: cast on the host first (the
        rounding of numpy's astype, and no wider copy than needed)."""
        if is_torch(array):
            return array.to(device=like.device, dtype=like.dtype)
        host = np.asarray(array)
        if host.dtype.kind == "f" and like.dtype != self.torch.bfloat16:  # numpy has no bfloat16
            host = host.astype(str(like.dtype).removeprefix("torch."), copy=False)
        return self.upload(host, like).to(like.dtype)

    def to_host(self, x):
        return x.detach().cpu().numpy()

    def count_nonfinite(self, x):
        """How many NaN/Inf values x holds, as a 0-d int64 tensor on x's device (read it when needed:
        reading it synchronises with the device)."""
        return (~self.torch.isfinite(x)).sum()

    def peak(self, x):
        """max |x| as a 0-d tensor on x's device (0 for an empty tensor)."""
        return x.abs().amax() if x.numel() else x.new_zeros(())


NUMPY = _NumpyOps()
TORCH = _TorchOps()


def _shape_param(value, shape):
    """Reshape a scalar or [B] parameter to [B, 1, ...] (or [1, 1, ...] for a scalar)."""
    ones = (1,) * (len(shape) - 1)
    if value.ndim == 0:
        return value.reshape((1,) + ones)
    if value.ndim == 1 and value.shape[0] in (1, shape[0]):
        return value.reshape((value.shape[0],) + ones)
    raise SamgError(
        f"a per-sample guidance parameter has shape {tuple(value.shape)} but the batch is "
        f"{shape[0]}: pass a float or a vector of length {shape[0]}"
    )


def ops_for(x: Any):
    """The shim for `x`'s array type; SamgError for anything that is not a float array/tensor."""
    if is_torch(x):
        ops = TORCH
    elif isinstance(x, np.ndarray):
        ops = NUMPY
    else:
        raise SamgError(
            f"guidance rules take numpy arrays or torch tensors, got {type(x).__name__}: "
            "convert the prediction with numpy.asarray(...)"
        )
    if not ops.is_float(x):
        raise SamgError(f"guidance rules need floating-point predictions, got {x.dtype}: cast to float32")
    return ops


def as_float32(x: Any):
    """x as float32 in its own array type and place (numpy: np.asarray(x, np.float32))."""
    return TORCH.f32(x) if is_torch(x) else np.asarray(x, dtype=np.float32)


def check_pair(u: Any, c: Any, min_ndim: int = 2):
    """Validate an (uncond, cond) prediction pair and return the shim for it."""
    ops = ops_for(u)
    if ops_for(c) is not ops:
        raise SamgError("pred_uncond and pred_cond are of different array types: pass both as numpy or both as torch")
    if tuple(u.shape) != tuple(c.shape):
        raise SamgError(
            f"pred_uncond has shape {tuple(u.shape)} but pred_cond has {tuple(c.shape)}: they must match"
        )
    if u.dtype != c.dtype:
        raise SamgError(f"pred_uncond is {u.dtype} but pred_cond is {c.dtype}: pass both in the same dtype")
    if u.ndim < min_ndim:
        raise SamgError(f"predictions need at least {min_ndim} dimensions [B, C, ...], got shape {tuple(u.shape)}")
    return ops
