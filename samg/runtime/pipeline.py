"""Text-to-image/video over an export folder: tokenize, encode, sample, decode.

Everything model-specific comes from samg.json (docs/architecture.md, "Export folder"); the loop
has no per-model branches. Imports numpy, tokenizers and the chosen runner; never torch (unless
the torch backend is chosen).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from samg.contract import Export, FlowScheduler, TokenizerEntry, read_export
from samg.runners.base import Runner, open_runner
from samg.errors import SamgError, require
from samg.rng import SEED_LIMIT
from samg.runtime import samplers, schedules
from samg.guidance.registry import DEFAULT_GUIDANCE_SCALE, SPATIAL_RULES
from samg.runtime.denoiser import Guidance, GuidedDenoiser, check_guidance_for_export, host_rule_params

DEFAULT_STEPS = 30
# Bounds on one call, checked before anything is allocated (a typo such as --height 100000 must
# not allocate gigabytes). Generous for every supported family: SDXL at 1024x1024 is 65 536 latent
# elements per image, CogVideoX's 49 frames at 720x480 about 1.1 million. Steps are bounded by the
# model's own num_train_timesteps (diffusers refuses more).
MAX_IMAGE_SIDE = 8192  # pixels, for height and width each
MAX_FRAMES = 1024  # frames of one clip
MAX_IMAGES_PER_CALL = 64  # images (or clips) of one call
MAX_LATENT_ELEMENTS = 1 << 24  # all latents of one call together: 64 MiB of float32
# Sampling stops with an error once |latents| exceeds LATENT_BOUND_FACTOR x (1 + the schedule's
# largest sigma): far beyond what a sane model gives at any scale up to MAX_GUIDANCE_SCALE
# (starting noise is about 5 x sigma_max at most), reached only when the model output blows up.
LATENT_BOUND_FACTOR = 1e4


def latent_bound(sigmas: np.ndarray) -> float:
    """The |latents| beyond which sampling stops: LATENT_BOUND_FACTOR x (1 + the largest finite sigma)."""
    return LATENT_BOUND_FACTOR * (1.0 + float(sigmas[np.isfinite(sigmas)].max(initial=0.0)))


def check_prompt(flag: str, text: Any, *, required: bool = False) -> str:
    """`text` if it is a string that encodes as UTF-8 (and is non-empty when required)."""
    if not isinstance(text, str):
        raise SamgError(f"{flag} must be text, got {type(text).__name__}: pass {flag} \"...\"")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a shell argument with bytes that are not UTF-8 (e.g. $'\xff')
        bad = text[exc.start].encode("utf-8", "surrogateescape")
        raise SamgError(f"{flag} is not valid UTF-8 text (byte 0x{bad.hex()} at character {exc.start}): "
                        "pass the prompt as UTF-8") from None
    if required and not text.strip():
        raise SamgError(f"a prompt is required: pass {flag} \"...\"")
    return text


def check_count(flag: str, value: Any, lo: int, hi: int, example: int) -> int:
    """`value` as an int if it is an integer in [lo, hi], else a SamgError naming `flag` and the range."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise SamgError(f"{flag} must be an integer in {lo}..{hi}, got {value}: e.g. {flag} {example}")
    return int(value)


def resolve_scales(guidance: str, scale: float | None, w_min: float | None, w_max: float | None) -> tuple[float, float]:
    """(w_min, w_max) from the CLI's --scale / --w-min / --w-max.

    Spatial rules with only --scale W use w_min = (1 + W) / 2, w_max = W: full strength in flat
    regions, half the guidance (above 1) on high-energy detail; below W = 1 there is no guidance
    above 1 to halve, so w_min = w_max = W. Other rules take one scale."""
    from samg.guidance import check_scale

    if (w_min is None) != (w_max is None):
        raise SamgError("pass both --w-min and --w-max, or --scale alone")
    if w_min is not None:
        if scale is not None:
            raise SamgError("pass either --scale or --w-min/--w-max, not both")
        return check_scale("--w-min", w_min), check_scale("--w-max", w_max)
    # the user's own --scale is checked, not the pair derived from it (-5 would read "w-min above w-max")
    w = DEFAULT_GUIDANCE_SCALE if scale is None else check_scale("--scale", scale)
    if guidance in SPATIAL_RULES:
        return min((1.0 + w) / 2.0, w), w
    return w, w


