"""`samg export`: command line (standard library only at import time)."""

from __future__ import annotations

import argparse

MODEL_NAMES = ("sd15", "sd21", "sdxl", "sd35-medium", "cogvideox", "modelscope-t2v", "digits")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="NAME", help=f"model family: {', '.join(MODEL_NAMES)}")
    parser.add_argument("--model-path", metavar="DIR", help="local diffusers pipeline folder (save_pretrained)")
    parser.add_argument("--tiny", action="store_true", help="export a tiny random model of the family (for tests)")
    parser.add_argument("--out", required=True, metavar="DIR", help="export folder to write")
    parser.add_argument(
        "--guidance", choices=("fused", "raw", "scfg"), default="fused",
        help="fused: one graph outputs the guided prediction; raw: outputs pred_uncond and pred_cond; "
        "scfg: the graph computes S-CFG from its attention maps (UNet models, see docs/scfg.md)",
    )
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--height", type=int, help="pixel height to trace at (default: the model's own)")
    parser.add_argument("--width", type=int, help="pixel width to trace at (default: the model's own)")
    parser.add_argument("--frames", type=int, help="video frames (video models only)")
    parser.add_argument("--tau", type=float, default=1.0, help="SAMG energy threshold (default 1.0)")
    parser.add_argument("--sharpness", type=float, default=4.0, help="SAMG sigmoid sharpness (default 4.0)")
    parser.add_argument("--smooth", type=int, choices=(0, 3), default=3,
                        help="3 (default): smooth the SAMG scale map 3x3; 0: no smoothing")
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
            validate=args.validate,
            quiet=args.quiet,
        )
    )
    return 0
