"""`samg build` on the tiny exports of every family (the shared `tiny_export` fixture).

Export folders are shared and read-only: engines go to tmp folders (`out_dir`). Parsing is cheap
and runs for every family; full builds of every family are marked slow, except SDXL, the
acceptance case.
"""

from __future__ import annotations

import pytest

from samg.build.loader import available_flavours

pytestmark = pytest.mark.tensorrt
if not available_flavours():
    pytest.skip("TensorRT / TensorRT-RTX is not importable (pip install tensorrt-rtx-cu13)", allow_module_level=True)

from samg.build.engine import BuildOptions, build_export  # noqa: E402
from samg.build.profiles import ShapeRequest  # noqa: E402
from samg.build.engine import (  # noqa: E402
    _default_tokens,
    declared_inputs,
    make_logger,
    network_io,
    onnx_input_dims,
    parse_network,
    plugin_layer_count,
)
from samg.build.loader import load_trt  # noqa: E402
from samg.build.profiles import input_profiles, symbol_ranges  # noqa: E402
from samg.contract import Export, engine_record_path, read_engine_record, read_export  # noqa: E402

FAMILIES = ["sd15", "sd21", "sdxl", "sd35-medium", "cogvideox", "modelscope-t2v"]
CONDITIONING = ("encoder_hidden_states", "text_embeds", "pooled_projections")


@pytest.fixture(scope="module")
def trt():
    from samg.build.plugin import register_plugin

    module = load_trt()
    register_plugin(module)
    return module


def latent_shape(export: Export, batch: int) -> list[int]:
    latent = export.latent
    sizes = {
        "B": batch,
        "C": latent.channels,
        "F": latent.latent_frames,
        "H": latent.height // latent.spatial_factor,
        "W": latent.width // latent.spatial_factor,
    }
    return [sizes[axis] for axis in latent.layout]


@pytest.mark.parametrize("family", FAMILIES)
def test_both_combine_paths_parse_and_profiles_follow_the_manifest(tiny_export, trt, family):
    import onnx

    folder = tiny_export(family)
    export = read_export(folder)
    path = folder / "denoiser.onnx"
    for combine, expected in (("function", 0), ("plugin", 1)):
        logger = make_logger(trt)
        builder = trt.Builder(logger)
        network, _parser = parse_network(trt, builder, logger, path, combine)
        assert plugin_layer_count(trt, network) == expected

    model = onnx.load(str(path), load_external_data=False)
    request = ShapeRequest(dynamic=True, opt={"batch": 2}, max={"batch": 3})
    ranges = symbol_ranges(export.latent, request, _default_tokens(export, model), vae_frames=export.vae.frame_mode)
    profiles = input_profiles("denoiser", onnx_input_dims(model), ranges, declared=declared_inputs(export, "denoiser"),
                              layout=export.latent.layout)
    assert sorted(profiles) == sorted(network_io(network)[0])
    assert profiles["latents"]["opt"] == latent_shape(export, 2)
    for point in ("min", "opt", "max"):
        batch = profiles["latents"][point][0]
        assert profiles["timestep"][point] == [batch]
        assert profiles["guidance_scales"][point] == [batch, 2]
        for name in CONDITIONING:
            if name in profiles:
                assert profiles[name][point][0] == 2 * batch
                declared = export.denoiser.inputs[name].shape
                assert profiles[name][point][1:] == list(declared[1:])


def test_sdxl_builds_with_both_combine_paths_and_rebuild_is_a_cache_hit(tiny_export, tmp_path):
    folder = tiny_export("sdxl")
    engines = tmp_path / "engines"
    options = dict(out_dir=engines, cache_dir=tmp_path / "cache", quiet=True)
    first = build_export(folder, BuildOptions(combine="function", **options))
    assert [r.component for r in first] == ["text_encoder", "denoiser", "vae_decoder"]
    assert all(r.status == "built" for r in first)
    plugin = build_export(folder, BuildOptions(combine="plugin", components=("denoiser",), **options))[0]
    assert plugin.status == "built" and plugin.record.plugins == ("samg::GuidanceCombine",)
    again = build_export(folder, BuildOptions(combine="plugin", **options))
    assert [r.status for r in again] == ["up-to-date"] * 3
    # switching back to the function path reuses the first denoiser from the engine cache
    back = build_export(folder, BuildOptions(combine="function", components=("denoiser",), **options))[0]
    assert back.status == "from-cache" and back.record.key == first[1].record.key
    assert engine_record_path(engines / "denoiser.engine") == engines / "denoiser.engine.json"
    record = read_engine_record(engines / "denoiser.engine")
    assert record.profiles["encoder_hidden_states"]["opt"][0] == 2 * record.profiles["latents"]["opt"][0]
    assert {"text_embeds", "guidance_scales"} <= set(record.inputs)
    assert not (folder / "engines").exists()  # the shared export folder stays untouched


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "sdxl"])
def test_every_family_builds_both_combine_paths(tiny_export, tmp_path, family):
    folder = tiny_export(family)
    for combine, components in (("function", ("text_encoder", "denoiser", "vae_decoder")), ("plugin", ("denoiser",))):
        options = BuildOptions(
            combine=combine,
            shapes=ShapeRequest(dynamic=True),
            components=components,
            out_dir=tmp_path / combine,
            cache_dir=tmp_path / "cache",
            quiet=True,
        )
        results = {r.component: r for r in build_export(folder, options)}
        assert set(results) == set(components)
        assert all(r.status == "built" and r.record.engine_bytes > 0 for r in results.values())
        assert results["denoiser"].record.combine == combine
