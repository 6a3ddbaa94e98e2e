"""A tiny array-namespace shim so each guidance rule has ONE code path for numpy and torch.

`ops_for(x)` returns `NUMPY` for numpy arrays and `TORCH` for torch tensors. torch is never
imported here: a tensor can only exist if the caller already imported torch, so we look it up in
`sys.modules`. Every reduction keeps its dimensions (keepdims) so results broadcast back.

Only what the rules need is here; add an operation to both classes when a rule needs it.
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
        torch = self.torch
        if is_torch(value):
            t = value.to(device=like.device, dtype=torch.float32)
        else:
            t = torch.as_tensor(np.asarray(value, dtype=np.float32), device=like.device)
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
        """a / b (torch does not warn on Inf/Inf or overflow)."""
        return a / b

    def std(self, x, axes, correction):
        return x.std(dim=tuple(axes), keepdim=True, correction=correction)

    def sigmoid(self, x):
        return self.torch.sigmoid(x)

    def sqrt(self, x):
        return self.torch.sqrt(x)

    def where(self, cond, a, b):
        torch = self.torch
        a = a if is_torch(a) else torch.as_tensor(a, dtype=torch.float32, device=cond.device)
        b = b if is_torch(b) else torch.as_tensor(b, dtype=torch.float32, device=cond.device)
        return torch.where(cond, a, b)

    def maximum(self, a, b):
        return self.torch.maximum(a, b)  # propagates NaN

    def minimum(self, a, b):
        return self.torch.minimum(a, b)  # propagates NaN

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
        return x.expand(like.shape).clone()

    def float64(self, x):
        return x.to(self.torch.float64)


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
