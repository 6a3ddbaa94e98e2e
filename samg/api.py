"""samg's Python serving API: diffusers' call conventions over an export folder, with every
request's denoiser steps batched with the other requests' in flight (samg.runtime.batching).

    import samg
    with samg.load("exports/sdxl", max_batch_size=8) as pipe:
        out = pipe(["a red fox", "a blue bird"], guidance=["samg", "cfg"], guidance_scale=[7.5, 5.0], seed=[1, 2])
        out.images, out.seeds, out.timings          # 2 PIL images, the seeds used, per-stage seconds
        future = pipe.submit(prompt="a cat", output_type="np")   # concurrent.futures.Future[SamgOutput]
        pipe.stats()                                 # batch sizes, queue depth, step latency, ...

Every request runs its own sampler with its own guidance state in a worker thread; text encoding
and VAE decoding happen there too, one request at a time per graph (not every backend's runner is
thread-safe). A request's result does not depend on what it was batched with: bit for bit with
ONNX Runtime on CPU (measured; GPU kernels may round a larger batch differently in the last bits),
docs/architecture.md, "Serving API and continuous batching".

Backpressure: at most `max_queue` requests wait for a worker; past that a submission fails at once
with PipelineBusy ("busy: ..."), which a server answers as "unavailable, retry". A request may
carry `is_cancelled` (a callable, e.g. a server's client-gone check): it is asked before the
request starts and before each of its steps, and stops it with RequestCancelled.

Keyword names and errors are the API's: a bad `guidance_scale=` is reported as `guidance_scale=`,
not as the CLI's `--scale`; `api_wording` is the one place that maps the CLI's wording.
"""

from __future__ import annotations

import math
import re
import secrets
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from samg.contract import ENGINES_DIR, Export
from samg.errors import SamgError, require
from samg.guidance.registry import DEFAULT_GUIDANCE_SCALE, RULES, SPATIAL_RULES
from samg.runtime import samplers
from samg.runtime.batching import DEFAULT_MAX_WAIT_S, LATENTS_INPUT, BatchingEngine, RequestCancelled
from samg.runtime.denoiser import SCFG_RULE
from samg.runtime.pipeline import DEFAULT_STEPS, MAX_IMAGES_PER_CALL, Pipeline, Request

OUTPUT_TYPES = ("pil", "np", "latent")
# Worker threads per image of max_batch_size: a full batch sampling while as many requests encode
# their prompts or decode their latents.
WORKERS_PER_BATCH_SLOT = 2
MAX_WAIT_MS_LIMIT = 1000.0  # a longer wait would only slow every request down
# Requests that may wait for a worker before submissions are refused (PipelineBusy): a backlog
# beyond this only grows every request's latency; clients should retry or go to another replica.
DEFAULT_MAX_QUEUE = 64
# close() waits this long for the requests already submitted; those still running then fail.
DEFAULT_CLOSE_TIMEOUT_S = 600.0
# Random seeds are drawn below 2^63 (any seed below SEED_LIMIT works when given): a drawn seed must
# fit a signed 64-bit integer, the server's INT64 `seed` output (and numpy's int64).
RANDOM_SEED_LIMIT = 2**63

# The CLI flags Pipeline.plan and the rules name in their errors -> the API's keywords.
CLI_FLAG_KEYWORDS = {
    "--prompt": "prompt", "--negative-prompt": "negative_prompt", "--guidance": "guidance",
    "--scale": "guidance_scale", "--w-max": "guidance_scale", "--w-min": "guidance_min",
    "--schedule": "guidance_schedule", "--steps": "num_inference_steps", "--sampler": "sampler",
    "--karras": "karras", "--seed": "seed", "--height": "height", "--width": "width", "--frames": "num_frames",
    "--num-images": "num_images_per_prompt", "--max-batch-size": "max_batch_size",
}
_CHOICE_KEYWORDS = ("guidance", "sampler", "guidance_schedule")  # their values are names: quoted in the API
# a flag, and its value when one follows (a number, a quoted text, a placeholder W/N, or a name); flags
# of `samg export` (after "re-export with" or inside `samg export ...`) are not this API's and stay
_FLAG = re.compile(r'(?<!re-export with )(?<!samg export )(?<![\w-])(--[a-z][a-z0-9-]*)'
                   r'(?:(\s+)("[^"]*"|-?\d[\w.+-]*|[A-Z]\b|[a-z][\w-]*))?')


