#!/usr/bin/env python
"""Train `samg-shapes`: a miniature Stable Diffusion on procedural coloured shapes, on a CPU.

The same parts as samg-digits (scripts/train_digits.py, whose tokenizer builder, VAE loop and
saver this reuses): a word-level tokenizer, a CLIP text encoder trained jointly with a
cross-attention UNet on the latents of a small AutoencoderKL, DDPM epsilon training with
classifier-free-guidance dropout, saved in the diffusers StableDiffusionPipeline layout.
Data: samg.bundled.shapes (32x32 renders, 1-2 shapes, prompts naming colour/shape/position).

    python scripts/train_shapes.py                          # the bundled model (see its README)
    python scripts/train_shapes.py --smoke --out /tmp/sh    # seconds: checks save and load
    python scripts/train_shapes.py --eval-only              # re-measure the saved model

Stages: 1) VAE on renders (latents 4x16x16, factor 2), checked by scoring its reconstructions;
2) UNet + text encoder jointly on frozen VAE latents, a resumable checkpoint every
`--checkpoint-every` steps; 3) save (EMA weights), reload with from_pretrained, and score CFG samples
with the exact scorer (eval.json).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import train_digits  # noqa: E402  (shared tokenizer builder, VAE loop, pipeline saver)
from samg.bundled import shapes  # noqa: E402
from samg.bundled.positional_unet import PositionalUNet2DConditionModel  # noqa: E402
from samg.io import atomic_path, atomic_write_json  # noqa: E402

DEFAULT_OUT = REPO / "samg" / "bundled" / "samg-shapes"
DEFAULT_CHECKPOINT = Path("/tmp/samg-shapes-train.ckpt")
# "<bos> a magenta triangle at the bottom right and a yellow square at the top left <eos>" is 17.
MAX_TOKENS = 20
POOL_SEED_OFFSET = 1_000_000  # training scenes come from seed + this; held-out evaluation uses seeds below it
EVAL_SEED = 12345
# SD 1.x betas rescaled to zero terminal SNR, v-prediction, trailing timesteps (Lin et al. 2023). With
# SD's own schedule the last training step keeps sqrt(alpha_bar) = 0.068 of the image, enough on these
# 16x16 latents for the network to read a shape's position out of the "noise" instead of the prompt:
# the first run placed shapes where the seed's noise put them, whatever the prompt said (10-17% of
# positions right, chance 11%, with or without coordinates).
PREDICTION_TYPE = "v_prediction"
SCHEDULER = dict(**train_digits.SCHEDULER, rescale_betas_zero_snr=True)
SAVED_SCHEDULER = dict(**SCHEDULER, prediction_type=PREDICTION_TYPE, timestep_spacing="trailing")


def build_models(tokenizer):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=64,
    ))
    # Word embeddings start far apart (std 1, not CLIP's 0.02). Trained jointly from near-equal
    # embeddings, the encoder kept the position words together (its outputs for "top left" and
    # "bottom right" differed by 6% after 2750 steps, colours by 97%) while the UNet, given nothing to
    # tell them apart, never learned to place shapes: each side waited for the other.
    torch.nn.init.normal_(text_encoder.get_input_embeddings().weight, std=1.0)
    # Factor 2 (32x32 -> 16x16 latents): a factor-4 VAE (8x8 latents, a 2x cheaper UNet step) still
    # blurred circles and triangles into blobs after 400-600 steps (30% of its reconstructions scored
    # correct, measured), while factor 2 keeps them sharp after a few hundred steps. Pixel space made
    # each UNet step ~3x slower again. The UNet's 16x16 level is convolution only (attention at 8x8
    # and 4x4), which halves its cost there; cross-attention at 8x8 is fine enough for a 3x3 grid.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=shapes.IMAGE_SIZE,
    )
    # Coordinates added at conv_in (samg/bundled/positional_unet.py): a plain UNet2DConditionModel
    # placed shapes at chance (10-14% of positions right after 4313 steps, colours 98%).
    unet = PositionalUNet2DConditionModel(
        sample_size=shapes.IMAGE_SIZE // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=64, attention_head_dim=8,
        norm_num_groups=16,
        # diffusers' "text" addition embedding: the prompt, attention-pooled, joins the timestep
        # embedding that modulates every ResNet block, a global path beside cross-attention (with the
        # coordinates, "place it where x < -1/3" is a per-channel gate). Cross-attention alone had
        # not bound position words after 1500 steps.
        addition_embed_type="text", addition_embed_type_num_heads=8,
    )
    return text_encoder, vae, unet


def render_pool(n: int, seed: int):
    """n seeded training scenes: images [n, 3, 32, 32] in [-1, 1] and their objects."""
    rng = np.random.default_rng(seed + POOL_SEED_OFFSET)
    scenes = [shapes.random_scene(rng) for _ in range(n)]
    images = np.stack([s.image for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [s.objects for s in scenes]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3], as diffusers' image processor rounds."""
    x = ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    return np.round(x * 255).astype(np.uint8)


