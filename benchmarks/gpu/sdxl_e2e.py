"""Stage 3 of benchmarks/gpu/check.sh: a full-size SDXL on the GPU, samg's torch path against
diffusers' own pipeline, in one run on the same weights.

The model is SDXL base's architecture (UNet 2.6 B parameters, both CLIP text encoders, the VAE)
with random float16 weights built from configs written out below: nothing is downloaded. The
tokenizers are samg's tiny offline CLIP tokenizers (token ids only feed the embedding tables).

samg's torch path is what `samg generate --backend torch --device cuda [--cuda-graph]` runs,
assembled in-process (a full SDXL export folder is gigabytes of ONNX): samg's export wrappers
(samg.export.wrappers) in torch runners (samg.runners.torch.TorchRunner.for_module), the
GuidedDenoiser, samg's Euler sampler on device tensors, and for the graph row the captured loops
`Pipeline.sample(cuda_graph=True)` replays (samg.runtime.graph_loop.GraphLoops, with the
pipeline's blow-up bound).

Rows, every one measured in the same run with interleaved repetitions (medians, interquartile
ranges; ratios per repetition, as samg.bench):
  step  one denoising step at 1024x1024 (UNet on batch 2 + guidance): SAMG through the fused op
        samg::guidance_combine, CFG through the same op (equal scales), CFG on a raw graph
        (u + w(c - u) in torch); eager and captured in a CUDA graph.
  e2e   prompt to decoded image, 30 Euler steps at 1024x1024: diffusers StableDiffusionXLPipeline
        eager fp16 (CFG), the same with torch.compile on the UNet (CFG), samg eager (SAMG), samg
        whole-loop CUDA graph (SAMG).
Targets: SAMG step <= 1.005x the CFG step (fused path, graphed); samg with the whole-loop graph
>= 1.3x faster than diffusers eager end to end, and ahead of diffusers + torch.compile.
Correctness gates the verdict (FAIL with the numbers when off): the graph's final latents against
the eager loop's, and samg's CFG loop against diffusers' own latents (TOLERANCES).
Before timing, one UNet call checks that the random float16 UNet gives a finite, moderate output;
if not, conv_out is scaled down (latency does not depend on weight values), and the probe says so.

Writes $STAGE_JSON after every phase (a timeout keeps what was measured).
`--cpu-dry-run`: the same code on samg's tiny SDXL pipeline on the CPU, 3 steps at 64x64 (checks
this script; no graphs, no compile, measures nothing).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
DEADLINE = float(os.environ.get("STAGE_DEADLINE", time.time() + 380))
STAGE_JSON = os.environ.get("STAGE_JSON", "stage_sdxl-e2e.json")

PROMPT = "a photograph of an astronaut riding a horse on the moon"
W_MIN, W_MAX = 3.0, 7.5  # SAMG's range; CFG at W_MAX
SAMPLER = "euler"
TOKENS = 77
COMPILE_MODE = os.environ.get("SDXL_E2E_COMPILE_MODE", "default")
# The step target is checked against both CFG steps: the same fused graph at equal scales (the op
# costs the same whatever the scales: this shows the noise floor) and the raw graph with CFG in torch
# (what a pipeline without the op runs: the op's real cost).
TARGETS = {"samg_step_over_fused_cfg_step": 1.005, "samg_step_over_raw_cfg_step": 1.005,
           "diffusers_eager_over_samg_graph": 1.3, "diffusers_compiled_over_samg_graph": 1.0}
# max |a - b| / max |b| of the final latents allowed. The graph replays the eager loop's kernels (in
# float16 on the GPU; the combine's energy sums are atomics, in any order); samg's CFG loop is
# diffusers' arithmetic with other float16 roundings (samg combines in float32).
TOLERANCES = {"graph_vs_eager_max_rel_diff": 1e-2, "cfg_latents_vs_diffusers_max_rel_diff": 2e-2}
# A trained SDXL's noise prediction stays within a few units; a random-weight UNet far beyond that
# would overflow float16 within a few steps (samg's finite check stops, diffusers returns NaN).
UNET_OUTPUT_LIMIT = 50.0

# stabilityai/stable-diffusion-xl-base-1.0: unet/config.json (architecture keys)
SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], center_input_sample=False,
    class_embed_type=None, class_embeddings_concat=False, conv_in_kernel=3, conv_out_kernel=3, cross_attention_dim=2048,
    cross_attention_norm=None, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1, dual_cross_attention=False, encoder_hid_dim=None, encoder_hid_dim_type=None,
    flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_only_cross_attention=None,
    mid_block_scale_factor=1, mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-05, norm_num_groups=32,
    num_attention_heads=None, num_class_embeds=None, only_cross_attention=False, out_channels=4,
    projection_class_embeddings_input_dim=2816, resnet_out_scale_factor=1.0, resnet_skip_time_act=False,
    resnet_time_scale_shift="default", sample_size=128, time_cond_proj_dim=None, time_embedding_act_fn=None,
    time_embedding_dim=None, time_embedding_type="positional", timestep_post_act=None,
    transformer_layers_per_block=[1, 2, 10], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    upcast_attention=None, use_linear_projection=True,
)
# text_encoder/config.json (CLIP ViT-L/14) and text_encoder_2/config.json (OpenCLIP ViT-bigG/14)
SDXL_TEXT_ENCODER = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, vocab_size=49408)
SDXL_TEXT_ENCODER_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                           max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, vocab_size=49408)
# vae/config.json; force_upcast off so both sides decode in float16 (diffusers would otherwise move
# the VAE to float32 and back on every call)
SDXL_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                latent_channels=4, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=False)


class Settings:
    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        self.device = "cpu" if dry_run else "cuda"
        self.dtype = "float32" if dry_run else "float16"
        self.size = 64 if dry_run else 1024
        self.steps = 3 if dry_run else 30
        self.step_reps, self.step_calls = (2, 1) if dry_run else (7, 5)
        self.e2e_reps = 2 if dry_run else 3


def left() -> float:
    return DEADLINE - time.time()


def save(result: dict) -> None:
    temp = STAGE_JSON + ".tmp"
    with open(temp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(temp, STAGE_JSON)


def synchronize(torch, s: Settings) -> None:
    if s.device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------
# The model: diffusers' SDXL pipeline with random weights, and samg's runners over the same modules.


def build_pipeline(torch, s: Settings):
    import diffusers
    import transformers

    from samg.models.specs import get_spec
    from samg.models.tiny import clip_tokenizer, tiny_sdxl

    spec = get_spec("sdxl")
    if s.dry_run:
        pipe = tiny_sdxl(spec)
    else:
        torch.manual_seed(0)
        tokenizer, tokenizer_2 = clip_tokenizer("<|endoftext|>"), clip_tokenizer("!")

        def clip(config, tok, projection: bool):
            ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
            return cls(transformers.CLIPTextConfig(**config, **ids))

        with torch.device(s.device):  # weights initialised on the GPU (seconds, not minutes)
            unet = diffusers.UNet2DConditionModel(**SDXL_UNET)
            text_encoder = clip(SDXL_TEXT_ENCODER, tokenizer, False)
            text_encoder_2 = clip(SDXL_TEXT_ENCODER_2, tokenizer_2, True)
            vae = diffusers.AutoencoderKL(**SDXL_VAE)
        config = {k: v for k, v in spec.scheduler.items() if k != "kind"}
        scheduler = diffusers.EulerDiscreteScheduler.from_config({**config, "prediction_type": spec.prediction_type})
        pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                                   tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                                   scheduler=scheduler, force_zeros_for_empty_prompt=True,
                                                   add_watermarker=False)
    pipe = pipe.to(s.device, getattr(torch, s.dtype))
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        module.eval().requires_grad_(False)
    return spec, pipe


class Samg:
    """samg's torch path over the pipeline's own modules (shared weights, no copies)."""

    def __init__(self, torch, s: Settings, spec, pipe):
        from samg.contract import DiscreteScheduler, GuidanceCombineAttrs
        from samg.export import wrappers
        from samg.runners.base import InputDecl
        from samg.runners.torch import TorchRunner
        from samg.runtime import schedules

        self.torch, self.s, self.spec, self.pipe = torch, s, spec, pipe
        f32, i64 = np.dtype(np.float32), np.dtype(np.int64)
        self.attrs = GuidanceCombineAttrs(smooth=3)  # what `samg export` writes
        factor = spec.spatial_factor
        id_inputs = {te.tokenizer.replace("tokenizer", "input_ids"): InputDecl(i64, (None, TOKENS))
                     for te in spec.text_encoders}
        encoders = [getattr(pipe, te.encoder) for te in spec.text_encoders]
        self.text = TorchRunner.for_module(wrappers.TextEncoder(encoders, spec), id_inputs, list(spec.conditioning),
                                           device=s.device, dtype=s.dtype, name="text_encoder.onnx")
        probe = self.text.run({name: np.zeros((1, TOKENS), np.int64) for name in id_inputs})
        conditioning = {name: InputDecl(f32, (None, *np.shape(probe[name])[1:])) for name in spec.conditioning}
        latent = {"latents": InputDecl(f32, (None, 4, None, None)), "timestep": InputDecl(f32, (None,))}
        self.id_names = list(id_inputs)

        def denoiser(fused: bool):
            module = wrappers.Denoiser(pipe.unet, spec, fused=fused, combine=self.attrs.attributes(),
                                       extras={"spatial_factor": factor})
            inputs = {**latent, **conditioning, **({"guidance_scales": InputDecl(f32, (None, 2))} if fused else {})}
            outputs = ["guided"] if fused else ["pred_uncond", "pred_cond"]
            return TorchRunner.for_module(module, inputs, outputs, device=s.device, dtype=s.dtype, name="denoiser.onnx")

        self.fused, self.raw = denoiser(True), denoiser(False)
        self.vae = TorchRunner.for_module(wrappers.VaeDecoder(pipe.vae), {"latents": InputDecl(f32, (None, 4, None, None))},
                                          ["images"], device=s.device, dtype=s.dtype, name="vae_decoder.onnx")
        self.schedule = schedules.make_schedule(DiscreteScheduler.from_json(dict(spec.scheduler)), SAMPLER, s.steps)
        self.scaling = spec.vae_scaling_factor
        self.loops = None  # samg.runtime.graph_loop.GraphLoops, as Pipeline.sample(cuda_graph=True) keeps them

    def conditioning(self, prompt: str) -> dict:
        """[2, ...] per conditioning input: zeros for the empty negative prompt (SDXL's
        force_zeros_for_empty_prompt, as samg's pipeline and diffusers do), then the prompt."""
        tokenizers = [getattr(self.pipe, te.tokenizer) for te in self.spec.text_encoders]
        ids = {name: tok(prompt, padding="max_length", max_length=TOKENS, truncation=True,
                         return_tensors="pt").input_ids.to(self.s.device)
               for name, tok in zip(self.id_names, tokenizers)}
        if self.s.device == "cpu":
            ids = {name: v.numpy() for name, v in ids.items()}
        encoded = self.text.run(ids)
        return {name: _cat_zeros_first(self.torch, v) for name, v in encoded.items()}

    def denoiser(self, conditioning: dict, rule: str):
        """A GuidedDenoiser: rule "samg" or "cfg" through the fused op, "cfg-raw" on the raw graph."""
        from samg.runtime.denoiser import Guidance, GuidedDenoiser

        fused = rule != "cfg-raw"
        name = "cfg" if rule.startswith("cfg") else "samg"
        w_min = W_MIN if name == "samg" else W_MAX
        return GuidedDenoiser(self.fused if fused else self.raw, prediction_type=self.spec.prediction_type,
                              schedule=self.schedule, conditioning=conditioning, guidance=Guidance(name, w_min, W_MAX),
                              combine=self.attrs if fused else None, host_rule_attrs=self.attrs)

    def initial(self, denoiser, noise: np.ndarray):
        return denoiser.place(noise) * float(self.schedule.init_noise_sigma)

    def decode(self, latents):
        return self.vae.run({"latents": latents / self.scaling})["images"]

    def eager(self, noise: np.ndarray, rule: str = "samg"):
        """Prompt to image with samg's sampler, step by step. Returns (latents, images)."""
        from samg.runtime.samplers import get_sampler

        den = self.denoiser(self.conditioning(PROMPT), rule)
        latents = get_sampler(SAMPLER)(den, self.initial(den, noise), self.schedule.sigmas)
        images = self.decode(latents)
        synchronize(self.torch, self.s)
        return latents, images

    def graphed(self, noise: np.ndarray):
        """Prompt to image with the whole sampling loop replayed from one CUDA graph (captured on the
        first call), as Pipeline.sample(cuda_graph=True) runs it. Returns (latents, images)."""
        from samg.runtime.graph_loop import GraphLoops
        from samg.runtime.pipeline import latent_bound

        den = self.denoiser(self.conditioning(PROMPT), "samg")
        x = self.initial(den, noise)
        if self.loops is None:
            self.loops = GraphLoops()
        latents = self.loops.sample(den, SAMPLER, x, bound=latent_bound(self.schedule.sigmas))
        images = self.decode(latents)
        synchronize(self.torch, self.s)
        return latents, images


def probe_unet(torch, s: Settings, samg: Samg, noise: np.ndarray, result: dict) -> None:
    """One UNet call (the raw graph: both predictions) at the first step on the prompt's conditioning.
    A random float16 UNet whose output is not finite, or beyond UNET_OUTPUT_LIMIT, gets its conv_out
    scaled down until it is (both pipelines share the module: the same weights for every row)."""
    sigma = float(samg.schedule.sigmas[0])
    start = noise * np.float32(samg.schedule.init_noise_sigma / np.sqrt(1.0 + sigma**2))
    feeds = {"latents": start, "timestep": np.full((1,), samg.schedule.timestep_for(sigma), np.float32),
             **samg.conditioning(PROMPT)}

    def peak() -> float:
        outs = samg.raw.run(feeds)
        values = torch.stack([torch.as_tensor(v).float().abs().max() for v in outs.values()])
        return float(values.max()) if bool(torch.isfinite(values).all()) else float("inf")

    probe = {"unet_output_peak": peak(), "conv_out_scaled_by": 1.0}
    result["unet_probe"] = probe
    for _ in range(4):
        if probe["unet_output_peak"] <= UNET_OUTPUT_LIMIT:
            break
        factor = 1e-3 if not np.isfinite(probe["unet_output_peak"]) else 1.0 / probe["unet_output_peak"]
        with torch.no_grad():
            samg.pipe.unet.conv_out.weight.mul_(factor)
            samg.pipe.unet.conv_out.bias.mul_(factor)
        probe["conv_out_scaled_by"] *= factor
        probe["unet_output_peak"] = peak()
    if probe["unet_output_peak"] > UNET_OUTPUT_LIMIT:
        probe["note"] = "still not finite or moderate after scaling conv_out: the overflow is inside the UNet"


def _cat_zeros_first(torch, value):
    if isinstance(value, np.ndarray):
        return np.concatenate([np.zeros_like(value), value])
    return torch.cat([torch.zeros_like(value), value])


def diffusers_call(torch, s: Settings, pipe, noise: np.ndarray, output_type: str = "pt"):
    latents = torch.from_numpy(noise).to(s.device, getattr(torch, s.dtype))
    with torch.no_grad():
        out = pipe(PROMPT, num_inference_steps=s.steps, guidance_scale=W_MAX, height=s.size, width=s.size,
                   latents=latents, output_type=output_type)
    synchronize(torch, s)
    return out.images


# ------------------------------------------------------------------------------------------------
# Timing


def spread_row(times: list[float]) -> dict:
    from samg.bench import quartiles

    q1, med, q3 = quartiles(times)
    return {"ms": round(med * 1e3, 3), "iqr_ms": [round(q1 * 1e3, 3), round(q3 * 1e3, 3)], "reps": len(times)}


def ratio_row(numerator: list[float], denominator: list[float]) -> dict:
    from samg.bench import ratio_spread

    r = ratio_spread(numerator, denominator)
    return {"ratio": round(r["ratio"], 4), "iqr": [round(r["q1"], 4), round(r["q3"], 4)], "reps": r["reps"],
            "resolved": r["resolved"]}


def cuda_seconds(torch, s: Settings, fn, calls: int) -> float:
    """Seconds per fn() over `calls` calls: CUDA events on the GPU, the wall clock on the CPU."""
    if s.device != "cuda":
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - started) / calls
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3 / calls


