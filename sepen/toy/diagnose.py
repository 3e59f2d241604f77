"""What a SepEn delta did to one prompt of the toy world, and why (`sepen toy diagnose`).

For one multi-object prompt, the base model and the model with the delta sample the same
seeds; for each: the exact detector's success and failure taxonomy; where the cross-attention
goes, as the share of the step-averaged attention taken by each token group (the start token,
each named object, the other words, the end and padding tokens); the cosine similarity of the
object tokens' keys and the overlap of their maps. For the delta: how far it moved each key
projection (relative Frobenius norm of the change). These are the quantities the method acts
on, so a SepEn run that breaks images can be read off them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sepen.delta import apply_delta, read_delta
from sepen.errors import SepenError
from sepen.models import load_pipeline
from sepen.sampling import sample_with_maps
from sepen.tokens import concept_token_positions, prompt_ids
from sepen.toy.evaluate import image_scores, rates, to_uint8
from sepen.toy.geometry import key_cosine, soft_iou
from sepen.toy.world import prompt_for


def token_groups(tokenizer, prompt: str, concepts: Sequence[str]) -> dict[str, list[int]]:
    """Every token position of the padded prompt in one group: 'start', each concept, 'words'
    (the prompt's other tokens), 'end' (the end token and the padding after it)."""

    ids = prompt_ids(tokenizer, [prompt])[0].tolist()
    positions = concept_token_positions(tokenizer, prompt, concepts)
    end = ids.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in ids else len(ids)
    groups = {"start": [0], **{c: list(p) for c, p in zip(concepts, positions)}}
    taken = {p for g in groups.values() for p in g}
    groups["words"] = [i for i in range(1, end) if i not in taken]
    groups["end"] = list(range(end, len(ids)))
    return groups


def key_change(pipe, delta: str | Path) -> dict[str, float]:
    """Relative Frobenius norm ||W_delta - W_base|| / ||W_base|| of every tensor of the delta."""

    tensors, metadata = read_delta(delta)
    if metadata.get("trainable") == "lora":
        raise SepenError(f"{delta}: key_change reads full-weight deltas, not LoRA")
    params = dict(pipe.unet.named_parameters())
    return {
        name: float((value - params[name].detach()).norm() / params[name].detach().norm())
        for name, value in sorted(tensors.items())
    }


def measure(pipe, concepts: Sequence[str], seeds: Sequence[int], config: dict) -> dict:
    """Success, taxonomy, attention budget, key cosine and map overlap of one prompt."""

    sp, ft = config["sampling"], config["finetune"]
    prompt = prompt_for(list(concepts))
    groups = token_groups(pipe.tokenizer, prompt, concepts)
    images, maps = sample_with_maps(
        pipe,
        [prompt] * len(seeds),
        [list(groups.values())] * len(seeds),
        list(seeds),
        sp["steps"],
        sp["guidance_scale"],
        ft["resolutions"],
        sp["batch_size"],
        how="sum",
    )
    budget = np.mean([m.mean((1, 2)) for m in maps], 0)
    pos = concept_token_positions(pipe.tokenizer, prompt, concepts)
    objects = [list(groups).index(c) for c in concepts]
    scores = rates(image_scores(to_uint8(images), [list(concepts)] * len(seeds)))
    return {
        "success": scores["success"]["mean"],
        "taxonomy": {k: v["mean"] for k, v in scores.items() if k.startswith("fail_")},
        "spurious": scores["spurious"]["mean"],
        "attention_budget": {g: float(b) for g, b in zip(groups, budget)},
        "object_peak": [float(np.mean([m[i].max() for m in maps])) for i in objects],
        "key_cosine": key_cosine(pipe, prompt, pos),
        "map_iou": float(np.mean([soft_iou(m[objects[0]], m[objects[1]]) for m in maps])),
    }


def diagnose(config: dict, model: str, delta: str | None, concepts, seeds) -> dict:

    pipe = load_pipeline(model)
    out = {"prompt_concepts": list(concepts), "seeds": [seeds[0], seeds[-1]]}
    out["base"] = measure(pipe, concepts, seeds, config)
    if delta is not None:
        change = key_change(pipe, delta)
        out["key_change"] = {"mean": float(np.mean(list(change.values()))), "per_tensor": change}

        apply_delta(pipe, delta)
        out["sepen"] = measure(pipe, concepts, seeds, config)
    return out
