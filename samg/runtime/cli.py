"""`samg generate DIR --prompt ... --out PATH`: images (PNG, a grid for several) or video (GIF/MP4)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MAX_FPS = 120  # video frame rate
MAX_GIF_FPS = 50  # GIF stores delays in 1/100 s, and viewers slow delays under 2/100 s down to 1/10 s
IMAGE_SUFFIXES = (".png",)
VIDEO_SUFFIXES = (".gif", ".mp4")


def check_output_location(out: Path, *, folder: bool = False) -> None:
    """SamgError unless `out` can be written, checked before the work: a file output must not be an
    existing folder (a folder output not an existing file), and the nearest existing folder above it
    must accept new files (probed with a temporary file, which is removed)."""
    from samg.errors import SamgError
    from samg.io import check_output_location as check_output_location_of

    flag = f"--out {str(out) or '(empty)'}"
    if not str(out) or (not folder and out.name in ("", ".", "..")):
        raise SamgError(f"{flag} names no file: pass a file path such as --out image.png")
    if not folder and out.is_dir():
        raise SamgError(f"{flag} is a folder: pass a file path inside it, e.g. --out {out / 'image.png'}")
    if folder and out.exists() and not out.is_dir():
        raise SamgError(f"{flag} is a file: pass a folder path")
    check_output_location_of(out if folder else out.parent, flag)  # missing folders are created when writing


def check_fps(fps, suffix: str) -> int:
    """The video frame rate if it is an integer in 1..MAX_FPS (1..MAX_GIF_FPS for GIF)."""
    from samg.errors import SamgError

    top = MAX_GIF_FPS if suffix == ".gif" else MAX_FPS
    if isinstance(fps, bool) or not isinstance(fps, int) or not 1 <= fps <= top:
        hint = f", or write .mp4 (up to {MAX_FPS})" if suffix == ".gif" else ""
        raise SamgError(f"--fps must be an integer in 1..{top} for {suffix or 'video'}, got {fps}: e.g. --fps 8{hint}")
    return fps


def add_arguments(p: argparse.ArgumentParser) -> None:
    # choices and defaults come from their registries (numpy-only imports, no torch)
    from samg.contract import GuidanceCombineAttrs, SemanticCombineAttrs
    from samg.guidance import DEFAULT_GUIDANCE_SCALE, MAX_GUIDANCE_SCALE, RULES, SCHEDULES
    from samg.runners.base import BACKENDS, DEVICES
    from samg.runtime.pipeline import DEFAULT_STEPS
    from samg.runtime.samplers import SAMPLERS

    in_graph = GuidanceCombineAttrs.rules  # what a fused graph runs; a raw export runs every registered rule
    host_only = [name for name in RULES if name not in in_graph]
    p.add_argument("export_dir", metavar="DIR", help="export folder (written by samg export)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--guidance", default="samg",
                   help=f"{', '.join(in_graph)} (fused or raw exports; default samg); {', '.join(host_only)} "
                        f"(raw exports only); {', '.join(SemanticCombineAttrs.rules)} (scfg exports)")
    p.add_argument("--scale", type=float, default=None,
                   help=f"guidance scale W in 0..{MAX_GUIDANCE_SCALE:g} (default {DEFAULT_GUIDANCE_SCALE:g}); for "
                        "samg alone it means w_min=(1+W)/2, w_max=W (w_min=W below 1)")
    p.add_argument("--w-min", type=float, default=None, help="SAMG scale on high-energy detail")
    p.add_argument("--w-max", type=float, default=None, help="SAMG scale on flat regions")
    p.add_argument("--schedule", choices=tuple(SCHEDULES), default="constant",
                   help="per-step guidance weight: scales become 1 + (w-1)*gain(step); linear and cosine "
                        "rise over the run with the same mean as constant (default constant)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--sampler", choices=tuple(SAMPLERS), default=None,
                   help="default: euler (flow_euler for flow-matching models)")
    p.add_argument("--karras", action="store_true", help="Karras sigmas (euler, euler_a, dpmpp_2m)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--frames", type=int, default=None, help="video models: number of frames")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--backend", choices=tuple(BACKENDS), default="onnxruntime")
    p.add_argument("--device", choices=DEVICES, default="cpu")
    p.add_argument("--cuda-graph", action="store_true",
                   help="run the whole sampling loop as one CUDA graph, captured once and replayed "
                        "(--backend torch --device cuda; deterministic samplers)")
    p.add_argument("--fps", type=int, default=8, help="video output frame rate")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="output .png, or .gif/.mp4 for video")


def image_grid(images):
    """[N, H, W, 3] -> one [rows*H, cols*W, 3] image, as square as possible."""
    import numpy as np

    n, h, w, c = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, c), images.dtype)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = img
    return grid


def write_output(images, out: Path, fps: int = 8) -> None:
    """PNG for images (grid when several); GIF/MP4 for video (frames of the first clips, side by side)."""
    from samg.errors import SamgError, require
    from samg.io import atomic_path

    suffix = out.suffix.lower()
    video = images.ndim == 5
    if video:
        if suffix not in VIDEO_SUFFIXES:
            raise SamgError(f"a video model writes .gif or .mp4, not {suffix or 'no suffix'}: e.g. --out clip.gif")
        fps = check_fps(fps, suffix)
        import numpy as np

        frames = np.stack([image_grid(images[:, f]) for f in range(images.shape[1])])
        iio = require("imageio", "to write video")
        with atomic_path(out) as tmp:
            if suffix == ".mp4":
                try:
                    iio.v3.imwrite(tmp, frames, extension=".mp4", fps=fps)
                except Exception as exc:  # no ffmpeg/pyav plugin installed
                    raise SamgError(f"cannot write MP4 here ({str(exc).splitlines()[0][:120]}): use --out clip.gif, "
                                    "or pip install imageio-ffmpeg") from None
            else:
                iio.v3.imwrite(tmp, frames, extension=".gif", duration=1000 / fps, loop=0)
            # Some writers report failure only on stderr: never hand over an empty file.
            if tmp.stat().st_size == 0:
                raise SamgError(f"the {suffix} writer produced an empty file: use --out clip.gif, or check imageio's ffmpeg")
        return
    if suffix not in IMAGE_SUFFIXES:
        raise SamgError(f"an image model writes .png, not {suffix or 'no suffix'}: e.g. --out image.png")
    pil = require("PIL.Image", "to write PNG files")
    with atomic_path(out) as tmp:
        pil.fromarray(image_grid(images)).save(tmp, format="PNG")


def run(args: argparse.Namespace) -> int:
    from samg.contract import read_export
    from samg.errors import SamgError
    from samg.runtime.pipeline import Pipeline

    # Everything is checked before the models are loaded and minutes are spent sampling.
    if not str(args.out).strip():  # Path("") would read as "."
        raise SamgError("--out is empty: pass a file path such as --out image.png")
    out = Path(args.out)
    export = read_export(args.export_dir, verify=False)  # Pipeline.load verifies the files
    video = export.latent.is_video
    allowed = VIDEO_SUFFIXES if video else IMAGE_SUFFIXES
    if out.suffix.lower() not in allowed:
        raise SamgError(f"--out must end in {' or '.join(allowed)} for this model, got {out.name or repr(str(out))}")
    check_output_location(out)
    if video:
        check_fps(args.fps, out.suffix.lower())
    request = dict(
        guidance=args.guidance, scale=args.scale, w_min=args.w_min, w_max=args.w_max, steps=args.steps,
        sampler=args.sampler, karras=args.karras, seed=args.seed, height=args.height, width=args.width,
        frames=args.frames, num_images=args.num_images, schedule=args.schedule,
    )
    planner = Pipeline(Path(args.export_dir), export, {}, [])
    planned = planner.plan(args.prompt, args.negative_prompt, **request)
    cuda_graph = getattr(args, "cuda_graph", False)
    if cuda_graph:  # the torch runner captures on CUDA (TorchRunner.graph_capturable)
        planner.check_cuda_graph(planned.guidance, planned.sampler,
                                 capturable=(args.backend, args.device) == ("torch", "cuda"))
    pipe = Pipeline.load(args.export_dir, backend=args.backend, device=args.device)
    images = pipe(args.prompt, args.negative_prompt, progress=not args.quiet, cuda_graph=cuda_graph, **request)
    write_output(images, out, fps=args.fps)
    if not args.quiet:
        print(f"samg generate: wrote {out}", file=sys.stderr)
    return 0