def step_graph(torch, fn):
    """fn captured in a CUDA graph (three warm-up calls on a side stream first); returns replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def per_step(torch, s: Settings, samg: Samg, noise: np.ndarray, result: dict) -> None:
    """One denoising step at the first sigma: SAMG (fused op), CFG (fused op, equal scales), CFG on
    the raw graph; eager and graphed; interleaved repetitions."""
    conditioning = samg.conditioning(PROMPT)
    sigma = float(samg.schedule.sigmas[0])
    calls = {}
    for rule in ("samg", "cfg", "cfg-raw"):
        den = samg.denoiser(conditioning, rule)
        x = samg.initial(den, noise)
        calls[f"{rule} eager"] = (lambda den=den, x=x: den(x, sigma, 0))
    rows = dict(calls)
    errors = {}
    with torch.no_grad():
        if s.device == "cuda":
            for name, fn in calls.items():
                try:
                    rows[name.replace("eager", "graph")] = step_graph(torch, fn)
                except Exception as exc:  # noqa: BLE001 - a row that cannot be captured is reported, not fatal
                    errors[name.replace("eager", "graph")] = f"{type(exc).__name__}: {exc}"[:300]
        for fn in rows.values():  # warm-up
            fn()
        synchronize(torch, s)
        times = {name: [] for name in rows}
        for _ in range(s.step_reps):
            if left() < 60:
                break
            for name, fn in rows.items():
                times[name].append(cuda_seconds(torch, s, fn, s.step_calls))
    step = {"rows": {name: spread_row(t) for name, t in times.items() if t}, "errors": errors}
    ratios = {}
    for mode in ("eager", "graph"):
        for other in ("cfg-raw", "cfg"):
            a, b = times.get(f"samg {mode}"), times.get(f"{other} {mode}")
            if a and b:
                ratios[f"samg / {other} ({mode})"] = ratio_row(a, b)
    if times.get("samg eager") and times.get("samg graph"):
        ratios["samg eager / samg graph"] = ratio_row(times["samg eager"], times["samg graph"])
    step["ratios"] = ratios
    result["step"] = step


def interleaved(rows: dict, reps: int, on_rep=None) -> dict[str, list[float]]:
    """Wall-clock seconds of each row's call, `reps` rounds of every row in turn (stops at the deadline)."""
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(reps):
        if left() < 15:
            break
        for name, fn in rows.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
        if on_rep is not None:
            on_rep(times)
    return times


