"""Importing TensorRT or TensorRT-RTX, the RTX wheel's missing-library-link defect, and the GPU's
compute capability (what engines of standard TensorRT are built for).

One code path serves both: the TensorRT-RTX Python API is the TensorRT API under the module name
`tensorrt_rtx`. `load_trt()` picks the module (auto: `tensorrt` first, then `tensorrt_rtx`).

The `tensorrt-rtx` wheel ships `libtensorrt_rtx.so.1` only, but the library `dlopen`s
`libtensorrt_rtx.so` when the ONNX parser meets a plugin node; the failed lookup aborts the whole
process (no Python exception). The lookup searches the library's own folder (its RPATH is
`$ORIGIN`) and `LD_LIBRARY_PATH` as it was when the process started; a library loaded by another
name does not satisfy it. So samg creates the link next to the library when that folder is
writable, and otherwise in a samg cache folder that must be on `LD_LIBRARY_PATH` before start
(`samg build` re-executes itself with it set).
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from samg.contract import ENGINE_COMBINE_PATHS
from samg.errors import SamgError, require

FLAVOURS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
# `samg build --precision` -> the export dtype it must match (networks are strongly typed)
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# `samg build --combine` choices: "none" is only recorded, for engines without the op
COMBINE_PATHS = tuple(path for path in ENGINE_COMBINE_PATHS if path != "none")
# flavour -> (package holding the shared libraries, versioned file, name the library dlopens)
_LIBRARY_LINKS = {"tensorrt-rtx": ("tensorrt_rtx_libs", "libtensorrt_rtx.so.1", "libtensorrt_rtx.so")}
REEXEC_MARKER = "SAMG_TRT_REEXEC"
# Builder flags an engine needs before its runs can be captured into a CUDA graph, per flavour:
# TensorRT-RTX allocates at run time unless told to use the application's memory.
CAPTURE_BUILD_FLAGS = {"tensorrt": (), "tensorrt-rtx": ("REQUIRE_USER_ALLOCATION",)}


def cache_root() -> Path:
    """samg's cache folder: $SAMG_CACHE_DIR, else $XDG_CACHE_HOME/samg, else ~/.cache/samg."""
    if os.environ.get("SAMG_CACHE_DIR"):
        return Path(os.environ["SAMG_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "samg"


def available_flavours() -> list[str]:
    """TensorRT flavours importable here (checked without importing them)."""
    return [f for f, module in FLAVOURS.items() if importlib.util.find_spec(module) is not None]


def resolve_flavour(flavour: str | None) -> str:
    """`None`/"auto" -> the first installed flavour; an explicit one must be installed."""
    installed = available_flavours()
    if flavour in (None, "auto"):
        if not installed:
            raise SamgError(
                "TensorRT is not installed (needed to build engines): pip install tensorrt-rtx-cu13 "
                '(or "samg[tensorrt]"), or install NVIDIA TensorRT'
            )
        return installed[0]
    if flavour not in FLAVOURS:
        raise SamgError(f"unknown TensorRT flavour {flavour!r}: use --trt tensorrt or --trt tensorrt-rtx")
    if flavour not in installed:
        hint = "pip install tensorrt-rtx-cu13" if flavour == "tensorrt-rtx" else "install NVIDIA TensorRT 10"
        others = f" (installed: {', '.join(installed)})" if installed else ""
        raise SamgError(f"--trt {flavour} is not installed{others}: {hint}")
    return flavour


def library_link_status(flavour: str) -> tuple[str, Path | None]:
    """("ok" | "needs-env", folder) after making the unversioned library link where possible.

    "needs-env": the link exists in `folder` (a samg cache folder) but that folder is not on
    LD_LIBRARY_PATH of this process, so a plugin node would abort it.
    """
    if flavour not in _LIBRARY_LINKS:
        return "ok", None
    package, versioned, wanted = _LIBRARY_LINKS[flavour]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return "ok", None  # not the pip wheel layout: a system install has its own links
    lib_dir = Path(next(iter(spec.submodule_search_locations)))
    return link_library(
        lib_dir, versioned, wanted, cache_root() / "lib" / flavour, os.environ.get("LD_LIBRARY_PATH", "")
    )


def link_library(
    lib_dir: Path, versioned: str, wanted: str, fallback: Path, ld_library_path: str
) -> tuple[str, Path | None]:
    """Make `wanted` -> `versioned` findable: next to the library, else in `fallback`."""
    target = lib_dir / versioned
    if not target.exists() or (lib_dir / wanted).exists():
        return "ok", lib_dir
    if _make_link(lib_dir / wanted, versioned):
        return "ok", lib_dir
    fallback.mkdir(parents=True, exist_ok=True)
    if not (fallback / wanted).exists() and not _make_link(fallback / wanted, str(target)):
        raise SamgError(f"cannot create {fallback / wanted}: make {fallback} writable or set SAMG_CACHE_DIR")
    on_path = [Path(p) for p in ld_library_path.split(os.pathsep) if p]
    if any(p.exists() and p.resolve() == fallback.resolve() for p in on_path):
        return "ok", fallback
    return "needs-env", fallback


def _make_link(link: Path, target: str) -> bool:
    """Create `link` -> `target` atomically; False when the folder is not writable."""
    temp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    try:
        if temp.is_symlink():
            temp.unlink()
        os.symlink(target, temp)
        os.replace(temp, link)
        return True
    except OSError:
        if temp.is_symlink():
            temp.unlink(missing_ok=True)
        return False


def ensure_library_link(flavour: str) -> None:
    """Make parsing/deserializing plugin nodes safe in this process, or raise a SamgError saying how."""
    status, folder = library_link_status(flavour)
    if status == "needs-env":
        raise SamgError(
            f"the {flavour} wheel lacks the libtensorrt_rtx.so link and its folder is read-only: start "
            f"Python with LD_LIBRARY_PATH={folder}:$LD_LIBRARY_PATH (samg build does this by itself)"
        )


def reexec_with_library_path(flavour: str, argv: list[str]) -> None:
    """For the CLI: if the link lives in the cache folder, re-run this command with it on the path.

    Returns normally when nothing is needed; replaces the process otherwise.
    """
    status, folder = library_link_status(flavour)
    if status == "ok":
        return
    if os.environ.get(REEXEC_MARKER):
        ensure_library_link(flavour)  # raises: the re-executed process still cannot see it
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(folder), env.get("LD_LIBRARY_PATH", "")) if p)
    env[REEXEC_MARKER] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "samg", *argv], env)


