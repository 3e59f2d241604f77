"""What differs between the denoiser families sepen finetunes: the UNets of Stable Diffusion
1.x/2.x/XL and the MMDiT transformers of Stable Diffusion 3/3.5 and FLUX.1.

Everything else (the signal, the losses, the optimisation loop, deltas) is written once against
this module: which layers hold the text keys and which projection is trained there, how the
attention capture is installed, how a denoiser is called on latents, how latents are noised
(DDPM noise for the UNets, flow matching for the MMDiTs), and where each concept's tokens lie in
the text sequence the denoiser sees (SD3: CLIP's 77 positions, then T5's; FLUX.1: T5 only).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch

from sepen.attention import captured_layers, cross_attention_factors, install_capture
from sepen.errors import ConceptNotFoundError, ConfigError
from sepen.joint_attention import (
    captured_blocks,
    install_joint_capture,
    is_joint,
    joint_layers,
    restore_processors,
)
from sepen.tokens import concept_token_positions

FAMILIES = {
    "UNet2DConditionModel": "unet",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
}
# default T5 sequence lengths of the diffusers pipelines (max_sequence_length)
T5_LENGTH = {"sd3": 256, "flux": 512}


def text_length(pipe) -> int | None:
    """The T5 part's length of an MMDiT's text sequence (None for UNets).

    The pipelines' defaults (SD3 256, FLUX.1 512), except for an SD3 without its T5 encoder,
    whose T5 part is zeros: it gets the CLIP length (77; the toy MMDiT's 16), as SD3's own
    inference code does, not 256 zero tokens."""
    kind = family(pipe)
    if kind == "unet":
        return None
    if kind == "sd3" and getattr(pipe, "text_encoder_3", None) is None:
        return pipe.tokenizer_max_length
    return T5_LENGTH[kind]


def call_options(pipe) -> dict:
    """Extra arguments of every pipeline call sepen makes (the MMDiTs' `text_length`)."""
    length = text_length(pipe)
    return {} if length is None else {"max_sequence_length": length}


def denoiser_of(pipe):
    """The pipeline's denoiser: its UNet or its transformer (a bare model is returned as is)."""
    for name in ("unet", "transformer"):
        model = getattr(pipe, name, None)
        if model is not None:
            return model
    return pipe


def family(model_or_pipe) -> str:
    """'unet', 'sd3' or 'flux', from the denoiser's class."""
    name = type(denoiser_of(model_or_pipe)).__name__
    if name not in FAMILIES:
        raise TypeError(f"sepen does not finetune a {name}; it knows {sorted(FAMILIES)}")
    return FAMILIES[name]


def key_layers(model) -> list[str]:
    """The attention modules whose text keys sepen trains, in forward order."""
    return joint_layers(model) if is_joint(model) else list(cross_attention_factors(model))


def projections(model, mode: str) -> tuple[str, ...]:
    """The text-key (and, for "to_k+to_v", text-value) projection names of a key layer."""
    keys, values = ("add_k_proj", "add_v_proj") if is_joint(model) else ("to_k", "to_v")
    return (keys, values) if mode == "to_k+to_v" else (keys,)


def install(model, ft: dict, latent_side: int, detach_start_token: bool = True):
    """The capture a `finetune` section (or any dict with its keys) asks for: UNet layers at
    `resolutions`, or an MMDiT's joint `blocks` with `joint_maps`."""
    if is_joint(model):
        return install_joint_capture(
            model,
            ft.get("blocks"),
            latent_side,
            ft.get("joint_maps", "joint"),
            detach_start_token=None if detach_start_token else False,
            image_queries_only=ft.get("key_scope") == "image_queries",
        )
    return install_capture(model, ft["resolutions"], latent_side, detach_start_token)


@contextmanager
def capturing(model, capture: dict, latent_side: int, detach_start_token: bool = True):
    """`install` for the duration of a block; the previous processors are restored after it."""
    saved = None if is_joint(model) else dict(model.attn_processors)
    store = install(model, capture, latent_side, detach_start_token)
    try:
        yield store
    finally:
        if saved is None:
            restore_processors(model, store)
        else:
            model.set_attn_processor(saved)


def check_capture(model, ft: dict, latent_side: int) -> list[str]:
    """The layers a `finetune` section captures; an error naming the bad setting if none."""
    if ft.get("key_scope") == "image_queries" and ft.get("trainable") == "to_k+to_v":
        raise ConfigError(
            "finetune.key_scope: image_queries keeps the text queries on the base model's keys, "
            "but finetune.trainable: to_k+to_v also trains the values every query reads: use "
            "trainable to_k or lora with it, or key_scope: all"
        )
    if is_joint(model):
        return captured_blocks(model, ft.get("blocks"))
    return captured_layers(model, ft["resolutions"], latent_side)


def latent_channels(pipe) -> int:
    return int(pipe.vae.config.latent_channels)


class Denoiser:
    """Calls a UNet or MMDiT on (noisy latents, timesteps, text embeddings, extra conditioning)
    and returns its prediction with the latents' shape.

    UNet: `extra` is SDXL's `added_cond_kwargs` (or None). SD3: `extra["pooled_projections"]`.
    FLUX.1: the latents are packed 2x2 into tokens with their position ids, the timestep is
    given as a fraction, the text ids are zeros, and a guidance-distilled model (dev) gets
    `guidance` as its embedded guidance scale.
    """

    def __init__(self, model, guidance: float | None = None):
        self.model = model
        self.kind = family(model)
        self.guidance = guidance

    def __call__(self, noisy, timesteps, emb, extra=None):
        model = self.model
        if self.kind == "unet":
            kwargs = {} if extra is None else {"added_cond_kwargs": extra}
            return model(noisy, timesteps, emb, **kwargs).sample
        if self.kind == "sd3":
            return model(
                hidden_states=noisy,
                timestep=timesteps,
                encoder_hidden_states=emb,
                pooled_projections=extra["pooled_projections"],
            ).sample
        return self._flux(noisy, timesteps, emb, extra)

    def _flux(self, noisy, timesteps, emb, extra):
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(
            b, h // 2, w // 2, noisy.device, emb.dtype
        )
        guidance = None
        if self.model.config.guidance_embeds:
            scale = 3.5 if self.guidance is None else self.guidance
            guidance = torch.full((b,), float(scale), device=noisy.device, dtype=torch.float32)
        out = self.model(
            hidden_states=packed,
            timestep=timesteps.to(packed.dtype) / 1000,
            guidance=guidance,
            pooled_projections=extra["pooled_projections"],
            encoder_hidden_states=emb,
            txt_ids=torch.zeros(emb.shape[1], 3, device=noisy.device, dtype=emb.dtype),
            img_ids=image_ids,
        ).sample
        return FluxPipeline._unpack_latents(out, h, w, 1)


class Noiser:
    """Noisy latents and the denoiser's timesteps for clean latents, noise and timestep indices.

    UNets: the DDPM forward process (`add_noise`), the index is the timestep. MMDiTs: flow
    matching, x_t = (1 - sigma) x_0 + sigma * noise with the scheduler's sigma of that index
    (unshifted where the pipeline shifts by resolution at sampling time, as FLUX.1 does).
    """

    def __init__(self, pipe):
        from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

        self.flow = family(pipe) != "unet"
        cls = FlowMatchEulerDiscreteScheduler if self.flow else DDPMScheduler
        self.scheduler = cls.from_config(pipe.scheduler.config)
        self.num_timesteps = self.scheduler.config.num_train_timesteps

    def __call__(self, latents, noise, index):
        if not self.flow:
            return self.scheduler.add_noise(latents, noise, index), index
        sigma = self.scheduler.sigmas.to(latents.device)[index].view(-1, 1, 1, 1)
        timesteps = self.scheduler.timesteps.to(latents.device)[index]
        return (1 - sigma) * latents + sigma * noise, timesteps


def text_encoders(pipe) -> list[tuple[str, object, int, int | None]]:
    """(label, tokenizer, offset in the text sequence, length) of each token copy of a prompt.

    UNets: the (first) CLIP tokenizer. SD3: CLIP at 0..76 (both CLIP encoders side by side in
    channels), then T5 from 77 when the pipeline has its T5 encoder. FLUX.1: T5 only.
    """
    kind = family(pipe)
    if kind == "unet":
        return [("CLIP (tokenizer)", pipe.tokenizer, 0, None)]
    if kind == "flux":
        return [("T5 (tokenizer_2)", pipe.tokenizer_2, 0, text_length(pipe))]
    out = [("CLIP (tokenizer)", pipe.tokenizer, 0, None)]
    if getattr(pipe, "text_encoder_3", None) is not None:
        out.append(
            ("T5 (tokenizer_3)", pipe.tokenizer_3, pipe.tokenizer_max_length, text_length(pipe))
        )
    return out


def text_positions(pipe, prompt: str, concepts: Sequence[str]) -> list[list[int]]:
    """Each concept's positions in the denoiser's text sequence, every token copy included.

    A concept that one tokenizer cannot find is a ConceptNotFoundError naming that tokenizer.
    """
    found: list[list[int]] = [[] for _ in concepts]
    for label, tokenizer, offset, length in text_encoders(pipe):
        try:
            positions = concept_token_positions(tokenizer, prompt, concepts, length)
        except ConceptNotFoundError as err:
            raise ConceptNotFoundError(f"{label}: {err}") from err
        for i, pos in enumerate(positions):
            found[i] += [offset + p for p in pos]
    return found
