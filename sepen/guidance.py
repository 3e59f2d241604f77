"""Test-time guidance: latent updates from a loss on the object tokens' attention maps
(docs/test-time.md), for Stable Diffusion 1.x, 2.x and XL pipelines.

One loop serves every test-time method. At each denoising step i it may

1. run the UNet once on the conditional prompt with gradient, until the last layer whose maps
   the loss reads (`sepen.attention.run_until_captured`), and compute the method's loss per
   image;
2. at a refinement step (`Schedule.thresholds`), repeat "gradient step on the latent, new
   loss" while an image's shortfall is above 1 - threshold, at most `max_refinement` times;
3. in the first `update_steps` steps, take one gradient step on the latent,
   z <- z - step_size[i] * grad L(z);

and then take the usual denoising step with classifier-free guidance. The refinement follows
Attend-and-Excite's published procedure (Chefer et al. 2023, its iterative refinement), so
that the `attend_excite` method matches diffusers' pipeline step for step
(tests/integration/test_guidance.py). Unlike that pipeline, the images of a batch are updated
together (their losses are independent, so the gradient of their sum is each image's own),
nothing is computed after the last update step, and the conditional pass scales its input as
the scheduler asks (diffusers' A&E skips `scale_model_input`, which only matters for
sigma-scaled schedulers such as SDXL's Euler).

A method is an `Objective`: a function of the captured maps (B, heads, h, w, T) and each
image's concept token positions that returns (loss, shortfall) per image; the shortfall is
what a refinement threshold is compared with (1 - the weakest object's peak).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sepen.attention import available_resolutions, install_capture, run_until_captured
from sepen.errors import ResolutionError, SepenError
from sepen.models.loading import is_sdxl

Objective = Callable[[torch.Tensor, Sequence], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Schedule:
    """When and how far the latents move, for `steps` denoising steps.

    Latents are updated at steps i < `update_steps`, with step size
    `scale_factor * sqrt(linspace(1, 0.5, steps))[i]`; at the steps in `thresholds` they are
    refined until the shortfall is at most 1 - threshold (at most `max_refinement` updates).
    """

    steps: int
    update_steps: int
    scale_factor: float
    thresholds: dict[int, float] = field(default_factory=dict)
    max_refinement: int = 20

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise SepenError(f"sampling.steps = {self.steps}: give at least 1 denoising step")
        if not 0 <= self.update_steps <= self.steps:
            raise SepenError(
                f"max_iter_to_alter = {self.update_steps} is outside 0..{self.steps} "
                f"(sampling.steps): give at most that many steps with latent updates"
            )
        bad = sorted(k for k in self.thresholds if not 0 <= k < self.steps)
        if bad:
            raise SepenError(
                f"thresholds name steps {bad}, outside 0..{self.steps - 1} of sampling.steps = "
                f"{self.steps}: use step indices below {self.steps}"
            )
        bad_values = sorted(v for v in self.thresholds.values() if not 0 <= v <= 1)
        if bad_values:
            raise SepenError(f"thresholds {bad_values} are outside 0..1: give peak values in 0..1")
        if self.scale_factor <= 0:
            raise SepenError(f"scale_factor = {self.scale_factor}: give a positive step size")
        if self.max_refinement < 0:
            raise SepenError(f"max_refinement = {self.max_refinement}: give 0 or more")

    def step_size(self, i: int) -> float:
        return float(self.scale_factor * np.sqrt(np.linspace(1.0, 0.5, self.steps))[i])

    def guided(self, i: int) -> bool:
        return i < self.update_steps or i in self.thresholds


@dataclass
class Conditioning:
    """Text conditioning of a batch: the classifier-free-guidance pair and the conditional half."""

    emb: torch.Tensor  # (2B or B, T, C): [unconditional; conditional] with guidance
    added: dict | None  # SDXL's added_cond_kwargs for `emb`
    guidance: bool

    def cond(self, index: torch.Tensor | None = None) -> tuple[torch.Tensor, dict | None]:
        """The conditional prompts' embeddings (and added conditioning), optionally a subset."""
        n = self.emb.shape[0] // 2 if self.guidance else 0

        def pick(x):
            x = x[n:]
            return x if index is None else x[index]

        added = None if self.added is None else {k: pick(v) for k, v in self.added.items()}
        return pick(self.emb), added


def encode(pipe, prompts: Sequence[str], guidance_scale: float, height: int, width: int):
    """The pipeline's own prompt encoding (and SDXL's size/crop time ids), as its __call__ does."""
    device = pipe._execution_device
    guidance = guidance_scale > 1.0
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
    with torch.no_grad():
        image = vae.decode(latents, return_dict=False)[0]
    if upcast:
        vae.to(dtype=torch.float16)
    if is_sdxl(pipe) and getattr(pipe, "watermark", None) is not None:
        image = pipe.watermark.apply_watermark(image)
    return pipe.image_processor.postprocess(
        image, output_type=output_type, do_denormalize=[True] * image.shape[0]
    )


