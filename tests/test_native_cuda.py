"""The CUDA kernel: compiles for sm_80/sm_89/sm_90 wherever nvcc exists; runs only with a GPU."""

from __future__ import annotations

import ctypes
import glob
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import samg.native
from samg.guidance import samg_v1
from samg_expectation import (
    CFG_RTOL,
    energy_sum_overflow_case,
    huge_delta_case,
    scaled_delta_case,
    spec_cfg,
    spec_samg_v1,
)

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
    for kernel in ("peak_kernel", "energy_kernel", "membership_kernel", "combine_kernel"):
        assert kernel in report
    assert "samg_guidance_combine_cuda" in subprocess.run(["nm", str(obj)], capture_output=True, text=True).stdout


# libcudart's names: the unversioned link exists only with a CUDA toolkit's development files;
# NVIDIA's wheels and most runtimes ship the versioned library alone.
CUDART_NAMES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12")


def _cudart_candidates(search_paths=None) -> list[str]:
    """Library names and paths to try for libcudart, in order: the plain names (the loader's search
    path), NVIDIA's wheels on sys.path (nvidia/cu13/lib, nvidia/cuda_runtime/lib), the toolkit."""
    candidates = list(CUDART_NAMES)
    for folder in sys.path if search_paths is None else search_paths:
        candidates += sorted(glob.glob(f"{folder or '.'}/nvidia/*/lib/libcudart.so*"), reverse=True)
    for lib in ("/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"):
        candidates += sorted(glob.glob(f"{lib}/libcudart.so*"), reverse=True)
    return candidates


def _gpu_runtime():
    """(libcudart, None) when a GPU can run the kernel, else (None, why): the skip says which part is missing."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return None, f"no NVIDIA driver on this machine ({exc})"
    tried = []
    for name in _cudart_candidates():
        try:
            cudart = ctypes.CDLL(name)
            break
        except OSError:
            tried.append(name)
    else:
        return None, (f"libcudart not found (tried {', '.join(tried)}): pip install nvidia-cuda-runtime, or put the "
                      "CUDA toolkit's lib64 on LD_LIBRARY_PATH")
    count = ctypes.c_int(0)
    status = cudart.cudaGetDeviceCount(ctypes.byref(count))
    if status != 0 or count.value == 0:
        return None, f"no usable NVIDIA GPU (cudaGetDeviceCount returned error {status}, {count.value} device(s))"
    return cudart, None


def test_cuda_runtime_lookup_covers_versioned_and_wheel_libraries(tmp_path):
    wheel = tmp_path / "nvidia" / "cu13" / "lib"
    wheel.mkdir(parents=True)
    (wheel / "libcudart.so.13").write_bytes(b"")
    candidates = _cudart_candidates([str(tmp_path)])
    assert candidates[:3] == ["libcudart.so", "libcudart.so.13", "libcudart.so.12"]
    assert str(wheel / "libcudart.so.13") in candidates
    cudart, why = _gpu_runtime()
    assert (cudart is None) == bool(why)  # a skip always says why


class _Params(ctypes.Structure):
    _fields_ = [("tau", ctypes.c_float), ("sharpness", ctypes.c_float), ("smooth", ctypes.c_int),
                ("channel_axis", ctypes.c_int)]


@pytest.fixture(scope="module")
def gpu_kernel(tmp_path_factory):
    """(the kernel library built for this machine's GPU, libcudart): compiled once; skips without a GPU."""
    nvcc = _nvcc()
    cudart, why = _gpu_runtime()
    if cudart is None:
        pytest.skip(f"{why} (the kernel is only compiled on this machine)")
    library = tmp_path_factory.mktemp("cuda") / "libsamg_combine_cuda.so"
    subprocess.run([nvcc, "-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC", "-arch=native",
                    str(samg.native.CUDA_SOURCE), "-o", str(library)], check=True)
    kernel = ctypes.CDLL(str(library))
    kernel.samg_guidance_combine_cuda.restype = ctypes.c_char_p
    kernel.samg_guidance_combine_cuda_workspace_size.restype = ctypes.c_size_t
    return kernel, cudart


def _combine_on_gpu(gpu_kernel, u, c, scales, *, tau=1.0, sharpness=4.0, smooth=0, channel_axis=1):
    """samg_guidance_combine_cuda on device copies of float32 u, c and scales [B, 2]; the output."""
    kernel, cudart = gpu_kernel
    params = _Params(tau, sharpness, smooth, channel_axis)
    dims = np.array(u.shape, np.int64)
    dims_p = dims.ctypes.data_as(ctypes.c_void_p)
    allocated = []

    def device(array):
        pointer = ctypes.c_void_p()
        assert cudart.cudaMalloc(ctypes.byref(pointer), ctypes.c_size_t(max(array.nbytes, 1))) == 0
        allocated.append(pointer)
        assert cudart.cudaMemcpy(pointer, array.ctypes.data_as(ctypes.c_void_p), ctypes.c_size_t(array.nbytes), 1) == 0
        return pointer

    workspace_size = kernel.samg_guidance_combine_cuda_workspace_size(dims_p, len(u.shape), ctypes.byref(params))
    assert workspace_size > 0
    try:
        d_u, d_c, d_out = device(u), device(c), device(np.empty_like(u))
        d_s = device(np.ascontiguousarray(scales, np.float32))
        d_ws = device(np.empty(workspace_size, np.uint8))
        error = kernel.samg_guidance_combine_cuda(d_u, d_c, d_s, d_out, 0, dims_p, len(u.shape), ctypes.byref(params),
                                                  d_ws, ctypes.c_size_t(workspace_size), None)
        assert error is None, error
        out = np.empty_like(u)
        assert cudart.cudaMemcpy(out.ctypes.data_as(ctypes.c_void_p), d_out, ctypes.c_size_t(out.nbytes), 2) == 0
    finally:
        for pointer in allocated:
            cudart.cudaFree(pointer)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("layout", [((2, 4, 33, 20), 1, 3), ((2, 3, 4, 9, 7), 2, 0), ((1, 4, 3, 8, 8), 1, 3)])
def test_cuda_kernel_matches_reference_on_gpu(gpu_kernel, layout):
    shape, channel_axis, smooth = layout
    rng = np.random.default_rng(0)
    u = rng.standard_normal(shape).astype(np.float32)
    c = (u + rng.standard_normal(shape) * rng.gamma(0.5, 1.0, shape)).astype(np.float32)
    scales = np.array([[1.5, 7.0], [2.0, 4.0]][: shape[0]], np.float32)
    out = _combine_on_gpu(gpu_kernel, u, c, scales, tau=1.2, sharpness=5.0, smooth=smooth, channel_axis=channel_axis)
    expected = samg_v1(u, c, scales[:, 0], scales[:, 1], tau=1.2, sharpness=5.0, smooth=smooth,
                       channel_axis=channel_axis)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


@pytest.mark.gpu
@pytest.mark.parametrize("smooth", [0, 3])
def test_cuda_huge_delta_with_equal_scales_is_cfg(gpu_kernel, smooth):
    # Δ ≈ 1e19: Δ² overflows float32; the energy of Δ / max|Δ| does not. nvcc fuses w·Δ + u into
    # one multiply-add, so CFG within CFG_RTOL of the float64 formula, not bit for bit.
    u, c = huge_delta_case()
    scales = np.array([[7.5, 7.5], [3.0, 3.0]], np.float32)
    out = _combine_on_gpu(gpu_kernel, u, c, scales, smooth=smooth)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, spec_cfg(u, c, scales[:, 0]), rtol=CFG_RTOL)