OUTPUTS = ("uint8", "latents")


@dataclass(frozen=True)
class Request:
    """One call's arguments after Pipeline.plan checked them."""

    prompt: str
    negative_prompt: str
    guidance: Guidance
    scale_schedule: Callable[[int, float], tuple[float, float]] | None
    steps: int
    sampler: str
    karras: bool
    seed: int
    num_images: int
    shape: tuple[int, ...]  # latents of the whole call
    output: str


@dataclass
class Tokenizer:
    tokenizer: Any  # tokenizers.Tokenizer, padded and truncated to max_length
    input_name: str

    def __call__(self, prompts: list[str]) -> np.ndarray:
        return np.array([e.ids for e in self.tokenizer.encode_batch(prompts)], dtype=np.int64)


def _load_tokenizer(export_dir: Path, entry: TokenizerEntry) -> Tokenizer:
    tokenizers = require("tokenizers", "to tokenize prompts")
    path = export_dir / entry.file
    if not path.is_file():
        raise SamgError(f"tokenizer file missing: {path}: re-export the model")
    tok = tokenizers.Tokenizer.from_file(str(path))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if not 0 <= (entry.pad_id or 0) < vocab:  # the tokenizers library overflows on ids past 2**32
        raise SamgError(f"pad_id {entry.pad_id} for {entry.file} is not a token of its vocabulary (ids 0..{vocab - 1}): "
                        "re-export the model with `samg export`")
    tok.enable_truncation(max_length=entry.max_length)  # room for special tokens is kept by the library
    tok.enable_padding(length=entry.max_length, pad_id=entry.pad_id or 0)
    return Tokenizer(tok, entry.input_name)


def _check_text_encoder_names(export: Export, runner: Runner) -> None:
    """The tokenizers feed inputs, and the manifest reads outputs, that the loaded graph declares."""
    te = export.text_encoder
    for i, entry in enumerate(te.tokenizers):
        if entry.input_name not in runner.input_names:
            raise SamgError(f"text_encoder.tokenizers[{i}].input {entry.input_name!r} is not an input of {te.file} "
                            f"(it has {', '.join(runner.input_names)}): re-export the model with `samg export`")
    for name in te.outputs:
        if name not in runner.output_names:
            raise SamgError(f"text_encoder.outputs names {name!r}, not an output of {te.file} (it has "
                            f"{', '.join(runner.output_names)}): re-export the model with `samg export`")


