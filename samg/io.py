"""Small I/O helpers shared by every part: atomic writes, output-location checks, finite checks, hashing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from samg.contract import MANIFEST, PARTIAL_MARKER
from samg.errors import SamgError

# Which files in a folder samg may replace or delete (relative POSIX paths); see atomic_dir.
Ownership = Callable[[Path], "set[str]"]


def _proc_umask() -> int | None:
    """The umask from /proc/self/status (Linux): read without changing it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_at_import() -> int:
    # os.umask can only be read by setting it; done once here, not on every write, because a
    # changed umask is process-wide and would race with other threads when samg is a library.
    mask = _proc_umask()
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_at_import()


def _umask() -> int:
    mask = _proc_umask()
    return _UMASK_AT_IMPORT if mask is None else mask


def check_output_location(path: str | os.PathLike, flag: str) -> Path:
    """SamgError unless new files can be created where `path` will go, checked before the work.

    The nearest existing folder at or above `path` must be a folder and accept new files (probed with
    a real temporary file, removed at once: root, read-only mounts and ACLs are judged as they are).
    Missing folders in between are created when writing. Returns that nearest existing folder."""
    ancestor = Path(os.path.abspath(path))
    while not ancestor.exists() and not ancestor.is_symlink():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SamgError(f"{flag}: {ancestor} is a file, not a folder: pick a path inside a folder")
    try:
        with tempfile.TemporaryFile(prefix=".samg-write-check-", dir=ancestor):
            pass
    except OSError as exc:
        raise SamgError(f"{flag}: cannot write to {ancestor} ({exc.strerror or exc}): pick a path in a folder "
                        "you can write to") from None
    return ancestor


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


# --- folders: swapped in whole or merged, never deleting what the caller does not own --------------
#
# atomic_dir assembles a folder as `.NAME.tmp-XXXX` (marker role "tmp") and then either renames it
# to NAME (NAME missing), swaps it in (NAME's previous content first marked role "old" and moved to
# `.NAME.old-XXXX`), or merges it file by file into NAME (NAME marked role "merge" with the files
# being written). A marker records pid and host, so that a leftover is recognised as samg's and as
# abandoned (same host, process gone) before anything is done with it.

TMP_ROLE, OLD_ROLE, MERGE_ROLE = "tmp", "old", "merge"


def tmp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-"


def _old_prefix(path: Path) -> str:
    return f".{path.name}.old-"


def pid_gone(pid: Any) -> bool:
    """True only for a numeric pid of a process that no longer runs on this host."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False  # not a pid samg wrote: nothing can be concluded
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # exists, owned by someone else
    return False


def read_json_object(path: Path) -> dict | None:
    """The JSON object in `path`, or None where the file is missing, unreadable or not an object
    (markers and stamps samg wrote: anything else is simply not one of them)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_marker(folder: Path) -> dict | None:
    """samg's partial marker in `folder`, or None where there is none (or it is not samg's)."""
    return read_json_object(folder / PARTIAL_MARKER)


def abandoned(marker: dict | None, role: str) -> bool:
    """The marker is samg's, of `role`, written on this host by a process that is gone."""
    return (marker is not None and marker.get("role") == role and marker.get("host") == socket.gethostname()
            and pid_gone(marker.get("pid")))


def _write_marker(folder: Path, role: str, **extra: Any) -> None:
    atomic_write_json(folder / PARTIAL_MARKER, {"pid": os.getpid(), "host": socket.gethostname(), "role": role,
                                                **extra})


def _leftovers(path: Path, prefix: str) -> list[Path]:
    try:
        return sorted(e for e in path.parent.iterdir()
                      if e.name.startswith(prefix) and e.is_dir() and not e.is_symlink())
    except OSError:
        return []


