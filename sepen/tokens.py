"""Map each concept of a prompt to all of its sub-token positions, with the model's tokenizer.

The authors' code took "word position + 1" as the token index, which is wrong for any concept
that the BPE splits into several tokens ("hippopotamus" -> hippo, potam, us) or that has several
words ("teddy bear"). Here a concept is found in the prompt text (case-insensitive, at word
boundaries), and every token whose character span overlaps it belongs to it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from sepen.errors import ConceptNotFoundError

AGGREGATIONS = ("mean", "max", "sum")


def _concept_pattern(concept: str) -> re.Pattern[str]:
    words = concept.strip().split()
    if not words:
        raise ConceptNotFoundError(f"empty concept {concept!r}: give the object's name, e.g. 'cat'")
    body = r"\s+".join(re.escape(w) for w in words)
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def concept_token_positions(
    tokenizer, prompt: str, concepts: Sequence[str], max_length: int | None = None
) -> list[list[int]]:
    """Positions (in the tokenized prompt, counting its special tokens: CLIP's start token is
    position 0, T5 has none) of every sub-token of each concept.

    A concept named twice in `concepts` takes successive mentions in the prompt. Longer concepts
    claim their text first, so "bear" next to "teddy bear" finds the standalone mention.
    Raises ConceptNotFoundError if a concept is not in the prompt or is cut off by the tokenizer's
    maximum length (or `max_length`, the sequence length the pipeline encodes, e.g. T5's).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} gives no character offsets; "
            "use a fast (tokenizers-backed) tokenizer"
        )
    encoding = tokenizer(
        prompt,
        add_special_tokens=True,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        verbose=False,
    )
    offsets = encoding["offset_mapping"]
    special = encoding["special_tokens_mask"]
    max_length = max_length or tokenizer.model_max_length
    # with truncation the last kept slot holds the end token (T5 and CLIP both end with one;
    # CLIP also starts with one, which only makes this bound safe)
    last_kept = max_length - 2 if max_length and max_length < 10**6 else len(offsets) - 1

    claimed: list[tuple[int, int]] = []
    spans: dict[int, tuple[int, int]] = {}
    for i in sorted(range(len(concepts)), key=lambda k: -len(concepts[k])):
        pattern = _concept_pattern(concepts[i])
        for match in pattern.finditer(prompt):
            if all(match.end() <= a or match.start() >= b for a, b in claimed):
                spans[i] = match.span()
                claimed.append(match.span())
                break
        else:
            raise ConceptNotFoundError(
                f"concept {concepts[i]!r} not found in prompt {prompt!r}"
                + (
                    " (it is named more often than the prompt mentions it)"
                    if pattern.search(prompt)
                    else ""
                )
                + ": name each concept as a whole word of the prompt"
            )

    positions: list[list[int]] = []
    for i, concept in enumerate(concepts):
        start, end = spans[i]
        found = [
            p
            for p, (a, b) in enumerate(offsets)
            if b > a and a < end and b > start and not special[p]
        ]
        if not found:
            raise ConceptNotFoundError(
                f"concept {concept!r} in prompt {prompt!r} maps to no token of "
                f"{type(tokenizer).__name__}"
            )
        unk = getattr(tokenizer, "unk_token_id", None)
        if unk is not None and any(encoding["input_ids"][p] == unk for p in found):
            raise ConceptNotFoundError(
                f"concept {concept!r} is not in the vocabulary of {type(tokenizer).__name__} "
                f"(it becomes {tokenizer.unk_token!r}): use one of the model's concepts"
            )
        if max(found) > last_kept:
            raise ConceptNotFoundError(
                f"concept {concept!r} is cut off by the tokenizer's maximum length "
                f"({max_length} tokens) in prompt {prompt!r}: shorten the prompt"
            )
        positions.append(found)
    return positions


def prompt_ids(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids of `prompts`, padded and truncated to the tokenizer's maximum length."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def aggregate_token_maps(
    maps: torch.Tensor, positions: Sequence[Sequence[int]], how: str = "mean"
) -> torch.Tensor:
    """One map per concept from the per-token maps.

    maps: (..., T) attention probabilities over the T text tokens.
    Returns (N, ...) with one entry per concept, its sub-tokens' maps combined by `how`.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"token aggregation {how!r} is not one of {AGGREGATIONS}")
    out = []
    for pos in positions:
        sub = maps[..., list(pos)]
        if how == "mean":
            out.append(sub.mean(-1))
        elif how == "max":
            out.append(sub.amax(-1))
        else:
            out.append(sub.sum(-1))
    return torch.stack(out)