class Pipeline:
    def __init__(self, export_dir: Path, export: Export, runners: dict[str, Runner], tokenizers: list[Tokenizer]):
        self.export_dir = export_dir
        self.export = export
        self.runners = runners
        self.tokenizers = tokenizers
        self.latent = export.latent
        self.prediction_type = export.prediction_type
        self.graph_loops = None  # the captured loops of `cuda_graph=True` generations, made on first use

    @classmethod
    def load(cls, export_dir: str | Path, backend: str = "onnxruntime", device: str = "cpu",
             **runner_opts) -> "Pipeline":
        export_dir = Path(export_dir)
        export = read_export(export_dir)  # validated, paths confined, files checked against their hashes
        graphs = {"text_encoder": export.text_encoder, "denoiser": export.denoiser, "vae": export.vae}
        runners = {role: open_runner(export_dir / g.file, backend, device, **runner_opts) for role, g in graphs.items()}
        toks = [_load_tokenizer(export_dir, e) for e in export.text_encoder.tokenizers]
        _check_text_encoder_names(export, runners["text_encoder"])
        return cls(export_dir, export, runners, toks)

    # -- stages ---------------------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """Conditioning tensors for N prompts, as the text encoder graph names them."""
        for text in prompts:
            check_prompt("a prompt", text)
        feeds = {t.input_name: t(prompts) for t in self.tokenizers}
        outs = self.runners["text_encoder"].run(feeds)
        return {name: np.asarray(outs[name], np.float32) for name in self.export.text_encoder.outputs}

    def conditioning(self, prompt: str, negative_prompt: str, batch: int) -> dict[str, np.ndarray]:
        """[2B, ...] per conditioning input: B copies of the negative, then B of the positive."""
        enc = self.conditioning_for([prompt], [negative_prompt])
        return {name: np.repeat(v, batch, axis=0) for name, v in enc.items()}

    def conditioning_for(self, prompts: list[str], negative_prompts: list[str]) -> dict[str, np.ndarray]:
        """[2N, ...] per conditioning input for N prompts: rows 0..N-1 the negative prompts, rows
        N..2N-1 the prompts, in order (the denoiser's uncond-first layout for a batch of N).

        Models trained with zeroed negative conditioning (SDXL: `force_zeros_for_empty_prompt`)
        get zeros for an empty negative prompt, as diffusers' pipelines do."""
        if len(prompts) != len(negative_prompts):
            raise SamgError(f"{len(prompts)} prompts and {len(negative_prompts)} negative prompts: pass one negative "
                            "prompt per prompt")
        n = len(prompts)
        enc = self.encode([*negative_prompts, *prompts])
        if self.export.text_encoder.force_zeros_for_empty_prompt:
            zero = np.array([not neg for neg in negative_prompts] + [False] * n)
            enc = {name: np.where(zero.reshape(-1, *[1] * (v.ndim - 1)), np.float32(0), v) for name, v in enc.items()}
        return enc

    def latent_shape(self, batch: int, height: int, width: int, frames: int | None) -> tuple[int, ...]:
        lat = self.latent
        f, ch = lat.spatial_factor, lat.channels
        h, w = height // f, width // f
        layout = lat.layout
        if layout == "BCHW":
            return (batch, ch, h, w)
        lf = (int(frames) - 1) // lat.temporal_factor + 1
        return (batch, ch, lf, h, w) if layout == "BCFHW" else (batch, lf, ch, h, w)

    def validate_size(self, height: int | None, width: int | None, frames: int | None) -> tuple[int, int, int | None]:
        lat = self.latent
        height = check_count("--height", lat.height if height is None else height, 1, MAX_IMAGE_SIDE, lat.height)
        width = check_count("--width", lat.width if width is None else width, 1, MAX_IMAGE_SIDE, lat.width)
        f = lat.pixel_multiple
        for flag, value in (("--height", height), ("--width", width)):
            if value % f:
                raise SamgError(f"{flag} must be a multiple of {f}, got {value}: e.g. {flag} {max(f, value // f * f)} "
                                f"(height and width must be multiples of {f} for this model)")
        if not lat.dynamic_resolution and (height, width) != (lat.height, lat.width):
            raise SamgError(f"this export has a static size {lat.height}x{lat.width}: drop --height/--width or re-export at {height}x{width}")
        if lat.is_video:
            tf = lat.temporal_factor
            example = lat.frames or tf * 4 + 1  # a static export takes only its own count
            frames = check_count("--frames", (lat.frames or 0) if frames is None else frames, 1, MAX_FRAMES, example)
            if (frames - 1) % tf:
                raise SamgError(f"--frames must be 1 + a multiple of {tf}, got {frames}: e.g. --frames {example}")
            if lat.frames and not lat.dynamic_frames and frames != lat.frames:
                raise SamgError(f"this export has a static frame count {lat.frames}: pass --frames {lat.frames}")
        elif frames is not None:
            raise SamgError("--frames applies to video models only: drop it for this image model")
        return height, width, frames

    def max_steps(self) -> int:
        """The model's num_train_timesteps: diffusers refuses more steps (they would repeat timesteps)."""
        return schedules.num_train_timesteps(self.export.scheduler)

    def check_latent_budget(self, shape: tuple[int, ...]) -> None:
        """SamgError naming the flag to lower when `shape` holds more than MAX_LATENT_ELEMENTS."""
        per_item = int(np.prod(shape[1:], dtype=np.int64))
        if per_item > MAX_LATENT_ELEMENTS:
            flags = "--height/--width" + ("/--frames" if len(shape) == 5 else "")
            raise SamgError(f"{flags} ask for {per_item} latent elements per {'clip' if len(shape) == 5 else 'image'}, "
                            f"above the limit of {MAX_LATENT_ELEMENTS} per call: lower {flags}")
        if shape[0] * per_item > MAX_LATENT_ELEMENTS:
            fit = MAX_LATENT_ELEMENTS // per_item
            raise SamgError(f"--num-images {shape[0]} needs {shape[0] * per_item} latent elements at this size, above "
                            f"the limit of {MAX_LATENT_ELEMENTS} per call: pass --num-images {fit} or less, over several runs")

    def make_schedule(self, guidance: Guidance, sampler: str, steps: int, karras: bool) -> schedules.Schedule:
        """The sampler's schedule for this model, or a SamgError when the sampler, --karras or the
        rule do not fit the model."""
        if karras and isinstance(self.export.scheduler, FlowScheduler):  # flow schedules have no Karras form
            raise SamgError("--karras does not apply to a flow-matching model: drop --karras")
        rule = guidance.host_rule()  # None for S-CFG, which runs in the graph
        if rule is not None and rule.returns_uncond and sampler not in samplers.DETERMINISTIC_FIRST_ORDER:
            raise samplers.renoise_unsupported(sampler)
        return schedules.make_schedule(self.export.scheduler, sampler, steps, karras=karras)

    def check_rule_params(self, guidance: Guidance, shape: tuple[int, ...], schedule: schedules.Schedule) -> None:
        """SamgError for guidance options the rule does not take or values it refuses (CFG++'s λ
        outside [0, 1], ...), before the models load: the parameters the denoiser would pass, and one
        call of the rule on a random pair of one sample's shape (its value checks live in the rule)."""
        rule = guidance.host_rule()
        if rule is None:  # S-CFG: its parameters are the export's, checked when it was written
            return
        params = rule.check_params(host_rule_params(rule, guidance.options, guidance.w_min, guidance.w_max,
                                                    self.export.host_rule_attrs))
        finite = schedule.sigmas[np.isfinite(schedule.sigmas)]
        sigma = float(finite[0]) if finite.size else 1.0
        probe = np.random.default_rng(0).standard_normal((2, 1, *shape[1:])).astype(np.float32)
        rule(probe[0], probe[1], step=0, sigma=sigma, state=rule.new_state(), **params)

    def check_cuda_graph(self, guidance: Guidance, sampler: str, *, capturable: bool) -> None:
        """SamgError unless the whole-loop CUDA graph can run this generation: a runner a CUDA graph
        can capture (`capturable`: the torch backend on CUDA), a deterministic sampler, and guidance
        computed in the graph or by a rule that reads no host value during a step
        (samg.runtime.graph_loop). Reads only the export: a CLI checks before loading the models."""
        from samg.runtime.graph_loop import GRAPH_SAMPLERS, capturable_rule

        if not capturable:
            raise SamgError("--cuda-graph needs the torch backend on a CUDA device: pass --backend torch --device cuda, "
                            "or drop --cuda-graph")
        if sampler not in GRAPH_SAMPLERS:
            raise SamgError(f"--cuda-graph runs the deterministic samplers ({', '.join(GRAPH_SAMPLERS)}), not "
                            f"{sampler!r}: pass --sampler {GRAPH_SAMPLERS[0]}, or drop --cuda-graph")
        if self.export.combine is None and not capturable_rule(guidance.host_rule()):
            raise SamgError(f"guidance {guidance.rule!r} reads host values during a step, so --cuda-graph cannot "
                            "capture it: drop --cuda-graph")

    def sample(self, conditioning: dict[str, np.ndarray], noise: np.ndarray, *, guidance: Guidance,
               sampler: str, steps: int, karras: bool = False, rng: np.random.Generator | None = None,
               progress: bool = False, scale_schedule: Callable | None = None,
               on_host_step: Callable | None = None, runner: Runner | None = None,
               cuda_graph: bool = False) -> np.ndarray:
        """Sample from standard normal `noise`; returns latents in the model's space (float32).
        `on_host_step(rule, inputs, params)`: see GuidedDenoiser (benchmarks measure scale maps there).
        `runner`: the denoiser runner this generation calls (default this pipeline's; the serving API
        passes one that batches its steps with other generations', samg.runtime.batching).
        `cuda_graph`: run all steps as one CUDA graph (samg.runtime.graph_loop), captured by the first
        generation of its shape, steps, sampler and rule and replayed by the later ones, whatever their
        prompts, scales and noise (check_cuda_graph says where it runs)."""
        schedule = self.make_schedule(guidance, sampler, steps, karras)
        sample_fn = samplers.get_sampler(sampler)
        runner = self.runners["denoiser"] if runner is None else runner
        if cuda_graph:
            self.check_cuda_graph(guidance, sampler, capturable=getattr(runner, "graph_capturable", False))
        denoise = GuidedDenoiser(
            runner, prediction_type=self.prediction_type,
            combine=self.export.combine, host_rule_attrs=self.export.host_rule_attrs, schedule=schedule,
            conditioning=conditioning, guidance=guidance, scale_schedule=scale_schedule, on_host_step=on_host_step,
        )
        # the loop runs where the runner computes: numpy here, or tensors on its GPU (one upload)
        x = denoise.place(noise.astype(np.float32) * np.float32(schedule.init_noise_sigma))
        bound = latent_bound(schedule.sigmas)
        bar = None
        # The samplers refuse NaN/Inf; huge finite latents would decode to a flat image with exit 0.
        # (On a GPU the check stays on the device until the loop ends: samplers.StepCheck.)
        def blow_up_error(i: int, peak: float) -> SamgError:
            return SamgError(f"latents reached |x| = {peak:.3g} after step {i + 1}/{steps}, beyond the sane bound "
                             f"{bound:.3g} ({LATENT_BOUND_FACTOR:g} x (1 + sigma_max)): the model output blew up; "
                             "lower the guidance scale or check the model files")

        if cuda_graph:  # the same checks, kept on the device by the captured loop
            x = self._graph_loops().sample(denoise, sampler, x, bound=bound, bound_error=blow_up_error)
            return samplers.to_host(schedule.to_model_latents(x)).astype(np.float32)
        blown_up = samplers.StepCheck(samplers.latent_peak, lambda peak: peak > bound, blow_up_error)

        def after_step(i: int, x, denoised) -> None:
            blown_up(i, x)
            if bar is not None:
                bar.update()

        if progress:
            from tqdm import tqdm

            bar = tqdm(total=steps, desc="sampling", unit="step", leave=False)
        try:
            try:
                x = sample_fn(denoise, x, schedule.sigmas, rng=rng, callback=after_step)
            except SamgError as failed:
                # On a device both checks report after the loop: a blow-up kept from an earlier step
                # is what the host loop would have stopped at, so it is the error to name.
                blown_up.finish(before=getattr(failed, "step", None))
                raise
            blown_up.finish()
        finally:
            if bar is not None:
                bar.close()
        return samplers.to_host(schedule.to_model_latents(x)).astype(np.float32)

    def _graph_loops(self):
        """This pipeline's captured whole-loop CUDA graphs (samg.runtime.graph_loop.GraphLoops)."""
        if self.graph_loops is None:
            from samg.runtime.graph_loop import GraphLoops

            self.graph_loops = GraphLoops()
        return self.graph_loops

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """uint8 images [N, H, W, 3] (video: [N, F, H, W, 3]) from model-space latents."""
        vae = self.export.vae
        z = latents / np.float32(vae.scaling_factor) + np.float32(vae.shift_factor or 0.0)
        layout, mode = self.latent.layout, vae.frame_mode
        runner = self.runners["vae"]
        if layout == "BCHW":
            images = runner.run({"latents": z})["images"]  # [N, 3, H, W]
            out = images.transpose(0, 2, 3, 1)
        else:
            if layout == "BCFHW":
                z = z.transpose(0, 2, 1, 3, 4)  # -> [N, F, C, h, w]
            n, nf = z.shape[:2]
            if mode == "joint":  # a 3-D VAE takes [N, C, F, h, w] and returns [N, 3, F, H, W]
                images = runner.run({"latents": z.transpose(0, 2, 1, 3, 4)})["images"]
                out = images.transpose(0, 2, 3, 4, 1)
            else:  # per frame through a 2-D VAE
                frames = [runner.run({"latents": z[:, i]})["images"] for i in range(nf)]
                out = np.stack(frames, axis=1).transpose(0, 1, 3, 4, 2)
        out = np.asarray(out, np.float32)
        from samg.io import check_finite

        check_finite("decoded images", out, "(VAE decoder output)")
        return ((out / 2 + 0.5).clip(0, 1) * 255).round().astype(np.uint8)

    # -- all together ---------------------------------------------------------------------------
    def plan(self, prompt: str, negative_prompt: str = "", *, guidance: str = "samg",
             scale: float | None = None, w_min: float | None = None, w_max: float | None = None,
             guidance_options: dict[str, Any] | None = None, steps: int = DEFAULT_STEPS,
             sampler: str | None = None, karras: bool = False, seed: int = 0,
             height: int | None = None, width: int | None = None, frames: int | None = None,
             num_images: int = 1, output: str = "uint8", schedule: str = "constant") -> Request:
        """Every argument of a call (see __call__) checked against this export, before anything is
        allocated or computed: a SamgError names the flag and the limit. Reads only the export, so
        a CLI can check a request before loading the models."""
        check_prompt("--prompt", prompt, required=True)
        negative_prompt = check_prompt("--negative-prompt", negative_prompt or "")
        steps = check_count("--steps", steps, 1, self.max_steps(), DEFAULT_STEPS)
        num_images = check_count("--num-images", num_images, 1, MAX_IMAGES_PER_CALL, 1)
        seed = check_count("--seed", seed, 0, SEED_LIMIT - 1, 0)
        if output not in OUTPUTS:
            raise SamgError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        lo, hi = resolve_scales(guidance, scale, w_min, w_max)
        g = Guidance(guidance, lo, hi, dict(guidance_options or {}))
        g.validate()
        check_guidance_for_export(g, self.export.combine)
        scale_schedule = None
        if schedule != "constant":
            from samg.guidance import get_schedule, scheduled

            get_schedule(schedule)  # SamgError naming the known schedules
            scale_schedule = lambda step, sigma: scheduled(schedule, (lo, hi), step, int(steps), sigma)  # noqa: E731
        height, width, frames = self.validate_size(height, width, frames)
        sampler = sampler or samplers.default_sampler(self.prediction_type)
        samplers.get_sampler(sampler)  # SamgError naming the known samplers
        plan_schedule = self.make_schedule(g, sampler, steps, karras)  # sampler, --karras and rule against the model
        shape = self.latent_shape(num_images, height, width, frames)
        self.check_latent_budget(shape)
        self.check_rule_params(g, shape, plan_schedule)
        return Request(prompt, negative_prompt, g, scale_schedule, steps, sampler, bool(karras), seed, num_images,
                       shape, output)

    def initial_noise(self, r: Request, latents: np.ndarray | None = None) -> np.ndarray:
        """The request's starting noise: `latents` when given (checked: shape, finite), else the
        seeded standard normals (Philox: the same noise as samg-run --seed)."""
        if latents is None:
            from samg.rng import standard_normal

            return standard_normal(r.seed, r.shape)
        noise = np.asarray(latents, np.float32)
        if noise.shape != r.shape:
            raise SamgError(f"latents have shape {noise.shape}, this request needs {r.shape}: match --height/--width")
        from samg.io import check_finite

        check_finite("latents", noise, "(the latents= argument)")
        return noise

    def __call__(self, prompt: str, negative_prompt: str = "", *, latents: np.ndarray | None = None,
                 progress: bool = False, cuda_graph: bool = False, **options: Any) -> np.ndarray:
        """Images (uint8 [N, H, W, 3], video [N, F, H, W, 3]) or, with output="latents", the
        final model-space latents. `options` are plan()'s: guidance, scale / w_min / w_max,
        guidance_options, steps, sampler, karras, seed, height, width, frames, num_images, output,
        schedule. `latents` replaces the seeded standard normal noise. `schedule` names a per-step
        guidance-weight schedule (samg.guidance.SCHEDULES): each step's scales become
        1 + (w − 1)·gain(step), fed to the graph at that step. `cuda_graph`: the whole sampling loop
        as one CUDA graph (see sample)."""
        r = self.plan(prompt, negative_prompt, **options)
        if cuda_graph:  # before the text encoder runs
            self.check_cuda_graph(r.guidance, r.sampler,
                                  capturable=getattr(self.runners["denoiser"], "graph_capturable", False))
        noise = self.initial_noise(r, latents)
        cond = self.conditioning(r.prompt, r.negative_prompt, r.num_images)
        final = self.sample(cond, noise, guidance=r.guidance, sampler=r.sampler, steps=r.steps, karras=r.karras,
                            rng=np.random.default_rng(r.seed), progress=progress, scale_schedule=r.scale_schedule,
                            cuda_graph=cuda_graph)
        if r.output == "latents":
            return final
        return self.decode(final)