@torch.no_grad()
def vae_check(vae, n: int, seed: int) -> float:
    """Fraction of held-out renders whose VAE reconstruction scores correct on the full prompt."""
    rng = np.random.default_rng(seed)
    scenes = [shapes.random_scene(rng) for _ in range(n)]
    x = torch.from_numpy(np.stack([s.image for s in scenes]).astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    recon = to_uint8(vae.decode(vae.encode(x).latent_dist.mean).sample)
    return float(np.mean([shapes.score(r, shapes.prompt_for(s.objects)).correct for r, s in zip(recon, scenes)]))


WARMUP_STEPS = 200
FINAL_LR_FACTOR = 0.1


def lr_factor(step: int, total: int, cooldown: float) -> float:
    """Learning-rate factor at `step`: linear warm-up over WARMUP_STEPS, constant, and a linear
    cool-down to FINAL_LR_FACTOR over the last `cooldown` fraction of the `total` planned steps
    (warmup-stable-decay); where the two overlap the smaller wins. A run stopped before its
    cool-down ends (`--max-minutes`) records the factor it reached (training.json)."""
    warm = min(1.0, (step + 1) / WARMUP_STEPS)
    decay_start = total * (1 - cooldown)
    if cooldown <= 0 or step < decay_start:
        return warm
    return min(warm, 1 - (1 - FINAL_LR_FACTOR) * min(1.0, (step - decay_start) / (total - decay_start)))


def train_denoiser(unet, text_encoder, tokenizer, lat_mean, lat_std, scaling, objects, args, gen, log,
                   deadline=None, resume=None):
    """v-prediction DDPM loss on the zero-terminal-SNR schedule; prompts drawn per sample; EMA weights;
    resumable checkpoints.

    The learning rate follows `lr_factor` over the planned `--unet-steps`; a run stopped by
    `--max-minutes` records the factor it reached. Resume with the same `--unet-steps`.
    Returns (ema unet, ema text encoder, steps done)."""
    from diffusers import DDPMScheduler

    alphas_cumprod = DDPMScheduler(**SCHEDULER, prediction_type=PREDICTION_TYPE).alphas_cumprod
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.unet_steps, args.lr_cooldown))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen)))
    first = 0
    if resume is not None:
        for module, key in ((unet, "unet"), (text_encoder, "text"), (ema_unet, "ema_unet"), (ema_text, "ema_text")):
            module.load_state_dict(resume[key])
        opt.load_state_dict(resume["opt"])
        sched.load_state_dict(resume["sched"])
        gen.set_state(resume["gen"])
        rng.bit_generator.state = resume["rng"]
        first = resume["step"]
        log(f"resumed at step {first}")
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    unet.train()
    text_encoder.train()
    start, cpu_start, done = time.time(), time.process_time(), first
    for step in range(first, args.unet_steps):
        if deadline is not None and time.time() > deadline:
            log(f"time limit reached: stopping after {step} steps")
            break
        idx = torch.randint(len(lat_mean), (args.batch_size,), generator=gen)
        latents = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scaling
        prompts = ["" if rng.random() < shapes.UNCOND_DROPOUT else shapes.random_prompt(objects[i], rng)
                   for i in idx.tolist()]
        loss = train_digits.denoiser_step(unet, text_encoder, tokenizer, latents, prompts, alphas_cumprod, gen,
                                          opt, sched, params, ema_params, step, max_tokens=MAX_TOKENS,
                                          prediction_type=PREDICTION_TYPE)
        done = step + 1
        if step % 50 == 0 or done == args.unet_steps:
            rate = (time.time() - start) / (done - first)
            cpu_rate = (time.process_time() - cpu_start) / (done - first)  # ~ idle-machine s/step
            log(f"unet step {step}/{args.unet_steps} loss {loss.item():.4f} {rate:.2f}s/step wall, "
                f"{cpu_rate:.2f} cpu-s/step")
        if args.checkpoint and (done % args.checkpoint_every == 0 or done == args.unet_steps):
            state = {"unet": unet.state_dict(), "text": text_encoder.state_dict(), "ema_unet": ema_unet.state_dict(),
                     "ema_text": ema_text.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                     "gen": gen.get_state(), "rng": rng.bit_generator.state, "step": done}
            with atomic_path(args.checkpoint) as tmp:
                torch.save(state, tmp)
            log(f"checkpoint at step {done}: {args.checkpoint}")
    return ema_unet, ema_text, done


