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

from samg.contract import read_export
from samg.engines.base import Runner, open_runner
from samg.errors import SamgError, require
from samg.runtime import samplers, schedules
from samg.runtime.denoiser import SPATIAL_RULES, Denoiser, Guidance

DEFAULT_STEPS = 30
DEFAULT_SCALE = 7.5


def resolve_scales(guidance: str, scale: float | None, w_min: float | None, w_max: float | None) -> tuple[float, float]:
    """(w_min, w_max) from the CLI's --scale / --w-min / --w-max.

    Spatial rules with only --scale W use w_min = (1 + W) / 2, w_max = W: full strength in flat
    regions, half the guidance (above 1) on high-energy detail. Other rules take one scale."""
    if (w_min is None) != (w_max is None):
        raise SamgError("pass both --w-min and --w-max, or --scale alone")
    if w_min is not None:
        if scale is not None:
            raise SamgError("pass either --scale or --w-min/--w-max, not both")
        return float(w_min), float(w_max)
    w = DEFAULT_SCALE if scale is None else float(scale)
    if guidance in SPATIAL_RULES:
        return (1.0 + w) / 2.0, w
    return w, w


@dataclass
class Tokenizer:
    tokenizer: Any  # tokenizers.Tokenizer, padded and truncated to max_length
    input_name: str

    def __call__(self, prompts: list[str]) -> np.ndarray:
        return np.array([e.ids for e in self.tokenizer.encode_batch(prompts)], dtype=np.int64)


def _load_tokenizer(export_dir: Path, entry: dict[str, Any]) -> Tokenizer:
    tokenizers = require("tokenizers", "to tokenize prompts")
    path = export_dir / entry["file"]
    if not path.is_file():
        raise SamgError(f"tokenizer file missing: {path}: re-export the model")
    tok = tokenizers.Tokenizer.from_file(str(path))
    max_len = int(entry["max_length"])
    tok.enable_truncation(max_length=max_len)  # room for special tokens is kept by the library
    tok.enable_padding(length=max_len, pad_id=int(entry.get("pad_id", 0)))
    return Tokenizer(tok, entry.get("input", "input_ids"))


