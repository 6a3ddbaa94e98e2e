"""`samg serve DIR`: serve an export on NVIDIA Triton Inference Server (KServe v2 protocol).

    samg serve DIR [--http-port 8000] [--grpc-port 8001] [--metrics-port 8002] [--host 127.0.0.1]
                   [--max-batch-size 8] [--backend onnxruntime] [--device cpu]
    samg serve DIR --repository-only --out REPO [--copy-export] [--kserve]
    samg serve DIR --kserve                      # the KServe YAML on stdout
    samg serve --install-triton                  # samg's own tritonserver (samg.serve.install)

Serving writes the model repository into a temporary folder of its own, starts tritonserver on it,
prints where it listens once the model is loaded, and stops it (and removes the folder) on Ctrl-C,
SIGTERM or SIGHUP (docs/serving.md, "Stopping", says what tritonserver waits for). Killed outright,
samg takes tritonserver along (samg.serve.server); the folder then stays.
"""

from __future__ import annotations

import argparse
import math
import signal
import socket
import sys
import tempfile
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # stop the server as Ctrl-C does (SIGHUP: the terminal closed)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from samg.api import DEFAULT_MAX_QUEUE
    from samg.runners.base import BACKENDS, DEVICES
    from samg.serve.repository import DEFAULT_MAX_BATCH_SIZE, KSERVE_FILE, MODEL_NAME
    from samg.serve.server import (
        DEFAULT_GRPC_PORT,
        DEFAULT_HOST,
        DEFAULT_HTTP_PORT,
        DEFAULT_METRICS_PORT,
        DEFAULT_READY_TIMEOUT_S,
    )

    p.add_argument("export_dir", metavar="DIR", nargs="?", help="export folder (written by samg export)")
    p.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT)
    p.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT)
    p.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT)
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}, this machine "
                                                        "only; 0.0.0.0 for every interface)")
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                   help="most images one batched denoiser call runs (concurrent requests share calls)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help=f"requests that may wait for a worker; more are answered 'server busy' (UNAVAILABLE) at "
                        f"once (default {DEFAULT_MAX_QUEUE})")
    p.add_argument("--backend", choices=tuple(BACKENDS), default="onnxruntime")
    p.add_argument("--device", choices=DEVICES, default="cpu")
    p.add_argument("--repository-only", action="store_true",
                   help=f"write the Triton model repository (model {MODEL_NAME!r}) to --out and exit, for "
                        "tritonserver elsewhere (e.g. NVIDIA's container)")
    p.add_argument("--out", metavar="REPO", help="with --repository-only: the repository folder")
    p.add_argument("--copy-export", action="store_true",
                   help="with --repository-only: put the export inside the repository (default: referenced by "
                        "its absolute path, which a container must mount at the same path)")
    p.add_argument("--kserve", action="store_true",
                   help=f"a KServe InferenceService for the repository: {KSERVE_FILE} in it with --repository-only "
                        "(implies --copy-export), else printed")
    p.add_argument("--install-triton", action="store_true",
                   help="download NVIDIA's tritonserver (the nvidia-pytriton wheel, 55 MB) into samg's cache; "
                        "idempotent")
    p.add_argument("--ready-timeout", type=float, default=DEFAULT_READY_TIMEOUT_S,
                   help=f"seconds to wait for the model to load (default {DEFAULT_READY_TIMEOUT_S:g})")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _check_port(flag: str, host: str, port: int) -> None:
    from samg.errors import SamgError

    if isinstance(port, bool) or not 1 <= port <= 65535:
        raise SamgError(f"{flag} must be a port in 1..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise SamgError(f"{flag} {port} on {host} cannot be used ({exc.strerror or exc}): pick another port, "
                            f"e.g. {flag} {port + 100}") from None


def _check_args(args: argparse.Namespace) -> None:
    from samg.errors import SamgError
    from samg.runtime.pipeline import MAX_IMAGES_PER_CALL

    if not 1 <= args.max_batch_size <= MAX_IMAGES_PER_CALL:  # samg.load's range, checked before the server starts
        raise SamgError(f"--max-batch-size must be in 1..{MAX_IMAGES_PER_CALL}, got {args.max_batch_size}: e.g. "
                        "--max-batch-size 8")
    if args.max_queue < 0:
        raise SamgError(f"--max-queue must be 0 or more, got {args.max_queue}: e.g. --max-queue 64")
    if not (math.isfinite(args.ready_timeout) and args.ready_timeout > 0):
        raise SamgError(f"--ready-timeout must be a positive number of seconds, got {args.ready_timeout}: e.g. "
                        "--ready-timeout 600")
    if args.out is not None and not args.repository_only:
        raise SamgError("--out goes with --repository-only: add --repository-only, or drop --out to serve")
    if args.repository_only and not args.out:
        raise SamgError("--repository-only needs --out REPO: the folder to write the repository to")
    if args.copy_export and not args.repository_only:
        raise SamgError("--copy-export goes with --repository-only --out REPO")


