"""Continuous batching of denoiser steps across concurrent generations.

Each generation (a request) runs its own plain sampler (samg.runtime.samplers) with its own
GuidedDenoiser (its own rule state, scales, schedule and conditioning) in its own thread. Only the
denoiser graph call is shared: the GuidedDenoiser's runner is a `RequestRunner` from
`BatchingEngine.request()`, whose `run(feeds)` queues this step's feeds and blocks until the
engine's scheduler thread has run ONE denoiser call on the waiting steps of all requests together,
then returns this request's slice of the outputs. Requests join at the next call after they start
and leave when they finish; nothing else changes for the sampler.

A combined call (the denoiser contract, docs/architecture.md "Export folder"): inputs with B rows
(latents, the per-sample timestep and guidance_scales) are concatenated in request order;
conditioning inputs with 2B rows (negatives first) are laid out uncond-first for the whole call:
every request's negative rows, then every request's prompt rows, in the same order. Outputs
([B, ...]) are sliced back by the same offsets. Each sample's output depends only on its own rows
(the graphs' ops work per sample), so a step gives what it gives alone: bit-identical with ONNX
Runtime on CPU for samg-digits and a tiny SDXL export (tests/test_batching.py).

When a call fires (the policy), with the scheduler idle:
  - every active request has a step waiting (a request is active inside `with engine.request()`;
    samg.api enters it before encoding the prompt, so requests submitted together take their
    first step together), or
  - the waiting steps fill max_batch_size images, or
  - the oldest waiting step has waited max_wait_s since the scheduler was last free: a request busy
    between steps (host-side guidance, a thread the OS did not run) stalls the others no longer.
The call takes the oldest waiting step and, in arrival order, every other waiting step with the
same input shapes while the images fit in max_batch_size; the rest wait for the next call (steps of
another size never share a call). A request with more images than max_batch_size is refused up
front (`check_fits`), not split: it would wait alone anyway and splitting buys nothing.

Failures: a request whose values go non-finite raises SamgError in its own thread (the samplers
check every step) and leaves; the others go on. An error of a combined call itself (the runner
raising, or returning outputs without one row per image) reaches every request in that call, and
the scheduler goes on with the next. Should the scheduler thread itself ever stop, every waiting
and later step fails with the reason instead of waiting forever. `close(timeout)` is bounded: steps
of requests still running after it fail ("closed before this request finished").
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from samg.errors import SamgError
from samg.runners.base import Runner

# How long a waiting step may wait for the other active requests' steps (see the policy above):
# a few ms is far below one denoiser call on any real model, yet long enough for a request's
# host-side work between two steps.
DEFAULT_MAX_WAIT_S = 0.005
LATENCY_WINDOW = 1000  # the most recent call latencies kept for stats()
LATENTS_INPUT = "latents"  # the denoiser input whose rows are the step's images (the contract's name)
# After close()'s wait, how long the scheduler thread may take to notice the stop (a runner call
# that never returns is abandoned: the thread is a daemon).
STOP_JOIN_S = 5.0


class RequestCancelled(SamgError):
    """The request's is_cancelled() turned true (its client went away): it stopped before its next step."""


@dataclass(eq=False)
class _Step:
    """One request's pending denoiser call."""

    feeds: dict[str, Any]
    images: int  # rows of `latents`
    paired: frozenset[str]  # inputs with 2 x images rows (conditioning, negatives first)
    shapes: tuple  # per input (name, shape past the batch, dtype): steps share a call only when equal
    since: float  # time.monotonic() when queued
    done: threading.Event = field(default_factory=threading.Event)
    outputs: dict[str, Any] | None = None
    error: BaseException | None = None


def _step(feeds: dict[str, Any]) -> _Step:
    images = int(feeds[LATENTS_INPUT].shape[0])
    paired, shapes = set(), []
    for name, value in feeds.items():
        rows = int(value.shape[0])
        if rows == 2 * images:
            paired.add(name)
        elif rows != images:  # a caller's bug, not a user's mistake
            raise ValueError(f"denoiser input {name!r} has {rows} rows for {images} latents: "
                             f"the contract says {images} or {2 * images}")
        shapes.append((name, tuple(value.shape[1:]), str(value.dtype)))
    return _Step(feeds, images, frozenset(paired), tuple(shapes), time.monotonic())


