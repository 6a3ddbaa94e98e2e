"""The CUDA kernel: compiles for sm_80/sm_89/sm_90 wherever nvcc exists; runs only with a GPU."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import samg.native
from samg.guidance import samg_v1

pytestmark = pytest.mark.native

ARCHS = ("80", "89", "90")


def _nvcc() -> str:
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if nvcc is None:
        pytest.skip("nvcc not found: install the CUDA toolkit to compile plugins/cuda")
    return nvcc


def test_cuda_kernel_compiles_for_ampere_ada_hopper(tmp_path):
    nvcc = _nvcc()
    gencode = [arg for arch in ARCHS for arg in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    obj = tmp_path / "guidance_combine.o"
    result = subprocess.run(
        [nvcc, "-std=c++17", "-O3", "--resource-usage", *gencode, "-c", str(samg.native.CUDA_SOURCE), "-o", str(obj)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert obj.stat().st_size > 10_000
    report = result.stdout + result.stderr
    for arch in ARCHS:  # ptxas reports every kernel it compiled, per architecture
        assert f"sm_{arch}" in report
    for kernel in ("energy_kernel", "membership_kernel", "combine_kernel"):
        assert kernel in report
    assert "samg_guidance_combine_cuda" in subprocess.run(["nm", str(obj)], capture_output=True, text=True).stdout


def _gpu_runtime():
    try:
        ctypes.CDLL("libcuda.so.1")
        cudart = ctypes.CDLL("libcudart.so")
    except OSError:
        return None
    count = ctypes.c_int(0)
    if cudart.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value == 0:
        return None
    return cudart


@pytest.mark.gpu
@pytest.mark.parametrize("layout", [((2, 4, 33, 20), 1, 3), ((2, 3, 4, 9, 7), 2, 0), ((1, 4, 3, 8, 8), 1, 3)])
def test_cuda_kernel_matches_reference_on_gpu(tmp_path, layout):
    nvcc = _nvcc()
    cudart = _gpu_runtime()
    if cudart is None:
        pytest.skip("no NVIDIA GPU (the kernel is only compiled on this machine)")
    shape, channel_axis, smooth = layout
    library = tmp_path / "libsamg_combine_cuda.so"
    subprocess.run([nvcc, "-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC", "-arch=native",
                    str(samg.native.CUDA_SOURCE), "-o", str(library)], check=True)
    kernel = ctypes.CDLL(str(library))
    kernel.samg_guidance_combine_cuda.restype = ctypes.c_char_p
    kernel.samg_guidance_combine_cuda_workspace_size.restype = ctypes.c_size_t

    class Params(ctypes.Structure):
        _fields_ = [("tau", ctypes.c_float), ("sharpness", ctypes.c_float), ("smooth", ctypes.c_int),
                    ("channel_axis", ctypes.c_int)]

    rng = np.random.default_rng(0)
    u = rng.standard_normal(shape).astype(np.float32)
    c = (u + rng.standard_normal(shape) * rng.gamma(0.5, 1.0, shape)).astype(np.float32)
    scales = np.array([[1.5, 7.0], [2.0, 4.0]][: shape[0]], np.float32)
    params = Params(1.2, 5.0, smooth, channel_axis)
    dims = np.array(shape, np.int64)
    dims_p = dims.ctypes.data_as(ctypes.c_void_p)

    def device(array):
        pointer = ctypes.c_void_p()
        assert cudart.cudaMalloc(ctypes.byref(pointer), ctypes.c_size_t(max(array.nbytes, 1))) == 0
        assert cudart.cudaMemcpy(pointer, array.ctypes.data_as(ctypes.c_void_p), ctypes.c_size_t(array.nbytes), 1) == 0
        return pointer

    workspace_size = kernel.samg_guidance_combine_cuda_workspace_size(dims_p, len(shape), ctypes.byref(params))
    assert workspace_size > 0
    d_u, d_c, d_s, d_out = device(u), device(c), device(scales), device(np.empty_like(u))
    d_ws = device(np.empty(workspace_size, np.uint8))
    error = kernel.samg_guidance_combine_cuda(d_u, d_c, d_s, d_out, 0, dims_p, len(shape), ctypes.byref(params),
                                              d_ws, ctypes.c_size_t(workspace_size), None)
    assert error is None, error
    out = np.empty_like(u)
    assert cudart.cudaMemcpy(out.ctypes.data_as(ctypes.c_void_p), d_out, ctypes.c_size_t(out.nbytes), 2) == 0
    for pointer in (d_u, d_c, d_s, d_out, d_ws):
        cudart.cudaFree(pointer)
    expected = samg_v1(u, c, scales[:, 0], scales[:, 1], tau=1.2, sharpness=5.0, smooth=smooth,
                       channel_axis=channel_axis)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))
