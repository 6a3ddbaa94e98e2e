"""`samg build DIR`: TensorRT / TensorRT-RTX engines for an export folder (one per component).

Light modules only at module level (standard library, numpy; see samg/cli.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from samg.build.loader import COMBINE_PATHS, FLAVOURS, PRECISIONS
from samg.contract import ENGINE_COMPONENTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("export_dir", metavar="DIR", help="export folder written by `samg export` (has samg.json)")
    parser.add_argument(
        "--trt",
        choices=tuple(FLAVOURS),
        default=None,
        help="TensorRT flavour (default: the installed one, tensorrt first)",
    )
    parser.add_argument(
        "--combine",
        choices=COMBINE_PATHS,
        default=COMBINE_PATHS[0],
        help="guidance combine as the ONNX function body (default) or as the samg::GuidanceCombine plugin",
    )
    parser.add_argument(
        "--precision",
        choices=tuple(PRECISIONS),
        default=None,
        help="must match the export's dtype (networks are strongly typed); default: the export's dtype",
    )
    shapes = parser.add_mutually_exclusive_group()
    shapes.add_argument("--static", dest="dynamic", action="store_false", help="one fixed shape (--opt) (default)")
    shapes.add_argument("--dynamic", dest="dynamic", action="store_true", help="shape ranges --min/--opt/--max")
    parser.set_defaults(dynamic=False)
    example = "batch=1,height=512,width=512,frames=9,tokens=77"
    parser.add_argument("--opt", default=None, help=f"optimum shape, e.g. {example} (default: the manifest's)")
    parser.add_argument("--min", default=None, help="smallest shape (with --dynamic)")
    parser.add_argument("--max", default=None, help="largest shape (with --dynamic)")
    parser.add_argument(
        "--components",
        default=",".join(ENGINE_COMPONENTS),
        help=f"comma-separated subset of {','.join(ENGINE_COMPONENTS)} (default: all)",
    )
    parser.add_argument("--out", default=None, help="engine folder (default: DIR/engines)")
    parser.add_argument("--cache-dir", default=None, help="engine cache folder (default: ~/.cache/samg/engines)")
    parser.add_argument("--timing-cache", default=None, help="timing cache file to read and update")
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="engines whose runs can be captured into CUDA graphs (TensorRT-RTX: REQUIRE_USER_ALLOCATION); "
        "needed by the tensorrt backend's cuda_graph option",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when a cached engine matches")
    parser.add_argument("--quiet", action="store_true", help="no progress messages")


def run(args: argparse.Namespace) -> int:
    from samg.build.loader import reexec_with_library_path, resolve_flavour

    flavour = resolve_flavour(args.trt)
    # The RTX wheel's library link may only be usable via LD_LIBRARY_PATH set before start.
    reexec_with_library_path(flavour, ["build", *_argv_of(args)])

    from samg.build.engine import BuildOptions, build_export
    from samg.build.profiles import ShapeRequest, parse_shape_spec

    components = tuple(c.strip() for c in args.components.split(",") if c.strip())
    options = BuildOptions(
        flavour=flavour,
        combine=args.combine,
        precision=args.precision,
        shapes=ShapeRequest(
            dynamic=args.dynamic,
            min=parse_shape_spec(args.min, "--min"),
            opt=parse_shape_spec(args.opt, "--opt"),
            max=parse_shape_spec(args.max, "--max"),
        ),
        components=components,
        out_dir=Path(args.out) if args.out else None,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        timing_cache=Path(args.timing_cache) if args.timing_cache else None,
        use_cache=not args.force,
        quiet=args.quiet,
        cuda_graph=args.cuda_graph,
    )
    results = build_export(args.export_dir, options)
    if not args.quiet:
        hits = sum(r.cache_hit for r in results)
        print(
            f"samg build: {len(results)} engine(s) in {results[0].engine_path.parent} "
            f"({len(results) - hits} built, {hits} cache hit{'s' if hits != 1 else ''})",
            file=sys.stderr,
        )
    return 0


def _argv_of(args: argparse.Namespace) -> list[str]:
    """The command line that reproduces `args` (for re-executing when called in-process)."""
    argv = [args.export_dir, "--combine", args.combine, "--components", args.components]
    for flag in ("trt", "precision", "opt", "min", "max", "out", "cache_dir", "timing_cache"):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    argv.append("--dynamic" if args.dynamic else "--static")
    flags = (("--force", args.force), ("--quiet", args.quiet), ("--debug", args.debug), ("--cuda-graph", args.cuda_graph))
    argv += [f for f, on in flags if on]
    return argv