def paired_ratios(times: dict[str, list[float]], pairs) -> dict:
    """Ratios of rows measured in the same rounds (equal counts)."""
    return {f"{a} / {b}": ratio_row(times[a], times[b]) for a, b in pairs
            if times.get(a) and times.get(b) and len(times[a]) == len(times[b])}


def end_to_end(torch, s: Settings, samg: Samg, pipe, noise: np.ndarray, result: dict) -> None:
    """Two rounds of measurements, so a long torch.compile warm-up cannot cost the main rows: first
    diffusers eager, samg eager and samg with the whole-loop graph; then, time permitting, diffusers
    with torch.compile interleaved with diffusers eager and samg's graph again."""
    eager_diffusers = "diffusers eager (CFG)"
    compiled_diffusers = "diffusers + torch.compile (CFG)"
    samg_eager, samg_graph = "samg eager (SAMG)", "samg graph (SAMG)"
    rows = {eager_diffusers: lambda: diffusers_call(torch, s, pipe, noise), samg_eager: lambda: samg.eager(noise)}
    notes, errors, warmup = {}, {}, {}
    e2e = {"rows": {}, "ratios": {}, "notes": notes, "errors": errors, "warmup_seconds": warmup, "steps": s.steps,
           "size": s.size}
    result["e2e"] = e2e
    with torch.no_grad():
        first = {}
        for name, fn in list(rows.items()):  # warm-up (and each row's time, for the budget)
            started = time.perf_counter()
            try:
                first[name] = fn()
            except Exception as exc:  # noqa: BLE001
                errors[name] = f"{type(exc).__name__}: {exc}"[:400]
                rows.pop(name)
            warmup[name] = round(time.perf_counter() - started, 2)
        if s.device != "cuda":
            notes[samg_graph] = "SKIP: CPU dry run (CUDA graphs need a GPU)"
        else:
            try:
                import samg.runtime.graph_loop  # noqa: F401
            except ImportError as exc:
                notes[samg_graph] = f"SKIP: samg.runtime.graph_loop is not there ({exc})"
            else:
                try:
                    started = time.perf_counter()
                    graph_latents, _ = samg.graphed(noise)  # captures
                    warmup[samg_graph] = round(time.perf_counter() - started, 2)
                    eager_latents = first.get(samg_eager, (None,))[0]
                    if eager_latents is not None:
                        diff = (graph_latents - eager_latents).abs().max() / eager_latents.abs().max()
                        e2e["graph_vs_eager_max_rel_diff"] = float(diff)
                    rows[samg_graph] = lambda: samg.graphed(noise)
                except Exception as exc:  # noqa: BLE001
                    errors[samg_graph] = f"{type(exc).__name__}: {exc}"[:400]
        save(result)

        def record(times):
            e2e["rows"] = {name: spread_row(t) for name, t in times.items() if t}
            e2e["ratios"].update(paired_ratios(times, [(eager_diffusers, samg_graph), (eager_diffusers, samg_eager),
                                                       (samg_eager, samg_graph)]))
            save(result)

        measured = interleaved(rows, s.e2e_reps, record)

        # round two: torch.compile. One round there is eager diffusers, samg's graph and the compiled
        # call (about an eager one), timed from round one (a warm-up time also holds a capture)
        def seconds(name: str) -> float:
            return float(np.median(measured[name])) if measured.get(name) else warmup.get(name, 5.0)

        again = {name: rows[name] for name in (eager_diffusers, samg_graph) if name in rows}
        one_round = sum(seconds(name) for name in again) + seconds(eager_diffusers)
        room = left() - one_round * s.e2e_reps - 20
        if s.device != "cuda":
            notes[compiled_diffusers] = "SKIP: CPU dry run"
            return
        if room < 150:
            notes[compiled_diffusers] = f"SKIP: {room:.0f} s left for its warm-up, under 150 s"
            return
        eager_unet = pipe.unet
        compiled = torch.compile(eager_unet, mode=None if COMPILE_MODE == "default" else COMPILE_MODE)

        def compiled_call():
            pipe.unet = compiled
            try:
                return diffusers_call(torch, s, pipe, noise)
            finally:
                pipe.unet = eager_unet

        try:
            started = time.perf_counter()
            compiled_call()  # compiles
            warmup[compiled_diffusers] = round(time.perf_counter() - started, 2)
            notes[compiled_diffusers] = f"torch.compile(unet, mode={COMPILE_MODE}); measured in a second round"
        except Exception as exc:  # noqa: BLE001
            errors[compiled_diffusers] = f"{type(exc).__name__}: {exc}"[:400]
            return
        save(result)
        second = {compiled_diffusers: compiled_call, **again}

        def record_second(times):
            e2e["compile_round"] = {name: spread_row(t) for name, t in times.items() if t}
            e2e["ratios"].update(paired_ratios(times, [(compiled_diffusers, samg_graph),
                                                       (eager_diffusers, compiled_diffusers)]))
            save(result)

        interleaved(second, s.e2e_reps, record_second)


