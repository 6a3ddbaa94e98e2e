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
