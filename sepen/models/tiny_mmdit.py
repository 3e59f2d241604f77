"""Tiny random-weight MMDiT pipelines (Stable Diffusion 3 / 3.5 and FLUX.1), for tests and smoke
runs.

The layouts mirror the real models at a fraction of the width: SD3's two CLIP encoders with
projections (their hidden states side by side, padded to T5's width) and a T5 encoder, joint
blocks with the image tokens first; SD3.5's per-head RMSNorm on queries and keys and its dual
attention blocks (`attn2`: image-only self-attention); FLUX.1's CLIP (pooled only) and T5
encoders, double-stream blocks with the text first, single-stream blocks, RoPE, 2x2 latent
packing and (dev) the guidance embedding. The T5 tokenizer is built in memory
(sepen.models.t5_tokenizer); the CLIP tokenizer is sepen's real CLIP BPE.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sepen.models.clip_tokenizer import build_clip_tokenizer
from sepen.models.t5_tokenizer import build_t5_tokenizer
from sepen.models.tiny import _tiny_clip_config, _tiny_vae, as_loaded

T5_WIDTH = 32


def _mmdit_vae(sample_size: int, latent_channels: int, shift: float):
    """The tiny 8x AutoencoderKL with the MMDiT latent shift and scale, no quant convs."""
    return _tiny_vae(
        sample_size,
        latent_channels=latent_channels,
        scaling_factor=1.5,
        shift_factor=shift,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _tiny_t5(tokenizer):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=T5_WIDTH,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def tiny_sd3_transformer_config(sample_size: int = 16, sd35: bool = False) -> dict:
    """SD3's joint transformer at a tiny width; `sd35`: RMSNorm on q/k, dual attention (block 0)."""
    return dict(
        sample_size=sample_size,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=32,
        pooled_projection_dim=32,
        pos_embed_max_size=sample_size // 2,
        qk_norm="rms_norm" if sd35 else None,
        dual_attention_layers=(0,) if sd35 else (),
    )


def build_tiny_sd3_pipeline(seed: int = 0, sample_size: int = 16, sd35: bool = False):
    """A StableDiffusion3Pipeline with random weights (deterministic for `seed`)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_clip_tokenizer(pad_token="!")
    tokenizer_3 = build_t5_tokenizer(256)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**tiny_sd3_transformer_config(sample_size, sd35))
    clips = [
        CLIPTextModelWithProjection(_tiny_clip_config(t, 16, projection_dim=16))
        for t in (tokenizer, tokenizer_2)
    ]
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_mmdit_vae(sample_size, 16, 0.06),
        text_encoder=clips[0],
        tokenizer=tokenizer,
        text_encoder_2=clips[1],
        tokenizer_2=tokenizer_2,
        text_encoder_3=_tiny_t5(tokenizer_3),
        tokenizer_3=tokenizer_3,
    )
    return as_loaded(pipe)


def tiny_flux_transformer_config(guidance: bool = True) -> dict:
    """FLUX.1's transformer at a tiny width (dev: with the guidance embedding)."""
    return dict(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=16,
        guidance_embeds=guidance,
        axes_dims_rope=(2, 2, 4),
    )


def build_tiny_flux_pipeline(seed: int = 0, sample_size: int = 16, guidance: bool = True):
    """A FluxPipeline with random weights (deterministic for `seed`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_t5_tokenizer(512)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**tiny_flux_transformer_config(guidance))
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
        vae=_mmdit_vae(sample_size, 4, 0.1),
        text_encoder=CLIPTextModel(_tiny_clip_config(tokenizer, 16)),
        tokenizer=tokenizer,
        text_encoder_2=_tiny_t5(tokenizer_2),
        tokenizer_2=tokenizer_2,
    )
    return as_loaded(pipe)


def save_tiny_mmdit_pipeline(path: str | Path, kind: str, seed: int = 0) -> Path:
    """Build a tiny `sd3`, `sd35` or `flux` pipeline and `save_pretrained` it to `path`."""
    builders = {
        "sd3": lambda: build_tiny_sd3_pipeline(seed),
        "sd35": lambda: build_tiny_sd3_pipeline(seed, sd35=True),
        "flux": lambda: build_tiny_flux_pipeline(seed),
    }
    if kind not in builders:
        raise ValueError(f"tiny MMDiT kind {kind!r} is not one of {sorted(builders)}")
    path = Path(path)
    builders[kind]().save_pretrained(path, safe_serialization=True)
    return path
