"""`samg export`: command line (standard library only at import time)."""

from __future__ import annotations

import argparse


def _factors(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 4,8, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # choices and defaults come from their registries (numpy-only imports, no torch)
    from samg.contract import GUIDANCE_KINDS
    from samg.export.exporter import TOLERANCE, ExportOptions
    from samg.models.specs import spec_names
    from samg.op.schema import SMOOTH_CHOICES

    parser.add_argument("--model", required=True, metavar="NAME", help=f"model family: {', '.join(spec_names())}")
    parser.add_argument("--model-path", metavar="DIR", help="local diffusers pipeline folder (save_pretrained)")
    parser.add_argument("--tiny", action="store_true", help="export a tiny random model of the family (for tests)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="export folder to write: a new or empty folder, or a previous samg export (replaced "
                        "only once the new one is complete)")
    parser.add_argument("--force", action="store_true",
                        help="export into a folder that also holds files samg did not write: those files are kept "
                        "(never replaced or deleted; a name the export needs is refused), samg's own files replaced")
    parser.add_argument(
        "--guidance", choices=GUIDANCE_KINDS, default=ExportOptions.guidance,
        help="fused: one graph outputs the guided prediction; raw: outputs pred_uncond and pred_cond; "
        "scfg: the graph computes S-CFG from its attention maps (UNet models, see docs/scfg.md)",
    )
    parser.add_argument("--opset", type=int, default=ExportOptions.opset, help=f"ONNX opset (default {ExportOptions.opset})")
    parser.add_argument("--dtype", choices=tuple(TOLERANCE), default=ExportOptions.dtype)
    parser.add_argument("--height", type=int, help="pixel height to trace at (default: the model's own)")
    parser.add_argument("--width", type=int, help="pixel width to trace at (default: the model's own)")
    parser.add_argument("--frames", type=int, help="video frames (video models only)")
    parser.add_argument("--tau", type=float, default=ExportOptions.tau,
                        help=f"SAMG energy threshold (default {ExportOptions.tau})")
    parser.add_argument("--sharpness", type=float, default=ExportOptions.sharpness,
                        help=f"SAMG sigmoid sharpness (default {ExportOptions.sharpness})")
    parser.add_argument("--smooth", type=int, choices=SMOOTH_CHOICES, default=ExportOptions.smooth,
                        help=f"3: smooth the SAMG scale map 3x3; 0: no smoothing (default {ExportOptions.smooth})")
    parser.add_argument("--scfg-levels", type=_factors, metavar="F[,F]",
                        help="S-CFG: UNet attention levels by downsampling factor, e.g. 4,8 (default: the two "
                        "coarsest with self- and cross-attention; SDXL at 1024 px: 4 keeps the op fast)")
    parser.add_argument("--scfg-corrected", action="store_true",
                        help="S-CFG: true average of attention powers, foreground from the conditional half "
                        "(default: as the paper's code)")
    parser.add_argument("--no-validate", dest="validate", action="store_false", help="skip ONNX Runtime vs torch checks")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from samg.export.exporter import ExportOptions, export

    export(
        ExportOptions(
            model=args.model,
            out=args.out,
            model_path=args.model_path,
            tiny=args.tiny,
            guidance=args.guidance,
            opset=args.opset,
            dtype=args.dtype,
            height=args.height,
            width=args.width,
            frames=args.frames,
            tau=args.tau,
            sharpness=args.sharpness,
            smooth=args.smooth,
            scfg_levels=args.scfg_levels,
            scfg_corrected=args.scfg_corrected,
            validate=args.validate,
            quiet=args.quiet,
            force=args.force,
        )
    )
    return 0
