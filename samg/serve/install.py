"""Where `tritonserver` is, and `samg serve --install-triton`, which puts one there.

Found in this order: the `SAMG_TRITONSERVER` environment variable (the binary; its backends in
`SAMG_TRITON_BACKENDS`, else `../backends` beside `bin/`, as in NVIDIA's container), samg's own
install (`install_dir()`), then `tritonserver` on PATH.

samg's install is the Triton Inference Server that the `nvidia-pytriton` wheel ships (a real
`tritonserver` with the Python backend and its stubs for Python 3.8-3.13). The wheel is fetched
with pip (`pip download --no-deps`, checked against its pinned SHA-256) and only its server tree
is unpacked: the PyTriton Python package itself is not installed (it requires numpy < 2). The
server tree is assembled in a temporary folder (named with the installing process's id) and renamed
into place, so a killed install leaves nothing half-made, and the next install removes the temporary
folders of installs whose process is gone; a finished one is recorded in a stamp, and installing
again is a no-op.

Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from samg.io import pid_gone, read_json_object, tmp_prefix

TRITON_WHEEL = "nvidia-pytriton"
TRITON_WHEEL_VERSION = "0.7.0"
TRITON_WHEEL_FILE = f"nvidia_pytriton-{TRITON_WHEEL_VERSION}-py3-none-manylinux_2_35_x86_64.whl"
TRITON_WHEEL_SHA256 = "21f063ff93bb426d0c06b7a55e7eb9efcfe62c0dddd9a908e9877e18710128df"
TRITON_SERVER_VERSION = "2.51.0"  # the tritonserver inside that wheel
WHEEL_SERVER_DIR = "pytriton/tritonserver/"  # bin/, backends/, python_backend_stubs/, caches/
WHEEL_LIBS_DIR = "nvidia_pytriton.libs/"  # the shared libraries the binaries' RPATH points to
STUB = "triton_python_backend_stub"
# The wheel's Python backend stub was built with a pybind11 older than numpy 2: under numpy 2 it
# sizes arrays wrongly (a BYTES input arrives as its first byte repeated, an output tensor as 0
# bytes). samg's install therefore gives the stub's interpreter numpy 1.x of its own (samg, ONNX
# Runtime and tokenizers run on either). The stub ignores PYTHONPATH but puts its working folder
# first on sys.path, so tritonserver runs in the folder holding that numpy (TritonInstall.stub_site).
# NVIDIA's containers ship numpy 1.x.
STUB_NUMPY = "numpy==1.26.4"  # the last numpy 1.x release; wheels for Python 3.9-3.12
STUB_NUMPY_NEWEST_PYTHON = (3, 12)
STUB_SITE = "stub-site"
INSTALL_STAMP = "samg-triton.json"
ENV_BINARY = "SAMG_TRITONSERVER"
ENV_BACKENDS = "SAMG_TRITON_BACKENDS"
ENV_HOME = "SAMG_TRITON_HOME"
INSTALL_HINT = "run `samg serve --install-triton` (downloads NVIDIA's tritonserver, 55 MB), or set SAMG_TRITONSERVER"


class TritonNotFound(Exception):
    """No usable tritonserver: the message says why and how to install one (one line)."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backend_dir: Path  # holds python/ (libtriton_python.so, the stub)
    source: str  # how it was found: the environment variable, samg's install, or PATH
    stub_site: Path | None = None  # run tritonserver here: the stub imports this folder's numpy first


def python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def install_dir() -> Path:
    """samg's tritonserver install: $SAMG_TRITON_HOME, else ~/.cache/samg/tritonserver-<version>."""
    home = os.environ.get(ENV_HOME)
    if home:
        return Path(home).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "samg" / f"tritonserver-{TRITON_SERVER_VERSION}"


