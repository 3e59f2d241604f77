"""Test-time guidance: latent updates from a loss on the object tokens' attention maps
(docs/test-time.md), for Stable Diffusion 1.x, 2.x, XL, 3/3.5 and FLUX.1 pipelines (the
pipelines' own steps: sepen.denoising; FLUX.1's latents are updated packed, as its pipeline
holds them, and its maps are read on the unpacked token grid).

One loop serves every test-time method. At each denoising step i it may

1. run the denoiser once on the conditional prompt with gradient, until the last layer whose
   maps the loss reads (`sepen.attention.run_until_captured`), and compute the method's loss
   per image;
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

from sepen.architecture import capturing, denoiser_of
from sepen.attention import available_resolutions, run_until_captured
from sepen.denoising import (
    batched,
    check_supported,
    decode,
    denoise_step,
    denoiser,
    encode,
    image_size,
    latent_side,
    model_input,
    scale_input,
    start,
)
from sepen.errors import ResolutionError, SepenError
from sepen.joint_attention import captured_blocks, is_joint

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


@contextlib.contextmanager
def _capturing(model, capture: dict, latent_side: int):
    """The capture processors on the denoiser and its weights frozen; both restored afterwards."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    try:
        with capturing(model, capture, latent_side, detach_start_token=False) as store:
            yield store
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


def check_capture(pipe, capture: dict, key: str) -> None:
    """Raise ResolutionError naming `key` and the grids (or blocks) there are, if the pipeline
    has no maps where `capture` asks for them (at its default image size)."""
    model = denoiser_of(pipe)
    if is_joint(model):
        captured_blocks(model, capture.get("blocks"))
        return
    resolutions = capture["resolutions"]
    side = model.config.sample_size
    available = available_resolutions(model, side)
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
    capture: dict,
    guidance_scale: float,
    output_type: str = "np",
    on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    stats: dict | None = None,
):
    """Images of `prompts` (image i from prompt i, a generator seeded by seeds[i]) with the
    latents guided by `objective` on the maps `capture` asks for (module doc).

    `capture`: a UNet's `resolutions`, or an MMDiT's `blocks` and `joint_maps`
    (sepen.architecture.capturing). `positions[i]` are prompt i's concept token positions
    (sepen.architecture.text_positions). `on_step(i, t, latents)` is called after each
    denoising step. `stats`, if given, receives counts of the passes with gradient.
    """
    if not len(prompts) == len(positions) == len(seeds):
        raise ValueError("prompts, positions and seeds differ in length")
    check_supported(pipe)
    model, scheduler = denoiser_of(pipe), pipe.scheduler
    call = denoiser(pipe, guidance_scale)
    size = image_size(pipe)
    cond = encode(pipe, prompts, guidance_scale, size, size)
    latents, timesteps, extra = start(pipe, seeds, schedule.steps, cond, size)
    counts = stats if stats is not None else {}
    counts.setdefault("guided_passes", 0)
    with _capturing(model, capture, latent_side(pipe, size)) as store:

        def loss_and_grad(x, t, index):
            """(shortfall, gradient of the loss) of the images `index` at latents x."""
            emb, added = cond.cond(index)
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                model_in = scale_input(scheduler, model_input(pipe, x, size), t)
                t_in = batched(call, t, len(x))
                maps = run_until_captured(call, store, model_in, t_in, emb, added)
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

        for i, t in enumerate(timesteps):
            if schedule.guided(i):
                latents = guide(latents, i, t)
            store.enabled = False
            try:
                latents = denoise_step(pipe, call, latents, t, cond, guidance_scale, extra, size)
            finally:
                store.enabled = True
            if on_step is not None:
                on_step(i, t, latents)
    return decode(pipe, latents, size, output_type)


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