def api_wording(message: str) -> str:
    """A runtime error message with the CLI's flags (--scale 7.5) as the API's keywords
    (guidance_scale=7.5); the one place that translates."""
    def keyword(m: re.Match) -> str:
        flag, space, value = m.groups()
        name = CLI_FLAG_KEYWORDS.get(flag)
        if name is None:
            return m.group(0)
        if name == "karras":  # a switch on the CLI
            return "karras=True" + (space + value if value else "")
        if value is None:
            return f"{name}="
        if value[0].isalpha() and len(value) > 1 and name not in _CHOICE_KEYWORDS:  # a word of the sentence
            return f"{name}={space}{value}"
        return f'{name}="{value}"' if name in _CHOICE_KEYWORDS and value[0] != '"' else f"{name}={value}"

    return _FLAG.sub(keyword, message)


class PipelineBusy(SamgError):
    """max_queue requests already wait for a worker: retry later (a server answers "unavailable")."""


@contextmanager
def _api_errors(prefix: str = "") -> Iterator[None]:
    """SamgErrors raised inside, reworded for the API (and prefixed, e.g. with the prompt's index)."""
    try:
        yield
    except SamgError as exc:  # of the same class: a caller may tell PipelineBusy or RequestCancelled apart
        raise type(exc)(prefix + api_wording(str(exc))) from None


@dataclass
class SamgOutput:
    """What a call returns. Image models fill `images`, video models `frames`:
    output_type "pil": a list of PIL images (video: a list of frame lists), "np": uint8
    [N, H, W, 3] (video [N, F, H, W, 3]), "latent": the final model-space latents [N, ...].
    Arrays of several sizes (a per-prompt height=) come as a list of one array per image.
    `seeds` and `timings` have one entry per prompt; a timing holds seconds per stage: queue (before
    a worker took it), encode, denoise, decode, total."""

    images: Any = None
    frames: Any = None
    seeds: list[int] = field(default_factory=list)
    timings: list[dict[str, float]] = field(default_factory=list)

    @staticmethod
    def concatenate(outputs: list["SamgOutput"]) -> "SamgOutput":
        """One output for several requests, in order. Arrays of different sizes (a per-prompt
        height=) cannot stack: they become a list with one array per image."""
        def join(values):
            if values[0] is None:
                return None
            if not isinstance(values[0], np.ndarray):
                return [v for vs in values for v in vs]
            if len({v.shape[1:] for v in values}) == 1:
                return np.concatenate(values)
            return [image for v in values for image in v]

        return SamgOutput(join([o.images for o in outputs]), join([o.frames for o in outputs]),
                          [s for o in outputs for s in o.seeds], [t for o in outputs for t in o.timings])


@dataclass
class _Job:
    request: Request
    noise: np.ndarray | None  # the checked latents= argument; None: drawn from the seed by the worker
    output_type: str
    submitted: float  # time.perf_counter()
    is_cancelled: Callable[[], bool] | None = None


def _text(name: str, value: Any, *, optional: bool = False) -> Any:
    if value is None and optional:
        return value
    if not isinstance(value, str):
        raise SamgError(f"{name}= must be a name (text), got {type(value).__name__}: e.g. {name}=\"...\"")
    return value


