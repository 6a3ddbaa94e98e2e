"""The exported graphs compute what the diffusers pipelines compute: ONNX Runtime on the export vs
the tiny pipeline in `source/` called the way its diffusers pipeline calls it (CFG, encode_prompt,
VAE decode). Raw exports combined on the host with samg.guidance.samg_v1 equal the fused graph."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
ort = pytest.importorskip("onnxruntime")

from samg.guidance import samg_v1
from samg.models.specs import get_spec

ATOL = 1e-4  # relative to max(1, max |reference|)


def _close(got, want, atol=ATOL):
    want = np.asarray(want, dtype=np.float32)
    err = float(np.max(np.abs(np.asarray(got, dtype=np.float32) - want)))
    assert err <= atol * max(1.0, float(np.max(np.abs(want)))), err


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: threads only add contention on the shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _session(folder, file):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(folder / file), options, providers=["CPUExecutionProvider"])


_PIPES = {}


def _pipe(folder, name):
    key = str(folder)
    if key not in _PIPES:
        cls = getattr(diffusers, get_spec(name).pipeline_class)
        _PIPES[key] = cls.from_pretrained(str(folder / "source"))
    return _PIPES[key]


def _manifest(folder):
    return json.loads((folder / "samg.json").read_text())


def _inputs(m, rng, batch, latent_hw=None):
    """Random denoiser feeds for the manifest's shapes (symbolic dims filled in)."""
    lat = m["latent"]
    h, w = latent_hw or (lat["latent_height"], lat["latent_width"])
    dims = {"B": batch, "2B": 2 * batch, "H": h, "W": w, "F": lat["latent_frames"]}
    feeds = {}
    for name, info in m["denoiser"]["inputs"].items():
        shape = [dims.get(d, d) for d in info["shape"]]
        feeds[name] = rng.standard_normal(shape).astype(np.float32)
    feeds["timestep"] = rng.uniform(0, 999, batch).astype(np.float32)
    return feeds


