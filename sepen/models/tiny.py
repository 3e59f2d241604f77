"""Tiny random-weight pipelines of the Stable Diffusion architecture, for tests and smoke runs.

The layout mirrors SD 1.x at a fraction of the width: cross-attention down blocks, a plain
lowest level, a cross-attention mid block, and the mirrored up path; a CLIP text encoder with
the real CLIP BPE tokenizer; an AutoencoderKL with the same downsampling factor as SD (8).
"""

from __future__ import annotations

from pathlib import Path

import torch

from sepen.models.clip_tokenizer import build_clip_tokenizer

SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
)


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """A StableDiffusionPipeline from its parts, without safety checker or progress bars."""
    from diffusers import StableDiffusionPipeline

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
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_unet_config(sample_size: int = 16, cross_attention_dim: int = 32) -> dict:
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def sd_unet_config(width: float = 1.0, sample_size: int = 64) -> dict:
    """Stable Diffusion 1.x's UNet configuration, its channels scaled by `width` (1.0: SD 1.4).

    Heads stay 8 per layer, as in SD 1.x; the cross-attention width stays 768 (CLIP ViT-L/14).
    """
    channels = tuple(max(8, int(round(c * width / 8)) * 8) for c in (320, 640, 1280, 1280))
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32 if width >= 0.5 else 8,
    )


def build_tiny_pipeline(seed: int = 0, sample_size: int = 16, cross_attention_dim: int = 32):
    """A StableDiffusionPipeline with random weights (deterministic for `seed`)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(sample_size, cross_attention_dim))
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=sample_size * 8,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cross_attention_dim,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        **SD_SCHEDULER, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    return assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler)


def save_tiny_pipeline(path: str | Path, seed: int = 0, **kwargs) -> Path:
    """Build a tiny pipeline and `save_pretrained` it to `path` (safetensors)."""
    path = Path(path)
    build_tiny_pipeline(seed=seed, **kwargs).save_pretrained(path, safe_serialization=True)
    return path


def cli(argv=None) -> int:
    """`sepen tiny-model --out DIR`: write a tiny random SD-architecture pipeline."""
    import argparse

    p = argparse.ArgumentParser(
        prog="sepen tiny-model",
        description="Save a tiny random-weight Stable Diffusion pipeline (real CLIP tokenizer) "
        "for smoke runs and tests.",
    )
    p.add_argument("--out", type=Path, required=True, help="folder to save_pretrained into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-size", type=int, default=16, help="latent side (image = 8x)")
    args = p.parse_args(argv)
    save_tiny_pipeline(args.out, seed=args.seed, sample_size=args.sample_size)
    print(args.out)
    return 0
