"""Batched sampling from a diffusers pipeline, one seeded generator per image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from sepen.architecture import call_options, capturing, denoiser_of
from sepen.tokens import aggregate_token_maps


def seeded_batches(prompts: Sequence[str], seeds: Sequence[int], batch_size: int, desc=None):
    """(first index, prompts, generators) per batch: item i gets a generator seeded by
    seeds[i], whatever the batch size. A progress bar is shown when `desc` is given."""
    batches = range(0, len(prompts), batch_size)
    for lo in tqdm(batches, desc=desc or "sampling", disable=desc is None, mininterval=10):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[lo : lo + batch_size]]
        yield lo, list(prompts[lo : lo + batch_size]), gens


def sample(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance: float,
    batch_size: int = 32,
    output_type: str = "np",
    desc: str | None = None,
):
    """Outputs for `prompts`, item i from prompt i with a generator seeded by seeds[i].

    Returns the pipeline's images concatenated over batches: a numpy array for "np", a tensor
    for "latent" or "pt". A progress bar is shown when `desc` is given.
    """
    out = []
    for _, chunk, gens in seeded_batches(prompts, seeds, batch_size, desc):
        with torch.no_grad():
            out.append(
                pipe(
                    chunk,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    generator=gens,
                    output_type=output_type,
                    **call_options(pipe),
                ).images
            )
    if output_type == "np":
        return np.concatenate(out)
    return torch.cat([o.float().cpu() for o in out])


def sample_with_maps(
    pipe,
    prompts: Sequence[str],
    positions: Sequence[Sequence[Sequence[int]]],
    seeds: Sequence[int],
    steps: int,
    guidance: float,
    capture,
    batch_size: int = 32,
    how: str = "mean",
    desc: str | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Images and each image's concept attention maps, averaged over the denoising steps.

    `positions[i]` are the token positions of prompt i's concepts
    (sepen.architecture.text_positions). `capture` says where the maps are read: a `finetune`
    section (a UNet's `resolutions`, an MMDiT's `blocks` and `joint_maps`) or a list of
    resolutions. The maps are the attention probabilities of the conditional prompt (heads
    averaged, layers averaged at the largest grid, sub-tokens combined by `how`): entry i has
    shape (N_i, h, w). The pipeline's attention processors are restored afterwards.
    """

    model = denoiser_of(pipe)
    if not isinstance(capture, dict):
        capture = {"resolutions": list(capture)}
    side = getattr(model.config, "sample_size", None) or 128
    images, maps = [], []
    state: dict = {}

    def on_step(p, i, t, kwargs):
        n, where, acc = len(state["where"]), state["where"], state["acc"]
        step = store.aggregate()[-n:].mean(1).float()  # conditional half, heads averaged
        for b in range(n):
            m = aggregate_token_maps(step[b], where[b], how)
            acc[b] = m if acc[b] is None else acc[b] + m
        store.reset()
        return kwargs

    with capturing(model, capture, side) as store:
        for lo, chunk, gens in seeded_batches(prompts, seeds, batch_size, desc):
            state["where"] = positions[lo : lo + batch_size]
            state["acc"] = [None] * len(chunk)
            store.reset()
            with torch.no_grad():
                out = pipe(
                    chunk,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    generator=gens,
                    output_type="np",
                    callback_on_step_end=on_step,
                    **call_options(pipe),
                )
            images.append(out.images)
            maps += [(a / steps).cpu().numpy() for a in state["acc"]]
    return np.concatenate(images), maps
