"""Run `tritonserver` on a model repository: the command, its environment, readiness, a clean stop.

The Python backend's stub embeds libpython and imports samg in its own process. It must load THIS
interpreter's libpython (a pyenv Python beside a system one would otherwise get the system's, and
fail with errors such as `'_thread.RLock' object has no attribute '_recursion_count'`), and see
this interpreter's packages: the interpreter's LIBDIR goes first on LD_LIBRARY_PATH, and its
sys.path (a virtual environment's included) into SAMG_SERVE_PATH, which the repository's model.py
adds to the stub's sys.path (the stub does not read PYTHONPATH).

On Linux the server is tied to the life of the thread that started it (prctl PR_SET_PDEATHSIG):
if samg is killed outright (SIGKILL, the OOM killer), the kernel kills tritonserver too, so no
orphan keeps the ports and the model; its Python backend stubs notice their parent is gone and exit.
Start it from a thread that lives as long as the server (`samg serve` uses the main thread).

Standard library only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Sequence

from samg.serve.install import TritonInstall

DEFAULT_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT, DEFAULT_GRPC_PORT, DEFAULT_METRICS_PORT = 8000, 8001, 8002
# Loading a model imports samg and opens its graphs: seconds for the bundled models, minutes for
# big ones on a slow disk.
DEFAULT_READY_TIMEOUT_S = 600.0
# tritonserver waits this long for in-flight requests when stopped (its --exit-timeout-secs).
EXIT_TIMEOUT_S = 30
POLL_S = 0.2
PATH_ENV = "SAMG_SERVE_PATH"  # read by the repository's model.py (samg.serve.repository.MODEL_PY)
# Lines tritonserver logs as errors on a machine without a GPU or NVML, harmless there.
HARMLESS_LOG = ("CudaDriverHelper", "NVML", "DCGM", "CUDA driver", "cuda driver", "GPU metrics",
                "Unable to get number of CUDA devices", "pinned memory", "CUDA memory pool", "cudaGetDevice",
                "Failed to initialize NVML")


SHM_DIR = "/dev/shm"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn (Linux) that has the kernel SIGKILL the child when the thread starting it
    exits: samg killed outright takes its tritonserver along. libc is loaded here, before the fork."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def in_child() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # samg died before the signal was armed
            os._exit(1)

    return in_child


class ServerFailed(Exception):
    """tritonserver exited or did not get ready: the message holds its error lines."""


@dataclass(frozen=True)
class Endpoints:
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int

    @property
    def http(self) -> str:
        return f"{self.client_host()}:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"{self.client_host()}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.client_host()}:{self.metrics_port}/metrics"

    def client_host(self) -> str:
        """The address a local client connects to: a wildcard bind is reached through loopback, an
        IPv6 address in brackets (host:port)."""
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"[{host}]" if ":" in host else host


def free_ports(count: int, host: str = DEFAULT_HOST) -> list[int]:
    """`count` distinct ports free on `host` now (for tests and benchmarks; another process could
    still take one): every socket stays bound until all are picked, so none repeats."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET))
                   for _ in range(count)]
        for s in sockets:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in sockets]


def local_endpoints(host: str = DEFAULT_HOST) -> "Endpoints":
    """Endpoints on three distinct free ports of `host`."""
    return Endpoints(host, *free_ports(3, host))


