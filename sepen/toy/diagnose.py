"""What a SepEn delta did to one prompt of the toy world, and why (`sepen toy diagnose`).

For one multi-object prompt, the base model and the model with the delta sample the same
seeds; for each: the exact detector's success and failure taxonomy; where the cross-attention
goes, as the share of the step-averaged attention taken by each token group (the start token,
each named object, the other words, the end and padding tokens); the cosine similarity of the
object tokens' keys and the overlap of their maps. For the delta: how far it moved each key
projection (relative Frobenius norm of the change) and, on an MMDiT, how much it changes each
joint block's text-stream and image-stream outputs (`stream_change`: an MMDiT's text keys are
also read by the text queries, so a key change rewrites the text stream that later blocks
project; a UNet's cross-attention keys have no such path). These are the quantities the method
acts on, so a SepEn run that breaks images can be read off them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sepen.architecture import Denoiser, denoiser_of
from sepen.delta import apply_delta, read_delta
from sepen.denoising import encode
from sepen.errors import SepenError
from sepen.joint_attention import is_joint
from sepen.models import load_pipeline
from sepen.sampling import sample_with_maps
from sepen.tokens import concept_token_positions, prompt_ids
from sepen.toy.evaluate import image_scores, rates, to_uint8
from sepen.toy.geometry import drawing_key_cosine, soft_iou
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
    params = dict(denoiser_of(pipe).named_parameters())
    return {
        name: float((value - params[name].detach()).norm() / params[name].detach().norm())
        for name, value in sorted(tensors.items())
    }


def block_outputs(pipe, prompt: str, seed: int, levels=(0.9, 0.6, 0.3)) -> list[dict]:
    """Per noise level, each joint block's (text-stream, image-stream) output for `prompt` on
    random latents seeded by `seed` (the last SD3 block has no text output: None)."""
    model = denoiser_of(pipe)
    outputs: dict = {}

    def hook(index):
        def keep(module, args, out):
            text, image = out if isinstance(out, tuple) else (None, out)
            outputs[index] = (None if text is None else text.detach(), image.detach())

        return keep

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(model.transformer_blocks)]
    side = pipe.vae.config.sample_size // pipe.vae_scale_factor
    cond = encode(pipe, [prompt], 1.0, side, side)
    noise = torch.randn(
        1, model.config.in_channels, side, side, generator=torch.Generator().manual_seed(seed)
    )
    result = []
    try:
        for level in levels:
            outputs.clear()
            with torch.no_grad():
                Denoiser(model)(noise, torch.tensor([level * 1000.0]), cond.emb, cond.added)
            result.append(dict(outputs))
    finally:
        for h in handles:
            h.remove()
    return result


def stream_change(pipe, delta: str | Path, prompt: str, seed: int) -> dict[str, dict]:
    """Relative change ||out_delta - out_base|| / ||out_base|| of each joint block's text- and
    image-stream output for `prompt`, mean over noise levels (block_outputs); `pipe` is left
    with the delta applied."""
    if not is_joint(denoiser_of(pipe)):
        raise SepenError("stream_change reads an MMDiT's joint blocks; this model has none")
    before = block_outputs(pipe, prompt, seed)
    apply_delta(pipe, delta)
    after = block_outputs(pipe, prompt, seed)

    def rel(a, b):
        return None if a is None else float((b - a).norm() / a.norm())

    out = {}
    for i in before[0]:
        text = [rel(x[i][0], y[i][0]) for x, y in zip(before, after)]
        image = [rel(x[i][1], y[i][1]) for x, y in zip(before, after)]
        out[f"block {i}"] = {
            "text_stream": None if text[0] is None else float(np.mean(text)),
            "image_stream": float(np.mean(image)),
        }
    return out


def measure(pipe, concepts: Sequence[str], seeds: Sequence[int], config: dict) -> dict:
    """Success, taxonomy, attention budget, key cosine and map overlap of one prompt."""

    sp, ft = config["sampling"], config["finetune"]
    prompt = prompt_for(list(concepts))
    groups = token_groups(pipe.tokenizer, prompt, concepts)
    pos = concept_token_positions(pipe.tokenizer, prompt, concepts)
    with drawing_key_cosine(pipe, prompt, pos) as cosine:
        images, maps = sample_with_maps(
            pipe,
            [prompt] * len(seeds),
            [list(groups.values())] * len(seeds),
            list(seeds),
            sp["steps"],
            sp["guidance_scale"],
            ft,  # a UNet's resolutions, an MMDiT's blocks and map kind
            sp["batch_size"],
            how="sum",
        )
    budget = np.mean([m.mean((1, 2)) for m in maps], 0)
    objects = [list(groups).index(c) for c in concepts]
    scores = rates(image_scores(to_uint8(images), [list(concepts)] * len(seeds)))
    return {
        "success": scores["success"]["mean"],
        "taxonomy": {k: v["mean"] for k, v in scores.items() if k.startswith("fail_")},
        "spurious": scores["spurious"]["mean"],
        "attention_budget": {g: float(b) for g, b in zip(groups, budget)},
        "object_peak": [float(np.mean([m[i].max() for m in maps])) for i in objects],
        "key_cosine": cosine(),
        "map_iou": float(np.mean([soft_iou(m[objects[0]], m[objects[1]]) for m in maps])),
    }


def diagnose(config: dict, model: str, delta: str | None, concepts, seeds) -> dict:

    pipe = load_pipeline(model)
    out = {"prompt_concepts": list(concepts), "seeds": [seeds[0], seeds[-1]]}
    out["base"] = measure(pipe, concepts, seeds, config)
    if delta is not None:
        change = key_change(pipe, delta)
        out["key_change"] = {"mean": float(np.mean(list(change.values()))), "per_tensor": change}
        if is_joint(denoiser_of(pipe)):  # (applies the delta)
            out["stream_change"] = stream_change(pipe, delta, prompt_for(list(concepts)), seeds[0])
        else:
            apply_delta(pipe, delta)
        out["sepen"] = measure(pipe, concepts, seeds, config)
    return out
