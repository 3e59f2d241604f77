"""The Attend-and-Excite baseline (Chefer et al. 2023): diffusers' pipeline sharing the base
pipeline's weights, its published schedule scaled to other step counts, and every sub-token
of every concept as a target (from sepen.tokens)."""

from __future__ import annotations

import torch

from sepen.errors import SepenError
from sepen.models.loading import is_sdxl
from sepen.tokens import concept_token_positions


def attend_excite_pipeline(pipe):
    """diffusers' Attend-and-Excite pipeline sharing the base pipeline's components."""
    if is_sdxl(pipe):
        raise SepenError(
            "Attend-and-Excite has no Stable Diffusion XL pipeline in diffusers: remove "
            "attend_excite from evaluation.methods (SDXL configs compare base and SepEn)"
        )
    try:
        from diffusers import StableDiffusionAttendAndExcitePipeline
    except ImportError as err:  # removed from a future diffusers
        raise SepenError(
            "this diffusers has no StableDiffusionAttendAndExcitePipeline: install "
            "diffusers<=0.42 to sample the attend_excite baseline"
        ) from err
    ae = StableDiffusionAttendAndExcitePipeline.from_pipe(pipe)
    ae.set_progress_bar_config(disable=True)
    return ae


PUBLISHED_STEPS = 50  # Attend-and-Excite's schedule is given for 50 denoising steps
PUBLISHED_THRESHOLDS = {0: 0.05, 10: 0.5, 20: 0.8}
PUBLISHED_MAX_ITER = 25


def attend_excite_schedule(ae_cfg: dict, steps: int) -> tuple[int, dict[int, float]]:
    """(max_iter_to_alter, thresholds) for `steps` denoising steps.

    Unset values take the published schedule for 50 steps with its step indices scaled to
    `steps` (for 25 steps: updates in the first 12, refinement at steps 0, 5 and 10), so the
    updates cover the same part of the denoising trajectory.
    """
    scale = steps / PUBLISHED_STEPS
    max_iter = ae_cfg["max_iter_to_alter"]
    if max_iter is None:
        max_iter = int(PUBLISHED_MAX_ITER * scale)
    thresholds = ae_cfg["thresholds"]
    if thresholds is None:
        thresholds = {int(k * scale): v for k, v in PUBLISHED_THRESHOLDS.items()}
    else:
        thresholds = {int(k): float(v) for k, v in thresholds.items()}
    return max_iter, thresholds


def sample_attend_excite(ae, entry: dict, seeds, sp: dict, ae_cfg: dict):
    """Images of one prompt with Attend-and-Excite; its token indices from our token mapper.

    Every sub-token of every concept is a target (a multi-token concept is not reduced to its
    first token: docs/method.md, "Defects of the authors' code", 1).
    """
    positions = concept_token_positions(ae.tokenizer, entry["prompt"], entry["concepts"])
    indices = sorted({i for sub in positions for i in sub})
    res = ae_cfg["attention_res"]
    max_iter, thresholds = attend_excite_schedule(ae_cfg, sp["steps"])
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return ae(
        [entry["prompt"]] * len(seeds),
        token_indices=[indices] * len(seeds),
        attn_res=(res, res),
        num_inference_steps=sp["steps"],
        guidance_scale=sp["guidance_scale"],
        max_iter_to_alter=max_iter,
        thresholds=thresholds,
        scale_factor=ae_cfg["scale_factor"],
        generator=gens,
        output_type="np",
    ).images
