"""The attention-grounding loss of toy pretraining (`toy.pretrain.grounding`): it gives the toy
model Stable Diffusion's localised object-token attention and start-token sink, the premise
SepEn's losses act on."""

from __future__ import annotations

import numpy as np
import torch

from sepen.toy.world import CONCEPTS, shape_mask


def cell_fractions(mask: np.ndarray, side: int) -> np.ndarray:
    """Fraction of each cell of a side x side grid covered by a boolean image mask."""
    f = mask.shape[0] // side
    return mask.reshape(side, f, side, f).mean((1, 3))


def grounding_labels(layouts, positions, side: int, size: int) -> torch.Tensor:
    """Which text token each cell of a side x side attention grid should attend to.

    A cell at least half covered by a named object gets that object's token position; a cell no
    object touches gets 0, the start token (the attention sink of Stable Diffusion's
    background); partly covered cells get -1 (ignored). `positions[b]` are the token positions
    of image b's objects in layout order (an empty list for an empty prompt: every cell 0).
    """

    labels = torch.zeros((len(layouts), side, side), dtype=torch.long)
    for b, (objects, pos) in enumerate(zip(layouts, positions)):
        covered = np.zeros((side, side))
        for k, obj in enumerate(objects):
            mask = shape_mask(CONCEPTS[obj.concept].shape, obj.cx, obj.cy, obj.r, size)
            frac = cell_fractions(mask, side)
            covered = np.maximum(covered, frac)
            if pos:
                labels[b][torch.from_numpy(frac >= 0.5)] = int(pos[k][0])
        partial = (covered > 0) & ((covered < 0.5) | (not pos))
        labels[b][torch.from_numpy(partial)] = -1
    return labels


def grounding_loss(maps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean -log attention on the labelled token over the labelled cells.

    maps: (B, h, w, T) attention probabilities (heads and layers averaged); labels: (B, h, w)
    token positions, -1 ignored.
    """
    keep = labels >= 0
    picked = maps[keep].gather(-1, labels[keep][:, None]).squeeze(-1)
    return -(picked.clamp_min(1e-8).log()).mean()


def grounded(named: list[str], objects: list, which: str) -> bool:
    """Whether an image's attention is grounded: its caption names every object it shows, and
    with `which` 'single' it shows one object only (composing is then left to the model)."""
    if len(named) != len(objects):
        return False
    return which == "all" or len(objects) == 1
