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
        ("{tmp}/afile/export", r"--out .*afile/export: .*afile is a file, not a folder"),
        ("/proc/samg-export-test", r"--out /proc/samg-export-test: cannot write to /proc \(.*\): pick a path in a folder"),
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
    with pytest.raises(SamgError, match=r"cannot write to .*locked \(Permission denied\)"):
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
    assert read_export(out).model == "sd15"
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
    assert "notes.txt" not in manifest.files and "denoiser.onnx" in manifest.files
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

    from samg.contract import PARTIAL_MARKER
    from samg.export.folder import samg_files

    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    shutil.copy(tiny_export("sd15") / "denoiser.onnx", out / "denoiser.onnx")
    proc = subprocess.Popen(["true"])
    proc.wait()
    (out / PARTIAL_MARKER).write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname(), "role": "merge",
                                                  "files": ["denoiser.onnx", MANIFEST]}))
    assert samg_files(out) == {"denoiser.onnx", PARTIAL_MARKER}
    with pytest.raises(SamgError, match=r"holds 1 file\(s\) samg did not write \(notes\.txt\)"):
        export(ExportOptions(model="sd15", tiny=True, out=str(out), quiet=True))
    assert os.path.exists(out / "denoiser.onnx") and (out / "notes.txt").read_text() == "keep me"


def _engine(folder: Path, component: str, data: bytes, **record) -> None:
    """An engine and the build record `samg build` writes beside it (format, size and hash)."""
    (folder / "engines").mkdir(exist_ok=True)
    (folder / "engines" / f"{component}.engine").write_bytes(data)
    fields = {"format": "samg-engine", "format_version": 1, "engine_bytes": len(data),
              "engine_sha256": "sha256:" + hashlib.sha256(data).hexdigest(), **record}
    (folder / "engines" / f"{component}.engine.json").write_text(json.dumps(fields))


def test_previous_export_with_engines_counts_as_samg_files(tmp_path, tiny_export):
    from samg.export.folder import samg_files

    out = tmp_path / "export"
    shutil.copytree(tiny_export("sd15"), out)
    _engine(out, "denoiser", b"engine")
    present = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert samg_files(out) == present
    (out / "engines" / "readme.md").write_text("mine")
    (out / "engines" / "my.engine").write_text("mine: not a name samg build writes")
    _engine(out, "vae_decoder", b"engine", engine_sha256="sha256:" + "0" * 64)  # not the engine its record built
    (out / "engines" / "text_encoder.engine").write_text("mine")
    (out / "engines" / "text_encoder.engine.json").write_text("{}")  # not a samg engine record
    assert samg_files(out) == present | {"engines/vae_decoder.engine.json"}


@pytest.mark.parametrize("force", [False, True])
def test_engine_files_in_a_folder_without_a_samg_export_are_the_users(tmp_path, capsys, force):
    """engines/*.engine is samg's only beside a valid samg manifest: in any other folder it is the
    user's, refused without --force and kept with it."""
    out = tmp_path / "D"
    (out / "engines").mkdir(parents=True)
    (out / "engines" / "my.engine").write_text("precious")
    _engine(out, "denoiser", b"also precious")
    before = _snapshot(out)
    if not force:
        err = _one_line_exit_2(capsys, ["export", "--model", "sd15", "--tiny", "--out", str(out), "--quiet"])
        assert "holds 3 file(s) samg did not write (engines/denoiser.engine, engines/denoiser.engine.json, " in err
        assert _snapshot(out) == before
        return
    export(ExportOptions(model="sd15", tiny=True, out=str(out), quiet=True, validate=False, force=True))
    assert {n: h for n, h in _snapshot(out).items() if n.startswith("engines/")} == before
    assert read_export(out).model == "sd15"


def test_a_file_written_into_the_folder_during_the_export_is_kept(tmp_path, tiny_export, monkeypatch):
    """Ownership is checked again right before the previous export is replaced: a file the user
    writes into DIR while the export runs stays, DIR is left as it was, and the new export waits
    in a visible sibling folder that the one-line error names."""
    import samg.export.exporter as exporter

    out = tmp_path / "export"
    shutil.copytree(tiny_export("sd15"), out)
    save_tokenizers = exporter._save_tokenizers

    def user_writes_meanwhile(*args, **kwargs):  # a step inside the long work
        (out / "notes.txt").write_text("written while exporting")
        return save_tokenizers(*args, **kwargs)

    monkeypatch.setattr(exporter, "_save_tokenizers", user_writes_meanwhile)
    before = _snapshot(out)
    with pytest.raises(SamgError) as info:
        export(ExportOptions(model="sd15", tiny=True, out=str(out), quiet=True, validate=False))
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("export.new-")]
    assert len(kept) == 1
    assert str(info.value).startswith(f"{out / 'notes.txt'} appeared while samg was writing {out}")
    assert f"the new result is in {kept[0]}" in str(info.value)
    assert _snapshot(out) == {**before, "notes.txt": hashlib.sha256(b"written while exporting").hexdigest()}
    assert read_export(kept[0]).model == "sd15"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", kept[0].name]


@pytest.mark.parametrize("options, message", [
    (dict(model="sd15", height=16400, width=64), r"--height 16400 is above the limit of 16384"),
    (dict(model="sd15", width=20000), r"--width 20000 is above the limit of 16384"),
    (dict(model="modelscope-t2v", frames=5000), r"--frames 5000 is above the limit of 4096"),
    (dict(model="cogvideox", height=4096, width=4096, frames=49),
     r"4096x4096x49 frames makes a latent of 54525952 values, above the limit of 16777216: lower --height/--width/--frames"),
])
def test_sizes_are_bounded_before_any_work(tmp_path, options, message):
    """16 channels x (4096/8)^2 x ((49-1)/4+1) latent frames = 54525952, written out."""
    import time

    started = time.monotonic()
    with pytest.raises(SamgError, match=message):
        export(ExportOptions(tiny=True, out=str(tmp_path / "out"), quiet=True, **options))
    assert time.monotonic() - started < 5
    assert list(tmp_path.iterdir()) == []


def test_an_invalid_manifest_while_writing_is_an_internal_error_naming_the_target(tmp_path, monkeypatch):
    import samg.export.exporter as exporter

    build = exporter._manifest

    def broken(*args, **kwargs):  # a samg bug: a manifest its own validator refuses
        from dataclasses import replace

        export = build(*args, **kwargs)
        return replace(export, latent=replace(export.latent, height=10**9))

    monkeypatch.setattr(exporter, "_manifest", broken)
    out = tmp_path / "export"
    with pytest.raises(SamgError) as info:
        export(ExportOptions(model="sd15", tiny=True, out=str(out), quiet=True, validate=False))
    message = str(info.value)
    assert message.startswith(f"internal error in samg export: the manifest written for {out} is invalid (")
    assert "latent.height" in message and "report this as a samg bug" in message
    assert "re-export" not in message and ".tmp-" not in message
    assert list(tmp_path.iterdir()) == []