def load_trt(flavour: str | None = None) -> ModuleType:
    """Import the TensorRT module of `flavour` (None: auto-detect), library link fixed first."""
    flavour = resolve_flavour(flavour)
    ensure_library_link(flavour)
    try:
        return importlib.import_module(FLAVOURS[flavour])
    except ImportError as exc:
        raise SamgError(f"{flavour} is installed but does not import ({exc}): reinstall it") from None


def flavour_of(trt: ModuleType) -> str:
    return "tensorrt-rtx" if trt.__name__ == "tensorrt_rtx" else "tensorrt"


def gpu_compute_capability() -> str | None:
    """The first GPU's compute capability ("sm_XY") via the CUDA driver API, or None without one."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    device, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(device), 0) != 0:
        return None
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
    if cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device) != 0:
        return None
    if cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device) != 0:
        return None
    return f"sm_{major.value}{minor.value}"


def supported_compute_capabilities(trt: ModuleType) -> tuple[str, ...] | None:
    """The GPUs ("sm_XY") the flavour's engines run on, where the module lists them: TensorRT-RTX's
    builder targets (trt.ComputeCapability: SM75, SM80, ...); None for standard TensorRT (any GPU it
    builds on)."""
    if flavour_of(trt) != "tensorrt-rtx" or not hasattr(trt, "ComputeCapability"):
        return None
    names = [name for name in trt.ComputeCapability.__members__ if name.startswith("SM") and name[2:].isdigit()]
    return tuple(f"sm_{name[2:]}" for name in sorted(names, key=lambda n: int(n[2:])))


def check_gpu_supported(trt: ModuleType, capability: str | None) -> None:
    """SamgError when `capability` (this GPU's "sm_XY"; None: no GPU seen) is not one the flavour runs on."""
    supported = supported_compute_capabilities(trt)
    if capability is None or supported is None or capability in supported:
        return
    raise SamgError(f"{flavour_of(trt)} {trt.__version__} does not run on this GPU (compute capability "
                    f"{capability}); it supports {', '.join(supported)}: use a GPU of those, or standard TensorRT "
                    "(samg build --trt tensorrt) or --backend onnxruntime on this one")


def numpy_dtype(trt: ModuleType, data_type):
    """The numpy dtype of a TensorRT tensor type; bfloat16 is ml_dtypes' (trt.nptype has none)."""
    np = require("numpy")
    if data_type == trt.DataType.BF16:
        return np.dtype(require("ml_dtypes", "for bfloat16 tensors").bfloat16)
    try:
        return np.dtype(trt.nptype(data_type))
    except TypeError:
        raise SamgError(f"TensorRT tensor type {data_type} has no numpy equivalent: export the model as float32, "
                        "float16 or bfloat16") from None


# Messages TensorRT-RTX logs as errors on a machine without a GPU although an ahead-of-time build
# works; they are left out of failure reports so that the real cause stands out.
_CPU_ONLY_NOISE = ("CUDA driver version is insufficient", "cudaError 35", "no CUDA-capable device")


# --------------------------------------------------------------------------------------------
# Logging: TensorRT's messages collected so failures show the builder's own words.


def make_logger(trt: ModuleType, echo: bool = False):
    """A trt.ILogger that keeps every warning/error (and echoes them to stderr when `echo`)."""

    class CollectingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[tuple[str, str]] = []

        def log(self, severity, msg):
            if severity > trt.ILogger.Severity.WARNING:
                return
            level = "W" if severity == trt.ILogger.Severity.WARNING else "E"
            self.messages.append((level, msg))
            if echo:
                print(f"  [TensorRT {level}] {msg}", file=sys.stderr)

        def mark(self) -> int:
            return len(self.messages)

        def report(self, since: int = 0) -> str:
            lines = [
                f"  [{level}] {msg.strip()}"
                for level, msg in self.messages[since:]
                if not any(noise in msg for noise in _CPU_ONLY_NOISE)
            ]
            return "\n".join(lines[-20:]) if lines else "  (TensorRT logged no error)"

    return CollectingLogger()


def polygraphy_trt(trt: ModuleType) -> ModuleType:
    """polygraphy.backend.trt driving `trt`'s flavour, its own log output silenced (samg reports).

    Polygraphy picks tensorrt or tensorrt_rtx once, when polygraphy.backend.trt is first imported
    (POLYGRAPHY_USE_TENSORRT_RTX), so the flag is set before that import.
    """
    config = require("polygraphy.config", "to build TensorRT engines (pip install polygraphy)")
    rtx = flavour_of(trt) == "tensorrt-rtx"
    if "polygraphy.backend.trt" not in sys.modules:
        config.USE_TENSORRT_RTX = rtx
    elif config.USE_TENSORRT_RTX != rtx:
        raise SamgError(f"polygraphy was already set up for the other TensorRT flavour than {flavour_of(trt)} in this "
                        "process: build with one flavour per process (--trt)")
    from polygraphy.backend import trt as polygraphy_backend
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.CRITICAL  # failures reach the user as SamgError with TensorRT's words
    return polygraphy_backend
