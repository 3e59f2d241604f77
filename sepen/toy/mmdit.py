"""The toy MMDiT world's model: a tiny Stable Diffusion 3, assembled as a diffusers
`StableDiffusion3Pipeline` (`toy.model.architecture: mmdit`).

An `SD3Transformer2DModel` (joint attention, image tokens first, 2x2 patches of the 16x16x4
latents: an 8x8 token grid) conditioned like SD3: two causal CLIP text encoders with
projections (the first as wide and deep as world v3's, plus one layer because SD3 reads the
penultimate hidden states; the second a small one, which SD3's pipeline requires), their hidden
states side by side and their pooled projections concatenated. There is no T5: the pipeline
fills its part of the sequence with zeros, as it does for SD3 without `text_encoder_3`, here
of the CLIP length (16; sepen.architecture.text_length). The
autoencoder is world v3's; sampling is flow matching with Euler steps. Pretraining
(`sepen toy pretrain`) uses flow matching's velocity target and the same attention grounding as
world v3, on the joint blocks' image->text maps renormalised over the text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sepen.tokens import prompt_ids
from sepen.toy.model import build_tokenizer, build_toy_vae

SECOND_WIDTH = 16  # the small second CLIP encoder (SD3's pipeline calls two)


def build_toy_mmdit_pipeline(m: dict, seed: int = 0):
    """An untrained toy MMDiT pipeline from the `toy.model` config section."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = build_tokenizer(max_length=m["max_tokens"])
    torch.manual_seed(seed)

    def clip(width: int, layers: int):
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=width,
                intermediate_size=2 * width,
                num_hidden_layers=layers,
                num_attention_heads=4,
                max_position_embeddings=m["max_tokens"],
                projection_dim=width,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )

    width = m["text_width"]
    text_encoder, text_encoder_2 = clip(width, m["text_layers"] + 1), clip(SECOND_WIDTH, 1)
    side, patch = m["image_size"] // 2, m.get("patch_size", 2)
    transformer = SD3Transformer2DModel(
        sample_size=side,
        patch_size=patch,
        in_channels=4,
        out_channels=4,
        num_layers=m["layers"],
        attention_head_dim=m["head_dim"],
        num_attention_heads=m["heads"],
        joint_attention_dim=width + SECOND_WIDTH,
        caption_projection_dim=m["heads"] * m["head_dim"],
        pooled_projection_dim=width + SECOND_WIDTH,
        pos_embed_max_size=side // patch,
        qk_norm=m.get("qk_norm"),
    )
    vae = build_toy_vae(m, shift_factor=0.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=m.get("flow_shift", 1.0)
        ),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_with_grad(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(text sequence, pooled projection) of `prompts` exactly as the SD3 pipeline's
    `encode_prompt` builds them without T5, but with gradients to the text encoders."""
    parts, pooled = [], []
    for tokenizer, encoder in (
        (pipe.tokenizer, pipe.text_encoder),
        (pipe.tokenizer_2, pipe.text_encoder_2),
    ):
        ids = prompt_ids(tokenizer, prompts).to(encoder.device)
        out = encoder(ids, output_hidden_states=True)
        parts.append(out.hidden_states[-2])
        pooled.append(out[0])
    clip = torch.cat(parts, -1)
    width = pipe.transformer.config.joint_attention_dim
    clip = F.pad(clip, (0, width - clip.shape[-1]))
    t5 = torch.zeros(
        len(prompts), pipe.tokenizer_max_length, width, dtype=clip.dtype, device=clip.device
    )
    return torch.cat([clip, t5], 1), torch.cat(pooled, -1)


def flow_loss(
    pipe, z: torch.Tensor, prompts: list[str], g: torch.Generator, sigmas: str = "uniform"
) -> torch.Tensor:
    """Flow matching's loss on clean latents `z`: x = (1 - sigma) z + sigma noise, the
    transformer predicts noise - z (SD3's velocity target). `sigmas`: "uniform" draws sigma ~
    U(0, 1) (the first toy MMDiT); "logit_normal" draws sigma = sigmoid(n), n ~ N(0, 1), SD3's
    choice, which spends the steps on middle noise levels, where the layout and shapes form."""
    noise = torch.randn(z.shape, generator=g)
    if sigmas == "logit_normal":
        sigma = torch.sigmoid(torch.randn(len(z), generator=g)).view(-1, 1, 1, 1)
    else:
        sigma = torch.rand(len(z), generator=g).view(-1, 1, 1, 1)
    noisy = (1 - sigma) * z + sigma * noise
    emb, pooled = encode_with_grad(pipe, prompts)
    pred = pipe.transformer(
        hidden_states=noisy,
        timestep=sigma.flatten() * pipe.scheduler.config.num_train_timesteps,
        encoder_hidden_states=emb,
        pooled_projections=pooled,
    ).sample
    return F.mse_loss(pred, noise - z)
