"""Attend-and-Excite (Chefer et al. 2023) as an objective of sepen.guidance's loop: its loss on
the renormalised maps and its published schedule, scaled to other step counts.

Written from the paper's equations and checked against diffusers' pipeline, latents per step
and images (tests/integration/test_guidance.py). Every sub-token of every concept is a target
(a multi-token concept is not reduced to its first token: docs/method.md, "Defects of the
authors' code", 1).
"""

from __future__ import annotations

import torch

from sepen.losses import smooth_maps

PUBLISHED_STEPS = 50  # Attend-and-Excite's schedule is given for 50 denoising steps
PUBLISHED_THRESHOLDS = {0: 0.05, 10: 0.5, 20: 0.8}
PUBLISHED_MAX_ITER = 25  # latent updates in the first 25 of 50 steps
PUBLISHED_SCALE = 20  # step size scale_factor * sqrt(linspace(1, 0.5, steps))
PUBLISHED_MAX_REFINEMENT = 20  # updates per refinement step at most
SOFTMAX_SCALE = 100.0


def attend_excite_schedule(cfg: dict, steps: int) -> tuple[int, dict[int, float]]:
    """(steps with latent updates, refinement thresholds) for `steps` denoising steps.

    Unset values take the published schedule for 50 steps with its step indices scaled to
    `steps` (for 25 steps: updates in the first 12, refinement at steps 0, 5 and 10), so the
    updates cover the same part of the denoising trajectory.
    """
    scale = steps / PUBLISHED_STEPS
    max_iter = cfg["max_iter_to_alter"]
    if max_iter is None:
        max_iter = int(PUBLISHED_MAX_ITER * scale)
    thresholds = cfg["thresholds"]
    if thresholds is None:
        thresholds = {int(k * scale): v for k, v in PUBLISHED_THRESHOLDS.items()}
    else:
        thresholds = {int(k): float(v) for k, v in thresholds.items()}
    return max_iter, thresholds


def renormalise(maps: torch.Tensor) -> torch.Tensor:
    """The text tokens between the start token and the last position, renormalised with a
    softmax of 100x per pixel: (..., T) -> (..., T - 2); position p becomes p - 1."""
    return (maps[..., 1:-1].float() * SOFTMAX_SCALE).softmax(-1)


def attend_excite_loss(maps: torch.Tensor, positions) -> tuple[torch.Tensor, torch.Tensor]:
    """A&E's loss per image: max over target tokens of max(0, 1 - peak), the peak being the
    maximum of the token's renormalised, Gaussian-smoothed (3x3, sigma 0.5) map.

    maps: (B, heads, h, w, T) from sepen.attention (layers averaged); heads are averaged.
    Returns (loss, loss): the loss is also the shortfall its refinement thresholds compare.
    """
    text = renormalise(maps.mean(1))  # (B, h, w, T - 2)
    losses = []
    for b, concepts in enumerate(positions):
        tokens = sorted({p - 1 for concept in concepts for p in concept})
        peaks = smooth_maps(text[b][..., tokens].permute(2, 0, 1)).flatten(1).amax(1)
        losses.append((1.0 - peaks).clamp(min=0).amax())
    loss = torch.stack(losses)
    return loss, loss
