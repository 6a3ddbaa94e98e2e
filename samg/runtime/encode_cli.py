"""`samg encode DIR --prompt ... --negative-prompt ... --out DIR`: conditioning tensors as .npy.

Writes one `<name>.npy` per conditioning input of the denoiser (e.g. encoder_hidden_states.npy),
shape [2, ...]: the negative prompt first, then the prompt (the denoiser's uncond-first order),
for runtimes without a tokenizer (the C++ runtime)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("export_dir", metavar="DIR", help="export folder (written by samg export)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--backend", choices=("onnxruntime", "torch", "null"), default="onnxruntime")
    p.add_argument("--out", required=True, help="output folder for the .npy files")


def run(args: argparse.Namespace) -> int:
    import io

    import numpy as np

    from samg.errors import SamgError
    from samg.io import atomic_write_bytes
    from samg.runtime.pipeline import Pipeline

    if not args.prompt.strip():
        raise SamgError('a prompt is required: pass --prompt "..."')
    out = Path(args.out)
    if out.is_file():
        raise SamgError(f"--out {out} is a file: pass a folder path")
    pipe = Pipeline.load(args.export_dir, backend=args.backend)
    cond = pipe.conditioning(args.prompt, args.negative_prompt, batch=1)
    for name, value in cond.items():
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(value, np.float32))
        atomic_write_bytes(out / f"{name}.npy", buf.getvalue())
    print(f"samg encode: wrote {', '.join(f'{n}.npy' for n in cond)} to {out}", file=sys.stderr)
    return 0