def _installed(root: Path) -> TritonInstall | None:
    """samg's install at `root` when complete and made for this Python (the stub embeds its libpython)."""
    stamp = read_json_object(root / INSTALL_STAMP)
    if stamp is None or stamp.get("wheel_sha256") != TRITON_WHEEL_SHA256 or stamp.get("python") != python_tag():
        return None
    server = root / WHEEL_SERVER_DIR
    found = TritonInstall(server / "bin" / "tritonserver", server / "backends", "samg's install", root / STUB_SITE)
    if (not os.access(found.binary, os.X_OK) or not (found.backend_dir / "python" / STUB).is_file()
            or not (root / STUB_SITE / "numpy").is_dir()):
        return None
    return found


def find_tritonserver() -> TritonInstall:
    """The tritonserver to run, or TritonNotFound saying how to get one."""
    env = os.environ.get(ENV_BINARY)
    if env:
        binary = Path(env).expanduser()
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise TritonNotFound(f"{ENV_BINARY}={env} is not an executable file: point it at tritonserver, or unset it "
                                 "and run `samg serve --install-triton`")
        backends = Path(os.environ.get(ENV_BACKENDS) or binary.resolve().parent.parent / "backends")
        if not (backends / "python").is_dir():
            raise TritonNotFound(f"no Python backend in {backends}: set {ENV_BACKENDS} to the folder holding "
                                 "python/ (libtriton_python.so)")
        return TritonInstall(binary, backends, ENV_BINARY)
    root = install_dir()
    mine = _installed(root)
    if mine is not None:
        return mine
    on_path = shutil.which("tritonserver")
    if on_path:  # NVIDIA's container: /opt/tritonserver/bin/tritonserver
        backends = Path(os.environ.get(ENV_BACKENDS) or Path(on_path).resolve().parent.parent / "backends")
        if (backends / "python").is_dir():
            return TritonInstall(Path(on_path), backends, "PATH")
    stamp = read_json_object(root / INSTALL_STAMP)
    if stamp is not None and stamp.get("python") != python_tag():
        raise TritonNotFound(f"the tritonserver in {root} was installed for Python {stamp.get('python')}, this is "
                             f"Python {python_tag()}: run `samg serve --install-triton` again")
    raise TritonNotFound(f"tritonserver not found: {INSTALL_HINT}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _pip_download(requirement: str, folder: Path, quiet: bool) -> list[Path]:
    """The wheels pip downloads for `requirement` (this interpreter's platform, no dependencies)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--dest", str(folder), requirement]
    if quiet:
        cmd.append("-q")
    done = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else None, stderr=subprocess.PIPE, text=True)
    name = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(folder.glob(f"{name}-*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr or "").strip().splitlines()[-1:] or ["no wheel downloaded"]
        raise TritonNotFound(f"pip could not download {requirement} for Python {python_tag()} ({last[0][:200]}): "
                             f"check the network, or install tritonserver yourself and set {ENV_BINARY}")
    return wheels


def _download_wheel(folder: Path, quiet: bool) -> Path:
    _pip_download(f"{TRITON_WHEEL}=={TRITON_WHEEL_VERSION}", folder, quiet)
    wheel = folder / TRITON_WHEEL_FILE
    if not wheel.is_file():
        raise TritonNotFound(f"pip did not download {TRITON_WHEEL_FILE}: install tritonserver yourself and set {ENV_BINARY}")
    digest = _sha256(wheel)
    if digest != TRITON_WHEEL_SHA256:
        raise TritonNotFound(f"{TRITON_WHEEL_FILE} has SHA-256 {digest}, expected {TRITON_WHEEL_SHA256}: the download "
                             "is not the wheel samg was tested with; retry, or set SAMG_TRITONSERVER")
    return wheel


def _unpack(wheel: Path, dest: Path, quiet: bool, prefixes: tuple[str, ...] = ("",)) -> None:
    """The wheel's files under `prefixes`, with their permission bits (zipfile drops them)."""
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.infolist() if m.filename.startswith(prefixes)]
        bar = None
        if not quiet:
            from tqdm import tqdm

            bar = tqdm(total=sum(m.file_size for m in members), unit="B", unit_scale=True, desc="unpacking",
                       leave=False, file=sys.stderr)
        for member in members:
            target = archive.extract(member, dest)
            mode = (member.external_attr >> 16) & 0o777
            if mode and not member.is_dir():
                os.chmod(target, mode & 0o755 | stat.S_IRUSR | stat.S_IWUSR)
            if bar is not None:
                bar.update(member.file_size)
        if bar is not None:
            bar.close()