def check_against_diffusers(torch, s: Settings, samg: Samg, pipe, noise: np.ndarray, result: dict) -> None:
    """Same math: samg's CFG (raw graph) latents against diffusers' CFG latents, same noise."""
    ours, _ = samg.eager(noise, rule="cfg-raw")
    theirs = diffusers_call(torch, s, pipe, noise, output_type="latent")
    ours = torch.as_tensor(np.asarray(ours) if isinstance(ours, np.ndarray) else ours).to(theirs.device).float()
    theirs = theirs.float()
    result["cfg_latents_vs_diffusers_max_rel_diff"] = float((ours - theirs).abs().max() / theirs.abs().max())


def verdict(result: dict) -> tuple[str, str]:
    step, e2e = result.get("step", {}), result.get("e2e", {})
    errors = {name: error for phase in ("probe", "step", "check", "e2e")
              for name, error in result.get(phase, {}).get("errors", {}).items()}
    parts, met = [], {}
    step_ratios = step.get("ratios", {})
    for key, other, label in (("samg_step_over_fused_cfg_step", "cfg", "fused-graph CFG"),
                              ("samg_step_over_raw_cfg_step", "cfg-raw", "raw-graph CFG")):
        mode = "graph" if f"samg / {other} (graph)" in step_ratios else "eager"
        r = step_ratios.get(f"samg / {other} ({mode})")
        if r:
            met[key] = r["ratio"] <= TARGETS[key]
            parts.append(f"step SAMG / {label} ({mode}) {r['ratio']} [IQR {r['iqr'][0]}-{r['iqr'][1]}]")
    ratios = e2e.get("ratios", {})
    for key, label in (("diffusers_eager_over_samg_graph", "diffusers eager (CFG) / samg graph (SAMG)"),
                       ("diffusers_compiled_over_samg_graph", "diffusers + torch.compile (CFG) / samg graph (SAMG)")):
        if label in ratios:
            r = ratios[label]
            met[key] = r["ratio"] >= TARGETS[key] if key.startswith("diffusers_eager") else r["ratio"] > TARGETS[key]
            parts.append(f"{label.split(' (')[0]}/samg graph {r['ratio']} [IQR {r['iqr'][0]}-{r['iqr'][1]}]")
    result["targets"] = {"goals": TARGETS, "met": met}
    checks, off = correctness(result)
    skipped = [f"{name}: {note}" for name, note in e2e.get("notes", {}).items() if note.startswith("SKIP")]
    summary = "; ".join(checks + parts) + (f"; targets met: {sum(met.values())}/{len(met)}" if met else "")
    if skipped:
        summary += "; " + "; ".join(skipped)
    if errors:
        return "FAIL", "; ".join(f"{k}: {v}" for k, v in errors.items())[:600] + ("; " + summary if summary else "")
    if off:
        return "FAIL", "results off: " + "; ".join(off) + "; " + summary
    if not parts:
        return "FAIL", "nothing was measured"
    return "PASS", summary