@contextlib.contextmanager
def _capturing(unet, resolutions: Sequence[int], latent_side: int):
    """The capture processors on `unet` and its weights frozen; both restored afterwards."""
    processors = dict(unet.attn_processors)
    flags = {name: p.requires_grad for name, p in unet.named_parameters()}
    unet.requires_grad_(False)
    try:
        yield install_capture(unet, list(resolutions), latent_side, detach_start_token=False)
    finally:
        unet.set_attn_processor(processors)
        for name, p in unet.named_parameters():
            p.requires_grad_(flags[name])


def check_capture(pipe, resolutions: Sequence[int], key: str) -> None:
    """Raise ResolutionError naming `key` and the grids there are, if the pipeline has no
    cross-attention maps at `resolutions` (at its default image size)."""
    side = pipe.unet.config.sample_size
    available = available_resolutions(pipe.unet, side)
    missing = [int(r) for r in resolutions if int(r) not in available]
    if missing or not resolutions:
        raise ResolutionError(
            f"{key} = {list(resolutions)}: this model has no cross-attention maps at "
            f"{missing or list(resolutions)} for {side}x{side} latents; set it to some of "
            f"{sorted(available, reverse=True)}"
        )


def guided_sample(
    pipe,
    prompts: Sequence[str],
    positions: Sequence[Sequence[Sequence[int]]],
    seeds: Sequence[int],
    objective: Objective,
    schedule: Schedule,
    resolutions: Sequence[int],
    guidance_scale: float,
    output_type: str = "np",
    on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    stats: dict | None = None,
):
    """Images of `prompts` (image i from prompt i, a generator seeded by seeds[i]) with the
    latents guided by `objective` on the maps at `resolutions` (module doc).

    `positions[i]` are prompt i's concept token positions (sepen.tokens; for SDXL in the first
    tokenizer's sequence). `on_step(i, t, latents)` is called after each denoising step.
    `stats`, if given, receives counts of the UNet passes with gradient.
    """
    if not len(prompts) == len(positions) == len(seeds):
        raise ValueError("prompts, positions and seeds differ in length")
    unet, scheduler = pipe.unet, pipe.scheduler
    height = width = unet.config.sample_size * pipe.vae_scale_factor
    device = pipe._execution_device
    cond = encode(pipe, prompts, guidance_scale, height, width)
    scheduler.set_timesteps(schedule.steps, device=device)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    latents = pipe.prepare_latents(
        len(prompts), unet.config.in_channels, height, width, cond.emb.dtype, device, generators
    )
    extra = pipe.prepare_extra_step_kwargs(generators, 0.0)
    counts = stats if stats is not None else {}
    counts.setdefault("guided_passes", 0)
    with _capturing(unet, resolutions, height // pipe.vae_scale_factor) as store:

        def loss_and_grad(x, t, index):
            """(shortfall, gradient of the loss) of the images `index` at latents x."""
            emb, added = cond.cond(index)
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                model_in = scheduler.scale_model_input(x, t)
                kwargs = {} if added is None else {"added_cond_kwargs": added}
                maps = run_until_captured(unet, store, model_in, t, emb, **kwargs)
                loss, shortfall = objective(maps, [positions[k] for k in index.tolist()])
                (grad,) = torch.autograd.grad(loss.sum(), [x])
            counts["guided_passes"] += len(index)
            return shortfall.detach(), grad

        def guide(latents, i, t):
            size = schedule.step_size(i)
            everyone = torch.arange(latents.shape[0])
            shortfall, grad = loss_and_grad(latents, t, everyone)
            if i in schedule.thresholds:
                target = max(0.0, 1.0 - schedule.thresholds[i])
                latents, grad = _refine(
                    latents, shortfall, grad, target, size, schedule.max_refinement,
                    lambda x, idx: loss_and_grad(x, t, idx),
                )  # fmt: skip
            if i < schedule.update_steps:
                latents = latents - size * grad
            return latents.detach()

        for i, t in enumerate(scheduler.timesteps):
            if schedule.guided(i):
                latents = guide(latents, i, t)
            store.enabled = False
            try:
                model_in = torch.cat([latents] * 2) if cond.guidance else latents
                model_in = scheduler.scale_model_input(model_in, t)
                kwargs = {} if cond.added is None else {"added_cond_kwargs": cond.added}
                with torch.no_grad():
                    noise = unet(model_in, t, encoder_hidden_states=cond.emb, **kwargs).sample
            finally:
                store.enabled = True
            if cond.guidance:
                uncond, text = noise.chunk(2)
                noise = uncond + guidance_scale * (text - uncond)
            latents = scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
            if on_step is not None:
                on_step(i, t, latents)
    return decode(pipe, latents, output_type)


def _refine(latents, shortfall, grad, target, size, limit, loss_and_grad):
    """Attend-and-Excite's iterative refinement, per image: while its shortfall is above
    `target` (checked before each further update, as the published loop does), step and
    recompute. Returns (latents, gradient at the returned latents)."""
    active = shortfall > target
    if not active.any():
        return latents, grad
    latents, grad = latents.clone(), grad.clone()
    done = torch.zeros_like(active)
    for k in range(1, limit + 1):
        index = torch.nonzero(active & ~done).flatten()
        if len(index) == 0:
            break
        previous = shortfall[index]
        latents[index] = latents[index] - size * grad[index]
        shortfall[index], grad[index] = loss_and_grad(latents[index], index)
        done[index] = (previous <= target) | (k >= limit)
    return latents, grad
