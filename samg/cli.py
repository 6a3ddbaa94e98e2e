"""The `samg` command line. Subcommands live in their own modules and are imported lazily.

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int`, and imports only the
standard library at module level, so `samg --help` and `samg X --help` work with no heavy backend
installed.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "export": ("samg.export.cli", "export a diffusion model to ONNX with the guidance combine fused in"),
    "generate": ("samg.runtime.cli", "generate images or video from an export folder"),
    "demo": ("samg.demo", "export the bundled samg-shapes model and write a CFG / SAMG / S-CFG grid"),
    "build": ("samg.build.cli", "build TensorRT engines from an export folder"),
    "bench": ("samg.bench", "side-by-side latency benchmarks (ratios measured in one run)"),
    "encode": ("samg.runtime.encode_cli", "encode prompts to conditioning tensors (.npy) for the C++ runtime"),
    "serve": ("samg.serve.cli", "serve an export on NVIDIA Triton Inference Server (KServe v2 protocol, continuous batching)"),
}


def _build_parser(only: str | None = None) -> argparse.ArgumentParser:
    from samg import __version__

    parser = argparse.ArgumentParser(
        prog="samg",
        description="samg: guided diffusion deployment with spatially adaptive guidance in the engine.",
    )
    parser.add_argument("--version", action="version", version=f"samg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
        if only is None or only == name:
            try:
                module = importlib.import_module(module_name)
            except ImportError:  # a subcommand not built yet must not break the others
                continue
            module.add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = _build_parser(command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if not hasattr(args, "_module"):
        parser.exit(2, f"samg {args.command}: not available in this installation\n")
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    from samg.errors import SamgError

    try:
        return int(args._module.run(args) or 0)
    except SamgError as exc:
        if args.debug:
            raise
        print(f"samg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"samg {args.command}: interrupted", file=sys.stderr)
        return 130


def export_main(argv: list[str] | None = None) -> int:
    """`samg-export ...` is `samg export ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return main(["export", *argv])


if __name__ == "__main__":
    sys.exit(main())