def eval_prompts(n_objects: int, count: int, seed: int) -> list[str]:
    """Held-out full prompts (seeded scenes, never the training pool's seeds)."""
    rng = np.random.default_rng(seed + n_objects)
    return [shapes.prompt_for(shapes.random_scene(rng, n_objects).objects) for _ in range(count)]


@torch.no_grad()
def eval_samples(out: Path, scales, count: int, steps: int, seed: int):
    """Diffusers' CFG samples of the held-out prompts: yields (scale, n_objects, prompts, uint8 images)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    for scale in scales:
        for n_objects in (1, 2):
            prompts = eval_prompts(n_objects, count, seed)
            images = pipe(prompts, num_inference_steps=steps, guidance_scale=scale, output_type="np",
                          generator=torch.Generator().manual_seed(seed)).images
            yield scale, n_objects, prompts, np.round(images * 255).astype(np.uint8)


def score_samples(prompts, images) -> dict:
    """Exact-scorer rates of one batch of samples: whole prompts, count and each attribute."""
    scores = [shapes.score(im, p) for im, p in zip(images, prompts)]
    return {
        "correct": float(np.mean([s.correct for s in scores])),
        "count_ok": float(np.mean([s.count_ok for s in scores])),
        **{a: float(np.mean([s.attribute_ok(a) for s in scores])) for a in shapes.ATTRIBUTES},
    }


def evaluate(out: Path, scales, count: int, steps: int, seed: int, log) -> dict:
    """Exact-scorer correctness of diffusers' CFG samples, one- and two-object prompts, per scale."""
    results = {}
    for scale, n_objects, prompts, images in eval_samples(out, scales, count, steps, seed):
        entry = results.setdefault(str(scale), {})
        entry[f"{n_objects}_object"] = score_samples(prompts, images)
        if n_objects == 2:
            log(f"eval guidance {scale}: {entry}")
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool", type=int, default=32000, help="training scenes rendered and VAE-encoded once")
    p.add_argument("--vae-steps", type=int, default=600)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-batch-size", type=int, default=32)
    p.add_argument("--unet-steps", type=int, default=6500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--lr-cooldown", type=float, default=0.3,
                   help="fraction of the planned UNet steps over which the learning rate decays linearly to 10%%")
    p.add_argument("--max-minutes", type=float, default=44.0,
                   help="stop UNet training at this wall time since the start, VAE stage included (the steps done "
                        "and the learning-rate factor reached are recorded); 0 = no limit. The default keeps the "
                        "whole run inside the 45-minute budget")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="resumable training state")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint (VAE from --out/.vae-stage)")
    p.add_argument("--smoke", action="store_true", help="a few steps of everything, to check the path")
    p.add_argument("--eval-scales", type=float, nargs="*", default=[1.0, 2.0, 3.0, 4.0, 5.0, 7.5])
    p.add_argument("--eval-count", type=int, default=100, help="prompts per kind (one/two objects) per scale")
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--eval-only", action="store_true", help="skip training; evaluate the saved model")
    args = p.parse_args(argv)
    if not 0 <= args.lr_cooldown < 1:
        p.error(f"--lr-cooldown {args.lr_cooldown} is outside [0, 1): give the fraction of the steps to cool down over")
    if args.smoke:
        args.pool, args.vae_steps, args.unet_steps, args.batch_size, args.vae_batch_size = 64, 3, 3, 8, 8
        args.eval_scales, args.eval_count, args.eval_steps, args.checkpoint = [3.0], 2, 2, None

    torch.set_num_threads(args.threads)
    t0, cpu0 = time.time(), time.process_time()
    log = lambda msg: print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)  # noqa: E731

    if not args.eval_only:
        torch.manual_seed(args.seed)
        gen = torch.Generator().manual_seed(args.seed)
        tokenizer = train_digits.build_tokenizer(shapes.vocabulary(), MAX_TOKENS)
        text_encoder, vae, unet = build_models(tokenizer)
        sizes = {name: train_digits.count_params(m) for name, m in
                 [("text_encoder", text_encoder), ("vae", vae), ("unet", unet)]}
        log(f"parameters: {sizes}")
        images, objects = render_pool(args.pool, args.seed)
        log(f"rendered {len(objects)} training scenes")
        vae_stage = args.checkpoint.with_suffix(".vae.pt") if args.checkpoint else None
        resume = torch.load(args.checkpoint, weights_only=False) if args.resume else None
        if resume is not None:
            vae.load_state_dict(torch.load(vae_stage, weights_only=False))
            vae.eval()
        else:
            train_digits.train_vae(vae, images, args.vae_steps, args.vae_batch_size, gen, log, lr=args.vae_lr)
            if vae_stage:
                torch.save(vae.state_dict(), vae_stage)
        t_vae = time.time() - t0
        vae_ok = vae_check(vae, 20 if args.smoke else 300, EVAL_SEED)
        log(f"vae reconstructions scored correct: {vae_ok:.3f}")
        with torch.no_grad():
            stats = [train_digits.encode_latent_stats(vae, chunk) for chunk in images.split(512)]
        lat_mean, lat_std = torch.cat([m for m, _ in stats]), torch.cat([s for _, s in stats])
        scaling = float(1.0 / lat_mean.std())  # SD's recipe: unit-variance latents for the UNet
        vae.register_to_config(scaling_factor=scaling)
        log(f"vae done: scaling_factor {scaling:.4f}")

        deadline = t0 + 60 * args.max_minutes if args.max_minutes else None
        ema_unet, ema_text, steps_done = train_denoiser(
            unet, text_encoder, tokenizer, lat_mean, lat_std, scaling, objects, args, gen, log, deadline, resume)
        info = {
            "command": "python scripts/train_shapes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seed": args.seed, "pool": args.pool, "vae_steps": args.vae_steps, "vae_lr": args.vae_lr, "vae_batch_size": args.vae_batch_size,
            "unet_steps_planned": args.unet_steps, "unet_steps": steps_done,
            "final_lr_factor": round(lr_factor(steps_done - 1, args.unet_steps, args.lr_cooldown), 4), "batch_size": args.batch_size,
            "lr": args.lr, "lr_cooldown": args.lr_cooldown, "threads": args.threads, "uncond_dropout": shapes.UNCOND_DROPOUT,
            "parameters": sizes, "vae_check_correct": vae_ok, "vae_scaling_factor": scaling,
            "scheduler": SAVED_SCHEDULER, "resumed": bool(args.resume),
            "seconds": {"vae": round(t_vae, 1), "total_training": round(time.time() - t0, 1),
                        "cpu_total_training": round(time.process_time() - cpu0, 1)},
            "versions": {"torch": torch.__version__},
        }
        train_digits.save_pipeline(args.out, tokenizer, ema_text, vae, ema_unet, info, SAVED_SCHEDULER)
        log(f"saved {args.out}")

    results = evaluate(args.out, args.eval_scales, args.eval_count, args.eval_steps, EVAL_SEED, log)
    atomic_write_json(args.out / "eval.json", {
        "prompts": "held-out full prompts, samg.bundled.shapes.prompt_for(random_scene(rng, n)) "
                   f"with rng seed {EVAL_SEED}+n", "sampler": "EulerDiscreteScheduler",
        "steps": args.eval_steps, "prompts_per_kind": args.eval_count, "results": results,
    })
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
