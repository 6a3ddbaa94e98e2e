"""Atomic writes leave either the old content or the new, never a partial file, with normal permissions."""

import json
import os
import stat

import numpy as np
import pytest

from samg.errors import SamgError
from samg.io import atomic_dir, atomic_path, atomic_write_json, check_finite


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]  # no temp file left
    atomic_write_json(target, {"k": 1})
    assert target.read_text().strip().startswith("{")


def test_atomic_dir_replaces_whole_folder(tmp_path):
    out = tmp_path / "export"
    with atomic_dir(out) as d:
        (d / "x").write_text("1")
    with pytest.raises(ValueError):
        with atomic_dir(out) as d:
            (d / "y").write_text("2")
            raise ValueError
    assert [p.name for p in out.iterdir()] == ["x"]
    with atomic_dir(out) as d:
        (d / "z").write_text("3")
    assert [p.name for p in out.iterdir()] == ["z"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "f") as tmp:
            tmp.write_bytes(b"1")
        with atomic_dir(tmp_path / "d"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_check_finite_names_the_tensor():
    check_finite("x", np.ones(3))
    with pytest.raises(SamgError, match=r"non-finite values in latents after step 2 \(1 of 3\)"):
        check_finite("latents", np.array([1.0, np.nan, 2.0]), "after step 2")


# --- crash safety of the folder swap: a kill at any point loses nothing, and leaves nothing forever --


def _dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _marker(folder, pid, role, host=None, **extra):
    import json
    import socket

    (folder / ".samg-partial").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "role": role,
                                                      **extra}))


def test_killed_assembly_leaves_a_temp_folder_the_next_run_removes(tmp_path):
    stale = tmp_path / ".export.tmp-killed"  # what `kill -9` during an export leaves
    stale.mkdir()
    (stale / "denoiser.onnx").write_bytes(b"half")
    _marker(stale, _dead_pid(), "tmp", target="export")
    running = tmp_path / ".export.tmp-running"  # another export still at work: not touched
    running.mkdir()
    _marker(running, os.getpid(), "tmp", target="export")
    foreign = tmp_path / ".export.tmp-mine"  # no samg marker: not samg's, not touched
    foreign.mkdir()
    with atomic_dir(tmp_path / "export") as d:
        (d / "x").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".export.tmp-mine", ".export.tmp-running", "export"]
    assert [p.name for p in (tmp_path / "export").iterdir()] == ["x"]  # the marker is not left in the result


def test_kill_between_the_two_renames_is_undone_by_the_next_reader(tmp_path):
    from samg.io import recover_dir

    # The previous folder was moved aside, the new one not yet moved in: `export` is missing.
    aside = tmp_path / ".export.old-abcd"
    aside.mkdir()
    (aside / "samg.json").write_text("{}")
    _marker(aside, _dead_pid(), "old", target="export")
    recover_dir(tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert (tmp_path / "export" / "samg.json").read_text() == "{}"


def test_kill_after_the_swap_leaves_an_old_copy_the_next_run_removes(tmp_path):
    from samg.io import recover_dir

    from samg.export.folder import samg_files
    from samg.io import clean_stale

    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "new").write_text("new")
    aside = tmp_path / ".export.old-abcd"
    aside.mkdir()
    (aside / "samg.json").write_text(json.dumps({"format": "samg-export", "files": {"a.onnx": "sha256:0"}}))
    (aside / "a.onnx").write_text("samg's")
    _marker(aside, _dead_pid(), "old", target="export")
    user = tmp_path / ".export.old-user"  # same pattern but no samg marker: kept
    user.mkdir()
    (user / "samg.json").write_text("{}")
    recover_dir(tmp_path / "export")  # a reader: deletes nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == [aside.name, user.name, "export"]
    clean_stale(tmp_path / "export", samg_files)  # the exporter: removes the abandoned old copy only
    assert sorted(p.name for p in tmp_path.iterdir()) == [user.name, "export"]
    assert (tmp_path / "export" / "new").read_text() == "new"


