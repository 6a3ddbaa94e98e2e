"""Find, build and load samg's native parts (ORT custom-op library, C++ runtime, CUDA kernel).

The libraries are built from the source tree by ``scripts/build_native.sh`` (cmake + a C++17
compiler; ONNX Runtime's headers and nlohmann/json are kept in third_party/, nothing is downloaded)::

    bash scripts/build_native.sh            # or: python -c "import samg.native as n; n.build()"

Nothing here imports onnxruntime at module level.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from samg.errors import SamgError

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "scripts" / "build_native.sh"
PLUGINS_DIR = ROOT / "plugins"
PLUGINS_BUILD = PLUGINS_DIR / "build"
RUNTIME_DIR = ROOT / "runtime" / "cpp"
RUNTIME_BUILD = RUNTIME_DIR / "build"
CUDA_SOURCE = PLUGINS_DIR / "cuda" / "guidance_combine.cu"
BUILD_COMMAND = f"bash {BUILD_SCRIPT}"

ORT_LIBRARY_NAME = "libsamg_ort.so"
RUNTIME_EXECUTABLE_NAME = "samg-run"
_SOURCE_SUFFIXES = {".cc", ".cpp", ".h", ".hpp", ".cu", ".cuh", ".txt"}


def missing_build_tools() -> list[str]:
    """Tools the build needs that are not on PATH (empty when a build can run)."""
    return [tool for tool in ("cmake", "c++", "bash") if shutil.which(tool) is None]


def _newest_source_mtime(*folders: Path) -> float:
    newest = BUILD_SCRIPT.stat().st_mtime if BUILD_SCRIPT.exists() else 0.0
    for folder in folders:
        for path in folder.rglob("*"):
            if "build" in path.relative_to(folder).parts[:1]:
                continue
            if path.suffix in _SOURCE_SUFFIXES and path.is_file():
                newest = max(newest, path.stat().st_mtime)
    return newest


def _is_stale(target: Path, *source_folders: Path) -> bool:
    return not target.exists() or target.stat().st_mtime < _newest_source_mtime(*source_folders)


def build(*, runtime: bool = True, cuda: bool | None = None, verbose: bool = False) -> None:
    """Run scripts/build_native.sh (idempotent). cuda=None compiles the CUDA kernel when nvcc exists."""
    missing = missing_build_tools()
    if missing:
        raise SamgError(
            f"cannot build the native libraries, missing {', '.join(missing)}: "
            f"install them (Debian: apt-get install cmake g++ make) and run {BUILD_COMMAND}"
        )
    if not BUILD_SCRIPT.exists():
        raise SamgError(f"{BUILD_SCRIPT} not found: the native build needs a source checkout of samg")
    args = ["bash", str(BUILD_SCRIPT)]
    if not runtime:
        args.append("--no-runtime")
    if cuda is False:
        args.append("--no-cuda")
    elif cuda is True:
        args.append("--cuda")
    if verbose:
        args.append("--verbose")
    result = subprocess.run(args, capture_output=not verbose, text=True)
    if result.returncode != 0:
        detail = (result.stderr or "").strip().splitlines()
        last = detail[-1] if detail else f"exit code {result.returncode}"
        raise SamgError(f"native build failed ({last}): run {BUILD_COMMAND} --verbose to see why")


def ort_custom_op_library(build_if_missing: bool = False) -> str | None:
    """Path of the built ORT custom-op library (samg::GuidanceCombine for the CPU EP), or None.

    ``SAMG_ORT_LIBRARY`` overrides the location. With ``build_if_missing`` a missing or outdated
    library is (re)built first (CPU parts only, no runtime).
    """
    override = os.environ.get("SAMG_ORT_LIBRARY")
    if override:
        return override if Path(override).is_file() else None
    library = PLUGINS_BUILD / ORT_LIBRARY_NAME
    if build_if_missing and _is_stale(library, PLUGINS_DIR):
        build(runtime=False, cuda=False)
    return str(library) if library.is_file() else None


def runtime_executable(build_if_missing: bool = False) -> str | None:
    """Path of the C++ runtime CLI ``samg-run``, or None (built on request like the library)."""
    executable = RUNTIME_BUILD / RUNTIME_EXECUTABLE_NAME
    if build_if_missing and (_is_stale(executable, RUNTIME_DIR) or _is_stale(executable, PLUGINS_DIR)):
        build(runtime=True, cuda=False)
    return str(executable) if executable.is_file() else None


def register_custom_ops(session_options, build_if_missing: bool = False) -> bool:
    """Register the custom-op library on an ``onnxruntime.SessionOptions``; False when not built.

    With it registered, a model whose ``samg::GuidanceCombine`` function body was stripped
    (``samg.op.strip_function``) runs the fused native kernel instead of the inlined body.
    """
    library = ort_custom_op_library(build_if_missing=build_if_missing)
    if library is None:
        return False
    session_options.register_custom_ops_library(library)
    return True