def _diffusers_prediction(name, pipe, feeds):
    """The model output on the doubled batch, called like the diffusers pipeline's denoising loop."""
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    x = torch.cat([t["latents"]] * 2)
    ts = torch.cat([t["timestep"]] * 2)
    ehs = t["encoder_hidden_states"]
    with torch.no_grad():
        if name == "sdxl":
            h, w = (d * pipe.vae_scale_factor for d in x.shape[-2:])
            time_ids = pipe._get_add_time_ids(
                (h, w), (0, 0), (h, w), dtype=ehs.dtype,
                text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
            ).repeat(x.shape[0], 1)
            added = {"text_embeds": t["text_embeds"], "time_ids": time_ids}
            return pipe.unet(x, ts, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
        if name == "sd35-medium":
            return pipe.transformer(hidden_states=x, timestep=ts, encoder_hidden_states=ehs,
                                    pooled_projections=t["pooled_projections"]).sample
        if name == "cogvideox":
            return pipe.transformer(hidden_states=x, encoder_hidden_states=ehs, timestep=ts).sample
        return pipe.unet(x, ts, encoder_hidden_states=ehs).sample


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd35-medium", "modelscope-t2v", "cogvideox"])
def test_fused_cfg_equals_diffusers_cfg(tiny_export, name):
    """w_min == w_max == w: the fused graph is diffusers' `u + w (c - u)` (at a second size if dynamic)."""
    folder = tiny_export(name)
    m, pipe, sess = _manifest(folder), _pipe(folder, name), _session(folder, "denoiser.onnx")
    rng = np.random.default_rng(0)
    sizes = [None]
    if m["latent"]["dynamic_resolution"]:
        step = m["latent"]["size_multiple"] // m["latent"]["spatial_factor"]
        sizes.append((m["latent"]["latent_height"] + step, m["latent"]["latent_width"] + 2 * step))
    for batch, size in zip((1, 2), sizes):
        feeds = _inputs(m, rng, batch, size)
        w = np.array([7.5, 3.0][:batch], dtype=np.float32)
        feeds["guidance_scales"] = np.stack([w, w], axis=1)
        (guided,) = sess.run(None, feeds)
        u, c = _diffusers_prediction(name, pipe, feeds).numpy().reshape(2, batch, *guided.shape[1:])
        wb = w.reshape(-1, *[1] * (guided.ndim - 1))
        _close(guided, u + wb * (c - u))


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_raw_matches_fused_with_host_combine(tiny_export, name):
    fused_dir, raw_dir = tiny_export(name, "fused"), tiny_export(name, "raw")
    m = _manifest(raw_dir)
    assert m["guidance"] == "raw" and list(m["denoiser"]["outputs"]) == ["pred_uncond", "pred_cond"]
    assert "guidance_scales" not in m["denoiser"]["inputs"]
    raw, fused = _session(raw_dir, "denoiser.onnx"), _session(fused_dir, "denoiser.onnx")
    assert [o.name for o in raw.get_outputs()] == ["pred_uncond", "pred_cond"]
    feeds = _inputs(_manifest(fused_dir), np.random.default_rng(1), 2)
    feeds["guidance_scales"] = np.array([[2.0, 9.0], [4.0, 4.0]], dtype=np.float32)
    (guided,) = fused.run(None, feeds)
    u, c = raw.run(None, {k: v for k, v in feeds.items() if k != "guidance_scales"})
    combine = m["combine"]
    host = samg_v1(u, c, feeds["guidance_scales"][:, 0], feeds["guidance_scales"][:, 1], tau=combine["tau"],
                   sharpness=combine["sharpness"], smooth=combine["smooth"], channel_axis=combine["channel_axis"])
    _close(guided, host, 1e-5)
    # Both exports come from the same seeded tiny model: raw u/c are diffusers' halves.
    want = _diffusers_prediction(name, _pipe(fused_dir, name), feeds).numpy()
    _close(np.concatenate([u, c]), want)
    assert not np.allclose(u, c)  # the conditioning really reaches the model


def _tokens(folder, m, prompts):
    import tokenizers

    feeds = {}
    for entry in m["text_encoder"]["tokenizers"]:
        tok = tokenizers.Tokenizer.from_file(str(folder / entry["file"]))
        feeds[entry["input"]] = np.array([e.ids for e in tok.encode_batch(prompts)], dtype=np.int64)
    return feeds


def _encode_prompt(name, pipe, prompt, negative):
    """diffusers' own encode_prompt: (negative, positive) for each conditioning output."""
    with torch.no_grad():
        if name == "sdxl":
            pe, ne, pp, npool = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                   do_classifier_free_guidance=True, negative_prompt=negative)
            return [(ne, pe), (npool, pp)]
        if name == "sd35-medium":
            pe, ne, pp, npool = pipe.encode_prompt(prompt, None, None, device="cpu", num_images_per_prompt=1,
                                                   do_classifier_free_guidance=True, negative_prompt=negative)
            return [(ne, pe), (npool, pp)]
        if name == "cogvideox":
            pe, ne = pipe.encode_prompt(prompt, negative, do_classifier_free_guidance=True, device="cpu")
            return [(ne, pe)]
        pe, ne = pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt=negative)
        return [(ne, pe)]


@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd35-medium", "cogvideox"])
def test_text_encoder_matches_encode_prompt(tiny_export, name):
    folder = tiny_export(name)
    m, pipe = _manifest(folder), _pipe(folder, name)
    prompt, negative = "a photo of a red cat near a tree", "blurry dog"
    outputs = _session(folder, "text_encoder.onnx").run(None, _tokens(folder, m, [negative, prompt]))
    expected = _encode_prompt(name, pipe, prompt, negative)
    assert len(outputs) == len(expected)
    for got, (neg, pos) in zip(outputs, expected):
        _close(got, torch.cat([neg, pos]).numpy())


@pytest.mark.parametrize("name", ["sd15", "cogvideox"])
def test_vae_matches_diffusers_decode(tiny_export, name):
    folder = tiny_export(name)
    m, pipe = _manifest(folder), _pipe(folder, name)
    shape = [1 if d == "N" else d for d in m["vae"]["inputs"]["latents"]["shape"]]
    shape = [m["latent"]["latent_height"] if d == "h" else m["latent"]["latent_width"] if d == "w" else d for d in shape]
    latents = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    (images,) = _session(folder, "vae_decoder.onnx").run(None, {"latents": latents})
    with torch.no_grad():
        want = pipe.vae.decode(torch.from_numpy(latents)).sample.clamp(-1, 1).numpy()
    assert images.shape == want.shape
    if name == "cogvideox":
        assert images.shape[2] == m["latent"]["frames"]
    _close(images, want)
