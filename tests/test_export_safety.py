"""`samg export --out DIR` never loses a user's files, checks DIR before the work, and replaces a
previous export only once the new one is complete (kills are simulated in tests/test_io.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from samg.cli import main
from samg.contract import MANIFEST, read_export
from samg.errors import SamgError

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from samg.export.exporter import ExportOptions, export  # noqa: E402


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_exit_2(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    return err


def test_folder_with_user_files_is_refused_and_untouched(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "photos").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "photos" / "a.png").write_bytes(b"\x89PNG")
    before = _snapshot(out)
    err = _one_line_exit_2(capsys, ["export", "--model", "sd15", "--tiny", "--out", str(out), "--quiet"])
    assert f"--out {out} holds 2 file(s) samg did not write (notes.txt, photos/a.png)" in err
    assert "--force" in err and "empty or new folder" in err
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp folder either


@pytest.mark.parametrize(
    "out, message",
    [
        ("", r"--out is empty: pass a folder path"),
        ("   ", r"--out is empty: pass a folder path"),
        (".", r"--out \. names no folder of its own"),
        ("..", r"--out \.\. names no folder of its own"),
        ("sub/..", r"names no folder of its own"),
        ("{tmp}", r"is the current folder or one above it"),
        ("{tmp}/afile", r"--out .*afile is a file: pass a folder path"),
        ("{tmp}/afile/export", r"cannot be created: .*afile is a file, not a folder"),
        ("/proc/samg-export-test", r"--out /proc/samg-export-test cannot be written: .* in /proc: pick a folder"),
    ],
)
def test_bad_out_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, out, message):
    import re

    (tmp_path / "afile").write_text("user data")
    monkeypatch.chdir(tmp_path)
    err = _one_line_exit_2(capsys, ["export", "--model", "sd15", "--tiny", "--out", out.format(tmp=tmp_path), "--quiet"])
    assert re.search(message, err), err
    assert (tmp_path / "afile").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_symlink_out_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(SamgError, match=r"--out .*link is a symbolic link"):
        export(ExportOptions(model="sd15", tiny=True, out=str(tmp_path / "link"), quiet=True))


@pytest.mark.skipif(hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0,
                    reason="root writes into read-only folders")
def test_read_only_parent_is_one_line(tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o500)
    with pytest.raises(SamgError, match=r"cannot be written: Permission denied in .*locked"):
        export(ExportOptions(model="sd15", tiny=True, out=str(parent / "export"), quiet=True))


def test_model_that_does_not_match_the_folders_pipeline(tmp_path, tiny_export):
    source = tiny_export("sd15") / "source"
    with pytest.raises(SamgError, match=r"--model sdxl needs a StableDiffusionXLPipeline folder, but .*source holds "
                       r"a StableDiffusionPipeline \(model_index\.json _class_name\): pass --model sd15 or --model sd21"):
        export(ExportOptions(model="sdxl", model_path=str(source), out=str(tmp_path / "out"), quiet=True))
    assert not (tmp_path / "out").exists()


def test_failed_export_keeps_the_previous_export(tmp_path, tiny_export):
    """A previous export is a valid target, and it is replaced only by a complete new export: here the
    new one fails inside the work (after loading the model), and the old one is still there, whole."""
    out = tmp_path / "export"
    shutil.copytree(tiny_export("sd15"), out)
    before = _snapshot(out)
    with pytest.raises(SamgError, match="at most 256"):
        export(ExportOptions(model="sd35-medium", tiny=True, height=512, out=str(out), quiet=True))
    assert _snapshot(out) == before
    assert read_export(out)["model"] == "sd15"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_force_exports_next_to_user_files_and_keeps_them(tmp_path, capsys):
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "tokenizer_notes").mkdir()
    (out / "tokenizer_notes" / "x.txt").write_text("also mine")
    export(ExportOptions(model="sd15", tiny=True, out=str(out), quiet=True, validate=False, force=True))
    assert (out / "notes.txt").read_text() == "keep me"
    assert (out / "tokenizer_notes" / "x.txt").read_text() == "also mine"
    manifest = read_export(out)
    assert "notes.txt" not in manifest["files"] and "denoiser.onnx" in manifest["files"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]
    # Without --force the mixed folder is refused (before any work) ...
    err = _one_line_exit_2(capsys, ["export", "--model", "sd15", "--tiny", "--out", str(out), "--quiet"])
    assert "holds 2 file(s) samg did not write (notes.txt, tokenizer_notes/x.txt)" in err


def test_force_never_replaces_a_user_file_with_an_export_name(tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "denoiser.onnx").write_text("the user's own model")
    with pytest.raises(SamgError, match=r"denoiser\.onnx was not written by samg and the export writes that name, "
                       r"so even --force will not replace it"):
        export(ExportOptions(model="sd15", tiny=True, out=str(out), quiet=True, force=True))
    assert (out / "denoiser.onnx").read_text() == "the user's own model"


def test_killed_force_export_is_recognised_by_the_next_one(tmp_path, tiny_export):
    """A --force export killed while moving files in leaves samg's files next to the user's, no
    manifest, and a marker listing what samg was writing: the next --force run may replace those."""
    import os
    import socket
    import subprocess

    from samg.contract import PARTIAL_MARKER, samg_files

    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    shutil.copy(tiny_export("sd15") / "denoiser.onnx", out / "denoiser.onnx")
    proc = subprocess.Popen(["true"])
    proc.wait()
    (out / PARTIAL_MARKER).write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname(),
                                                  "files": ["denoiser.onnx", MANIFEST]}))
    assert samg_files(out) == {"denoiser.onnx", PARTIAL_MARKER}
    with pytest.raises(SamgError, match=r"holds 1 file\(s\) samg did not write \(notes\.txt\)"):
        export(ExportOptions(model="sd15", tiny=True, out=str(out), quiet=True))
    assert os.path.exists(out / "denoiser.onnx") and (out / "notes.txt").read_text() == "keep me"


def test_previous_export_with_engines_counts_as_samg_files(tmp_path, tiny_export):
    from samg.contract import samg_files

    out = tmp_path / "export"
    shutil.copytree(tiny_export("sd15"), out)
    (out / "engines").mkdir()
    (out / "engines" / "denoiser.engine").write_bytes(b"engine")
    (out / "engines" / "denoiser.engine.json").write_text("{}")
    present = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert samg_files(out) == present
    (out / "engines" / "readme.md").write_text("mine")
    assert "engines/readme.md" not in samg_files(out)
