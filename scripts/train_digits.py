#!/usr/bin/env python
"""Train `samg-digits`: a miniature Stable Diffusion on scikit-learn's 8x8 digits, on a CPU.

Same parts as SD 1.x, in miniature: a word-level tokenizer, a CLIP text encoder, a UNet with
cross-attention working on the latents of a small AutoencoderKL, DDPM training with epsilon
prediction and classifier-free-guidance dropout. The result is saved in the diffusers
StableDiffusionPipeline layout, so `StableDiffusionPipeline.from_pretrained(out)` loads it.

    python scripts/train_digits.py --max-minutes 24         # the bundled model (see its README)
    python scripts/train_digits.py --smoke --out /tmp/sd    # seconds: checks save and load

Stages: 1) VAE on the upsampled training digits, 2) UNet + text encoder jointly on frozen VAE
latents, 3) save (EMA weights), reload with from_pretrained, and (if the digit classifier is
bundled) measure how often CFG samples are read as the prompted digit.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from samg.bundled import data as digits_data  # noqa: E402
from samg.io import atomic_dir, atomic_write_json  # noqa: E402

DEFAULT_OUT = REPO / "samg" / "bundled" / "samg-digits"
MAX_TOKENS = 8  # "<bos> a bold handwritten seven <eos>" is 6 tokens; room to spare
UNCOND_DROPOUT = 0.12
SCHEDULER = dict(  # SD 1.x noise schedule
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


def build_tokenizer(words=None, max_length: int = MAX_TOKENS):
    """Word-level tokenizer (lower-cased, split on whitespace/punctuation) as a transformers fast tokenizer.

    `words` is the vocabulary after the special tokens (default: the digits prompts'); samg-shapes
    builds its tokenizer with this too."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = digits_data.vocabulary() if words is None else list(words)
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    # Like CLIP: every prompt, the empty one included, is wrapped in <bos> ... <eos>.
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>",
        special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=max_length,
        padding_side="right",
    )


def build_models(tokenizer):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=64,
    )
    text_encoder = CLIPTextModel(text_config)
    vae = AutoencoderKL(
        in_channels=3,  # grayscale repeated on RGB, so the pipeline's image handling is SD's own
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=digits_data.IMAGE_SIZE,
    )
    unet = UNet2DConditionModel(
        sample_size=digits_data.IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    return text_encoder, vae, unet


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def to_rgb_tensor(images01: np.ndarray) -> torch.Tensor:
    """[N, H, W] in [0, 1] -> [N, 3, H, W] in [-1, 1]."""
    x = torch.from_numpy(images01).float().mul(2).sub(1)
    return x[:, None].repeat(1, 3, 1, 1)


def train_vae(vae, images: torch.Tensor, steps: int, batch: int, gen: torch.Generator, log, lr: float = 1e-3) -> None:
    """Reconstruction (L1 + MSE) with a small KL term, as SD's VAE but without the GAN/LPIPS parts."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    vae.train()
    for step in range(steps):
        idx = torch.randint(len(images), (batch,), generator=gen)
        x = images[idx]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        rec_loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = posterior.kl().mean() / z[0].numel()
        loss = rec_loss + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} rec {rec_loss.item():.4f} kl/elem {kl.item():.3f}")
    vae.eval()


@torch.no_grad()
def encode_latent_stats(vae, images: torch.Tensor):
    dist = vae.encode(images).latent_dist
    return dist.mean, dist.std


def denoiser_step(unet, text_encoder, tokenizer, latents, prompts, alphas_cumprod, gen, opt, sched, params,
                  ema_params, step: int, max_tokens: int = MAX_TOKENS, prediction_type: str = "epsilon"):
    """One optimiser step of the DDPM loss (epsilon or v-prediction target) on (latents, prompts), then
    the EMA update of `ema_params` towards `params`. Draws timesteps then noise from `gen`, in that
    order. Returns the loss."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_tokens, truncation=True, return_tensors="pt").input_ids
    cond = text_encoder(ids)[0]
    t = torch.randint(0, SCHEDULER["num_train_timesteps"], (len(latents),), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    pred = unet(noisy, t, encoder_hidden_states=cond).sample
    target = noise if prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents  # v
    loss = F.mse_loss(pred, target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    decay = min(0.999, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, params, 1 - decay)
    return loss


def train_denoiser(unet, text_encoder, tokenizer, lat_mean, lat_std, scaling, split, steps, batch, gen, log,
                   deadline=None):
    """Epsilon-prediction DDPM loss; prompts drawn per sample; EMA of UNet and text encoder weights.

    The learning rate is constant after warm-up and nothing depends on the planned total, so a run
    stopped by `deadline` after N steps equals a run with `steps=N`. Returns (unet, text, steps done).
    """
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(**SCHEDULER, prediction_type="epsilon")
    alphas_cumprod = noise_sched.alphas_cumprod
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-2)
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen)))
    labels, styles = split.train_labels, split.train_styles
    unet.train()
    text_encoder.train()
    start = time.time()
    done = 0
    for step in range(steps):
        if deadline is not None and time.time() > deadline:
            log(f"time limit reached: stopping after {step} steps")
            break
        idx = torch.randint(len(lat_mean), (batch,), generator=gen)
        latents = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scaling
        prompts = [
            "" if rng.random() < UNCOND_DROPOUT else digits_data.prompt_for(int(labels[i]), styles[i], rng)
            for i in idx.tolist()
        ]
        loss = denoiser_step(unet, text_encoder, tokenizer, latents, prompts, alphas_cumprod, gen,
                             opt, sched, params, ema_params, step)
        done = step + 1
        if step % 100 == 0 or step == steps - 1:
            rate = (time.time() - start) / (step + 1)
            log(f"unet step {step}/{steps} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} {rate:.2f}s/step")
    return ema_unet, ema_text, done


