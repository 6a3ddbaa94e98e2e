"""The `samg` model in Triton's Python backend (each repository's `1/model.py` imports this class).

`initialize` loads the export once (`samg.load`), with the settings the repository writer put in
config.pbtxt's `parameters`. Three ways to run requests, one per `mode`:

- continuous (the default): `execute` parses each request, submits it to the continuous-batching
  engine and returns at once; each request's one response is sent from the engine's worker when
  its image is ready (the response sender with the FINAL flag). Triton therefore keeps handing
  new requests to the model while others sample, and they join the running denoiser batches. The
  model is not decoupled (exactly one response per request): tritonserver 2.51 refuses decoupled
  models on HTTP `infer` and gRPC `ModelInfer`, while a non-decoupled model may answer through the
  response sender after `execute` returned, so plain `infer` works on both protocols.
- dynamic: Triton's request-level dynamic batching (`dynamic_batching {}`, inputs [batch, 1]):
  one `execute` runs the batch Triton formed to completion, denoiser calls shared, and takes no
  new request before it is done.
- single: one request at a time, engine batch size 1 (the baseline without batching).

A bad request gets an INVALID_ARG error naming the input (the SamgError's line); the model goes on.
So does a generation that fails on its own values (non-finite latents). Past `max_queue` requests
waiting for a worker, a request is answered at once with UNAVAILABLE ("server busy: ..."). In
continuous mode a request whose client went away (Triton's `request.is_cancelled()`) stops before
its next step and is answered CANCELLED.
`initialize` refuses a Python backend that cannot hand numpy arrays over intact (tritonserver
2.51's stub under numpy 2: see samg.serve.install) rather than crash on the first request.

Custom metrics (pb_utils.MetricFamily) mirror `pipe.stats()` every METRICS_INTERVAL_S seconds,
from a daemon thread, which stops once tritonserver is gone.

The model process (the backend's stub) exits when tritonserver does, through a watchdog thread of
samg's: a metric update, a cancellation check or a response is a message to the server that waits
for its reply, and one pending when the server dies holds the stub's message lock forever, which
blocks the stub's own parent watchdog (seen with gdb on stubs left running with the model loaded).
"""

from __future__ import annotations

import json
import os
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from samg.api import DEFAULT_MAX_QUEUE, PipelineBusy
from samg.errors import SamgError
from samg.runtime.batching import RequestCancelled
from samg.serve.protocol import INPUT_NAMES, SEED_OUTPUT, image_output_name, parse_request

MODES = ("continuous", "dynamic", "single")
METRICS_INTERVAL_S = 1.0
# finalize waits this long for requests still running (tritonserver unloads the model only after
# its own exit timeout has passed or the requests are done).
FINALIZE_TIMEOUT_S = 30.0
SERVER_WATCH_S = 1.0  # how often the stub checks that tritonserver still runs


