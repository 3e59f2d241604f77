"""The toy text-to-image model, assembled as a diffusers StableDiffusionPipeline.

A real UNet2DConditionModel with cross-attention at 16x16 and 8x8 (and the 4x4 mid block), a
transformers CLIPTextModel, a word-level tokenizer, and a two-level AutoencoderKL (32x32 images,
16x16x4 latents), so that finetuning, sampling and metrics use the same code paths as on Stable
Diffusion.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from sepen.models.tiny import assemble_pipeline
from sepen.toy.world import CONCEPTS

SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
WORDS = ["a", "an", "photo", "of", "and", "with"]


def build_tokenizer(concepts=None, max_length: int = 16) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (one token per word, lower-cased) with start and end tokens."""
    names = list(concepts or CONCEPTS)
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS + names)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>",
        special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def build_toy_vae(m: dict, **extra):
    """The toy world's two-level autoencoder (32x32 images, 16x16x4 latents), untrained.

    `extra`: further AutoencoderKL settings (the toy MMDiT's `shift_factor`)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(m["vae_channels"], 2 * m["vae_channels"]),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=m["image_size"],
        mid_block_add_attention=False,
        **extra,
    )


def build_toy_pipeline(cfg: dict, seed: int = 0):
    """An untrained toy pipeline from the `toy.model` config section."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    m = cfg
    tokenizer = build_tokenizer(max_length=m["max_tokens"])
    torch.manual_seed(seed)
    width = m["text_width"]
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=m["text_layers"],
            num_attention_heads=4,
            max_position_embeddings=m["max_tokens"],
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    channels = tuple(m["channels"])
    unet = UNet2DConditionModel(
        sample_size=m["image_size"] // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width,
        attention_head_dim=m["heads"],
        norm_num_groups=8,
    )
    vae = build_toy_vae(m)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        steps_offset=1,
        prediction_type=m["prediction_type"],
        clip_sample=False,
        set_alpha_to_one=False,
    )
    return assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler)