def correctness(result: dict) -> tuple[list[str], list[str]]:
    """(every correctness check as "name value (<= tolerance)", the ones off or missing). The graph
    against the eager loop is required when the graph row was measured; samg's CFG against diffusers
    always."""
    e2e = result.get("e2e", {})
    values = {"graph_vs_eager_max_rel_diff": e2e.get("graph_vs_eager_max_rel_diff"),
              "cfg_latents_vs_diffusers_max_rel_diff": result.get("cfg_latents_vs_diffusers_max_rel_diff")}
    graph_measured = "samg graph (SAMG)" in e2e.get("rows", {}) or "graph_vs_eager_max_rel_diff" in e2e
    labels = {"graph_vs_eager_max_rel_diff": "graph vs eager latents",
              "cfg_latents_vs_diffusers_max_rel_diff": "samg CFG vs diffusers latents"}
    checks, off = [], []
    for key, tolerance in TOLERANCES.items():
        value = values[key]
        if value is None:
            if key == "cfg_latents_vs_diffusers_max_rel_diff" or graph_measured:
                off.append(f"{labels[key]}: not checked")
            continue
        line = f"{labels[key]} max rel diff {value:.3g} (<= {tolerance:g})"
        checks.append(line)
        if not value <= tolerance:  # NaN is off too
            off.append(line.replace("(<=", "(above"))
    result["correctness"] = {"tolerances": TOLERANCES, "values": values, "off": off}
    return checks, off