def test_merge_keeps_other_files_and_replaces_only_owned_ones(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("user")
    (out / "old.onnx").write_text("samg's, no longer written")
    (out / "samg.json").write_text("old manifest")
    with atomic_dir(out, owned=lambda folder: {"old.onnx", "samg.json"} & {p.name for p in folder.iterdir()},
                    merge=True) as d:
        (d / "samg.json").write_text("new manifest")
        (d / "sub").mkdir()
        (d / "sub" / "a.onnx").write_text("new")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["notes.txt", "samg.json", "sub/a.onnx"]
    assert (out / "notes.txt").read_text() == "user" and (out / "samg.json").read_text() == "new manifest"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_merge_refuses_a_file_that_appeared_and_is_not_owned(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    with pytest.raises(SamgError, match=r"a.onnx appeared while samg was writing .*export and was not written by "
                       r"samg, so .*export was left as it was: the new result is in .*export\.new-"):
        with atomic_dir(out, owned=lambda folder: set(), merge=True) as d:
            (d / "a.onnx").write_text("new")
            (out / "a.onnx").write_text("user's, written meanwhile")
    assert (out / "a.onnx").read_text() == "user's, written meanwhile"
    kept = [p.name for p in tmp_path.iterdir() if p.name != "export"]
    assert len(kept) == 1 and (tmp_path / kept[0] / "a.onnx").read_text() == "new"


def test_the_umask_is_read_without_changing_it(tmp_path, monkeypatch):
    """os.umask(0) to read it would briefly change the whole process's umask (a race with every other
    thread when samg is a library): writes must not call it."""
    old = os.umask(0o027)
    try:
        def forbidden(mask):
            raise AssertionError(f"os.umask({mask:o}) called while writing")

        monkeypatch.setattr(os, "umask", forbidden)
        with atomic_path(tmp_path / "f") as tmp:
            tmp.write_bytes(b"1")
        with atomic_dir(tmp_path / "d"):
            pass
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o750


# --- leftovers that only look like samg's are never touched -------------------------------------------


def test_a_users_backup_folder_named_like_samgs_is_neither_restored_nor_deleted(tmp_path):
    """`.exp.old-backup/` with a samg.json and notes, no samg marker: a reader does not move it in
    place of a missing exp, and a writer does not delete it."""
    from samg.contract import read_export
    from samg.export.folder import samg_files

    backup = tmp_path / ".exp.old-backup"
    backup.mkdir()
    (backup / "samg.json").write_text("{}")
    (backup / "notes.txt").write_text("mine")
    with pytest.raises(SamgError, match="is not a folder"):
        read_export(tmp_path / "exp")
    assert not (tmp_path / "exp").exists() and (backup / "notes.txt").read_text() == "mine"
    with atomic_dir(tmp_path / "exp", owned=samg_files) as d:
        (d / "x").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".exp.old-backup", "exp"]
    assert sorted(p.name for p in backup.iterdir()) == ["notes.txt", "samg.json"]


@pytest.mark.parametrize("marker", [
    dict(pid="12x", role="old"),  # not a pid samg wrote
    dict(pid="dead", role="old", host="another-host"),  # another machine's (shared file system): its pid means nothing here
    dict(pid="dead", role="backup"),  # not samg's role
])
def test_an_old_folder_is_restored_only_with_samgs_marker_from_a_gone_process_on_this_host(tmp_path, marker):
    from samg.export.folder import samg_files
    from samg.io import clean_stale, recover_dir

    aside = tmp_path / ".exp.old-1234-abcd"
    aside.mkdir()
    (aside / "samg.json").write_text("{}")
    pid = _dead_pid() if marker["pid"] == "dead" else marker["pid"]
    _marker(aside, pid, marker["role"], host=marker.get("host"))
    recover_dir(tmp_path / "exp")
    assert sorted(p.name for p in tmp_path.iterdir()) == [aside.name]
    (tmp_path / "exp").mkdir()
    clean_stale(tmp_path / "exp", samg_files)
    assert sorted(p.name for p in aside.iterdir()) == [".samg-partial", "samg.json"]


def test_an_abandoned_old_folder_loses_only_samgs_files(tmp_path):
    """Marked "old" by a process that is gone, but a user file got in: only the files its manifest
    lists (and samg's bookkeeping) are deleted; the folder stays with the user's file."""
    from samg.export.folder import samg_files
    from samg.io import clean_stale

    (tmp_path / "exp").mkdir()
    aside = tmp_path / ".exp.old-abcd"
    aside.mkdir()
    (aside / "samg.json").write_text(json.dumps({"format": "samg-export", "files": {"a.onnx": "sha256:0"}}))
    (aside / "a.onnx").write_text("samg's")
    (aside / "mine.txt").write_text("the user's")
    _marker(aside, _dead_pid(), "old")
    clean_stale(tmp_path / "exp", samg_files)
    assert sorted(p.name for p in aside.iterdir()) == ["mine.txt"]


# --- a file that appears between the check and the swap is never lost ------------------------------


def _owns_manifest_and_onnx(folder):
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.name == "samg.json" or p.suffix == ".onnx"}


def test_replace_refuses_when_a_foreign_file_appeared_and_keeps_the_new_folder_beside(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "samg.json").write_text("old")
    with pytest.raises(SamgError) as info:
        with atomic_dir(out, owned=_owns_manifest_and_onnx) as d:
            (d / "samg.json").write_text("new")
            (out / "notes.txt").write_text("written by the user meanwhile")
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("export.new-")]
    assert len(kept) == 1
    message = str(info.value)
    assert f"{out / 'notes.txt'} appeared while samg was writing {out}" in message
    assert f"the new result is in {kept[0]}" in message and "\n" not in message
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "samg.json"]
    assert (out / "samg.json").read_text() == "old" and (out / "notes.txt").read_text().startswith("written")
    assert sorted(p.name for p in kept[0].iterdir()) == ["samg.json"] and (kept[0] / "samg.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", kept[0].name]


def test_replace_with_only_owned_files_swaps_and_removes_only_those(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "samg.json").write_text("old")
    (out / "old.onnx").write_text("old graph")
    with atomic_dir(out, owned=_owns_manifest_and_onnx) as d:
        (d / "samg.json").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["samg.json"] and (out / "samg.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_merge_keeps_a_file_that_appeared_meanwhile_and_deletes_only_owned_ones(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("user")
    (out / "old.onnx").write_text("samg's, no longer written")
    with atomic_dir(out, owned=_owns_manifest_and_onnx, merge=True) as d:
        (d / "new.onnx").write_text("new")
        (out / "later.txt").write_text("the user's, written meanwhile")
    assert sorted(p.name for p in out.iterdir()) == ["later.txt", "new.onnx", "notes.txt"]
