"""Batched sampling from a diffusers pipeline, one seeded generator per image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm


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
    batches = range(0, len(prompts), batch_size)
    for lo in tqdm(batches, desc=desc or "sampling", disable=desc is None, mininterval=10):
        chunk = list(prompts[lo : lo + batch_size])
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[lo : lo + batch_size]]
        with torch.no_grad():
            out.append(
                pipe(
                    chunk,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    generator=gens,
                    output_type=output_type,
                ).images
            )
    if output_type == "np":
        return np.concatenate(out)
    return torch.cat([o.float().cpu() for o in out])
