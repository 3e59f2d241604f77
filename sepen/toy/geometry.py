"""The geometry of object tokens: how alike two tokens' keys are (cosine, averaged over the
cross-attention layers), how much their attention maps overlap (soft IoU), and how well such
a value predicts failure (Spearman's rank correlation)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

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


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (None when either side is constant or too short)."""
    from scipy.stats import spearmanr

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(spearmanr(x, y).statistic)