def model_settings(parameters: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    """config.pbtxt `parameters` ({key: {"string_value": ...}}) -> load settings; a relative
    export_dir is relative to the model's version folder (an export copied into the repository)."""
    values = {key: (value or {}).get("string_value", "") for key, value in parameters.items()}
    missing = [k for k in ("export_dir", "mode", "max_batch_size") if not values.get(k)]
    if missing:
        raise SamgError(f"config.pbtxt lacks parameter {', '.join(missing)}: rewrite the repository with "
                        "`samg serve EXPORT_DIR --repository-only --out DIR`")
    if values["mode"] not in MODES:
        raise SamgError(f"config.pbtxt parameter mode is {values['mode']!r}, one of {', '.join(MODES)} expected")
    export_dir = Path(values["export_dir"])
    if not export_dir.is_absolute():
        export_dir = model_dir / export_dir
    try:
        max_batch_size = int(values["max_batch_size"])
    except ValueError:
        raise SamgError(f"config.pbtxt parameter max_batch_size is {values['max_batch_size']!r}, not an integer") from None
    try:
        max_queue = int(values.get("max_queue") or DEFAULT_MAX_QUEUE)  # repositories before max_queue: the default
    except ValueError:
        raise SamgError(f"config.pbtxt parameter max_queue is {values['max_queue']!r}, not an integer") from None
    return {"export_dir": export_dir, "mode": values["mode"], "max_batch_size": max_batch_size, "max_queue": max_queue,
            "backend": values.get("backend") or "onnxruntime", "device": values.get("device") or "cpu"}


def check_backend_arrays(pb_utils: Any) -> None:
    """SamgError unless a tensor made from numpy comes back whole: a Python backend built with a
    pybind11 older than numpy 2 reads numpy 2's item sizes wrongly (all elements become the first,
    BYTES inputs crash the stub)."""
    probe = np.arange(1, 4, dtype=np.float32)
    back = pb_utils.Tensor("probe", probe).as_numpy()
    if back.shape != probe.shape or not np.array_equal(back, probe):
        raise SamgError(f"this Triton Python backend cannot exchange arrays with numpy {np.__version__} (it was built "
                        "before numpy 2): give the backend's Python numpy<2, as `samg serve` does with its own "
                        "tritonserver (samg.serve.install), or use a tritonserver built for numpy 2")


def server_alive(pid: int) -> bool:
    """Whether tritonserver (`pid`, this stub's parent) still runs."""
    if os.getppid() != pid:  # re-parented: tritonserver exited
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True


def exit_with_server(pid: int) -> None:
    """Runs on a daemon thread of the stub: exit the process once tritonserver (`pid`) is gone."""
    while server_alive(pid):
        time.sleep(SERVER_WATCH_S)
    os._exit(1)  # nothing to clean: the server that owned this process's requests and memory is gone


class _Metrics:
    """samg's own metrics beside Triton's, updated from pipe.stats() by a background thread."""

    def __init__(self, pb_utils: Any, stats: Any, labels: dict[str, str]):
        fam = pb_utils.MetricFamily
        self._stats, self._labels = stats, labels
        self._families = {
            "queue": fam("samg_queue_depth", "Requests submitted and waiting for a worker", fam.GAUGE),
            "in_flight": fam("samg_requests_in_flight", "Requests being encoded, sampled or decoded", fam.GAUGE),
            "waiting": fam("samg_waiting_steps", "Denoiser steps waiting for the next batched call", fam.GAUGE),
            "calls": fam("samg_denoiser_calls_total", "Batched denoiser calls, by images per call", fam.COUNTER),
            "latency": fam("samg_denoiser_call_seconds",
                           "Latency of one batched denoiser call (one step of every request in it), recent calls",
                           fam.GAUGE),
            "done": fam("samg_requests_done_total", "Requests answered with an image", fam.COUNTER),
            "failed": fam("samg_requests_failed_total", "Requests that failed while generating", fam.COUNTER),
            "rejected": fam("samg_requests_rejected_total", "Requests refused as bad (the error names the input)",
                            fam.COUNTER),
            "busy": fam("samg_requests_busy_total", "Requests answered 'server busy' (max_queue requests waiting)",
                        fam.COUNTER),
            "cancelled": fam("samg_requests_cancelled_total", "Requests stopped because their client went away",
                             fam.COUNTER),
        }
        self._gauges = {k: self._families[k].Metric(labels=labels) for k in ("queue", "in_flight", "waiting")}
        self._counters = {k: self._families[k].Metric(labels=labels)
                          for k in ("done", "failed", "rejected", "busy", "cancelled")}
        self._latency = {q: self._families["latency"].Metric(labels={**labels, "stat": q})
                         for q in ("mean", "p50", "p90", "max")}
        self._calls: dict[int, Any] = {}
        self._seen: dict[Any, float] = {}
        self._stop = threading.Event()
        self._server_pid = os.getppid()  # tritonserver: the stub is its child
        self._thread = threading.Thread(target=self._loop, name="samg-metrics", daemon=True)
        self._thread.start()

    def _add(self, key: Any, metric: Any, total: float) -> None:
        delta = total - self._seen.get(key, 0)
        if delta > 0:
            metric.increment(delta)
            self._seen[key] = total

    def update(self) -> None:
        stats = self._stats()
        self._gauges["queue"].set(stats.get("queue_depth", 0))
        self._gauges["in_flight"].set(stats.get("in_flight", 0))
        self._gauges["waiting"].set(stats.get("waiting_steps", 0))
        self._add("done", self._counters["done"], stats.get("requests_done", 0))
        self._add("failed", self._counters["failed"], stats.get("requests_failed", 0))
        self._add("rejected", self._counters["rejected"], stats.get("requests_rejected", 0))
        self._add("busy", self._counters["busy"], stats.get("requests_busy", 0))
        self._add("cancelled", self._counters["cancelled"], stats.get("requests_cancelled", 0))
        for size, calls in (stats.get("batch_sizes") or {}).items():
            if size not in self._calls:
                self._calls[size] = self._families["calls"].Metric(labels={**self._labels, "batch_size": str(size)})
            self._add(("calls", size), self._calls[size], calls)
        latency = stats.get("step_latency_s") or {}
        for q, metric in self._latency.items():
            if latency.get(q) is not None:
                metric.set(latency[q])

    def _loop(self) -> None:
        while not self._stop.wait(METRICS_INTERVAL_S) and server_alive(self._server_pid):
            try:
                self.update()
            except Exception:  # metrics must never take the model down
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        # metrics before their families (the backend refuses the other order)
        self._gauges.clear(), self._counters.clear(), self._latency.clear(), self._calls.clear()
        self._families.clear()


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        from samg.api import load

        self.pb = pb_utils
        threading.Thread(target=exit_with_server, args=(os.getppid(),), name="samg-server-watch", daemon=True).start()
        check_backend_arrays(pb_utils)
        config = json.loads(args["model_config"])
        model_dir = Path(args["model_repository"]) / str(args["model_version"])
        settings = model_settings(config.get("parameters") or {}, model_dir)
        self.mode = settings["mode"]
        self.batched = int(config.get("max_batch_size") or 0) > 0  # Triton's batching: inputs [batch, 1]
        self.pipe = load(settings["export_dir"], backend=settings["backend"], device=settings["device"],
                         max_batch_size=settings["max_batch_size"], max_queue=settings["max_queue"])
        self.output = image_output_name(self.pipe.export.latent.is_video)
        self._send_lock = threading.Lock()
        self._rejected = self._busy = 0  # requests answered bad / "server busy" (counted under _send_lock)
        self.logger = pb_utils.Logger
        self.metrics = None
        try:
            self.metrics = _Metrics(pb_utils, self.stats, {"model": args["model_name"],
                                                           "version": str(args["model_version"])})
        except Exception as exc:  # a backend without custom metrics still serves
            self.logger.log_warn(f"samg: custom metrics unavailable: {exc}")

    # -- requests -------------------------------------------------------------------------------
    def _inputs(self, request: Any) -> dict[str, np.ndarray]:
        tensors = {}
        for name in INPUT_NAMES:
            tensor = self.pb.get_input_tensor_by_name(request, name)
            if tensor is not None:
                tensors[name] = tensor.as_numpy().copy()  # the request's memory goes when it is answered
        return tensors

    def _submit(self, request: Any) -> list:
        """The futures of one request's rows (all rows checked before any starts); SamgError for a
        bad request, PipelineBusy past max_queue."""
        rows = parse_request(self._inputs(request), batched=self.batched)
        cancel = {} if self.batched else {"is_cancelled": request.is_cancelled}  # one client per request
        return self.pipe.submit_many([dict(output_type="np", **cancel, **row) for row in rows])

    def stats(self) -> dict[str, Any]:
        """pipe.stats() and the requests this model refused (bad, or busy)."""
        with self._send_lock:
            rejected, busy = self._rejected, self._busy
        return {**self.pipe.stats(), "requests_rejected": rejected, "requests_busy": busy}

    def _error(self, exc: BaseException, *, rejected: bool = False) -> Any:
        """The error response for `exc`; `rejected`: raised while checking the request."""
        errors = self.pb.TritonError
        if isinstance(exc, PipelineBusy):
            with self._send_lock:
                self._busy += 1
            # the message starts "busy: ...": "server busy: ..." to the client
            return self.pb.InferenceResponse(error=errors(f"server {exc}", errors.UNAVAILABLE))
        if isinstance(exc, RequestCancelled):
            return self.pb.InferenceResponse(error=errors(str(exc), errors.CANCELLED))
        if isinstance(exc, SamgError):
            if rejected:
                with self._send_lock:
                    self._rejected += 1
            return self.pb.InferenceResponse(error=self.pb.TritonError(str(exc), self.pb.TritonError.INVALID_ARG))
        self.logger.log_error("samg: " + "".join(traceback.format_exception(exc)))
        return self.pb.InferenceResponse(error=self.pb.TritonError(f"internal error: {exc!r}"))

    def _response(self, outputs: list) -> Any:
        pb = self.pb
        images = [o.frames if o.frames is not None else o.images for o in outputs]
        pixels = np.concatenate(images) if self.batched else images[0][0]
        seeds = np.array([[s] for o in outputs for s in o.seeds] if self.batched else [outputs[0].seeds[0]], np.int64)
        return pb.InferenceResponse(output_tensors=[
            pb.Tensor(self.output, np.ascontiguousarray(pixels, np.uint8)),
            pb.Tensor(SEED_OUTPUT, seeds),
        ])

    def _answer(self, futures: list) -> Any:
        try:
            return self._response([f.result() for f in futures])
        except BaseException as exc:
            return self._error(exc)

    def execute(self, requests: list) -> list | None:
        if self.mode != "continuous":  # the whole batch to completion before the next one
            pending = []
            for request in requests:
                try:
                    pending.append(self._submit(request))
                except BaseException as exc:
                    pending.append(exc)
            return [self._error(p, rejected=True) if isinstance(p, BaseException) else self._answer(p) for p in pending]
        for request in requests:
            sender = request.get_response_sender()
            try:
                futures = self._submit(request)
            except BaseException as exc:
                self._send(sender, self._error(exc, rejected=True))
                continue
            future = futures[0]  # unbatched: one row
            future.add_done_callback(lambda f, sender=sender: self._send(sender, self._answer([f])))
        return None

    def _send(self, sender: Any, response: Any) -> None:
        with self._send_lock:
            try:
                sender.send(response, flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception as exc:  # the client went away or the server is stopping
                self.logger.log_warn(f"samg: could not send a response: {exc}")

    def finalize(self) -> None:
        if self.metrics is not None:  # first: no metric message may be in flight while the model goes
            self.metrics.close()
        self.pipe.close(timeout=FINALIZE_TIMEOUT_S)
