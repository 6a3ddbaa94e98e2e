"""Optimization profiles derived from the typed manifest's parts (no TensorRT needed)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from samg.build.profiles import ShapeRequest, input_profiles, parse_shape_spec, symbol_ranges
from samg.contract import Latent, TensorSpec
from samg.errors import SamgError


def sd_latent(**changes) -> Latent:
    """An SDXL-like image latent at 512x768 pixels, dynamic resolution."""
    latent = Latent(layout="BCHW", channels=4, spatial_factor=8, temporal_factor=1, height=512, width=768, frames=None,
                    dynamic_resolution=True)
    return replace(latent, **changes)


def declared(**shapes) -> dict[str, TensorSpec]:
    return {name: TensorSpec(tuple(shape), "float32") for name, shape in shapes.items()}


# What the manifest declares for the denoiser's and the VAE's inputs.
DENOISER_DECLARED = declared(
    latents=["B", 4, "H", "W"],
    timestep=["B"],
    encoder_hidden_states=["2B", 77, 768],
    text_embeds=["2B", 1280],
    guidance_scales=["B", 2],
)
VAE_DECLARED = declared(latents=["N", 4, "h", "w"])


def denoiser_profiles(onnx_inputs, ranges, declared=DENOISER_DECLARED, layout="BCHW"):
    return input_profiles("denoiser", onnx_inputs, ranges, declared=declared, layout=layout)


DENOISER_ONNX = {
    "latents": ["B", 4, "H", "W"],
    "timestep": ["B"],
    "encoder_hidden_states": ["2B", 77, 768],
    "text_embeds": ["2B", 1280],
    "guidance_scales": ["B", 2],
}


def test_parse_shape_spec_reads_keys_and_rejects_garbage():
    assert parse_shape_spec("batch=2, height=512,width=768") == {"batch": 2, "height": 512, "width": 768}
    assert parse_shape_spec(None) == {}
    for bad in ("batch=0", "batch", "colour=3", "height=-8", "height=abc"):
        with pytest.raises(SamgError, match="KEY=POSITIVE_INT"):
            parse_shape_spec(bad)


def test_static_profile_is_the_manifest_size_with_conditioning_batch_doubled():
    ranges = symbol_ranges(sd_latent(), ShapeRequest(dynamic=False), default_tokens=77)
    profiles = denoiser_profiles(DENOISER_ONNX, ranges)
    assert profiles["latents"] == {"min": [1, 4, 64, 96], "opt": [1, 4, 64, 96], "max": [1, 4, 64, 96]}
    assert profiles["encoder_hidden_states"]["opt"] == [2, 77, 768]
    assert profiles["text_embeds"]["max"] == [2, 1280]
    assert profiles["guidance_scales"]["min"] == [1, 2]


def test_dynamic_profile_ties_conditioning_batch_to_twice_the_latent_batch():
    request = ShapeRequest(
        dynamic=True,
        min={"batch": 1, "height": 256, "width": 256},
        opt={"batch": 2, "height": 512, "width": 512},
        max={"batch": 3, "height": 1024, "width": 768},
    )
    ranges = symbol_ranges(sd_latent(), request, default_tokens=77)
    profiles = denoiser_profiles(DENOISER_ONNX, ranges)
    assert profiles["latents"] == {"min": [1, 4, 32, 32], "opt": [2, 4, 64, 64], "max": [3, 4, 128, 96]}
    for point in ("min", "opt", "max"):
        latent_batch = profiles["latents"][point][0]
        assert profiles["encoder_hidden_states"][point][0] == 2 * latent_batch
        assert profiles["text_embeds"][point][0] == 2 * latent_batch
        assert profiles["timestep"][point] == [latent_batch]


def test_dynamic_defaults_stay_on_the_size_multiple_and_include_the_optimum():
    latent = sd_latent(height=64, width=64, size_multiple=16)
    ranges = symbol_ranges(latent, ShapeRequest(dynamic=True), default_tokens=77)
    low, opt, high = ranges["H"]
    assert low <= opt <= high and opt == 8
    assert (low * 8) % 16 == 0 and high == 16
    assert ranges["B"][0] == 1 and ranges["B"][2] >= 2


def test_vae_and_text_encoder_symbols():
    request = ShapeRequest(dynamic=True, opt={"batch": 2}, max={"batch": 4})
    ranges = symbol_ranges(sd_latent(), request, default_tokens=77)
    vae = input_profiles("vae_decoder", {"latents": ["N", 4, "h", "w"]}, ranges, declared=VAE_DECLARED)
    assert vae["latents"]["opt"] == [2, 4, 64, 96] and vae["latents"]["max"][0] == 4
    text = input_profiles("text_encoder", {"input_ids": ["N", 77]}, ranges)
    assert text["input_ids"] == {"min": [1, 77], "opt": [4, 77], "max": [8, 77]}


def test_per_frame_video_vae_decodes_batch_times_frames():
    latent = sd_latent(height=256, width=256, frames=16, layout="BCFHW", dynamic_resolution=False)
    video_declared = {**DENOISER_DECLARED, **declared(latents=["B", 4, "F", "H", "W"])}
    request = ShapeRequest(dynamic=False, opt={"batch": 2})
    ranges = symbol_ranges(latent, request, default_tokens=77, vae_frames="per_frame")
    assert ranges["F"] == (16, 16, 16)
    assert ranges["NV"] == (32, 32, 32)
    profiles = denoiser_profiles({"latents": ["B", 4, "F", "H", "W"]}, ranges, video_declared, layout="BCFHW")
    assert profiles["latents"]["opt"] == [2, 4, 16, 32, 32]


def test_fixed_onnx_dims_win_and_unknown_dynamic_dims_are_refused():
    ranges = symbol_ranges(sd_latent(), ShapeRequest(dynamic=True), default_tokens=77)
    profiles = denoiser_profiles({"latents": ["B", 4, 64, 64]}, ranges)
    assert profiles["latents"]["max"][2:] == [64, 64]
    with pytest.raises(SamgError, match="does not say what it is"):
        denoiser_profiles({"mystery": ["B", "q"]}, ranges)


def test_bad_ranges_are_refused_with_the_flag_named():
    latent = sd_latent()
    with pytest.raises(SamgError, match="--min <= --opt <= --max"):
        symbol_ranges(latent, ShapeRequest(dynamic=True, min={"batch": 4}, opt={"batch": 2}), 77)
    with pytest.raises(SamgError, match="need --dynamic"):
        symbol_ranges(latent, ShapeRequest(dynamic=False, max={"batch": 4}), 77)
    with pytest.raises(SamgError, match="not a multiple of 8"):
        symbol_ranges(latent, ShapeRequest(dynamic=False, opt={"height": 500}), 77)
    with pytest.raises(SamgError, match="not a multiple of 16"):
        symbol_ranges(sd_latent(size_multiple=16), ShapeRequest(dynamic=False, opt={"height": 520}), 77)
    fixed = sd_latent(dynamic_resolution=False)
    with pytest.raises(SamgError, match="fixed at 512"):
        symbol_ranges(fixed, ShapeRequest(dynamic=True, max={"height": 1024}), 77)


def test_request_from_a_denoiser_engines_profiles_rebuilds_the_same_shapes():
    """`samg bench --backend tensorrt` builds the raw variant's engines from the fused engine's record."""
    from samg.build.profiles import request_from_profiles

    latent = sd_latent()
    # static: latents [1, 4, 64, 96] at spatial factor 8 is 512x768 pixels, 77 tokens
    static = {"latents": {"min": [1, 4, 64, 96], "opt": [1, 4, 64, 96], "max": [1, 4, 64, 96]},
              "encoder_hidden_states": {"min": [2, 77, 768], "opt": [2, 77, 768], "max": [2, 77, 768]}}
    request = request_from_profiles(latent, static)
    assert request == ShapeRequest(dynamic=False, opt={"batch": 1, "height": 512, "width": 768, "tokens": 77})
    dynamic = {"latents": {"min": [1, 4, 32, 48], "opt": [2, 4, 64, 96], "max": [4, 4, 128, 192]}}
    request = request_from_profiles(latent, dynamic)
    assert request == ShapeRequest(dynamic=True, min={"batch": 1, "height": 256, "width": 384},
                                   opt={"batch": 2, "height": 512, "width": 768},
                                   max={"batch": 4, "height": 1024, "width": 1536})
    # and it gives back the engine's latents profile
    ranges = symbol_ranges(latent, request, default_tokens=77)
    assert denoiser_profiles(DENOISER_ONNX, ranges)["latents"] == dynamic["latents"]
    # video [B, F, C, H, W] with 4x temporal compression: latent frames 4 are 13 pixel frames
    video = Latent(layout="BFCHW", channels=16, spatial_factor=8, temporal_factor=4, height=480, width=720, frames=13,
                   dynamic_resolution=False)
    frames = request_from_profiles(video, {"latents": {k: [1, 4, 16, 60, 90] for k in ("min", "opt", "max")}})
    assert frames.opt == {"batch": 1, "frames": 13, "height": 480, "width": 720}
    with pytest.raises(SamgError, match="does not fit the layout BCHW"):
        request_from_profiles(latent, {"latents": {k: [1, 4, 64] for k in ("min", "opt", "max")}})