def server_env(install: TritonInstall, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    # samg's own folder first: an editable install is found through a .pth hook that plain path
    # entries do not run
    samg_root = str(Path(__file__).resolve().parents[2])
    paths = [samg_root, *(p for p in sys.path if p and Path(p).is_dir())]
    env[PATH_ENV] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def server_command(install: TritonInstall, repositories: Sequence[Path], endpoints: Endpoints,
                   shm_prefix: str) -> list[str]:
    return [
        str(install.binary),
        *(f"--model-repository={repository}" for repository in repositories),
        f"--backend-directory={install.backend_dir}",
        f"--http-address={endpoints.host}", f"--http-port={endpoints.http_port}",
        f"--grpc-address={endpoints.host}", f"--grpc-port={endpoints.grpc_port}",
        f"--metrics-address={endpoints.host}", f"--metrics-port={endpoints.metrics_port}",
        "--allow-metrics=true", "--allow-gpu-metrics=false",
        "--strict-readiness=true", "--model-control-mode=none", "--disable-auto-complete-config",
        f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
        # the Python backend's shared-memory regions named as this server's, so a killed server's are found
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
    ]


def manual_command(install: TritonInstall | None, repository: Path) -> str:
    """A shell line that serves `repository` with `install` by hand (what TritonServer runs, less
    samg's ports and log handling): this interpreter's libpython and import path included;
    plain `tritonserver --model-repository` when none is known (NVIDIA's container)."""
    import shlex

    repository = Path(repository).resolve()
    if install is None or install.source == "PATH":
        return f"tritonserver --model-repository {shlex.quote(str(repository))}"
    line = shlex.join([str(install.binary), f"--model-repository={repository}", f"--backend-directory={install.backend_dir}"])
    line = f"{PATH_ENV}={shlex.quote(server_env(install, {})[PATH_ENV])} {line}"
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        line = f"LD_LIBRARY_PATH={shlex.quote(libdir)} {line}"
    if install.stub_site is not None:
        line = f"cd {shlex.quote(str(install.stub_site))} && {line}"
    return line


def is_error_line(line: str) -> bool:
    """A tritonserver log line worth showing: an error (E...) or a failed model, not the CPU-only noise."""
    text = line.strip()
    if not text or any(h in text for h in HARMLESS_LOG):
        return False
    return text.startswith("E") and text[1:5].isdigit() or "UNAVAILABLE" in text or text.startswith("error:")


class TritonServer:
    """One tritonserver process on one or several model repositories: `start()`, `wait_ready()`,
    `stop()`; or `with TritonServer(...)`.

    Its log goes to `log_path`; `echo` (a callable) also gets every error line as it comes."""

    def __init__(self, install: TritonInstall, repository: Path | Sequence[Path], endpoints: Endpoints, log_path: Path,
                 echo: Callable[[str], None] | None = None):
        self.install, self.endpoints = install, endpoints
        self.repositories = [Path(repository)] if isinstance(repository, (str, os.PathLike)) else list(map(Path, repository))
        self.log_path = Path(log_path)
        self.echo = echo
        self.process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._errors: list[str] = []
        self.shm_prefix = f"samg_serve_{os.getpid()}_{secrets.token_hex(4)}_"

    def start(self) -> "TritonServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "a", buffering=1)
        # Its own process group: a Ctrl-C in the terminal reaches samg, which stops the server in order.
        try:
            self.process = subprocess.Popen(
                server_command(self.install, self.repositories, self.endpoints, self.shm_prefix),
                env=server_env(self.install), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, errors="replace", start_new_session=True, cwd=self.install.stub_site,
                preexec_fn=_die_with_parent())
        except BaseException:
            log.close()
            raise
        self._reader = threading.Thread(target=self._read, args=(self.process.stdout, log), daemon=True)
        self._reader.start()
        return self

    def _read(self, stream: IO[str], log: IO[str]) -> None:
        with log:
            for line in stream:
                log.write(line)
                if is_error_line(line):
                    self._errors.append(line.rstrip())
                    if self.echo is not None:
                        self.echo(line.rstrip())

    def errors(self) -> list[str]:
        return list(self._errors)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ready(self) -> bool:
        url = f"http://{self.endpoints.http}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT_S) -> None:
        """Return once the server and every model are ready; ServerFailed if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                self._join_reader()
                raise ServerFailed(self._failure(f"tritonserver exited with code {self.process.returncode}"))
            if self.ready():
                return
            time.sleep(POLL_S)
        raise ServerFailed(self._failure(f"tritonserver was not ready after {timeout:.0f} s"))

    def _failure(self, what: str) -> str:
        errors = [e for e in self._errors if "failed to load all models" not in e]
        detail = errors[-1] if errors else "no error line"
        return f"{what} ({detail[:600]}; full log: {self.log_path})"

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5)

    def stop(self, timeout: float = EXIT_TIMEOUT_S + 10) -> int | None:
        """SIGINT, then SIGKILL for whatever of the server is left after it exits or `timeout`.
        Not a drain: tritonserver 2.51 closes its endpoints at SIGINT and has ONE budget of
        EXIT_TIMEOUT_S to wait for open HTTP connections, then in-flight inferences (none, for the
        continuous model, which answers from its own workers), then to unload the models; requests
        still running are lost to their clients (docs/serving.md, "Stopping")."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._reap()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the server and its model processes at once (as a crash would)."""
        self._reap()

    def _reap(self) -> None:
        """SIGKILL this server's process group (tritonserver and its Python backend stubs, which a
        server exiting on its exit timeout leaves behind) and remove its shared-memory regions."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        self._join_reader()
        deadline = time.monotonic() + 10  # the stubs die with the group; their regions go once they have
        while _group_alive(self.process.pid) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        for region in Path(SHM_DIR).glob(f"{self.shm_prefix}*"):
            with contextlib.suppress(OSError):
                region.unlink()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