class Pipeline:
    def __init__(self, export_dir: Path, manifest: dict[str, Any], runners: dict[str, Runner],
                 tokenizers: list[Tokenizer]):
        self.export_dir = export_dir
        self.manifest = manifest
        self.runners = runners
        self.tokenizers = tokenizers
        self.latent = manifest["latent"]
        self.prediction_type = manifest["prediction_type"]

    @classmethod
    def load(cls, export_dir: str | Path, backend: str = "onnxruntime", device: str = "cpu",
             **runner_opts) -> "Pipeline":
        export_dir = Path(export_dir)
        manifest = read_export(export_dir)  # validated, paths confined, files checked against their hashes
        files = {
            "text_encoder": manifest["text_encoder"]["file"],
            "denoiser": manifest["denoiser"]["file"],
            "vae": manifest["vae"]["file"],
        }
        runners = {role: open_runner(export_dir / f, backend, device, **runner_opts) for role, f in files.items()}
        toks = [_load_tokenizer(export_dir, e) for e in manifest["text_encoder"]["tokenizers"]]
        return cls(export_dir, manifest, runners, toks)

    # -- stages ---------------------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """Conditioning tensors for N prompts, as the text encoder graph names them."""
        feeds = {t.input_name: t(prompts) for t in self.tokenizers}
        outs = self.runners["text_encoder"].run(feeds)
        return {name: np.asarray(outs[name], np.float32) for name in self.manifest["text_encoder"]["outputs"]}

    def conditioning(self, prompt: str, negative_prompt: str, batch: int) -> dict[str, np.ndarray]:
        """[2B, ...] per conditioning input: B copies of the negative, then B of the positive.

        Models trained with zeroed negative conditioning (SDXL: `force_zeros_for_empty_prompt`)
        get zeros for an empty negative prompt, as diffusers' pipelines do."""
        enc = self.encode([negative_prompt, prompt])
        if not negative_prompt and self.manifest["text_encoder"].get("force_zeros_for_empty_prompt", False):
            enc = {name: np.concatenate([np.zeros_like(v[1:]), v[1:]]) for name, v in enc.items()}
        return {name: np.repeat(v, batch, axis=0) for name, v in enc.items()}

    def latent_shape(self, batch: int, height: int, width: int, frames: int | None) -> tuple[int, ...]:
        lat = self.latent
        f, ch = int(lat["spatial_factor"]), int(lat["channels"])
        h, w = height // f, width // f
        layout = lat["layout"]
        if layout == "BCHW":
            return (batch, ch, h, w)
        lf = (int(frames) - 1) // int(lat.get("temporal_factor", 1)) + 1
        return (batch, ch, lf, h, w) if layout == "BCFHW" else (batch, lf, ch, h, w)

    def validate_size(self, height: int | None, width: int | None, frames: int | None) -> tuple[int, int, int | None]:
        lat = self.latent
        height = int(lat["height"] if height is None else height)
        width = int(lat["width"] if width is None else width)
        f = int(lat.get("size_multiple") or lat["spatial_factor"])  # the denoiser may need more than the VAE factor
        if height <= 0 or width <= 0 or height % f or width % f:
            raise SamgError(f"height and width must be positive multiples of {f}, got {height}x{width}: e.g. --height {max(f, height // f * f)}")
        if not lat.get("dynamic_resolution", False) and (height, width) != (lat["height"], lat["width"]):
            raise SamgError(f"this export has a static size {lat['height']}x{lat['width']}: drop --height/--width or re-export at {height}x{width}")
        video = lat["layout"] != "BCHW"
        if video:
            frames = int(lat.get("frames") or 0) if frames is None else int(frames)
            tf = int(lat.get("temporal_factor", 1))
            if frames <= 0 or (frames - 1) % tf:
                raise SamgError(f"frames must be 1 + a multiple of {tf}, got {frames}: e.g. --frames {tf * 4 + 1}")
            if lat.get("frames") and not lat.get("dynamic_frames", False) and frames != int(lat["frames"]):
                raise SamgError(f"this export has a static frame count {lat['frames']}: pass --frames {lat['frames']}")
        elif frames is not None:
            raise SamgError("--frames applies to video models only: drop it for this image model")
        return height, width, frames

    def sample(self, conditioning: dict[str, np.ndarray], noise: np.ndarray, *, guidance: Guidance,
               sampler: str, steps: int, karras: bool = False, rng: np.random.Generator | None = None,
               progress: bool = False, scale_schedule: Callable | None = None) -> np.ndarray:
        """Sample from standard normal `noise`; returns latents in the model's space (float32)."""
        schedule = schedules.make_schedule(self.manifest["scheduler"], sampler, steps, karras=karras)
        sample_fn = samplers.get_sampler(sampler)
        if guidance.rule == "cfgpp" and sampler not in samplers.DETERMINISTIC_FIRST_ORDER:
            raise SamgError(f"cfgpp re-noises along the unconditional prediction, which {sampler} cannot: use --sampler euler or ddim")
        denoise = Denoiser(
            self.runners["denoiser"], prediction_type=self.prediction_type,
            export_guidance=self.manifest["guidance"], schedule=schedule, conditioning=conditioning,
            guidance=guidance, combine=self.manifest.get("combine"), scale_schedule=scale_schedule,
        )
        x = noise.astype(np.float32) * np.float32(schedule.init_noise_sigma)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=steps, desc="sampling", unit="step", leave=False)
        try:
            x = sample_fn(denoise, x, schedule.sigmas, rng=rng, callback=(lambda *_: bar.update()) if bar else None)
        finally:
            if bar is not None:
                bar.close()
        return schedule.to_model_latents(x).astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """uint8 images [N, H, W, 3] (video: [N, F, H, W, 3]) from model-space latents."""
        vae = self.manifest["vae"]
        z = latents / np.float32(vae["scaling_factor"]) + np.float32(vae.get("shift_factor", 0.0) or 0.0)
        layout, mode = self.latent["layout"], vae.get("frames", "none")
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
    def __call__(self, prompt: str, negative_prompt: str = "", *, guidance: str = "samg",
                 scale: float | None = None, w_min: float | None = None, w_max: float | None = None,
                 guidance_options: dict[str, Any] | None = None, steps: int = DEFAULT_STEPS,
                 sampler: str | None = None, karras: bool = False, seed: int = 0,
                 height: int | None = None, width: int | None = None, frames: int | None = None,
                 num_images: int = 1, latents: np.ndarray | None = None, output: str = "uint8",
                 progress: bool = False, schedule: str = "constant") -> np.ndarray:
        """Images (uint8 [N, H, W, 3], video [N, F, H, W, 3]) or, with output="latents", the
        final model-space latents. `latents` replaces the seeded standard normal noise.
        `schedule` names a per-step guidance-weight schedule (samg.guidance.SCHEDULES): each step's
        scales become 1 + (w − 1)·gain(step), fed to the graph at that step."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise SamgError("a prompt is required: pass --prompt \"...\"")
        if not isinstance(steps, (int, np.integer)) or steps < 1:
            raise SamgError(f"steps must be a positive integer, got {steps}: e.g. --steps 30")
        if num_images < 1:
            raise SamgError(f"the number of images must be at least 1, got {num_images}")
        lo, hi = resolve_scales(guidance, scale, w_min, w_max)
        g = Guidance(guidance, lo, hi, dict(guidance_options or {}))
        g.validate()
        scale_schedule = None
        if schedule != "constant":
            from samg.guidance import get_schedule, scheduled

            get_schedule(schedule)  # SamgError naming the known schedules
            scale_schedule = lambda step, sigma: scheduled(schedule, (lo, hi), step, int(steps), sigma)  # noqa: E731
        height, width, frames = self.validate_size(height, width, frames)
        sampler = sampler or samplers.default_sampler(self.prediction_type)
        shape = self.latent_shape(num_images, height, width, frames)
        rng = np.random.default_rng(seed)
        if latents is None:
            noise = rng.standard_normal(shape, dtype=np.float32)
        else:
            noise = np.asarray(latents, np.float32)
            if noise.shape != shape:
                raise SamgError(f"latents have shape {noise.shape}, this request needs {shape}: match --height/--width")
        cond = self.conditioning(prompt, negative_prompt or "", num_images)
        final = self.sample(cond, noise, guidance=g, sampler=sampler, steps=int(steps), karras=karras,
                            rng=rng, progress=progress, scale_schedule=scale_schedule)
        if output == "latents":
            return final
        return self.decode(final)