@pytest.mark.gpu
@pytest.mark.parametrize("smooth", [0, 3])
def test_cuda_energy_sum_overflow_gives_the_spec_result(gpu_kernel, smooth):
    # Every location's energy is finite in float32, the sample's sum is not.
    u, c = energy_sum_overflow_case()
    scales = np.array([[2.0, 8.0], [1.0, 6.0]], np.float32)
    out = _combine_on_gpu(gpu_kernel, u, c, scales, smooth=smooth)
    np.testing.assert_allclose(out, spec_samg_v1(u, c, scales[:, 0], scales[:, 1], smooth=smooth), rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("magnitude", [1e-7, 1e-30, 1e19])
def test_cuda_map_is_the_spec_formula_at_every_scale_of_delta(gpu_kernel, magnitude):
    # The spec's absolute ε on the energy of Δ itself: at |Δ| ~ 1e-7 it sets Ê, so a wrong max |Δ|
    # would show. 96 x 80 locations span many blocks of the peak kernel (their atomic max).
    u, c = scaled_delta_case(magnitude, shape=(2, 4, 96, 80))
    scales = np.array([[2.0, 8.0], [1.0, 6.0]], np.float32)
    out = _combine_on_gpu(gpu_kernel, u, c, scales, smooth=3)
    assert np.isfinite(out).all()
    expected = spec_samg_v1(u, c, scales[:, 0], scales[:, 1], smooth=3)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.gpu
def test_cuda_inf_in_delta_makes_the_sample_nan(gpu_kernel):
    # An Inf makes the sample's max |Δ| Inf and its own Δ / s Inf/Inf = NaN, which reaches the
    # whole sample through the energy sum (docs/guidance-op.md); the other sample is untouched.
    rng = np.random.default_rng(3)
    u = rng.standard_normal((2, 4, 6, 6)).astype(np.float32)
    c = (u + rng.standard_normal(u.shape)).astype(np.float32)
    c[0, 1, 2, 3] = np.inf
    scales = np.array([[2.0, 7.0], [2.0, 7.0]], np.float32)
    out = _combine_on_gpu(gpu_kernel, u, c, scales)
    assert np.isnan(out[0]).all()
    np.testing.assert_allclose(out[1:], spec_samg_v1(u[1:], c[1:], 2.0, 7.0), rtol=1e-5, atol=1e-5)