class SamgPipeline:
    """An export folder ready to serve: `pipe(prompt, ...)`, `pipe.submit(prompt=..., ...)`,
    `pipe.stats()`, `pipe.close()` (or `with samg.load(...) as pipe:`).

    Thread-safe: any number of threads may call `pipe(...)` and `pipe.submit(...)` at once. Every
    request runs in a worker thread with its own sampler and guidance state (APG's momentum
    included); its denoiser steps share graph calls with the other requests in flight, up to
    `max_batch_size` images per call, and it gives what it gives alone (same seed, same result;
    see the module docstring on exactness). At most `max_queue` requests wait for a worker
    (PipelineBusy beyond)."""

    def __init__(self, pipeline: Pipeline, *, max_batch_size: int = 8, max_wait_s: float = DEFAULT_MAX_WAIT_S,
                 max_concurrent_requests: int | None = None, max_queue: int = DEFAULT_MAX_QUEUE):
        self.pipeline = pipeline
        self.engine = BatchingEngine(pipeline.runners["denoiser"], max_batch_size=max_batch_size, max_wait_s=max_wait_s)
        self._workers = max_concurrent_requests or WORKERS_PER_BATCH_SLOT * max_batch_size
        self._executor = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="samg-request")
        self._encode_lock, self._decode_lock = threading.Lock(), threading.Lock()
        self.max_queue = int(max_queue)
        self._lock = threading.Lock()  # guards the counters, _pending and _closed
        self._closed = False
        self._pending: set[Future] = set()  # submitted, not finished: what close() waits for
        self._queued = self._in_flight = self._done = self._failed = self._cancelled = 0

    @property
    def export(self) -> Export:
        return self.pipeline.export

    def default_request(self) -> dict[str, Any]:
        """This export's defaults for the keywords of a call."""
        export, latent = self.export, self.export.latent
        return {
            "guidance": export.combine.rules[0] if export.combine is not None else "samg",
            "guidance_scale": DEFAULT_GUIDANCE_SCALE, "guidance_min": None, "guidance_schedule": "constant",
            "num_inference_steps": DEFAULT_STEPS,
            "sampler": samplers.default_sampler(export.prediction_type),
            "height": latent.height, "width": latent.width, "num_frames": latent.frames if latent.is_video else None,
            "num_images_per_prompt": 1, "output_type": "pil",
        }

    # -- calls ----------------------------------------------------------------------------------
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                 guidance: str | list[str] | None = None, guidance_scale: float | list[float] | None = None,
                 guidance_min: float | list[float] | None = None, num_inference_steps: int | list[int] = DEFAULT_STEPS,
                 sampler: str | list[str] | None = None, seed: int | list[int] | None = None,
                 height: int | list[int] | None = None, width: int | list[int] | None = None,
                 num_frames: int | list[int] | None = None, latents: np.ndarray | list[np.ndarray] | None = None,
                 output_type: str = "pil", num_images_per_prompt: int | list[int] = 1,
                 guidance_options: dict | list[dict] | None = None, guidance_schedule: str | list[str] = "constant",
                 karras: bool | list[bool] = False, progress: bool = False) -> SamgOutput:
        """Generate for one prompt or a list of prompts, all in one batch.

        guidance: a rule name (samg.guidance.RULES; default: samg, scfg on an S-CFG export).
        guidance_scale: the scale (default 7.5); for SAMG's spatial rules the largest, w_max.
        guidance_min: SAMG's w_min (spatial rules only); None takes (1 + guidance_scale) / 2, as the CLI.
        guidance_options: the rule's own parameters (e.g. {"momentum": -0.5} for apg).
        guidance_schedule: per-step guidance weight (samg.guidance.SCHEDULES).
        seed: None draws a random seed (reported in .seeds). latents: the starting noise instead of
        the seeded one ([images, ...] for one prompt; for several, one array per prompt or all of
        them stacked). Every keyword but output_type and progress takes a list (one value per
        prompt) or a single value for all prompts. progress: a bar of finished prompts."""
        options = dict(negative_prompt=negative_prompt, guidance=guidance, guidance_scale=guidance_scale,
                       guidance_min=guidance_min, num_inference_steps=num_inference_steps, sampler=sampler, seed=seed,
                       height=height, width=width, num_frames=num_frames, num_images_per_prompt=num_images_per_prompt,
                       guidance_options=guidance_options, guidance_schedule=guidance_schedule, karras=karras)
        prompts = self._prompts(prompt)
        per_prompt = self._per_prompt(len(prompts), options)
        latents_per_prompt = self._split_latents(latents, per_prompt)
        jobs = []
        for i, (text, one, lat) in enumerate(zip(prompts, per_prompt, latents_per_prompt)):
            with _api_errors(f"prompt[{i}]: " if len(prompts) > 1 else ""):
                jobs.append(self._job(text, output_type=output_type, latents=lat, **one))
        total = sum(job.request.num_images for job in jobs)
        if total > MAX_IMAGES_PER_CALL:
            raise SamgError(f"this call asks for {total} images, above the limit of {MAX_IMAGES_PER_CALL} per call: "
                            "split the prompts over several calls")
        futures = self._start(jobs)  # all submitted (or none) before any is awaited: one batch
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(futures), desc="generating", unit="prompt", leave=False)
            for f in futures:
                f.add_done_callback(lambda _: bar.update())
        try:
            results, failure = [], None
            for i, f in enumerate(futures):  # every request finishes before the call returns or raises
                try:
                    results.append(f.result())
                except SamgError as exc:
                    failure = failure or SamgError(f"prompt[{i}]: {exc}" if len(futures) > 1 else str(exc))
                except Exception as exc:  # an internal error: raised as it is, after the others finish
                    failure = failure or exc
            if failure is not None:
                raise failure
            return SamgOutput.concatenate(results)
        finally:
            if bar is not None:
                bar.close()

    def submit(self, prompt: str, **options: Any) -> "Future[SamgOutput]":
        """One request (the keywords of __call__, single values) without waiting: a Future of its
        SamgOutput. Arguments are checked now (a SamgError raised here; PipelineBusy when max_queue
        requests already wait); failures while generating (e.g. values going non-finite) are the
        Future's exception. is_cancelled: a callable asked before the request starts and before
        each step; once true, the request stops with RequestCancelled."""
        return self.submit_many([{"prompt": prompt, **options}])[0]

    def submit_many(self, requests: list[dict[str, Any]]) -> "list[Future[SamgOutput]]":
        """Several requests (each a dict of submit's keywords, prompt included), all checked before
        any starts: every one is submitted, or none is (a SamgError, "request[i]: ..." for the first
        bad one)."""
        jobs = []
        for i, options in enumerate(requests):
            with _api_errors(f"request[{i}]: " if len(requests) > 1 else ""):
                jobs.append(self._submitted_job(**options))
        return self._start(jobs)

    def _submitted_job(self, prompt: Any = None, **options: Any) -> _Job:
        unknown = sorted(set(options) - set(_REQUEST_KEYWORDS) - {"output_type", "latents", "is_cancelled"})
        if unknown:
            raise SamgError(f"unknown keyword {', '.join(unknown)}: submit takes prompt and "
                            f"{', '.join(_REQUEST_KEYWORDS)}, output_type, latents, is_cancelled")
        text = self._prompts(prompt)
        if len(text) != 1:
            raise SamgError("submit takes one prompt: call submit once per prompt, or pipe([...]) for a list")
        for name, value in options.items():
            if isinstance(value, (list, tuple)):
                raise SamgError(f"{name}= takes one value in submit (one request): call pipe([...]) for lists")
        is_cancelled = options.pop("is_cancelled", None)
        if is_cancelled is not None and not callable(is_cancelled):
            raise SamgError(f"is_cancelled= must be a callable returning True once the request should stop, got "
                            f"{type(is_cancelled).__name__}")
        job = self._job(text[0], **options)
        job.is_cancelled = is_cancelled
        return job

    # -- requests -------------------------------------------------------------------------------
    @staticmethod
    def _prompts(prompt: Any) -> list[str]:
        if isinstance(prompt, str):
            return [prompt]
        if not isinstance(prompt, (list, tuple)):
            raise SamgError(f"prompt= must be text or a list of texts, got {type(prompt).__name__}: e.g. prompt=\"a cat\"")
        if not prompt:
            raise SamgError("prompt= is an empty list: pass at least one prompt")
        return list(prompt)

    @staticmethod
    def _per_prompt(n: int, options: dict[str, Any]) -> list[dict[str, Any]]:
        """One keyword dict per prompt: a list gives one value per prompt, anything else is shared."""
        columns = {}
        for name, value in options.items():
            if isinstance(value, np.ndarray) and value.ndim == 1:  # e.g. guidance_scale=np.linspace(...)
                value = value.tolist()
            if isinstance(value, (list, tuple)):
                if len(value) != n:
                    raise SamgError(f"{name}= has {len(value)} values for {n} prompt{'s' * (n != 1)}: pass one value "
                                    "per prompt, or a single value for all")
                columns[name] = list(value)
            else:
                columns[name] = [value] * n
        return [{name: column[i] for name, column in columns.items()} for i in range(n)]

    @staticmethod
    def _split_latents(latents: Any, per_prompt: list[dict[str, Any]]) -> list[Any]:
        n = len(per_prompt)
        if latents is None:
            return [None] * n
        if isinstance(latents, (list, tuple)):
            if len(latents) != n:
                raise SamgError(f"latents= has {len(latents)} arrays for {n} prompts: pass one per prompt")
            return list(latents)
        if n == 1:
            return [latents]
        counts = [one["num_images_per_prompt"] for one in per_prompt]
        if not all(isinstance(c, (int, np.integer)) and c >= 1 for c in counts):
            return [None] * n  # plan() refuses the count itself, naming it
        arr = np.asarray(latents)
        if arr.ndim == 0 or arr.shape[0] != sum(counts):
            raise SamgError(f"latents= has shape {list(arr.shape)}, {sum(counts)} images along the first axis are "
                            f"needed for {n} prompts: stack one [images, ...] array per prompt, or pass a list of them")
        return np.split(arr, np.cumsum(counts)[:-1])

    def _job(self, prompt: str, *, negative_prompt=None, guidance=None, guidance_scale=None, guidance_min=None,
             num_inference_steps=DEFAULT_STEPS, sampler=None, seed=None, height=None, width=None, num_frames=None,
             num_images_per_prompt=1, guidance_options=None, guidance_schedule="constant", karras=False,
             latents=None, output_type="pil") -> _Job:
        """One request checked against the export (Pipeline.plan, errors in the API's words)."""
        with _api_errors():
            if output_type not in OUTPUT_TYPES:
                raise SamgError(f"output_type= must be one of {', '.join(map(repr, OUTPUT_TYPES))}, got {output_type!r}")
            rule = _text("guidance", guidance, optional=True) or self.default_request()["guidance"]
            _text("sampler", sampler, optional=True)
            _text("guidance_schedule", guidance_schedule)
            if guidance_options is not None and not isinstance(guidance_options, dict):
                raise SamgError(f"guidance_options= must be a dict of the rule's parameters, got "
                                f"{type(guidance_options).__name__}: e.g. guidance_options={{\"momentum\": -0.5}}")
            if not isinstance(karras, (bool, np.bool_)):
                raise SamgError(f"karras= must be True or False, got {karras!r}")
            if guidance_min is None:
                scales = dict(scale=guidance_scale)
            elif (rule in RULES or rule == SCFG_RULE) and rule not in SPATIAL_RULES:
                raise SamgError(f"guidance_min= applies to the spatial rules ({', '.join(SPATIAL_RULES)}), not to "
                                f"guidance={rule!r}: drop guidance_min= and pass guidance_scale= alone")
            else:
                scales = dict(w_min=guidance_min, w_max=DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale)
            if seed is None:
                seed = secrets.randbelow(RANDOM_SEED_LIMIT)
            negative = "" if negative_prompt is None else negative_prompt
            request = self.pipeline.plan(
                prompt, negative, guidance=rule, **scales, guidance_options=guidance_options, steps=num_inference_steps,
                sampler=sampler, karras=bool(karras), seed=seed, height=height, width=width, frames=num_frames,
                num_images=num_images_per_prompt, output="latents", schedule=guidance_schedule)
            self.engine.check_fits(request.num_images)
            noise = None if latents is None else self.pipeline.initial_noise(request, latents)
        return _Job(request, noise, output_type, time.perf_counter())

    def _start(self, jobs: list[_Job]) -> "list[Future[SamgOutput]]":
        """Submit every job or none (closed, or PipelineBusy past max_queue)."""
        with self._lock:
            if self._closed:
                raise SamgError("this pipeline is closed: samg.load(...) it again to run more requests")
            unfinished = self._queued + self._in_flight
            if unfinished + len(jobs) - self._workers > self.max_queue:  # more than max_queue without a worker
                raise PipelineBusy(f"busy: {max(0, unfinished - self._workers)} requests already wait for a worker, "
                                   f"{len(jobs)} more would pass max_queue={self.max_queue}: retry later, or load "
                                   "with a larger max_queue")
            self._queued += len(jobs)
            futures = [self._executor.submit(self._generate, job) for job in jobs]
            self._pending.update(futures)
        for future in futures:  # outside the lock: a finished future runs its callback at once
            future.add_done_callback(self._forget)
        return futures

    def _forget(self, future: Future) -> None:
        with self._lock:
            self._pending.discard(future)
            if future.cancelled():
                self._queued -= 1

    def _generate(self, job: _Job) -> SamgOutput:
        with self._lock:
            self._queued -= 1
            self._in_flight += 1
        try:
            with _api_errors():
                out = self._run(job)
        except BaseException as exc:
            with self._lock:
                self._in_flight -= 1
                if isinstance(exc, RequestCancelled):
                    self._cancelled += 1
                else:
                    self._failed += 1
            raise
        with self._lock:
            self._in_flight -= 1
            self._done += 1
        return out

    def _run(self, job: _Job) -> SamgOutput:
        """One request in its worker thread: encode, sample (batched), decode."""
        p, r = self.pipeline, job.request
        start = time.perf_counter()
        timings = {"queue": start - job.submitted}
        if job.is_cancelled is not None and job.is_cancelled():
            raise RequestCancelled("the request was cancelled (its client went away) before it started")
        # active from before encoding: requests submitted together take their first step together
        with self.engine.request(job.is_cancelled) as runner:
            with self._encode_lock:
                cond = p.conditioning(r.prompt, r.negative_prompt, r.num_images)
            timings["encode"] = time.perf_counter() - start
            start = time.perf_counter()
            noise = p.initial_noise(r) if job.noise is None else job.noise
            latents = p.sample(cond, noise, guidance=r.guidance, sampler=r.sampler, steps=r.steps, karras=r.karras,
                               rng=np.random.default_rng(r.seed), scale_schedule=r.scale_schedule, runner=runner)
        timings["denoise"] = time.perf_counter() - start
        start = time.perf_counter()
        if job.output_type == "latent":
            value = latents
        else:
            with self._decode_lock:
                value = p.decode(latents)
            if job.output_type == "pil":
                value = self._pil(value)
        timings["decode"] = time.perf_counter() - start
        timings["total"] = time.perf_counter() - job.submitted
        video = self.export.latent.is_video
        return SamgOutput(images=None if video else value, frames=value if video else None, seeds=[r.seed],
                          timings=[timings])

    def _pil(self, images: np.ndarray) -> list:
        image = require("PIL.Image", "to return PIL images (or pass output_type=\"np\")")
        if images.ndim == 5:  # video: [N, F, H, W, 3]
            return [[image.fromarray(frame) for frame in clip] for clip in images]
        return [image.fromarray(img) for img in images]

    # -- metrics and shutdown -------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """The engine's metrics (batch_sizes {images per denoiser call: calls}, requests_per_call,
        denoiser_calls, waiting_steps, sampling, step_latency_s) and the requests':
        queue_depth (submitted, waiting for a worker), in_flight (being worked on), requests_done,
        requests_failed, requests_cancelled."""
        stats = self.engine.stats()
        with self._lock:
            stats.update(queue_depth=self._queued, in_flight=self._in_flight, requests_done=self._done,
                         requests_failed=self._failed, requests_cancelled=self._cancelled)
        return stats

    def close(self, timeout: float | None = DEFAULT_CLOSE_TIMEOUT_S) -> None:
        """Refuse new requests and finish the ones already submitted, for up to `timeout` seconds
        (None: no bound); requests still running then fail ("closed before this request
        finished"). Then release the workers and the scheduler (idempotent)."""
        with self._lock:
            self._closed = True
            pending = list(self._pending)
        start = time.monotonic()
        wait(pending, timeout)
        self.engine.close(None if timeout is None else max(0.0, timeout - (time.monotonic() - start)))
        self._executor.shutdown(wait=False)  # a request still queued fails at once: the engine is closed

    def __enter__(self) -> "SamgPipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# The per-request keywords of __call__ and submit (output_type, latents and progress aside).
_REQUEST_KEYWORDS = ("negative_prompt", "guidance", "guidance_scale", "guidance_min", "num_inference_steps", "sampler",
                     "seed", "height", "width", "num_frames", "num_images_per_prompt", "guidance_options",
                     "guidance_schedule", "karras")


def engine_batch_limit(export_dir: str | Path) -> int | None:
    """The most latents one call of the export's denoiser TensorRT engine takes (its build
    record's `latents` profile), None when there is no engine (the runner names it missing)."""
    from samg.contract import read_engine_record, read_export

    export_dir = Path(export_dir)
    engine = export_dir / ENGINES_DIR / f"{Path(read_export(export_dir, verify=False).denoiser.file).stem}.engine"
    if not engine.is_file():
        return None
    profile = read_engine_record(engine).profiles.get(LATENTS_INPUT)
    return None if profile is None else int(profile["max"][0])


def check_engine_batch(export_dir: str | Path, max_batch_size: int) -> None:
    """Refuse a batch above the denoiser TensorRT engine's profile: a call above it would fail every
    request in it, under load. Worded for the CLI; `load` rewords it for the API."""
    limit = engine_batch_limit(export_dir)
    if limit is not None and max_batch_size > limit:
        raise SamgError(f"--max-batch-size {max_batch_size} is above the {limit} latents the denoiser's TensorRT "
                        f"engine takes (its profile): load with --max-batch-size {limit}, or rebuild the engine "
                        f"with `samg build DIR --dynamic --max batch={max_batch_size},...`")


def load(export_dir: str | Path, backend: str = "onnxruntime", device: str = "cpu", max_batch_size: int = 8, *,
         max_wait_ms: float = DEFAULT_MAX_WAIT_S * 1000, max_concurrent_requests: int | None = None,
         max_queue: int = DEFAULT_MAX_QUEUE, **runner_opts: Any) -> SamgPipeline:
    """An export folder (written by `samg export`) loaded for serving (see SamgPipeline).

    max_batch_size: the most images one denoiser call runs (with backend="tensorrt", at most the
    engine profile's batch). max_wait_ms: how long a waiting step waits for the other requests'
    steps before its call runs anyway (samg.runtime.batching). max_concurrent_requests: worker
    threads (default 2 x max_batch_size). max_queue: requests that may wait for a worker before
    submissions fail with PipelineBusy. runner_opts go to the backend (e.g. threads= for onnxruntime)."""
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, (int, np.integer)) \
            or not 1 <= max_batch_size <= MAX_IMAGES_PER_CALL:
        raise SamgError(f"max_batch_size= must be an integer in 1..{MAX_IMAGES_PER_CALL}, got {max_batch_size!r}: "
                        "e.g. max_batch_size=8")
    if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) \
            or not (math.isfinite(max_wait_ms) and 0 <= max_wait_ms <= MAX_WAIT_MS_LIMIT):
        raise SamgError(f"max_wait_ms= must be a number of milliseconds in 0..{MAX_WAIT_MS_LIMIT:g}, got {max_wait_ms!r}: "
                        "e.g. max_wait_ms=5")
    if max_concurrent_requests is not None and (isinstance(max_concurrent_requests, bool) or not isinstance(
            max_concurrent_requests, (int, np.integer)) or max_concurrent_requests < 1):
        raise SamgError(f"max_concurrent_requests= must be a positive integer, got {max_concurrent_requests!r}: "
                        f"e.g. max_concurrent_requests={2 * int(max_batch_size)}")
    if isinstance(max_queue, bool) or not isinstance(max_queue, (int, np.integer)) or max_queue < 0:
        raise SamgError(f"max_queue= must be an integer >= 0, got {max_queue!r}: e.g. max_queue={DEFAULT_MAX_QUEUE}")
    if backend == "tensorrt":
        with _api_errors():
            check_engine_batch(export_dir, max_batch_size)
    pipeline = Pipeline.load(export_dir, backend, device, **runner_opts)
    return SamgPipeline(pipeline, max_batch_size=int(max_batch_size), max_wait_s=max_wait_ms / 1000,
                        max_concurrent_requests=max_concurrent_requests, max_queue=int(max_queue))
