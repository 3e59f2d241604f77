"""The geometry of object tokens: how alike two tokens' keys are (cosine, averaged over the
cross-attention layers), how much their attention maps overlap (soft IoU), and how well such
a value predicts failure (Spearman's rank correlation).

A UNet's text keys depend on the prompt alone. An MMDiT's depend on the timestep and, after the
first block, on the image (the text stream is modulated and updated in every joint block), so
they are recorded while the images are drawn (`recorded_key_cosine`)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from sepen.architecture import denoiser_of
from sepen.joint_attention import is_joint, joint_layers
from sepen.tokens import prompt_ids


def soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Overlap of two attention maps, each normalised to sum 1: sum(min) / sum(max)."""
    a = np.asarray(a, np.float64) / max(float(np.sum(a)), 1e-12)
    b = np.asarray(b, np.float64) / max(float(np.sum(b)), 1e-12)
    return float(np.minimum(a, b).sum() / np.maximum(a, b).sum())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def key_cosine(pipe, prompt: str, positions) -> float:
    """Mean over the UNet's cross-attention layers of the cosine similarity of the first two
    concepts' keys (each concept's sub-token keys averaged) for `prompt`."""
    with torch.no_grad():
        hidden = pipe.text_encoder(prompt_ids(pipe.tokenizer, [prompt]))[0][0]
        values = []
        for name, module in pipe.unet.named_modules():
            if name.endswith("attn2"):
                keys = module.to_k(hidden)
                a, b = (keys[list(p)].mean(0) for p in positions[:2])
                values.append(cosine(a, b))
    return float(np.mean(values))


@contextlib.contextmanager
def recorded_key_cosine(model, positions, found: list):
    """Context: while the denoiser runs, append to `found` the cosine similarity of the first
    two concepts' text keys (sub-tokens averaged) of the conditional half's images, per joint
    block and call (forward hooks on the joint blocks' `add_k_proj`)."""
    modules = dict(model.named_modules())

    def hook(module, inputs, keys):
        for k in keys[keys.shape[0] // 2 :].detach().float():
            a, b = (k[list(p)].mean(0) for p in positions[:2])
            found.append(cosine(a, b))

    handles = [
        modules[f"{name}.add_k_proj"].register_forward_hook(hook) for name in joint_layers(model)
    ]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def drawing_key_cosine(pipe, prompt: str, positions):
    """Context for drawing `prompt`: yields a function that returns the first two concepts' key
    cosine - an MMDiT's recorded while the images inside are drawn (`recorded_key_cosine`),
    a UNet's from the prompt alone (`key_cosine`)."""
    model, found = denoiser_of(pipe), []
    joint = is_joint(model)
    with recorded_key_cosine(model, positions, found) if joint else contextlib.nullcontext():
        yield lambda: float(np.mean(found)) if found else key_cosine(pipe, prompt, positions)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (None when either side is constant or too short)."""
    from scipy.stats import spearmanr

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(spearmanr(x, y).statistic)
