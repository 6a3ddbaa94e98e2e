"""Which files in an export folder samg wrote: the only ones `samg export` may replace or delete.

Standard library at import time (samg.contract, samg.io); used by the exporter before the work and
again, through samg.io.atomic_dir, right before the folder is changed.
"""

from __future__ import annotations

import json
from pathlib import Path

from samg.contract import (ENGINE_COMPONENTS, ENGINE_FORMAT, ENGINES_DIR, FORMAT, MANIFEST, PARTIAL_MARKER,
                           TINY_SOURCE_DIR, VERIFIED_STAMP, validate_manifest)
from samg.errors import SamgError
from samg.io import MERGE_ROLE, present_files, read_marker, sha256_file

# Larger records are not samg's (a real one is a few KiB).
_MAX_ENGINE_RECORD_BYTES = 1 << 20


def _manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def _is_valid(manifest: dict, folder: Path) -> bool:
    try:
        validate_manifest(json.loads(json.dumps(manifest)), str(folder / MANIFEST), complete=False)
    except (SamgError, ValueError, TypeError, RecursionError):
        return False
    return True


def samg_engine_files(folder: Path, present: set[str]) -> set[str]:
    """The `samg build` engines in `folder`: for each component, `engines/<component>.engine.json`
    when it is a samg engine record, and the engine beside it when its size and hash match that
    record. Any other file under engines/ is not samg's."""
    owned = set()
    for component in ENGINE_COMPONENTS:
        engine = f"{ENGINES_DIR}/{component}.engine"
        record_name = engine + ".json"
        if record_name not in present or (folder / record_name).is_symlink():
            continue
        try:
            if (folder / record_name).stat().st_size > _MAX_ENGINE_RECORD_BYTES:
                continue
            record = json.loads((folder / record_name).read_text())
        except (OSError, ValueError, RecursionError):
            continue
        if not isinstance(record, dict) or record.get("format") != ENGINE_FORMAT:
            continue
        owned.add(record_name)
        path = folder / engine
        try:
            if (engine in present and not path.is_symlink() and path.stat().st_size == record.get("engine_bytes")
                    and sha256_file(path) == record.get("engine_sha256")):
                owned.add(engine)
        except OSError:
            pass
    return owned


def samg_files(folder: str | Path) -> set[str]:
    """Files in `folder` (relative POSIX paths) that samg wrote: those of the export its manifest
    describes (with the tiny model's source/), samg's bookkeeping, the `samg build` engines when the
    manifest is a valid samg manifest (samg_engine_files), and those a killed `--force` export was
    writing (listed in its "merge" marker). Nothing else may be replaced or deleted."""
    folder = Path(folder)
    present = present_files(folder)
    owned: set[str] = set()
    manifest = _manifest(folder)
    if manifest is not None:
        owned.add(MANIFEST)
        files = manifest.get("files")
        owned.update(n for n in (files if isinstance(files, dict) else {}) if isinstance(n, str))
        source = manifest.get("source")
        if isinstance(source, dict) and source.get("kind") == "tiny":
            owned.update(n for n in present if n.split("/")[0] == TINY_SOURCE_DIR)
        if _is_valid(manifest, folder):
            owned |= samg_engine_files(folder, present)
    marker = read_marker(folder)
    if marker is not None:
        owned.add(PARTIAL_MARKER)
        listed = marker.get("files") if marker.get("role") == MERGE_ROLE else None
        owned.update(n for n in (listed if isinstance(listed, list) else []) if isinstance(n, str))
    if owned:
        owned.add(VERIFIED_STAMP)
    return owned & present
