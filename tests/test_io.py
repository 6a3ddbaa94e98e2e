"""Atomic writes leave either the old content or the new, never a partial file, with normal permissions."""

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


def _marker(folder, pid, **extra):
    import json
    import socket

    (folder / ".samg-partial").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), **extra}))


def test_killed_assembly_leaves_a_temp_folder_the_next_run_removes(tmp_path):
    stale = tmp_path / ".export.tmp-killed"  # what `kill -9` during an export leaves
    stale.mkdir()
    (stale / "denoiser.onnx").write_bytes(b"half")
    _marker(stale, _dead_pid(), target="export")
    running = tmp_path / ".export.tmp-running"  # another export still at work: not touched
    running.mkdir()
    _marker(running, os.getpid(), target="export")
    foreign = tmp_path / ".export.tmp-mine"  # no samg marker: not samg's, not touched
    foreign.mkdir()
    with atomic_dir(tmp_path / "export") as d:
        (d / "x").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".export.tmp-mine", ".export.tmp-running", "export"]
    assert [p.name for p in (tmp_path / "export").iterdir()] == ["x"]  # the marker is not left in the result


def test_kill_between_the_two_renames_is_undone_by_the_next_reader(tmp_path):
    from samg.io import recover_dir

    # The previous folder was moved aside, the new one not yet moved in: `export` is missing.
    aside = tmp_path / f".export.old-{_dead_pid()}-abcd"
    aside.mkdir()
    (aside / "samg.json").write_text("{}")
    recover_dir(tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert (tmp_path / "export" / "samg.json").read_text() == "{}"


def test_kill_after_the_swap_leaves_an_old_copy_the_next_run_removes(tmp_path):
    from samg.io import recover_dir

    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "new").write_text("new")
    aside = tmp_path / f".export.old-{_dead_pid()}-abcd"
    aside.mkdir()
    (aside / "samg.json").write_text("{}")
    user = tmp_path / f".export.old-{_dead_pid()}-user"  # same pattern but not samg's content: kept
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    recover_dir(tmp_path / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == [user.name, "export"]
    assert (tmp_path / "export" / "new").read_text() == "new"


def test_merge_keeps_other_files_and_replaces_only_owned_ones(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("user")
    (out / "old.onnx").write_text("samg's, no longer written")
    (out / "samg.json").write_text("old manifest")
    with atomic_dir(out, merge_owned={"old.onnx", "samg.json"}) as d:
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
    with pytest.raises(SamgError, match="a.onnx appeared while exporting and was not written by samg"):
        with atomic_dir(out, merge_owned=set()) as d:
            (d / "a.onnx").write_text("new")
            (out / "a.onnx").write_text("user's, written meanwhile")
    assert (out / "a.onnx").read_text() == "user's, written meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
