"""The evaluation protocol's arithmetic, as pure functions (no models, no files)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

_SPLIT = re.compile(r"\s+(?:and|with)\s+", re.IGNORECASE)


def object_phrases(prompt: str) -> list[str]:
    """The prompt split at 'and'/'with' (the minimum-object score's parts).

    "a photo of a cat and a dog" -> ["a photo of a cat", "a dog"], as the Attend-and-Excite
    evaluation does; a prompt without a conjunction is one part.
    """
    parts = [p.strip() for p in _SPLIT.split(prompt.strip())]
    return [p for p in parts if p]


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two (n, d) tensors."""
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    return (a * b).sum(-1)


def template_average(
    encode: Callable[[list[str]], torch.Tensor],
    text: str,
    templates: Sequence[Callable[[str], str]],
) -> torch.Tensor:
    """Mean of the unit-normalised embeddings of `text` in every template, renormalised (d,)."""
    emb = encode([t(text) for t in templates]).float()
    emb = emb / emb.norm(dim=-1, keepdim=True)
    mean = emb.mean(0)
    return mean / mean.norm()


def min_object_score(part_scores: Sequence[float]) -> float:
    return float(min(part_scores))


def detection_outcome(
    detections: Sequence[tuple[str, float]], named: Sequence[str], threshold: float
) -> dict[str, float]:
    """Per-image detection outcome from (label, score) pairs.

    success: every named object detected with score >= threshold; hit_rate: the share of named
    objects detected; spurious: any other label of the query vocabulary detected.
    """
    found = {label for label, score in detections if score >= threshold}
    hits = [c in found for c in named]
    return {
        "detection_success": float(all(hits)),
        "detection_hit_rate": sum(hits) / len(hits),
        "detection_spurious": float(bool(found - set(named))),
    }