def main(dry_run: bool) -> dict:
    s = Settings(dry_run)
    result: dict = {"status": "FAIL", "reason": "started, did not finish (see gpu_check.log)",
                    "settings": {"device": s.device, "dtype": s.dtype, "size": s.size, "steps": s.steps,
                                 "sampler": SAMPLER, "w_min": W_MIN, "w_max": W_MAX, "prompt": PROMPT}}
    try:
        import torch
    except ImportError as exc:
        return {"status": "SKIP", "reason": f"torch does not import ({exc})"}
    if not dry_run and not torch.cuda.is_available():
        return {"status": "SKIP", "reason": "torch sees no CUDA device"}
    try:
        import diffusers  # noqa: F401
    except ImportError as exc:
        return {"status": "SKIP", "reason": f"diffusers does not import ({exc}): carry its wheel "
                                            "(bash benchmarks/gpu/prepare_carry.sh)"}
    if not dry_run:
        result["settings"]["gpu"] = torch.cuda.get_device_name(0)
        from samg.op.torch_op import cuda_kernel_problem

        # what the op itself runs: its CUDA kernel, or (any failure to get it) the reference rule in torch
        problem = cuda_kernel_problem(torch.cuda.current_device())
        result["settings"]["combine"] = "samg::guidance_combine CUDA kernel" if problem is None else \
            f"reference rule in torch (kernel unavailable: {problem})"
        result["settings"]["combine_kernel"] = problem is None
    save(result)
    started = time.perf_counter()
    spec, pipe = build_pipeline(torch, s)
    result["build_seconds"] = round(time.perf_counter() - started, 1)
    result["unet_parameters_billion"] = round(sum(p.numel() for p in pipe.unet.parameters()) / 1e9, 3)
    samg = Samg(torch, s, spec, pipe)
    noise = np.random.default_rng(0).standard_normal((1, 4, s.size // 8, s.size // 8)).astype(np.float32)
    for phase, fn in (("probe", lambda: probe_unet(torch, s, samg, noise, result)),
                      ("step", lambda: per_step(torch, s, samg, noise, result)),
                      ("check", lambda: check_against_diffusers(torch, s, samg, pipe, noise, result)),
                      ("e2e", lambda: end_to_end(torch, s, samg, pipe, noise, result))):
        if left() < 20:
            result.setdefault("not_run", []).append(phase)
            continue
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - later phases still run
            result.setdefault("phase_errors", {})[phase] = traceback.format_exc()[-1500:]
            result.setdefault(phase, {}).setdefault("errors", {})[phase] = f"{type(exc).__name__}: {exc}"[:400]
        save(result)
    result["status"], result["reason"] = verdict(result)
    if dry_run:
        result["reason"] = "CPU dry run (tiny SDXL, nothing measured): " + result["reason"]
    return result


if __name__ == "__main__":
    try:
        outcome = main(dry_run="--cpu-dry-run" in sys.argv[1:])
    except Exception:  # noqa: BLE001 - the stage reports, the run goes on
        outcome = {"status": "FAIL", "reason": traceback.format_exc()[-1500:]}
    save(outcome)
    print(outcome["status"], "-", outcome["reason"])