def save_pipeline(out: Path, tokenizer, text_encoder, vae, unet, training_info: dict,
                  scheduler_config: dict | None = None) -> None:
    """The diffusers StableDiffusionPipeline folder; `scheduler_config` replaces the SD 1.x Euler one."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    scheduler = EulerDiscreteScheduler(**(scheduler_config or dict(
        **SCHEDULER, prediction_type="epsilon", timestep_spacing="leading", steps_offset=1
    )))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    readme = out / "README.md"
    card = readme.read_text() if readme.exists() else None
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        # transformers 5 records its new class name "TokenizersBackend"; the old name is an alias of
        # it there and is the only one transformers 4 knows, so write that for portability.
        for name in ("model_index.json", "tokenizer/tokenizer_config.json"):
            path = tmp / name
            path.write_text(path.read_text().replace('"TokenizersBackend"', '"PreTrainedTokenizerFast"'))
        atomic_write_json(tmp / "training.json", training_info)
        if card is not None:  # the model card is written by hand; keep it across retraining
            (tmp / "README.md").write_text(card)


@torch.no_grad()
def evaluate(out: Path, scales, per_digit: int, steps: int, seed: int, log) -> dict:
    """Fraction of CFG samples the bundled classifier reads as the prompted digit, per scale."""
    from diffusers import StableDiffusionPipeline

    from samg.bundled import load_digit_classifier

    classify = load_digit_classifier()
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    results = {}
    for scale in scales:
        correct, per_class = 0, {}
        for digit in range(10):
            gen = torch.Generator().manual_seed(seed + digit)
            images = pipe(
                f"a handwritten {digit}", num_images_per_prompt=per_digit, num_inference_steps=steps,
                guidance_scale=scale, generator=gen, output_type="np",
            ).images
            logits, _ = classify(images)
            hits = int((logits.argmax(1) == digit).sum())
            per_class[digit] = hits / per_digit
            correct += hits
        results[str(scale)] = {"accuracy": correct / (10 * per_digit), "per_digit": per_class}
        log(f"eval guidance {scale}: {correct / (10 * per_digit):.3f}")
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=250)
    p.add_argument("--vae-batch-size", type=int, default=64)
    p.add_argument("--unet-steps", type=int, default=3000)
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop UNet training at this wall time (the steps done are recorded)")
    p.add_argument("--batch-size", type=int, default=64)
    # One thread: on the shared 2-core machine under load, 2 threads ran 6-8x slower per step.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="a few steps of everything, to check the path")
    p.add_argument("--eval-scales", type=float, nargs="*", default=[1.0, 2.0, 4.0, 7.5])
    p.add_argument("--eval-per-digit", type=int, default=20)
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--eval-only", action="store_true", help="skip training; evaluate the saved model")
    args = p.parse_args(argv)
    if args.smoke:
        args.vae_steps, args.unet_steps, args.batch_size, args.vae_batch_size = 3, 3, 16, 16
        args.eval_scales, args.eval_per_digit, args.eval_steps = [3.0], 2, 2

    torch.set_num_threads(args.threads)
    t0 = time.time()
    log = lambda msg: print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    if not args.eval_only:
        torch.manual_seed(args.seed)
        gen = torch.Generator().manual_seed(args.seed)
        split = digits_data.load_split()
        tokenizer = build_tokenizer()
        text_encoder, vae, unet = build_models(tokenizer)
        sizes = {name: count_params(m) for name, m in [("text_encoder", text_encoder), ("vae", vae), ("unet", unet)]}
        log(f"parameters: {sizes}")
        images = to_rgb_tensor(split.train_images)

        train_vae(vae, images, args.vae_steps, args.vae_batch_size, gen, log)
        t_vae = time.time() - t0
        lat_mean, lat_std = encode_latent_stats(vae, images)
        scaling = float(1.0 / lat_mean.std())  # SD's recipe: unit-variance latents for the UNet
        vae.register_to_config(scaling_factor=scaling)
        with torch.no_grad():
            recon = vae.decode(lat_mean[:256]).sample
        vae_mse = float(F.mse_loss(recon, images[:256]))
        log(f"vae done: scaling_factor {scaling:.4f}, recon mse (in [-1,1]) {vae_mse:.5f}")

        deadline = t0 + 60 * args.max_minutes if args.max_minutes else None
        ema_unet, ema_text, unet_steps_done = train_denoiser(
            unet, text_encoder, tokenizer, lat_mean, lat_std, scaling, split,
            args.unet_steps, args.batch_size, gen, log, deadline,
        )
        info = {
            "command": "python scripts/train_digits.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seed": args.seed, "vae_steps": args.vae_steps, "vae_batch_size": args.vae_batch_size,
            "unet_steps_planned": args.unet_steps, "unet_steps": unet_steps_done, "batch_size": args.batch_size, "threads": args.threads, "uncond_dropout": UNCOND_DROPOUT,
            "parameters": sizes, "vae_recon_mse": vae_mse, "vae_scaling_factor": scaling,
            "seconds": {"vae": round(t_vae, 1), "total_training": round(time.time() - t0, 1)},
            "split": {"seed": digits_data.SPLIT_SEED, "test_fraction": digits_data.TEST_FRACTION,
                      "test_indices": split.test_indices.tolist()},
            "versions": {"torch": torch.__version__},
        }
        save_pipeline(args.out, tokenizer, ema_text, vae, ema_unet, info)
        log(f"saved {args.out}")

    classifier_dir = REPO / "samg" / "bundled" / "digit-classifier"
    if (classifier_dir / "classifier.onnx").exists():
        results = evaluate(args.out, args.eval_scales, args.eval_per_digit, args.eval_steps, args.seed, log)
        atomic_write_json(args.out / "eval.json", {
            "prompt": "a handwritten {digit}", "sampler": "EulerDiscreteScheduler",
            "steps": args.eval_steps, "samples_per_digit": args.eval_per_digit, "results": results,
        })
    else:
        from diffusers import StableDiffusionPipeline  # at least prove the folder loads and runs

        pipe = StableDiffusionPipeline.from_pretrained(args.out)
        image = pipe("a 3", num_inference_steps=2, output_type="np").images
        log(f"reloaded and sampled: {image.shape} (no classifier bundled; skipped the accuracy check)")
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