def recover_dir(path: str | os.PathLike) -> None:
    """Put back a folder a killed swap left moved aside; safe for readers: it deletes nothing.

    Killed between the two renames of atomic_dir's swap, `path` is missing and its previous content
    waits as `.NAME.old-XXXX`; it is renamed back only when its marker says it is samg's "old" folder
    of a process on this host that is gone. Where `path` exists, or the parent folder cannot be
    written, nothing happens (a reader then reports what is missing)."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        return
    for entry in _leftovers(path, _old_prefix(path)):
        if abandoned(read_marker(entry), OLD_ROLE):
            with contextlib.suppress(OSError):
                os.replace(entry, path)
                return


def _remove_owned(folder: Path, owned: Ownership | None) -> bool:
    """Delete the files `owned(folder)` names (all, where owned is None) and samg's marker, then the
    folders left empty; True when `folder` is gone. Anything else stays where it is."""
    if owned is None:
        shutil.rmtree(folder, ignore_errors=True)
        return not folder.exists()
    for name in sorted(owned(folder) | {PARTIAL_MARKER}):
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
            (folder / name).unlink()
    for root, dirs, _files in sorted(os.walk(folder, topdown=False), key=lambda w: -len(w[0])):
        for name in dirs:
            with contextlib.suppress(OSError):  # not empty (or a link): kept
                os.rmdir(os.path.join(root, name))
    with contextlib.suppress(OSError):
        os.rmdir(folder)
    return not folder.exists()


def clean_stale(path: str | os.PathLike, owned: Ownership | None) -> None:
    """Remove what killed atomic_dir runs for `path` left behind (for writers only, never readers).

    First the reader's repair (recover_dir). Then, each only when its marker is samg's, of the right
    role, from this host and its process is gone: a `.NAME.tmp-XXXX` folder (all samg wrote) is
    removed; from a `.NAME.old-XXXX` folder only the files `owned` claims are removed (the folder
    stays if anything else is in it); a "tmp"/"old" marker left in `path` itself is removed."""
    path = Path(path)
    recover_dir(path)
    for entry in _leftovers(path, tmp_prefix(path)):
        if abandoned(read_marker(entry), TMP_ROLE):
            shutil.rmtree(entry, ignore_errors=True)
    for entry in _leftovers(path, _old_prefix(path)):
        if abandoned(read_marker(entry), OLD_ROLE):
            _remove_owned(entry, owned)
    marker = read_marker(path)
    if abandoned(marker, TMP_ROLE) or abandoned(marker, OLD_ROLE):  # killed after the swap
        with contextlib.suppress(OSError):
            (path / PARTIAL_MARKER).unlink()


def present_files(folder: str | os.PathLike) -> set[str]:
    """Every file and symbolic link under `folder` (relative POSIX paths); links are not followed."""
    folder = Path(folder)
    found: set[str] = set()
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        for name in files + [d for d in dirs if (here / d).is_symlink()]:
            found.add((here / name).relative_to(folder).as_posix())
    return found


def _keep_new_aside(tmp: Path, path: Path, foreign: list[str]) -> SamgError:
    """Move the finished folder to a visible sibling and say where (nothing in `path` is touched)."""
    kept = Path(tempfile.mkdtemp(prefix=f"{path.name}.new-", dir=path.parent))
    os.replace(tmp, kept)
    with contextlib.suppress(OSError):
        (kept / PARTIAL_MARKER).unlink()
    more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
    return SamgError(f"{path / foreign[0]}{more} appeared while samg was writing {path} and was not written by "
                     f"samg, so {path} was left as it was: the new result is in {kept}; move your files out of "
                     f"{path} and rename {kept} to {path}")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, owned: Ownership | None = None, merge: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success its content becomes `path`.

    owned(folder) names the files in a folder that the caller may replace or delete; None means the
    caller owns all of `path` (a folder only it writes). Ownership is checked again right before
    `path` is changed, so a file that appeared meanwhile is never lost: then `path` is left as it is,
    the new folder is kept as a visible `NAME.new-XXXX` sibling, and SamgError says where.

    Default: the new folder replaces `path` (the old content is moved aside, the new folder renamed
    in, and the old folder's owned files deleted; a kill at any point is repaired by recover_dir /
    clean_stale). merge=True: the new files are moved into `path` one by one, the owned files the
    new set lacks are deleted, and every other file is left as it is (`path` meanwhile holds a
    "merge" marker listing the files being written, so a killed merge is recognised)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path, owned)
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(path), dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        _write_marker(tmp, TMP_ROLE, target=path.name)
        yield tmp
        if not path.exists() and not path.is_symlink():
            os.replace(tmp, path)  # fails, deleting nothing, if a non-empty `path` appeared meanwhile
            (path / PARTIAL_MARKER).unlink()
            return
        present = present_files(path)
        mine = present if owned is None else owned(path)
        if merge:
            new = sorted(n for n in present_files(tmp) if n != PARTIAL_MARKER)
            foreign = [n for n in new if n in present and n not in mine]
            if foreign:
                raise _keep_new_aside(tmp, path, foreign)
            _merge(tmp, path, new, mine)
            return
        foreign = sorted(present - mine)
        if foreign:
            raise _keep_new_aside(tmp, path, foreign)
        # Marked and moved aside under a name recover_dir knows, so a kill between the renames loses nothing.
        _write_marker(path, OLD_ROLE, target=path.name)
        old = Path(tempfile.mkdtemp(prefix=_old_prefix(path), dir=path.parent))
        try:
            os.replace(path, old)
        except OSError:
            os.rmdir(old)
            with contextlib.suppress(OSError):
                (path / PARTIAL_MARKER).unlink()
            raise
        os.replace(tmp, path)
        (path / PARTIAL_MARKER).unlink()  # kept until here so that a kill never leaves an unmarked temp folder
        if not _remove_owned(old, owned):  # something samg did not write got in after the last check
            kept = Path(tempfile.mkdtemp(prefix=f"{path.name}.previous-", dir=path.parent))
            os.replace(old, kept)
            print(f"samg: kept files that appeared in {path} while it was replaced (not written by samg) in "
                  f"{kept}", file=sys.stderr)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _merge(tmp: Path, path: Path, new: list[str], owned: set[str]) -> None:
    _write_marker(path, MERGE_ROLE, files=sorted(set(new) | owned))
    # The manifest goes first and comes back last: until then the folder is not a loadable export.
    with contextlib.suppress(FileNotFoundError):
        (path / MANIFEST).unlink()
    for name in sorted(new, key=lambda n: n == MANIFEST):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / name, path / name)
    for name in sorted(owned - set(new) - {PARTIAL_MARKER}):
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
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
        raise nonfinite_error(name, int(a.size - np.isfinite(a).sum()), a.size, where)


def nonfinite_error(name: str, bad: int, size: int, where: str = "") -> SamgError:
    """check_finite's error for `bad` of `size` values non-finite (also raised for device tensors,
    whose count is read after the loop)."""
    at = f" {where}" if where else ""
    return SamgError(f"non-finite values in {name}{at} ({bad} of {size}): lower the guidance scale, "
                     "check the model files, or run in float32")