def combine_feeds(steps: list[_Step]) -> dict[str, Any]:
    """One call's feeds from several steps: B-row inputs concatenated in order, 2B-row conditioning
    as every step's negative rows, then every step's prompt rows (uncond-first for the whole call)."""
    if len(steps) == 1:
        return steps[0].feeds
    out = {}
    for name in steps[0].feeds:
        parts = [s.feeds[name] for s in steps]
        if name in steps[0].paired:
            parts = [p[:s.images] for p, s in zip(parts, steps)] + [p[s.images:] for p, s in zip(parts, steps)]
        out[name] = np.concatenate(parts)
    return out


def split_outputs(outputs: Any, images: list[int]) -> list[dict[str, Any]]:
    """Each step's rows of one call's outputs ([sum(images), ...] each); RuntimeError naming the
    output when the runner did not return one row per image (slicing a short output would hand the
    last requests short or empty results without a word)."""
    total = sum(images)
    if not isinstance(outputs, dict):
        raise RuntimeError(f"the denoiser runner returned {type(outputs).__name__}, not a dict of outputs")
    for name, value in outputs.items():
        shape = list(getattr(value, "shape", None) or [])
        if shape[:1] != [total]:
            raise RuntimeError(f"the denoiser runner returned output {name!r} with shape {shape} for a call of "
                               f"{total} images: one row per image expected")
    ends = np.cumsum(images)
    return [{name: value[end - n:end] for name, value in outputs.items()} for n, end in zip(images, ends)]


class RequestRunner:
    """The Runner one request's GuidedDenoiser calls: each `run` is one step, batched with the
    waiting steps of the other requests. `is_cancelled` (a callable) is asked before every step."""

    def __init__(self, engine: "BatchingEngine", is_cancelled: Callable[[], bool] | None = None):
        self._engine = engine
        self._is_cancelled = is_cancelled
        self.input_names = list(engine.runner.input_names)
        self.output_names = list(engine.runner.output_names)

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        if self._is_cancelled is not None and self._is_cancelled():
            raise RequestCancelled("the request was cancelled (its client went away)")
        return self._engine.run_step(feeds)


