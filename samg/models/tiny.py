"""Tiny randomly initialised diffusers pipelines, one builder per family.

They keep each family's structure (the same component classes, conditioning, latent layout, VAE
factors and scheduler recipe as the published checkpoint) at a size that exports in about a
second, so the real loading and export code can be tested with no downloaded weights.
Tokenizers are built locally: a byte-level BPE CLIP tokenizer over a handful of merges and a
Unigram T5 tokenizer over a few words. Everything is seeded and deterministic.
"""

from __future__ import annotations

from typing import Any

from samg.errors import require

_WORDS = "a photo of the cat dog red blue green tree house car digit zero one two three four five six seven eight nine"


def _torch():
    return require("torch", "to build tiny models")


def _diffusers():
    return require("diffusers", "to build tiny models")


def _transformers():
    return require("transformers", "to build tiny models")


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """Byte-level BPE tokenizer with CLIP's pre/post-processing and a tiny vocabulary."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for char in alphabet:
        vocab[char] = len(vocab)
    for char in alphabet:
        vocab[char + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in _WORDS.split():
        # Merge left to right so every listed word becomes one token.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            merged = pair[0] + pair[1]
            if merged not in vocab:
                merges.append(pair)
                vocab[merged] = len(vocab)
            pieces = [merged] + pieces[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = _transformers().CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token)
    tokenizer.model_max_length = 77
    return tokenizer


def t5_tokenizer(max_length: int):
    """Unigram tokenizer with T5's special tokens (pad 0, eos 1, unk 2) and a tiny vocabulary."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, -1.0) for word in _WORDS.split()]
    pieces += [(char, -5.0) for char in "abcdefghijklmnopqrstuvwxyz0123456789.,!?"]
    tokenizer = _transformers().T5TokenizerFast(vocab=pieces, extra_ids=0)
    tokenizer.model_max_length = max_length
    return tokenizer


def _clip_encoder(tokenizer, *, with_projection: bool, hidden: int = 32, projection: int = 32):
    t = _transformers()
    config = t.CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,  # >= 2 so the penultimate hidden state is a real layer output
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = t.CLIPTextModelWithProjection if with_projection else t.CLIPTextModel
    return cls(config).eval()


def _t5_encoder(tokenizer, d_model: int):
    t = _transformers()
    config = t.T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=0,
    )
    return t.T5EncoderModel(config).eval()


def _vae_2d(latent_channels: int, scaling_factor: float, shift_factor: float | None = None, **extra):
    # Four blocks: the same 8x spatial factor as the real VAEs.
    return _diffusers().AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        **extra,
    ).eval()


def _scheduler(spec):
    config = {k: v for k, v in spec.scheduler.items() if k != "kind"}
    if spec.prediction_type != "flow":
        config["prediction_type"] = spec.prediction_type
    if spec.scheduler_class == "PNDMScheduler":
        config["skip_prk_steps"] = True
    cls = getattr(_diffusers(), spec.scheduler_class)
    return cls.from_config(config)


def _seed(seed: int) -> None:
    _torch().manual_seed(seed)


def tiny_sd(spec, seed: int = 0) -> Any:
    """SD 1.5 / 2.1 structure (2.1: linear projections in the transformer blocks, v-prediction)."""
    _seed(seed)
    d = _diffusers()
    tokenizer = clip_tokenizer("<|endoftext|>" if spec.name != "sd21" else "!")
    unet = d.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4) if spec.name == "sd21" else 8,
        use_linear_projection=spec.name == "sd21",
        norm_num_groups=8,
    ).eval()
    return d.StableDiffusionPipeline(
        vae=_vae_2d(4, spec.vae_scaling_factor),
        text_encoder=_clip_encoder(tokenizer, with_projection=False),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(spec),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl(spec, seed: int = 0) -> Any:
    _seed(seed)
    d = _diffusers()
    tokenizer = clip_tokenizer("<|endoftext|>")
    tokenizer_2 = clip_tokenizer("!")
    text_encoder = _clip_encoder(tokenizer, with_projection=False, hidden=32)
    text_encoder_2 = _clip_encoder(tokenizer_2, with_projection=True, hidden=32, projection=32)
    time_embed_dim = 8
    unet = d.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,  # both CLIP hidden states concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + 32,
        transformer_layers_per_block=(1, 2),
        norm_num_groups=8,
    ).eval()
    return d.StableDiffusionXLPipeline(
        vae=_vae_2d(4, spec.vae_scaling_factor),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler(spec),
        force_zeros_for_empty_prompt=spec.force_zeros_for_empty_prompt,
    )


def tiny_sd3(spec, seed: int = 0) -> Any:
    """SD 3.5 medium structure: MMDiT with qk RMS norm and a dual-attention layer, 3 text encoders."""
    _seed(seed)
    d = _diffusers()
    tokenizer = clip_tokenizer("<|endoftext|>")
    tokenizer_2 = clip_tokenizer("!")
    t5_length = spec.text_encoders[2].max_length
    tokenizer_3 = t5_tokenizer(t5_length)
    t5_width = 96  # wider than both CLIP widths together (64), so the pipeline's zero padding shows
    transformer = d.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=t5_width,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
        qk_norm="rms_norm",
        dual_attention_layers=(0,),
    ).eval()
    return d.StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_scheduler(spec),
        vae=_vae_2d(16, spec.vae_scaling_factor, spec.vae_shift_factor, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip_encoder(tokenizer, with_projection=True),
        tokenizer=tokenizer,
        text_encoder_2=_clip_encoder(tokenizer_2, with_projection=True),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_t5_encoder(tokenizer_3, t5_width),
        tokenizer_3=tokenizer_3,
    )


def tiny_cogvideox(spec, seed: int = 0) -> Any:
    _seed(seed)
    d = _diffusers()
    max_length = spec.text_encoders[0].max_length
    tokenizer = t5_tokenizer(max_length)
    transformer = d.CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        time_embed_dim=8,
        text_embed_dim=32,
        num_layers=1,
        sample_width=8,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=spec.temporal_factor,
        max_text_seq_length=max_length,
    ).eval()
    vae = d.AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=spec.latent_channels,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=spec.temporal_factor,
        scaling_factor=spec.vae_scaling_factor,
    ).eval()
    return d.CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5_encoder(tokenizer, 32),
        vae=vae,
        transformer=transformer,
        scheduler=_scheduler(spec),
    )


def tiny_modelscope(spec, seed: int = 0) -> Any:
    _seed(seed)
    d = _diffusers()
    tokenizer = clip_tokenizer("<|endoftext|>")
    unet = d.UNet3DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()
    return d.TextToVideoSDPipeline(
        vae=_vae_2d(4, spec.vae_scaling_factor),
        text_encoder=_clip_encoder(tokenizer, with_projection=False),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(spec),
    )
