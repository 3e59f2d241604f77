"""A pipeline's own sampling steps, taken apart so that a loop of ours can act between them:
prompt encoding, initial latents and timesteps, the classifier-free-guidance prediction and the
scheduler step, and decoding, for Stable Diffusion 1.x/2.x, XL and 3/3.5 (each as its diffusers
pipeline's __call__ does them). The test-time guidance loop (sepen.guidance) is built on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sepen.architecture import Denoiser, denoiser_of, family, text_length
from sepen.errors import SepenError
from sepen.models.loading import is_sdxl


@dataclass
class Conditioning:
    """Text conditioning of a batch: the classifier-free-guidance pair and the conditional half."""

    emb: torch.Tensor  # (2B or B, T, C): [unconditional; conditional] with guidance
    added: dict | None  # SDXL's added_cond_kwargs, SD3's pooled projections, for `emb`
    guidance: bool

    def cond(self, index: torch.Tensor | None = None) -> tuple[torch.Tensor, dict | None]:
        """The conditional prompts' embeddings (and added conditioning), optionally a subset."""
        n = self.emb.shape[0] // 2 if self.guidance else 0

        def pick(x):
            x = x[n:]
            return x if index is None else x[index]

        added = None if self.added is None else {k: pick(v) for k, v in self.added.items()}
        return pick(self.emb), added


def check_supported(pipe) -> None:
    """Test-time guidance runs on SD 1.x/2.x/XL and SD3/SD3.5 pipelines."""
    if family(pipe) == "flux":
        raise SepenError(
            "test-time guidance (attend_excite, sepen_test_time) is not available for FLUX.1 "
            "yet: remove those methods from evaluation.methods for this model (SepEn finetuning "
            "works; docs/mmdit.md)"
        )


def encode(pipe, prompts: Sequence[str], guidance_scale: float, height: int, width: int):
    """The pipeline's own prompt encoding (and SDXL's size/crop time ids), as its __call__ does."""
    device = pipe._execution_device
    guidance = guidance_scale > 1.0
    if family(pipe) == "sd3":
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(
            list(prompts), None, None, device=device, do_classifier_free_guidance=guidance,
            max_sequence_length=text_length(pipe),
        )  # fmt: skip
        if guidance:
            emb, pooled = torch.cat([neg, emb]), torch.cat([neg_pooled, pooled])
        return Conditioning(emb, {"pooled_projections": pooled}, guidance)
    if not is_sdxl(pipe):
        emb, neg = pipe.encode_prompt(list(prompts), device, 1, guidance)
        return Conditioning(torch.cat([neg, emb]) if guidance else emb, None, guidance)
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompt=list(prompts), device=device, num_images_per_prompt=1,
        do_classifier_free_guidance=guidance,
    )  # fmt: skip
    projection = (
        int(pooled.shape[-1])
        if pipe.text_encoder_2 is None
        else pipe.text_encoder_2.config.projection_dim
    )
    time_ids = pipe._get_add_time_ids(
        (height, width), (0, 0), (height, width), dtype=emb.dtype,
        text_encoder_projection_dim=projection,
    )  # fmt: skip
    if guidance:
        emb, pooled = torch.cat([neg, emb]), torch.cat([neg_pooled, pooled])
        time_ids = torch.cat([time_ids, time_ids])
    time_ids = time_ids.to(device).repeat(len(prompts), 1)
    added = {"text_embeds": pooled.to(device), "time_ids": time_ids}
    return Conditioning(emb.to(device), added, guidance)


def image_size(pipe) -> int:
    """The pipeline's default image side in pixels."""
    model = denoiser_of(pipe)
    return model.config.sample_size * pipe.vae_scale_factor


def start(pipe, seeds: Sequence[int], steps: int, cond: Conditioning, size: int):
    """(initial latents, timesteps, scheduler step kwargs), as the pipeline's __call__ starts."""
    device = pipe._execution_device
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps, device=device)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    model = denoiser_of(pipe)
    latents = pipe.prepare_latents(
        len(seeds), model.config.in_channels, size, size, cond.emb.dtype, device, generators
    )
    prepare = getattr(pipe, "prepare_extra_step_kwargs", None)
    extra = prepare(generators, 0.0) if prepare is not None else {}
    return latents, scheduler.timesteps, extra


def scale_input(scheduler, x: torch.Tensor, t) -> torch.Tensor:
    """The scheduler's input scaling (flow-matching schedulers have none)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return x if scale is None else scale(x, t)


def denoise_step(pipe, call: Denoiser, latents, t, cond: Conditioning, scale: float, extra):
    """One denoising step with classifier-free guidance, without gradient."""
    model_in = torch.cat([latents] * 2) if cond.guidance else latents
    model_in = scale_input(pipe.scheduler, model_in, t)
    with torch.no_grad():
        noise = call(model_in, batched(call, t, len(model_in)), cond.emb, cond.added)
    if cond.guidance:
        uncond, text = noise.chunk(2)
        noise = uncond + scale * (text - uncond)
    return pipe.scheduler.step(noise, t, latents, **extra, return_dict=False)[0]


def batched(call: Denoiser, t, n: int):
    """UNets take a scalar timestep; the MMDiTs one per image (as their pipelines expand it)."""
    return t if call.kind == "unet" else t.expand(n)


def decode(pipe, latents: torch.Tensor, output_type: str = "np"):
    """Images from final latents, as the pipeline's __call__ decodes them."""
    if output_type == "latent":
        return latents
    vae = pipe.vae
    upcast = is_sdxl(pipe) and vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        vae.to(dtype=torch.float32)
    latents = latents.to(vae.dtype)
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if is_sdxl(pipe) and mean is not None and std is not None:
        shape = (1, len(mean), 1, 1)
        mean = torch.tensor(mean).view(shape).to(latents)
        std = torch.tensor(std).view(shape).to(latents)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
        if family(pipe) == "sd3":
            latents = latents + vae.config.shift_factor
    with torch.no_grad():
        image = vae.decode(latents, return_dict=False)[0]
    if upcast:
        vae.to(dtype=torch.float16)
    if is_sdxl(pipe) and getattr(pipe, "watermark", None) is not None:
        image = pipe.watermark.apply_watermark(image)
    return pipe.image_processor.postprocess(
        image, output_type=output_type, do_denormalize=[True] * image.shape[0]
    )
