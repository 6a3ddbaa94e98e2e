"""Small I/O helpers shared by every part: atomic writes, finite checks, hashing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from samg.contract import MANIFEST, PARTIAL_MARKER
from samg.errors import SamgError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it over `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp name keeps the target's extension: writers such as ffmpeg pick the format from it.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; the result should look like any new file
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def _old_prefix(path: Path) -> str:
    return f".{path.name}.old-"


def _pid_dead(pid: Any) -> bool:
    """True when `pid` (from a marker or folder name) is no longer a running process on this host."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return True
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # exists, owned by someone else
    return False


def _marker(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / PARTIAL_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _stale(marker: dict | None) -> bool:
    return marker is not None and marker.get("host") == socket.gethostname() and _pid_dead(marker.get("pid"))


def _old_pid(folder: Path, path: Path) -> int | None:
    """The pid in a `.NAME.old-PID-XXXX` folder name (the process that moved the old export aside)."""
    head = folder.name[len(_old_prefix(path)):].split("-")[0]
    return int(head) if head.isdigit() else None


def _looks_like_samg(folder: Path) -> bool:
    """An empty folder, or one holding a samg manifest or samg's partial marker."""
    try:
        return not any(folder.iterdir()) or (folder / MANIFEST).is_file() or (folder / PARTIAL_MARKER).is_file()
    except OSError:
        return False


def recover_dir(path: str | os.PathLike) -> None:
    """Clean up after a process killed inside `atomic_dir(path)`.

    Killed between the two renames of the swap: `path` is missing and the previous folder waits as
    `.NAME.old-PID-XXXX`; it is put back. Killed after the swap: the old copy is removed. Killed
    while assembling: the `.NAME.tmp-XXXX` folder (marked by samg's partial marker, its process gone)
    is removed. Only folders recognisably samg's are touched; where the parent folder cannot be
    written this does nothing (a reader then reports what is missing)."""
    path = Path(path)
    parent = path.parent
    try:
        entries = [e for e in parent.iterdir() if e.name.startswith((_tmp_prefix(path), _old_prefix(path)))]
    except OSError:
        return
    for entry in sorted(entries):
        try:
            if entry.is_symlink() or not entry.is_dir():
                continue
            if entry.name.startswith(_tmp_prefix(path)):
                if _stale(_marker(entry)):
                    shutil.rmtree(entry)
            elif _pid_dead(_old_pid(entry, path)) and _looks_like_samg(entry):
                if not path.exists() and not path.is_symlink():
                    os.replace(entry, path)
                else:
                    shutil.rmtree(entry)
        except OSError:
            continue
    if _stale(_marker(path)) and (path / MANIFEST).is_file() and not _marker(path).get("files"):
        with contextlib.suppress(OSError):  # a swap finished, its marker not yet removed
            (path / PARTIAL_MARKER).unlink()


def _write_marker(folder: Path, **extra: Any) -> None:
    atomic_write_json(folder / PARTIAL_MARKER, {"pid": os.getpid(), "host": socket.gethostname(), **extra})


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, merge_owned: set[str] | None = None) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it becomes `path`.

    Default: the folder replaces `path` whole (the old one is moved aside, the new one renamed in,
    the old one removed; `recover_dir` repairs a kill at any point). With `merge_owned` (the files
    in `path` that the caller may replace or delete): the new files are moved into the existing
    `path` one by one and the owned files the new set lacks are deleted; every other file in `path`
    is left as it is. While merging, `path` holds a partial marker listing every file being
    replaced, so a killed merge is recognised and can be redone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        _write_marker(tmp, target=path.name)
        yield tmp
        if merge_owned is not None:
            _merge(tmp, path, merge_owned)
            return
        if path.exists() or path.is_symlink():
            # Moved aside under a name recover_dir knows, so a kill between the renames loses nothing.
            old = Path(tempfile.mkdtemp(prefix=f"{_old_prefix(path)}{os.getpid()}-", dir=path.parent))
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        (path / PARTIAL_MARKER).unlink()  # kept until here so that a kill never leaves an unmarked temp folder
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _merge(tmp: Path, path: Path, owned: set[str]) -> None:
    new = sorted(n for n in (p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()) if n != PARTIAL_MARKER)
    clash = [n for n in new if n not in owned and ((path / n).exists() or (path / n).is_symlink())]
    if clash:
        raise SamgError(f"{path / clash[0]} appeared while exporting and was not written by samg: move it away "
                        "and export again")
    path.mkdir(parents=True, exist_ok=True)
    _write_marker(path, files=sorted(set(new) | owned))
    # The manifest goes first and comes back last: until then the folder is not a loadable export.
    with contextlib.suppress(FileNotFoundError):
        (path / MANIFEST).unlink()
    for name in sorted(new, key=lambda n: n == MANIFEST):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / name, path / name)
    for name in sorted(owned - set(new)):
        with contextlib.suppress(FileNotFoundError):
            (path / name).unlink()
    (path / PARTIAL_MARKER).unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return "sha256:" + h.hexdigest()


def check_finite(name: str, array: Any, where: str = "") -> None:
    """Raise SamgError if `array` (numpy or anything np.asarray accepts) holds NaN or Inf."""
    a = np.asarray(array)
    if a.dtype.kind in "fc" and not np.isfinite(a).all():
        bad = int(a.size - np.isfinite(a).sum())
        at = f" {where}" if where else ""
        raise SamgError(
            f"non-finite values in {name}{at} ({bad} of {a.size}): lower the guidance scale, "
            "check the model files, or run in float32"
        )