def _remove_abandoned_tmp(root: Path) -> None:
    """The temporary folders of installs into `root` whose process is gone (killed midway)."""
    for folder in root.parent.glob(tmp_prefix(root) + "*"):
        pid = folder.name[len(tmp_prefix(root)):].split("-")[0]
        if pid.isdigit() and pid_gone(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def install_tritonserver(*, quiet: bool = False) -> TritonInstall:
    """Install tritonserver into install_dir() (idempotent); returns it."""
    root = install_dir()
    done = _installed(root)
    if done is not None:
        return done
    if root.exists() and not root.is_dir():
        raise TritonNotFound(f"{root} is a file, not samg's tritonserver folder: remove it, or set {ENV_HOME} to "
                             "another folder")
    if root.exists() and read_json_object(root / INSTALL_STAMP) is None and any(root.iterdir()):
        raise TritonNotFound(f"{root} exists and was not written by samg: remove it, or set {ENV_HOME} to another folder")
    if sys.version_info[:2] > STUB_NUMPY_NEWEST_PYTHON:  # said before a 55 MB download, not after
        newest = ".".join(map(str, STUB_NUMPY_NEWEST_PYTHON))
        raise TritonNotFound(f"the Triton Python backend here needs {STUB_NUMPY}, which has no wheel for Python "
                             f"{python_tag()}: run samg serve from Python 3.10-{newest}, or set {ENV_BINARY} to a "
                             "tritonserver built for numpy 2")
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_tmp(root)
    with tempfile.TemporaryDirectory(prefix=f"{tmp_prefix(root)}{os.getpid()}-", dir=root.parent) as tmp:
        tmp_root = Path(tmp) / "tree"
        download = Path(tmp) / "download"
        download.mkdir()
        if not quiet:
            print(f"samg serve: downloading {TRITON_WHEEL}=={TRITON_WHEEL_VERSION} (tritonserver "
                  f"{TRITON_SERVER_VERSION}, 55 MB) with pip", file=sys.stderr)
        wheel = _download_wheel(download, quiet)
        _unpack(wheel, tmp_root, quiet, (WHEEL_SERVER_DIR, WHEEL_LIBS_DIR))
        for numpy_wheel in _pip_download(STUB_NUMPY, download, quiet):
            _unpack(numpy_wheel, tmp_root / STUB_SITE, quiet)
        stub = tmp_root / WHEEL_SERVER_DIR / "python_backend_stubs" / python_tag() / STUB
        if not stub.is_file():
            raise TritonNotFound(f"the wheel has no Python backend stub for Python {python_tag()} (it ships 3.8-3.13): "
                                 "run samg serve with one of those")
        # The Python backend runs the stub beside libtriton_python.so; both resolve the wheel's
        # libraries through the same relative RPATH from there.
        shutil.copy2(stub, tmp_root / WHEEL_SERVER_DIR / "backends" / "python" / STUB)
        (tmp_root / INSTALL_STAMP).write_text(json.dumps({
            "wheel": TRITON_WHEEL_FILE, "wheel_sha256": TRITON_WHEEL_SHA256, "tritonserver": TRITON_SERVER_VERSION,
            "python": python_tag(), "python_libdir": sysconfig.get_config_var("LIBDIR"), "stub_numpy": STUB_NUMPY,
        }, indent=2) + "\n")
        if root.exists():  # samg's own install for another Python: replaced whole
            old = Path(tmp) / "old"
            os.replace(root, old)
        os.replace(tmp_root, root)
    found = _installed(root)
    if found is None:
        raise TritonNotFound(f"the install in {root} is incomplete: remove it and run `samg serve --install-triton` again")
    return found
