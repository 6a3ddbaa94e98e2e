"""The plugin's CUDA kernels compiled as it compiles them, without TensorRT or a GPU: NVRTC on
guidance_combine.cu with the options and name expressions samg.build.plugin hands to CuPy, the CUDA
header search, nvcc on the same source. They need libnvrtc (or nvcc) only, so the GPU proof
(benchmarks/gpu/check.sh, stage 1) runs them on the GPU host, where NVIDIA's wheels provide it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from samg.errors import SamgError


def _nvidia_wheel_dirs(kind: str) -> list[str]:
    """`kind` ("lib" or "include") folders of NVIDIA's pip wheels on sys.path (nvidia/cu13/lib, ...)."""
    import glob

    return sorted({d for folder in sys.path if folder for d in glob.glob(f"{folder}/nvidia/*/{kind}")})


def _nvrtc():
    """libnvrtc (pip install nvidia-cuda-nvrtc, or a CUDA toolkit), or None."""
    import ctypes
    import ctypes.util
    import glob
    import site

    names = [ctypes.util.find_library("nvrtc")]
    folders = site.getsitepackages() + _nvidia_wheel_dirs("lib") + ["/usr/local/cuda/lib64"]
    for folder in folders:
        names += sorted(glob.glob(f"{folder}/nvidia/cu*/lib/libnvrtc.so*")) + sorted(glob.glob(f"{folder}/libnvrtc.so*"))
    for name in filter(None, names):
        if ".alt." in name:
            continue  # the wheel's alternative build, same API
        try:
            # libnvrtc dlopens its builtins library by name: load the one beside it first
            for builtins in sorted(Path(name).parent.glob("libnvrtc-builtins.so*")) if "/" in name else ():
                ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _wheel_header_dir():
    """The CUDA headers as NVIDIA's pip wheel installs them (nvidia-cuda-runtime), or None."""
    from samg.build.plugin import cuda_include_dir

    try:
        return cuda_include_dir(environ={}, system_roots=[])
    except SamgError:
        return None


@pytest.mark.parametrize("headers", ["found by default", "from the nvidia-cuda-runtime wheel"])
def test_plugin_kernels_compile_with_nvrtc_as_cupy_compiles_them(headers):
    """What CupyLauncher hands to cupy.RawModule: guidance_combine.cu's text, its options and name
    expressions, compiled by NVRTC itself; every kernel it launches is in the PTX."""
    import ctypes

    from samg.build.plugin import KERNEL_NAMES, KERNEL_SOURCE, compile_options, cuda_include_dir

    nvrtc = _nvrtc()
    if nvrtc is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc)")
    include = cuda_include_dir() if headers == "found by default" else _wheel_header_dir()
    if include is None:
        pytest.skip("no nvidia/*/include folder with the CUDA headers on sys.path (pip install nvidia-cuda-runtime)")
    assert KERNEL_SOURCE.resolve() == (Path(__file__).parents[1] / "plugins" / "cuda" / "guidance_combine.cu").resolve()
    program = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), KERNEL_SOURCE.read_bytes(), b"guidance_combine.cu",
                                    0, None, None) == 0
    for name in KERNEL_NAMES:
        assert nvrtc.nvrtcAddNameExpression(program, name.encode()) == 0
    options = [o.encode() for o in (*compile_options(include), "--gpu-architecture=compute_80")]
    status = nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    assert status == 0, log.value.decode()[-3000:]
    nvrtc.nvrtcGetPTXSize(program, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    assert nvrtc.nvrtcGetPTX(program, ptx) == 0
    text = ptx.value.decode()
    for name in KERNEL_NAMES:
        lowered = ctypes.c_char_p()
        assert nvrtc.nvrtcGetLoweredName(program, name.encode(), ctypes.byref(lowered)) == 0, name
        assert f".entry {lowered.value.decode()}(" in text, name
    assert len(KERNEL_NAMES) == 13  # peak, energy, combine (smooth or not) per element type + membership
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


def test_nvrtc_without_the_include_path_does_not_find_the_headers():
    """Why compile_options passes -I: NVRTC 13 has no built-in cuda_fp16.h."""
    import ctypes

    from samg.build.plugin import KERNEL_SOURCE

    nvrtc = _nvrtc()
    if nvrtc is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc)")
    version = (ctypes.c_int(), ctypes.c_int())
    nvrtc.nvrtcVersion(ctypes.byref(version[0]), ctypes.byref(version[1]))
    if version[0].value < 13:
        pytest.skip(f"NVRTC {version[0].value}.{version[1].value}: the missing built-in header is NVRTC 13's")
    program = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), KERNEL_SOURCE.read_bytes(), b"g.cu", 0, None, None) == 0
    options = [b"--std=c++17", b"--gpu-architecture=compute_80"]
    status = nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    assert status != 0 and "cuda_bf16.h" in log.value.decode()


def _header_tree(root: Path, *headers: str) -> Path:
    root.mkdir(parents=True)
    for header in headers:
        (root / header).write_text("// stand-in\n")
    return root


def test_cuda_include_dir_search_order_and_the_missing_headers_error(tmp_path):
    from samg.build.plugin import cuda_include_candidates, cuda_include_dir

    both = ("cuda_fp16.h", "cuda_bf16.h")
    site_dir = tmp_path / "site"
    wheel13 = _header_tree(site_dir / "nvidia" / "cu13" / "include", *both)
    wheel12 = _header_tree(site_dir / "nvidia" / "cuda_runtime" / "include", *both)
    toolkit = _header_tree(tmp_path / "toolkit" / "include", *both)
    half_only = _header_tree(tmp_path / "old" / "include", "cuda_fp16.h")
    system = [str(tmp_path / "system")]

    # CUDA_PATH first, then the wheels (CUDA 13's before CUDA 12's), then the system roots
    environ = {"CUDA_PATH": str(tmp_path / "toolkit")}
    assert cuda_include_candidates(environ, [str(site_dir)], system) == [
        toolkit, wheel13, wheel12, tmp_path / "system" / "include"]
    assert cuda_include_dir(environ, [str(site_dir)], system) == str(toolkit)
    assert cuda_include_dir({}, [str(site_dir)], system) == str(wheel13)
    # a folder lacking cuda_bf16.h is passed over
    assert cuda_include_dir({"CUDA_HOME": str(tmp_path / "old")}, [str(site_dir)], []) == str(wheel13)
    assert half_only.is_dir()
    assert cuda_include_dir({}, [], [str(tmp_path / "toolkit")]) == str(toolkit)
    with pytest.raises(SamgError, match=r"cuda_fp16\.h and cuda_bf16\.h were not found.*pip install nvidia-cuda-runtime"):
        cuda_include_dir({"CUDA_PATH": str(tmp_path / "old")}, [str(tmp_path / "nowhere")], [])


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed")
def test_cuda_kernel_source_compiles(tmp_path):
    from samg.build.plugin import KERNEL_SOURCE

    # The plugin's source is plugins/cuda/guidance_combine.cu itself; nvcc compiles its kernels too.
    ptx = tmp_path / "k.ptx"
    subprocess.run(["nvcc", "-ptx", "-std=c++17", "-arch=compute_75", str(KERNEL_SOURCE.resolve()), "-o", str(ptx)],
                   check=True, timeout=120)
    text = ptx.read_text()
    for name in ("peak_kernel", "energy_kernel", "membership_kernel", "combine_kernel"):
        assert name in text
    for element in ("f", "6__half", "13__nv_bfloat16"):  # mangled template arguments
        assert f"peak_kernelI{element}" in text
