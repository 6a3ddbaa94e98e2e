"""The build record beside each engine (`<component>.engine.json`) and the checks an engine must
pass before it is loaded: shared by the builder (samg.build.engine) and the runner
(samg.runners.tensorrt), so the runner needs neither the builder nor ONNX.
"""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path
from types import ModuleType

from samg.build.loader import flavour_of
from samg.errors import SamgError, check
from samg.io import sha256_file

ENGINE_FORMAT = "samg-engine"
ENGINE_FORMAT_VERSION = 1


def gpu_compute_capability() -> str | None:
    """The first GPU's compute capability via the CUDA driver API, or None without one."""
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


def read_record(engine_path: Path) -> dict:
    """The JSON record beside an engine, checked for format; SamgError if missing or broken."""
    record_path = record_path_of(engine_path)
    check(engine_path.is_file(), f"{engine_path} does not exist: build it with `samg build EXPORT_DIR`")
    check(
        record_path.is_file(),
        f"{engine_path} has no build record {record_path.name} beside it: rebuild it with `samg build`",
    )
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError as exc:
        raise SamgError(f"{record_path} is not valid JSON ({exc}): rebuild with `samg build`") from None
    check(
        record.get("format") == ENGINE_FORMAT and record.get("format_version") == ENGINE_FORMAT_VERSION,
        f"{record_path} is not a samg engine record of version {ENGINE_FORMAT_VERSION}: rebuild with `samg build`",
    )
    return record


def record_path_of(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")


def verify_engine(engine_path: str | os.PathLike, trt: ModuleType | None = None) -> dict:
    """Check an engine file against its record (and the installed TensorRT); return the record.

    Refuses, with a SamgError naming the fix: a missing/unreadable record, a truncated or altered
    engine (size/hash), an engine of the other TensorRT flavour or another version, or one built
    for another GPU.
    """
    engine_path = Path(engine_path)
    record = read_record(engine_path)
    size = engine_path.stat().st_size
    check(
        size == record.get("engine_bytes"),
        f"{engine_path} is {size} bytes but was built as {record.get('engine_bytes')}: the file is truncated "
        "or replaced; rebuild with `samg build`",
    )
    check(
        sha256_file(engine_path) == record.get("engine_sha256"),
        f"{engine_path} does not match its build record (hash differs): the file is corrupt; rebuild with `samg build`",
    )
    if trt is not None:
        flavour, version = flavour_of(trt), trt.__version__
        check(
            record["trt"]["flavour"] == flavour and record["trt"]["version"] == version,
            f"{engine_path} was built with {record['trt']['flavour']} {record['trt']['version']} but this is "
            f"{flavour} {version}: rebuild with `samg build --trt {flavour}`",
        )
        wanted = record.get("compute_capability", "any")
        if wanted not in ("any", "unknown"):
            here = gpu_compute_capability()
            check(
                here in (None, wanted),
                f"{engine_path} was built for {wanted} but this GPU is {here}: rebuild on this machine",
            )
    return record
