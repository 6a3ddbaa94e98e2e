"""torch modules that become the exported graphs: denoiser, text encoder, VAE decoder.

Each wraps the diffusers components of a loaded pipeline and reproduces what the diffusers pipeline
computes around them (batch doubling, prompt-embedding assembly, latent layout), so the ONNX graphs
take exactly the inputs named in docs/architecture.md. This module imports torch at import time;
only the exporter imports it, after `require("torch")`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from samg.models.specs import ModelSpec

# --- denoiser -------------------------------------------------------------------------------------


def _call_unet(model, x, t, cond: dict[str, torch.Tensor], extras: dict) -> torch.Tensor:
    added = None
    if "text_embeds" in cond:
        added = {"text_embeds": cond["text_embeds"], "time_ids": _sdxl_time_ids(x, cond, extras)}
    return model(x, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added, return_dict=False)[0]


def _sdxl_time_ids(x, cond, extras) -> torch.Tensor:
    """(original_size, crop (0, 0), target_size) in pixels from the latent size, like the pipeline."""
    if not torch.jit.is_tracing():
        # Eager (the torch backend): filled on text_embeds' device. The traced form below builds them
        # on the host, which a CUDA model cannot take and a CUDA-graph capture refuses.
        embeds = cond["text_embeds"]
        height, width = x.shape[-2] * extras["spatial_factor"], x.shape[-1] * extras["spatial_factor"]
        ids = embeds.new_zeros(embeds.shape[0], 6)
        for column, size in ((0, height), (1, width), (4, height), (5, width)):
            ids[:, column] = size
        return ids
    shape = torch._shape_as_tensor(x)  # traced as a Shape node, so H and W stay dynamic
    height = shape[-2:-1] * extras["spatial_factor"]
    width = shape[-1:] * extras["spatial_factor"]
    zero = torch.zeros_like(height)
    ids = torch.cat([height, width, zero, zero, height, width]).to(cond["text_embeds"].dtype)
    return ids.unsqueeze(0).expand(cond["text_embeds"].shape[0], 6)


def _call_unet3d(model, x, t, cond, extras) -> torch.Tensor:
    return model(x, t, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]


def _call_sd3(model, x, t, cond, extras) -> torch.Tensor:
    return model(
        hidden_states=x,
        timestep=t,
        encoder_hidden_states=cond["encoder_hidden_states"],
        pooled_projections=cond["pooled_projections"],
        return_dict=False,
    )[0]


def _call_cogvideox(model, x, t, cond, extras) -> torch.Tensor:
    return model(
        hidden_states=x,
        encoder_hidden_states=cond["encoder_hidden_states"],
        timestep=t,
        image_rotary_emb=extras.get("image_rotary_emb"),
        return_dict=False,
    )[0]


MODEL_CALLS: dict[str, Callable] = {
    "UNet2DConditionModel": _call_unet,
    "UNet3DConditionModel": _call_unet3d,
    "SD3Transformer2DModel": _call_sd3,
    "CogVideoXTransformer3DModel": _call_cogvideox,
}


class Denoiser(nn.Module):
    """latents [B,...], timestep [B], conditioning [2B,...] (uncond first) -> guided or (u, c).

    The model runs once on the doubled batch, as diffusers pipelines do for CFG.
    """

    def __init__(self, model, spec: ModelSpec, *, fused: bool, combine: dict, extras: dict):
        super().__init__()
        self.model = model
        self.spec = spec
        self.fused = fused
        self.combine = combine
        self.extras = extras
        self._call = MODEL_CALLS[spec.denoiser_class]

    def forward(self, latents, timestep, *rest):
        names = self.spec.conditioning
        cond = dict(zip(names, rest[: len(names)]))
        batch = latents.shape[0]
        x = torch.cat([latents, latents])
        t = torch.cat([timestep, timestep])
        pred = self._call(self.model, x, t, cond, self.extras).to(latents.dtype)
        uncond, conditional = pred[:batch], pred[batch:]
        if not self.fused:
            return uncond, conditional
        from samg.op import guidance_combine

        (scales,) = rest[len(names) :]
        return guidance_combine(uncond, conditional, scales, **self.combine)


# --- text encoder ---------------------------------------------------------------------------------


def _encode_one(encoder, ids, hidden: str, pooled: bool):
    """(hidden states, pooled or None) exactly as the diffusers pipelines take them."""
    if hidden == "last" and not pooled:
        return encoder(ids)[0], None
    out = encoder(ids, output_hidden_states=True)
    states = out.hidden_states[-2] if hidden == "penultimate" else out[0]
    return states, (out[0] if pooled else None)


def _combine_single(states, pooled):
    return (states[0],)


def _combine_sdxl(states, pooled):
    # encode_prompt: penultimate states of both CLIPs concatenated; pooled of the last encoder.
    return torch.cat(states, dim=-1), [p for p in pooled if p is not None][-1]


def _combine_sd3(states, pooled):
    # StableDiffusion3Pipeline.encode_prompt: CLIP-L/G concatenated, zero-padded to T5's width,
    # then T5 appended along tokens; pooled = both CLIP pooled outputs concatenated.
    clip = torch.cat(states[:2], dim=-1)
    t5 = states[2]
    clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled[:2], dim=-1)


TEXT_COMBINES: dict[str, Callable] = {"single": _combine_single, "sdxl": _combine_sdxl, "sd3": _combine_sd3}


class TextEncoder(nn.Module):
    """input_ids, input_ids_2, ... -> the denoiser's conditioning tensors for N prompts."""

    def __init__(self, encoders: list, spec: ModelSpec, out_dtype: torch.dtype | None = None):
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        self.spec = spec
        self.out_dtype = out_dtype  # the denoiser's dtype, when the encoders compute in another
        self._combine = TEXT_COMBINES[spec.text_combine]

    def forward(self, *input_ids):
        states, pooled = [], []
        for encoder, ids, te in zip(self.encoders, input_ids, self.spec.text_encoders):
            s, p = _encode_one(encoder, ids, te.hidden, te.pooled)
            states.append(s)
            pooled.append(p)
        outputs = self._combine(states, pooled)
        if self.out_dtype is not None:
            outputs = tuple(o.to(self.out_dtype) for o in outputs)
        return outputs if len(outputs) > 1 else outputs[0]


# --- VAE decoder ----------------------------------------------------------------------------------


class VaeDecoder(nn.Module):
    """latents (already unscaled by the runtime) -> images in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0].clamp(-1.0, 1.0)
