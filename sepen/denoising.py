"""A pipeline's own sampling steps, taken apart so that a loop of ours can act between them:
prompt encoding, initial latents and timesteps, the classifier-free-guidance prediction and the
scheduler step, and decoding, for Stable Diffusion 1.x/2.x, XL, 3/3.5 and FLUX.1 (each as its
diffusers pipeline's __call__ does them). The test-time guidance loop (sepen.guidance) is built
on it.

FLUX.1 differs in three ways, all as `FluxPipeline.__call__` does it: no classifier-free
guidance (a guidance-distilled model gets `guidance_scale` as its embedded guidance; schnell
ignores it); the latents the loop holds are packed 2x2 into tokens, (B, h/2 * w/2, 4C), and the
scheduler steps them packed (`model_input` unpacks them for the denoiser, `to_latents` packs its
prediction); the timesteps are shifted by the image's token count (`mu`).
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


SUPPORTED = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline",
             "FluxPipeline")  # fmt: skip


def check_supported(pipe) -> None:
    """Test-time guidance runs on the text-to-image pipelines of SD 1.x/2.x, XL, SD3/SD3.5 and
    FLUX.1 (their own steps, above); any other pipeline is a one-line error naming it."""
    name = type(pipe).__name__
    if name not in SUPPORTED:
        raise SepenError(
            f"test-time guidance (attend_excite, sepen_test_time) runs on {', '.join(SUPPORTED)}; "
            f"this model loads as {name}: remove those methods from evaluation.methods for it "
            "(base and SepEn still sample)"
        )


def is_flux(pipe) -> bool:
    return family(pipe) == "flux"


def denoiser(pipe, guidance_scale: float) -> Denoiser:
    """The denoiser call of the loop; FLUX.1 [dev] gets `guidance_scale` as embedded guidance."""
    return Denoiser(denoiser_of(pipe), guidance=guidance_scale if is_flux(pipe) else None)


def encode(pipe, prompts: Sequence[str], guidance_scale: float, height: int, width: int):
    """The pipeline's own prompt encoding (and SDXL's size/crop time ids), as its __call__ does."""
    device = pipe._execution_device
    if is_flux(pipe):  # no classifier-free guidance; text ids are zeros (Denoiser)
        emb, pooled, _ = pipe.encode_prompt(
            list(prompts), None, device=device, max_sequence_length=text_length(pipe)
        )
        return Conditioning(emb, {"pooled_projections": pooled}, False)
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
    if is_flux(pipe):
        return pipe.default_sample_size * pipe.vae_scale_factor
    model = denoiser_of(pipe)
    return model.config.sample_size * pipe.vae_scale_factor


def latent_side(pipe, size: int) -> int:
    """The (unpacked) latents' side for images of `size` pixels."""
    if is_flux(pipe):  # FluxPipeline.prepare_latents: even, for the 2x2 packing
        return 2 * (int(size) // (pipe.vae_scale_factor * 2))
    return int(size) // pipe.vae_scale_factor


def model_input(pipe, latents: torch.Tensor, size: int) -> torch.Tensor:
    """The loop's latents as the denoiser call takes them: FLUX.1's packed tokens unpacked to
    (B, C, h, w) (a permutation, so a gradient on them is the packed latents' gradient)."""
    if not is_flux(pipe):
        return latents
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(latents, size, size, pipe.vae_scale_factor)


def to_latents(pipe, prediction: torch.Tensor) -> torch.Tensor:
    """A denoiser prediction (B, C, h, w) in the loop's layout (FLUX.1: packed 2x2)."""
    if not is_flux(pipe):
        return prediction
    from diffusers import FluxPipeline

    b, c, h, w = prediction.shape
    return FluxPipeline._pack_latents(prediction, b, c, h, w)


def start(pipe, seeds: Sequence[int], steps: int, cond: Conditioning, size: int):
    """(initial latents, timesteps, scheduler step kwargs), as the pipeline's __call__ starts."""
    device = pipe._execution_device
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    if is_flux(pipe):
        return _start_flux(pipe, generators, steps, cond, size)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps, device=device)
    model = denoiser_of(pipe)
    latents = pipe.prepare_latents(
        len(seeds), model.config.in_channels, size, size, cond.emb.dtype, device, generators
    )
    prepare = getattr(pipe, "prepare_extra_step_kwargs", None)
    extra = prepare(generators, 0.0) if prepare is not None else {}
    return latents, scheduler.timesteps, extra


def _start_flux(pipe, generators, steps: int, cond: Conditioning, size: int):
    """FluxPipeline's start: packed latents, linear sigmas shifted by the token count (mu)."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    device, scheduler = pipe._execution_device, pipe.scheduler
    channels = denoiser_of(pipe).config.in_channels // 4
    latents, _ = pipe.prepare_latents(
        len(generators), channels, size, size, cond.emb.dtype, device, generators
    )
    sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1, 1 / steps, steps)
    mu = calculate_shift(
        latents.shape[1],
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
    return latents, timesteps, {}


def scale_input(scheduler, x: torch.Tensor, t) -> torch.Tensor:
    """The scheduler's input scaling (flow-matching schedulers have none)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return x if scale is None else scale(x, t)


def denoise_step(
    pipe, call: Denoiser, latents, t, cond: Conditioning, scale: float, extra, size: int
):
    """One denoising step with classifier-free guidance (FLUX.1: none), without gradient."""
    model_in = torch.cat([latents] * 2) if cond.guidance else latents
    model_in = scale_input(pipe.scheduler, model_input(pipe, model_in, size), t)
    with torch.no_grad():
        noise = call(model_in, batched(call, t, len(model_in)), cond.emb, cond.added)
    if cond.guidance:
        uncond, text = noise.chunk(2)
        noise = uncond + scale * (text - uncond)
    noise = to_latents(pipe, noise)
    return pipe.scheduler.step(noise, t, latents, **extra, return_dict=False)[0]


def batched(call: Denoiser, t, n: int):
    """UNets take a scalar timestep; the MMDiTs one per image (as their pipelines expand it)."""
    return t if call.kind == "unet" else t.expand(n)


def decode(pipe, latents: torch.Tensor, size: int, output_type: str = "np"):
    """Images from final latents, as the pipeline's __call__ decodes them."""
    if output_type == "latent":
        return latents
    latents = model_input(pipe, latents, size)  # FLUX.1: unpacked
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
        if family(pipe) in ("sd3", "flux"):
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
