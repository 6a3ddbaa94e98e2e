"""One frozen :class:`ModelSpec` per supported model family.

Everything family-specific that the exporter (and, through the manifest, every runtime) needs lives
here as data: names, latent layout, text encoders, scheduler recipe, VAE factors. Code elsewhere
looks these up instead of branching on model names. Importing this module is cheap (stdlib only);
the tiny-config builders in :mod:`samg.models.tiny` import torch/diffusers when called.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from samg.errors import SamgError

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "bundled"


@dataclass(frozen=True)
class TextEncoderSpec:
    """One tokenizer + text encoder pair, as diffusers names its subfolders."""

    tokenizer: str  # pipeline component / subfolder, e.g. "tokenizer_2"
    encoder: str  # e.g. "text_encoder_2"
    max_length: int  # tokens per prompt, as the diffusers pipeline pads/truncates
    # What the pipeline takes from the encoder: "last" hidden state, "penultimate" hidden state
    # (SDXL/SD3 CLIP), plus the pooled projection when `pooled` is set.
    hidden: str = "last"
    pooled: bool = False

    @property
    def input_name(self) -> str:
        return "input_ids" + self.tokenizer[len("tokenizer") :]


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


# diffusers scheduler configs of the published checkpoints (the recipe the runtime re-implements).
_SD_DISCRETE = {
    "kind": "discrete",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "rescale_betas_zero_snr": False,
    "set_alpha_to_one": False,
    "clip_sample": False,
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    hub_id: str
    pipeline_class: str
    denoiser_class: str
    denoiser_component: str  # "unet" or "transformer"
    prediction_type: str  # epsilon | v_prediction | flow
    layout: str  # BCHW | BFCHW | BCFHW
    latent_channels: int
    spatial_factor: int
    temporal_factor: int
    default_height: int
    default_width: int
    default_frames: int | None
    text_encoders: tuple[TextEncoderSpec, ...]
    # How the per-encoder outputs become the denoiser conditioning ("single", "sdxl", "sd3").
    text_combine: str
    conditioning: tuple[str, ...]  # denoiser conditioning inputs = text encoder graph outputs
    scheduler: Mapping[str, Any]
    scheduler_class: str
    vae_class: str
    vae_scaling_factor: float
    vae_shift_factor: float
    vae_frames: str  # none | per_frame | joint
    dynamic_resolution: bool
    dynamic_frames: bool = False
    # SDXL: an absent negative prompt means all-zero negative conditioning, not the encoded "".
    force_zeros_for_empty_prompt: bool = False
    bundled: str | None = None  # folder under samg/bundled/ loaded when no --model-path is given
    tiny: str = ""  # name of the tiny builder in samg.models.tiny
    notes: tuple[str, ...] = field(default=())

    @property
    def channel_axis(self) -> int:
        return self.layout.index("C")

    @property
    def is_video(self) -> bool:
        return "F" in self.layout

    @property
    def default_source(self) -> str:
        """Where the model is loaded from when the user passes neither --model-path nor --tiny."""
        return str(BUNDLED_DIR / self.bundled) if self.bundled else self.hub_id

    def latent_frames(self, frames: int | None) -> int | None:
        if frames is None:
            return None
        return (frames - 1) // self.temporal_factor + 1

    def build_tiny(self, seed: int = 0):
        """A tiny randomly initialised diffusers pipeline of this family (deterministic per seed)."""
        from samg.models import tiny

        return getattr(tiny, self.tiny)(self, seed)


_CLIP_L = TextEncoderSpec("tokenizer", "text_encoder", 77)

_SD15 = ModelSpec(
    name="sd15",
    family="sd15",
    hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
    pipeline_class="StableDiffusionPipeline",
    denoiser_class="UNet2DConditionModel",
    denoiser_component="unet",
    prediction_type="epsilon",
    layout="BCHW",
    latent_channels=4,
    spatial_factor=8,
    temporal_factor=1,
    default_height=512,
    default_width=512,
    default_frames=None,
    text_encoders=(_CLIP_L,),
    text_combine="single",
    conditioning=("encoder_hidden_states",),
    scheduler=_frozen(_SD_DISCRETE),
    scheduler_class="PNDMScheduler",
    vae_class="AutoencoderKL",
    vae_scaling_factor=0.18215,
    vae_shift_factor=0.0,
    vae_frames="none",
    dynamic_resolution=True,
    tiny="tiny_sd",
)

SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _SD15,
        replace(
            _SD15,
            name="sd21",
            family="sd21",
            hub_id="stabilityai/stable-diffusion-2-1",
            prediction_type="v_prediction",
            default_height=768,
            default_width=768,
            scheduler_class="DDIMScheduler",
        ),
        ModelSpec(
            name="sdxl",
            family="sdxl",
            hub_id="stabilityai/stable-diffusion-xl-base-1.0",
            pipeline_class="StableDiffusionXLPipeline",
            denoiser_class="UNet2DConditionModel",
            denoiser_component="unet",
            prediction_type="epsilon",
            layout="BCHW",
            latent_channels=4,
            spatial_factor=8,
            temporal_factor=1,
            default_height=1024,
            default_width=1024,
            default_frames=None,
            text_encoders=(
                TextEncoderSpec("tokenizer", "text_encoder", 77, hidden="penultimate"),
                TextEncoderSpec("tokenizer_2", "text_encoder_2", 77, hidden="penultimate", pooled=True),
            ),
            text_combine="sdxl",
            conditioning=("encoder_hidden_states", "text_embeds"),
            scheduler=_frozen(_SD_DISCRETE),
            scheduler_class="EulerDiscreteScheduler",
            vae_class="AutoencoderKL",
            vae_scaling_factor=0.13025,
            vae_shift_factor=0.0,
            vae_frames="none",
            dynamic_resolution=True,
            force_zeros_for_empty_prompt=True,
            tiny="tiny_sdxl",
        ),
        ModelSpec(
            name="sd35-medium",
            family="sd3",
            hub_id="stabilityai/stable-diffusion-3.5-medium",
            pipeline_class="StableDiffusion3Pipeline",
            denoiser_class="SD3Transformer2DModel",
            denoiser_component="transformer",
            prediction_type="flow",
            layout="BCHW",
            latent_channels=16,
            spatial_factor=8,
            temporal_factor=1,
            default_height=1024,
            default_width=1024,
            default_frames=None,
            text_encoders=(
                TextEncoderSpec("tokenizer", "text_encoder", 77, hidden="penultimate", pooled=True),
                TextEncoderSpec("tokenizer_2", "text_encoder_2", 77, hidden="penultimate", pooled=True),
                TextEncoderSpec("tokenizer_3", "text_encoder_3", 256),
            ),
            text_combine="sd3",
            conditioning=("encoder_hidden_states", "pooled_projections"),
            scheduler=_frozen({"kind": "flow", "shift": 3.0, "num_train_timesteps": 1000}),
            scheduler_class="FlowMatchEulerDiscreteScheduler",
            vae_class="AutoencoderKL",
            vae_scaling_factor=1.5305,
            vae_shift_factor=0.0609,
            vae_frames="none",
            dynamic_resolution=True,
            tiny="tiny_sd3",
        ),
        ModelSpec(
            name="cogvideox",
            family="cogvideox",
            hub_id="THUDM/CogVideoX-2b",
            pipeline_class="CogVideoXPipeline",
            denoiser_class="CogVideoXTransformer3DModel",
            denoiser_component="transformer",
            prediction_type="v_prediction",
            layout="BFCHW",
            latent_channels=16,
            spatial_factor=8,
            temporal_factor=4,
            default_height=480,
            default_width=720,
            default_frames=49,
            text_encoders=(TextEncoderSpec("tokenizer", "text_encoder", 226),),
            text_combine="single",
            conditioning=("encoder_hidden_states",),
            # CogVideoX-2b's scheduler_config.json (CogVideoXDDIMScheduler): zero-terminal-SNR
            # rescaled betas, trailing spacing, alphas_cumprod shifted by snr_shift_scale.
            scheduler=_frozen(
                {
                    "kind": "discrete",
                    "num_train_timesteps": 1000,
                    "beta_start": 0.00085,
                    "beta_end": 0.012,
                    "beta_schedule": "scaled_linear",
                    "timestep_spacing": "trailing",
                    "steps_offset": 0,
                    "rescale_betas_zero_snr": True,
                    "snr_shift_scale": 3.0,
                    "set_alpha_to_one": True,
                    "clip_sample": False,
                }
            ),
            scheduler_class="CogVideoXDDIMScheduler",
            vae_class="AutoencoderKLCogVideoX",
            vae_scaling_factor=1.15258426,
            vae_shift_factor=0.0,
            vae_frames="joint",
            # Position embeddings are baked for the traced size (see docs/platform notes).
            dynamic_resolution=False,
            tiny="tiny_cogvideox",
        ),
        ModelSpec(
            name="modelscope-t2v",
            family="modelscope-t2v",
            hub_id="ali-vilab/text-to-video-ms-1.7b",
            pipeline_class="TextToVideoSDPipeline",
            denoiser_class="UNet3DConditionModel",
            denoiser_component="unet",
            prediction_type="epsilon",
            layout="BCFHW",
            latent_channels=4,
            spatial_factor=8,
            temporal_factor=1,
            default_height=256,
            default_width=256,
            default_frames=16,
            text_encoders=(_CLIP_L,),
            text_combine="single",
            conditioning=("encoder_hidden_states",),
            scheduler=_frozen(_SD_DISCRETE),
            scheduler_class="DDIMScheduler",
            vae_class="AutoencoderKL",
            vae_scaling_factor=0.18215,
            vae_shift_factor=0.0,
            vae_frames="per_frame",
            dynamic_resolution=True,
            dynamic_frames=True,
            tiny="tiny_modelscope",
        ),
        replace(
            _SD15,
            name="digits",
            hub_id="samg/samg-digits",
            # Real sizes are read from the bundled model's config at export time.
            default_height=64,
            default_width=64,
            scheduler_class="DDPMScheduler",
            bundled="samg-digits",
        ),
        replace(
            _SD15,
            name="shapes",
            hub_id="samg/samg-shapes",
            # Real sizes are read from the bundled model's config at export time (32x32 images).
            default_height=64,
            default_width=64,
            scheduler_class="EulerDiscreteScheduler",
            bundled="samg-shapes",
        ),
    )
}


def spec_names() -> list[str]:
    return list(SPECS)


def get_spec(name: str) -> ModelSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise SamgError(f"unknown model {name!r}: choose one of {', '.join(SPECS)}") from None
