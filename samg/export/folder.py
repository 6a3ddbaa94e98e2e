"""Which files in an export folder samg wrote: the only ones `samg export` may replace or delete.

No heavy imports (samg.contract, samg.io); used by the exporter before the work and
again, through samg.io.atomic_dir, right before the folder is changed.
"""

from __future__ import annotations

from pathlib import Path

from samg.contract import (ENGINE_COMPONENTS, ENGINES_DIR, MANIFEST, PARTIAL_MARKER, TINY_SOURCE_DIR, VERIFIED_STAMP,
                           engine_record_claims, manifest_claims)
from samg.io import MERGE_ROLE, present_files, read_marker, sha256_file


def samg_engine_files(folder: Path, present: set[str]) -> set[str]:
    """The `samg build` engines in `folder`: for each component, `engines/<component>.engine.json`
    when it is a samg engine record, and the engine beside it when its size and hash match that
    record. Any other file under engines/ is not samg's."""
    owned = set()
    for component in ENGINE_COMPONENTS:
        engine = f"{ENGINES_DIR}/{component}.engine"
        record_name = engine + ".json"
        claims = engine_record_claims(folder / record_name) if record_name in present else None
        if claims is None:
            continue
        owned.add(record_name)
        engine_bytes, engine_sha256 = claims
        path = folder / engine
        try:
            if (engine in present and not path.is_symlink() and path.stat().st_size == engine_bytes
                    and sha256_file(path) == engine_sha256):
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
    claims = manifest_claims(folder)
    if claims is not None:
        owned.add(MANIFEST)
        owned.update(claims.files)
        if claims.tiny_source:
            owned.update(n for n in present if n.split("/")[0] == TINY_SOURCE_DIR)
        if claims.valid:
            owned |= samg_engine_files(folder, present)
    marker = read_marker(folder)
    if marker is not None:
        owned.add(PARTIAL_MARKER)
        listed = marker.get("files") if marker.get("role") == MERGE_ROLE else None
        owned.update(n for n in (listed if isinstance(listed, list) else []) if isinstance(n, str))
    if owned:
        owned.add(VERIFIED_STAMP)
    return owned & present
