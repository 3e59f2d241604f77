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


def as_loaded(pipe):
    """`pipe` as `from_pretrained` gives it: every model in eval mode (a model built from its
    config is in training mode, so the tiny T5's dropout would make each encoding differ), no
    progress bars."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
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


def sdxl_unet_config(width: float = 1.0, sample_size: int = 128) -> dict:
    """Stable Diffusion XL's UNet configuration, its channels scaled by `width` (1.0: SDXL base).

    Head dimension 64 as in SDXL (5, 10, 20 heads at full width); transformer depths 1, 2, 10;
    the text width (2048 = 768 + 1280) and the size/crop conditioning stay as in SDXL.
    """
    channels = tuple(max(64, int(round(c * width / 64)) * 64) for c in (320, 640, 1280))
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=tuple(c // 64 for c in channels),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=1280 + 6 * 256,
        norm_num_groups=32,
    )


def tiny_sdxl_unet_config(sample_size: int = 16, text_widths=(32, 32)) -> dict:
    """SDXL's layout (no attention at the top level, deeper transformers lower down, the
    text-time additional embedding) at a tiny width."""
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 2, 4),
        cross_attention_dim=sum(text_widths),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=text_widths[1] + 6 * 8,
        norm_num_groups=8,
    )


def _tiny_vae(sample_size: int, **extra):
    """The tiny pipelines' 8x AutoencoderKL (random weights) for `sample_size` latents;
    `extra` overrides its settings (the MMDiT pipelines' latent channels, shift and scale)."""
    from diffusers import AutoencoderKL

    settings = dict(
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
    settings.update(extra)
    return AutoencoderKL(**settings)


def _tiny_clip_config(tokenizer, width: int, **extra):
    """A 2-layer CLIP text encoder's config of hidden size `width` for `tokenizer`."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def build_tiny_sdxl_pipeline(seed: int = 0, sample_size: int = 16):
    """A StableDiffusionXLPipeline with random weights: two CLIP text encoders (the second
    with a projection, its tokenizer padding with "!"), SDXL's UNet layout, an 8x VAE."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_clip_tokenizer(pad_token="!")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_sdxl_unet_config(sample_size))
    vae = _tiny_vae(sample_size)
    text_encoder = CLIPTextModel(_tiny_clip_config(tokenizer, 32))
    text_encoder_2 = CLIPTextModelWithProjection(
        _tiny_clip_config(tokenizer_2, 32, projection_dim=32)
    )
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULER, steps_offset=1)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    return as_loaded(pipe)


def build_tiny_pipeline(seed: int = 0, sample_size: int = 16, cross_attention_dim: int = 32):
    """A StableDiffusionPipeline with random weights (deterministic for `seed`)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(sample_size, cross_attention_dim))
    vae = _tiny_vae(sample_size)
    text_encoder = CLIPTextModel(_tiny_clip_config(tokenizer, cross_attention_dim))
    scheduler = DDIMScheduler(
        **SD_SCHEDULER, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    return as_loaded(assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler))


def save_tiny_pipeline(path: str | Path, seed: int = 0, sdxl: bool = False, **kwargs) -> Path:
    """Build a tiny pipeline (SD 1.x layout, or SDXL's) and `save_pretrained` it to `path`."""
    path = Path(path)
    build = build_tiny_sdxl_pipeline if sdxl else build_tiny_pipeline
    build(seed=seed, **kwargs).save_pretrained(path, safe_serialization=True)
    return path