def run(args: argparse.Namespace) -> int:
    from samg.errors import SamgError

    if args.install_triton:
        from samg.serve.install import TritonNotFound, install_tritonserver

        try:
            found = install_tritonserver(quiet=args.quiet)
        except TritonNotFound as exc:
            raise SamgError(str(exc)) from None
        print(f"samg serve: tritonserver ready in {found.binary}", file=sys.stderr)
        if args.export_dir is None:
            return 0
    if args.export_dir is None:
        raise SamgError("pass the export folder: samg serve DIR (written by samg export)")
    _check_args(args)
    from samg.contract import read_export

    read_export(args.export_dir, verify=False)  # a wrong folder is named before anything else happens
    if args.backend == "tensorrt":  # what the model's load would refuse, said before the server starts
        from samg.api import check_engine_batch

        check_engine_batch(args.export_dir, args.max_batch_size)
    if args.kserve and not args.repository_only:
        from samg.serve.repository import kserve_yaml

        sys.stdout.write(kserve_yaml(max_batch_size=args.max_batch_size, device=args.device))
        return 0
    if args.repository_only:
        return _write_only(args)
    return _serve(args)


def _entry(args: argparse.Namespace):
    from samg.serve.repository import ModelEntry

    return ModelEntry(max_batch_size=args.max_batch_size, max_queue=args.max_queue)


def _write_only(args: argparse.Namespace) -> int:
    from samg.serve.repository import MODEL_NAME, write_repository

    from samg.serve.install import TritonNotFound, find_tritonserver
    from samg.serve.server import manual_command

    out = write_repository(args.out, args.export_dir, models=(_entry(args),), backend=args.backend, device=args.device,
                           copy_export=args.copy_export or args.kserve, kserve=args.kserve)
    if not args.quiet:
        try:
            install = find_tritonserver()
        except TritonNotFound:
            install = None
        print(f"samg serve: wrote the Triton model repository {out} (model {MODEL_NAME!r}); serve it with\n"
              f"  {manual_command(install, out)}\n"
              "(NVIDIA's container: tritonserver --model-repository with samg installed, docs/serving.md)",
              file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import shutil

    from samg.errors import SamgError
    from samg.serve.install import TritonNotFound, find_tritonserver
    from samg.serve.repository import MODEL_NAME, write_repository
    from samg.serve.server import EXIT_TIMEOUT_S, Endpoints, ServerFailed, TritonServer

    try:
        install = find_tritonserver()
    except TritonNotFound as exc:
        raise SamgError(str(exc)) from None
    for flag, port in (("--http-port", args.http_port), ("--grpc-port", args.grpc_port),
                       ("--metrics-port", args.metrics_port)):
        _check_port(flag, args.host, port)
    if len({args.http_port, args.grpc_port, args.metrics_port}) < 3:
        raise SamgError("--http-port, --grpc-port and --metrics-port must differ")
    endpoints = Endpoints(args.host, args.http_port, args.grpc_port, args.metrics_port)
    work = Path(tempfile.mkdtemp(prefix="samg-serve-"))  # samg's own: removed when the server stops
    keep_work = False
    server = None
    previous = {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS}
    try:
        repository = write_repository(work / "repository", args.export_dir, models=(_entry(args),),
                                      backend=args.backend, device=args.device)
        echo = None if args.quiet else (lambda line: print(f"tritonserver: {line}", file=sys.stderr))
        server = TritonServer(install, repository, endpoints, work / "tritonserver.log", echo=echo)
        if not args.quiet:
            print(f"samg serve: starting tritonserver ({install.binary}) and loading {args.export_dir}", file=sys.stderr)
        server.start()
        try:
            server.wait_ready(args.ready_timeout)
        except ServerFailed as exc:
            keep_work = True
            raise SamgError(f"{exc}: fix the cause above and run samg serve again") from None
        print(f"samg serve: model {MODEL_NAME!r} ready: HTTP http://{endpoints.http}/v2/models/{MODEL_NAME}/infer"
              f", gRPC {endpoints.grpc}, metrics {endpoints.metrics_url}"
              f"{' (on every interface)' if args.host in ('0.0.0.0', '::') else ''}; Ctrl-C stops it",
              file=sys.stderr, flush=True)
        code = server.process.wait()
        keep_work = True
        raise SamgError(f"tritonserver exited with code {code} ({(server.errors() or ['no error line'])[-1][:300]}; "
                        f"log: {work / 'tritonserver.log'})")
    except KeyboardInterrupt:
        if not args.quiet:
            print(f"samg serve: stopping (requests still running are lost; tritonserver takes up to {EXIT_TIMEOUT_S} s "
                  "while clients keep connections open)", file=sys.stderr)
        if server is not None:
            server.stop()
        if not args.quiet:
            print("samg serve: stopped", file=sys.stderr)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server is not None and server.running():
            server.stop()
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)


def _interrupt(signum, frame):  # STOP_SIGNALS stop the server as Ctrl-C does
    raise KeyboardInterrupt
