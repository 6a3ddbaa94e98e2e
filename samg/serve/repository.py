"""A Triton model repository for an export folder, and a KServe InferenceService for it.

    DIR/
      samg-repository.json        what samg wrote here (the only files it may replace)
      kserve.yaml                 with --kserve
      samg/config.pbtxt           the protocol (samg.serve.protocol), mode and load settings
      samg/1/model.py             imports samg.serve.triton_model.TritonPythonModel
      samg/1/export/...           with --copy-export: the export itself (else referenced by path)

tritonserver loads the model directories and ignores the files beside them. The export is
referenced by its absolute path unless copied (hard links where the file system allows): a
container or a KServe pod needs the copy, or the export mounted at the same path.

Writes go through samg.io.atomic_dir: a folder that exists, is not empty and was not written here
is refused before any work; one written here is replaced whole (files that appeared in it meanwhile
stop the swap and are kept).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from samg.api import DEFAULT_MAX_QUEUE
from samg.errors import SamgError
from samg.serve.server import PATH_ENV
from samg.serve.protocol import DATATYPES, INPUTS, PIXEL_CHANNELS, SEED_OUTPUT, image_output_name
from samg.serve.triton_model import MODES

MODEL_NAME = "samg"
REPOSITORY_MARKER = "samg-repository.json"
REPOSITORY_FORMAT = "samg-triton-repository"
REPOSITORY_FORMAT_VERSION = 1
KSERVE_FILE = "kserve.yaml"
COPIED_EXPORT_DIR = "export"  # inside the model's version folder
VERSION = "1"
DEFAULT_MAX_BATCH_SIZE = 8
# The image a GPU host runs: NVIDIA's tritonserver container (Python backend included) plus samg.
TRITON_CONTAINER = "nvcr.io/nvidia/tritonserver:24.10-py3"
KSERVE_STORAGE_PLACEHOLDER = "s3://YOUR-BUCKET/samg-repository"
KSERVE_IMAGE_PLACEHOLDER = "YOUR-REGISTRY/samg-tritonserver:24.10"

MODEL_PY = f'''\
# Written by `samg serve`: the samg model for Triton's Python backend. The code is samg's own,
# so the server's Python needs samg installed: pip install "samg[runtime]".
import os
import sys

# `samg serve` passes its interpreter's import path (a virtual environment's too): the backend's
# interpreter does not read PYTHONPATH.
sys.path[1:1] = [p for p in os.environ.get("{PATH_ENV}", "").split(os.pathsep) if p and p not in sys.path]

from samg.serve.triton_model import TritonPythonModel  # noqa: E402,F401
'''


@dataclass(frozen=True)
class ModelEntry:
    """One model of a repository: its name, how it runs requests (samg.serve.triton_model.MODES),
    the most images one denoiser call runs, and how many requests may wait for a worker before
    new ones are answered "server busy" (samg.load's max_queue)."""

    name: str = MODEL_NAME
    mode: str = "continuous"
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_queue: int = DEFAULT_MAX_QUEUE


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_pbtxt(entry: ModelEntry, export, export_ref: str, backend: str, device: str) -> str:
    """config.pbtxt for `entry` serving `export` (a samg.contract.Export) found at `export_ref`."""
    from samg import __version__

    if entry.mode not in MODES:
        raise SamgError(f"mode {entry.mode!r} is not one of {', '.join(MODES)}")
    latent = export.latent
    dynamic = entry.mode == "dynamic"  # Triton's own batching: a leading batch dimension
    height, width = (-1, -1) if latent.dynamic_resolution else (latent.height, latent.width)
    pixel_dims = [height, width, PIXEL_CHANNELS]
    if latent.is_video:
        pixel_dims = [-1 if latent.dynamic_frames or not latent.frames else latent.frames, *pixel_dims]
    lines = [
        f"# Written by samg serve {__version__}: the samg model (docs/serving.md). Rewrite it with",
        "# `samg serve EXPORT_DIR --repository-only --out DIR` rather than editing it.",
        f"name: {_quote(entry.name)}",
        'backend: "python"',
        f"max_batch_size: {entry.max_batch_size if dynamic else 0}",
        "input [",
    ]
    for i, spec in enumerate(INPUTS):
        optional = "" if spec.required else "\n    optional: true"
        comma = "," if i < len(INPUTS) - 1 else ""
        lines.append(f"  {{  # {spec.help}\n    name: {_quote(spec.name)}\n    data_type: {DATATYPES[spec.datatype][0]}\n"
                     f"    dims: [ 1 ]{optional}\n  }}{comma}")
    lines += [
        "]",
        "output [",
        f"  {{\n    name: {_quote(image_output_name(latent.is_video))}\n    data_type: {DATATYPES['UINT8'][0]}\n"
        f"    dims: [ {', '.join(map(str, pixel_dims))} ]\n  }},",
        f"  {{\n    name: {_quote(SEED_OUTPUT)}\n    data_type: {DATATYPES['INT64'][0]}\n    dims: [ 1 ]\n  }}",
        "]",
        # One instance: one engine whose batches every request joins (more instances would split them).
        "instance_group [ { count: 1, kind: KIND_CPU } ]",
    ]
    if dynamic:
        lines.append("dynamic_batching { }")
    params = {"export_dir": export_ref, "mode": entry.mode, "max_batch_size": str(entry.max_batch_size if entry.mode
                                                                                    != "single" else 1),
              "max_queue": str(entry.max_queue), "backend": backend, "device": device}
    for key, value in params.items():
        lines.append(f"parameters: {{ key: {_quote(key)} value: {{ string_value: {_quote(value)} }} }}")
    return "\n".join(lines) + "\n"


def kserve_yaml(*, name: str = MODEL_NAME, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, device: str = "cpu") -> str:
    """A KServe ServingRuntime (tritonserver with samg) and an InferenceService using it."""
    gpu = device == "cuda"
    limits = '          nvidia.com/gpu: "1"\n' if gpu else '          cpu: "4"\n          memory: 16Gi\n'
    return f"""\
# Written by `samg serve --kserve` (docs/serving.md, "KServe"). Before applying:
#  1. Write the repository with the export inside it:
#       samg serve EXPORT_DIR --repository-only --copy-export --out samg-repository
#     and upload that folder to object storage; put its address in storageUri below.
#  2. Build an image of NVIDIA's tritonserver with samg installed and put it in `image` below:
#       FROM {TRITON_CONTAINER}
#       RUN pip install "samg[runtime]" "numpy<2"   # the backend stub needs numpy 1.x; onnxruntime-gpu on GPUs
#  3. kubectl apply -f kserve.yaml
# Each replica runs one engine that batches up to {max_batch_size} concurrent requests' denoiser steps;
# KServe adds replicas when the concurrency per replica passes scaleTarget (no batching across replicas).
apiVersion: serving.kserve.io/v1alpha1
kind: ServingRuntime
metadata:
  name: samg-tritonserver
spec:
  supportedModelFormats:
    - name: samg-triton
      version: "1"
      autoSelect: true
  protocolVersions: [v2, grpc-v2]
  containers:
    - name: kserve-container
      image: {KSERVE_IMAGE_PLACEHOLDER}
      args:
        - tritonserver
        - --model-repository=/mnt/models
        - --http-port=8080
        - --grpc-port=9000
        - --allow-metrics=true
        - --strict-readiness=true
      ports:
        - containerPort: 8080
          protocol: TCP
---
apiVersion: serving.kserve.io/v1beta1
kind: InferenceService
metadata:
  name: {name}
spec:
  predictor:
    minReplicas: 1
    maxReplicas: 4
    scaleMetric: concurrency
    scaleTarget: {max_batch_size}
    containerConcurrency: {4 * max_batch_size}
    model:
      modelFormat:
        name: samg-triton
      runtime: samg-tritonserver
      protocolVersion: v2
      storageUri: {KSERVE_STORAGE_PLACEHOLDER}
      resources:
        limits:
{limits}"""


def repository_files(folder: Path) -> set[str]:
    """The files of `folder` that samg serve wrote (its marker lists them); empty if none."""
    try:
        marker = json.loads((Path(folder) / REPOSITORY_MARKER).read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(marker, dict) or marker.get("format") != REPOSITORY_FORMAT:
        return set()
    files = {f for f in (marker.get("files") if isinstance(marker.get("files"), list) else []) if isinstance(f, str)}
    # What serving adds to samg's files: a copied export's verified-stamp (samg.contract) and the
    # bytecode Python caches for model.py.
    from samg.contract import VERIFIED_STAMP

    made = {f"{f.split(f'/{COPIED_EXPORT_DIR}/')[0]}/{COPIED_EXPORT_DIR}/{VERIFIED_STAMP}"
            for f in files if f"/{COPIED_EXPORT_DIR}/" in f}
    present = {p.relative_to(folder).as_posix() for p in Path(folder).glob(f"*/{VERSION}/__pycache__/model.*.pyc")}
    made |= {p for p in present if f"{p.split('/')[0]}/{VERSION}/model.py" in files}
    return {REPOSITORY_MARKER} | files | made


def check_repository_out(out: Path) -> None:
    """SamgError before any work unless `out` is missing, empty, or a repository samg serve wrote."""
    from samg.io import check_output_location

    if out.exists() and not out.is_dir():
        raise SamgError(f"--out {out} is a file: pass a folder for the repository")
    if out.is_dir() and any(out.iterdir()) and not repository_files(out):
        raise SamgError(f"--out {out} is not empty and was not written by samg serve (no {REPOSITORY_MARKER}): "
                        "pick a new folder, or empty this one")
    check_output_location(out, f"--out {out}")


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # samg replaces export files by rename, never in place: sharing them is safe
    except OSError:
        shutil.copy2(src, dst)


def export_files(export_dir: Path) -> list[str]:
    """The export's files that a copy needs: what samg wrote, without its bookkeeping."""
    from samg.contract import PARTIAL_MARKER, VERIFIED_STAMP
    from samg.export.folder import samg_files

    return sorted(f for f in samg_files(export_dir) if f not in (VERIFIED_STAMP, PARTIAL_MARKER))


def write_repository(out: str | os.PathLike, export_dir: str | os.PathLike, *, models: tuple[ModelEntry, ...] = (ModelEntry(),),
                     backend: str = "onnxruntime", device: str = "cpu", copy_export: bool = False,
                     kserve: bool = False) -> Path:
    """Write the repository for `export_dir` into `out` (see the module doc); returns `out`."""
    from samg.contract import read_export
    from samg.io import atomic_dir

    out = Path(out)
    export_dir = Path(export_dir).resolve()
    export = read_export(export_dir)  # a broken export is reported now, not by the server's model load
    check_repository_out(out)
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise SamgError(f"model names repeat: {names}")
    written: list[str] = []
    with atomic_dir(out, owned=repository_files) as tmp:
        def put(rel: str, text: str) -> None:
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(rel)

        for entry in models:
            ref = str(export_dir)
            if copy_export:
                ref = COPIED_EXPORT_DIR
                for rel in export_files(export_dir):
                    _link_or_copy(export_dir / rel, tmp / entry.name / VERSION / COPIED_EXPORT_DIR / rel)
                    written.append(f"{entry.name}/{VERSION}/{COPIED_EXPORT_DIR}/{rel}")
            put(f"{entry.name}/config.pbtxt", config_pbtxt(entry, export, ref, backend, device))
            put(f"{entry.name}/{VERSION}/model.py", MODEL_PY)
        if kserve:
            put(KSERVE_FILE, kserve_yaml(max_batch_size=models[0].max_batch_size, device=device))
        from samg import __version__

        (tmp / REPOSITORY_MARKER).write_text(json.dumps({
            "format": REPOSITORY_FORMAT, "format_version": REPOSITORY_FORMAT_VERSION, "samg_version": __version__,
            "export": str(export_dir), "copied_export": copy_export, "models": [m.__dict__ for m in models],
            "files": sorted(written),
        }, indent=2) + "\n")
    return out