class BatchingEngine:
    """Runs the denoiser steps of concurrent requests as shared calls (see the module docstring).
    Thread-safe: any number of threads may hold a request at once."""

    def __init__(self, runner: Runner, *, max_batch_size: int = 8, max_wait_s: float = DEFAULT_MAX_WAIT_S):
        self.runner = runner
        self.max_batch_size = int(max_batch_size)
        self.max_wait_s = float(max_wait_s)
        self._cond = threading.Condition()
        self._waiting: list[_Step] = []  # in arrival order
        self._active = 0  # requests inside request()
        self._free_since = time.monotonic()  # when the scheduler last finished a call
        self._closed = False
        self._stopped: str | None = None  # why the scheduler stopped: every step fails with it
        self._running: list[_Step] = []  # the steps of the call in progress
        # metrics, read by stats()
        self._batch_sizes: Counter[int] = Counter()  # images per call -> calls
        self._requests_per_call: Counter[int] = Counter()
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._thread = threading.Thread(target=self._serve, name="samg-batching", daemon=True)
        self._thread.start()

    # -- requests -------------------------------------------------------------------------------
    def check_fits(self, images: int) -> None:
        """SamgError when a request of `images` images could never fit one call."""
        if images > self.max_batch_size:
            raise SamgError(f"a request of {images} images is above max_batch_size {self.max_batch_size}: ask for "
                            f"at most {self.max_batch_size} images per request, or load with a larger max_batch_size")

    @contextmanager
    def request(self, is_cancelled: Callable[[], bool] | None = None) -> Iterator[RequestRunner]:
        """Register one generation for its sampling loop; its steps go through the runner yielded
        (RequestCancelled before a step once `is_cancelled()` is true)."""
        with self._cond:
            if self._closed:
                raise SamgError("this pipeline is closed: load it again to run more requests")
            if self._stopped is not None:
                raise SamgError(self._stopped)
            self._active += 1
        try:
            yield RequestRunner(self, is_cancelled)
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()  # the others may all be waiting now

    def run_step(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """Queue one step and block until a shared call has run it; this step's outputs."""
        step = _step(feeds)
        self.check_fits(step.images)
        with self._cond:
            if self._stopped is not None:
                raise SamgError(self._stopped)
            self._waiting.append(step)
            self._cond.notify_all()
        step.done.wait()  # set by the call that runs it, or by _stop
        if step.error is not None:  # a fresh exception per request: one object raised in several threads would share a traceback
            err = step.error
            if isinstance(err, SamgError):
                raise type(err)(str(err)) from err
            raise RuntimeError(f"the batched denoiser call failed: {type(err).__name__}: {err}") from err
        assert step.outputs is not None
        return step.outputs

    # -- the scheduler --------------------------------------------------------------------------
    def _deadline(self) -> float:
        return max(self._waiting[0].since, self._free_since) + self.max_wait_s

    def _take_call(self) -> list[_Step] | None:
        """The steps of the next call if one is due (the policy in the module docstring), else None."""
        if not self._waiting:
            return None
        due = (len(self._waiting) >= self._active
               or sum(s.images for s in self._waiting) >= self.max_batch_size
               or time.monotonic() >= self._deadline())
        if not due:
            return None
        first, call, images = self._waiting[0], [], 0
        for s in self._waiting:
            if s.shapes == first.shapes and images + s.images <= self.max_batch_size:
                call.append(s)
                images += s.images
        self._waiting = [s for s in self._waiting if s not in call]
        return call

    def _serve(self) -> None:
        reason = "the batching engine stopped: load the pipeline again"
        try:
            while True:
                with self._cond:
                    call = self._take_call()
                    while call is None:
                        if self._stopped is not None or (self._closed and not self._active and not self._waiting):
                            return
                        timeout = max(0.0, self._deadline() - time.monotonic()) if self._waiting else None
                        self._cond.wait(timeout)
                        call = self._take_call()
                    self._running = call
                self._run_call(call)
        except BaseException as exc:  # a bug of the engine itself: named to every request, never a silent hang
            reason = f"the batching engine stopped on an internal error ({type(exc).__name__}: {exc}): load the pipeline again"
            raise
        finally:
            self._stop(reason)

    def _run_call(self, call: list[_Step]) -> None:
        """One denoiser call for `call`'s steps; each step gets its rows, or the call's error."""
        start = time.perf_counter()
        try:
            results = [(out, None) for out in split_outputs(self.runner.run(combine_feeds(call)),
                                                              [s.images for s in call])]
        except BaseException as exc:  # handed to the requests of this call; the scheduler goes on
            results = [(None, exc)] * len(call)
        latency = time.perf_counter() - start
        with self._cond:
            self._free_since = time.monotonic()
            self._batch_sizes[sum(s.images for s in call)] += 1
            self._requests_per_call[len(call)] += 1
            self._latencies.append(latency)
            self._running = []
            for s, (outputs, error) in zip(call, results):
                if not s.done.is_set():  # not failed by _stop meanwhile
                    s.outputs, s.error = outputs, error
                    s.done.set()

    def _stop(self, reason: str) -> None:
        """From now on every step fails with `reason`: those waiting, the call in progress, later ones."""
        with self._cond:
            if self._stopped is None:
                self._stopped = reason
            for s in self._waiting + self._running:
                if not s.done.is_set():
                    s.error = SamgError(self._stopped)
                    s.done.set()
            self._waiting = []
            self._cond.notify_all()

    # -- metrics and shutdown -------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """batch_sizes ({images per call: calls}), requests_per_call (likewise), denoiser_calls,
        waiting_steps and sampling (requests in their sampling loop) now, and step_latency_s over
        the last LATENCY_WINDOW calls (count, mean, p50, p90, max, last; None before any call)."""
        with self._cond:
            latencies = np.array(self._latencies)
            stats = {
                "batch_sizes": dict(sorted(self._batch_sizes.items())),
                "requests_per_call": dict(sorted(self._requests_per_call.items())),
                "denoiser_calls": sum(self._batch_sizes.values()),
                "waiting_steps": len(self._waiting),
                "sampling": self._active,
            }
        stats["step_latency_s"] = None if not latencies.size else {
            "count": int(latencies.size), "mean": float(latencies.mean()),
            "p50": float(np.percentile(latencies, 50)), "p90": float(np.percentile(latencies, 90)),
            "max": float(latencies.max()), "last": float(latencies[-1]),
        }
        return stats

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, let the active ones finish (for up to `timeout` seconds; None: no
        bound), then stop the scheduler thread. Steps still to run after the timeout fail with
        "closed before this request finished"."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._stop("the pipeline was closed before this request finished")
            self._thread.join(STOP_JOIN_S)
