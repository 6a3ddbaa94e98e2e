"""`samg encode DIR --prompt ... --negative-prompt ... --out DIR`: conditioning tensors as .npy.

Writes one `<name>.npy` per conditioning input of the denoiser (e.g. encoder_hidden_states.npy),
for runtimes without a tokenizer (the C++ runtime). `--prompt` may be repeated: N prompts give
shape [2N, ...], rows 0..N-1 the negative prompts and rows N..2N-1 the prompts in the order given
(the denoiser's uncond-first layout for a batch of N, one sample per prompt); one prompt gives
[2, ...]. `--negative-prompt` is given once (shared by every prompt) or once per prompt."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from samg.runners.base import CPU_BACKENDS

    p.add_argument("export_dir", metavar="DIR", help="export folder (written by samg export)")
    p.add_argument("--prompt", action="append", required=True,
                   help="repeat for several prompts: one conditioning row each, in order")
    p.add_argument("--negative-prompt", action="append", default=None,
                   help="once (shared by every prompt) or once per prompt; default empty")
    p.add_argument("--backend", choices=CPU_BACKENDS, default=CPU_BACKENDS[0])
    p.add_argument("--out", required=True, help="output folder for the .npy files")


def run(args: argparse.Namespace) -> int:
    import io

    import numpy as np

    from samg.errors import SamgError
    from samg.io import atomic_write_bytes
    from samg.runtime.cli import check_output_location
    from samg.runtime.pipeline import MAX_IMAGES_PER_CALL, Pipeline, check_prompt

    def as_list(value):  # argparse gives lists; a caller's Namespace may hold one string
        return [value] if isinstance(value, str) else list(value or [""])

    prompts = [check_prompt("--prompt", text, required=True) for text in as_list(args.prompt)]
    negatives = [check_prompt("--negative-prompt", text) for text in as_list(args.negative_prompt)]
    if len(prompts) > MAX_IMAGES_PER_CALL:
        raise SamgError(f"{len(prompts)} prompts, at most {MAX_IMAGES_PER_CALL} per call: split them over several runs")
    if len(negatives) == 1:
        negatives *= len(prompts)
    elif len(negatives) != len(prompts):
        raise SamgError(f"{len(prompts)} --prompt and {len(negatives)} --negative-prompt: pass one negative prompt "
                        "for all, or one per prompt")
    out = Path(args.out)
    check_output_location(out, folder=True)
    pipe = Pipeline.load(args.export_dir, backend=args.backend)
    cond = pipe.conditioning_for(prompts, negatives)
    for name, value in cond.items():
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(value, np.float32))
        atomic_write_bytes(out / f"{name}.npy", buf.getvalue())
    print(f"samg encode: wrote {', '.join(f'{n}.npy' for n in cond)} to {out}", file=sys.stderr)
    return 0
