"""Probes of the world card that ask whether a concept reaches the image through its object
tokens' attention (docs/mmdit.md), without trusting the detector where it cannot see:

- `text_share`: per attention layer (an MMDiT's joint blocks, a UNet's cross-attention
  layers), the image queries' attention on the object tokens, the start token and the rest of
  the text, at several noise levels, on noised latents of rendered scenes of the prompt's
  objects. In an MMDiT the shares are of the joint softmax (the rest is the image's own
  tokens); in a UNet the cross-attention reads only text, so the three shares sum to 1.
- `swap_test` (SD3-style MMDiTs, which also feed the prompt through a pooled vector): images
  drawn from the prompt's token sequence with the empty prompt's pooled vector, and from the
  empty prompt's sequence with the prompt's pooled vector, against the plain prompt. If the
  concept reaches the image through the object tokens, the first keeps most successes and the
  second loses them.
- `centroid_counts`: the steering test read without the detector: the centre of mass of each
  object's colour (`sepen.toy.detect.color_labels`), left or right of the middle. A shape the
  model cannot draw still has its colour, so steering is seen where the detector is blind.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sepen.architecture import Denoiser, denoiser_of, family, text_positions
from sepen.attention import install_capture
from sepen.denoising import encode
from sepen.joint_attention import install_joint_capture, is_joint, restore_processors
from sepen.toy.detect import color_labels
from sepen.toy.evaluate import image_scores, rates, to_uint8
from sepen.toy.pretrain import to_tensor
from sepen.toy.world import CONCEPTS, place, prompt_for, render

NOISE_LEVELS = (0.9, 0.6, 0.3)  # sigma of flow matching; a UNet's timestep is sigma * 1000
MIN_COLOUR_PIXELS = 4  # fewer pixels of an object's colour: the object is not there


def colour_side(image: np.ndarray, concept: str, labels: np.ndarray | None = None) -> str | None:
    """'left' or 'right': the half holding the centre of mass of the concept's colour (None
    when fewer than MIN_COLOUR_PIXELS pixels have it)."""
    labels = color_labels(image) if labels is None else labels
    ys, xs = np.nonzero(labels == list(CONCEPTS).index(concept))
    if len(xs) < MIN_COLOUR_PIXELS:
        return None
    return "left" if (xs + 0.5).mean() < image.shape[1] / 2 else "right"


def centroid_sides(images: np.ndarray, pair: Sequence[str]) -> list[tuple[bool, bool]]:
    """Per image: (first object's colour on the left, second object's colour on the right)."""
    out = []
    for im in images:
        labels = color_labels(im)
        out.append(
            (
                colour_side(im, pair[0], labels) == "left",
                colour_side(im, pair[1], labels) == "right",
            )
        )
    return out


def centroid_counts(images: np.ndarray, pair: Sequence[str]) -> dict[str, int]:
    """How many images have the first object's colour left and the second's right."""
    return side_counts(centroid_sides(images, pair))


def side_counts(sides: Sequence[tuple[bool, bool]]) -> dict[str, int]:
    """Counts of `centroid_sides`' per-image (first left, second right) flags."""
    return {
        "first_left": sum(a for a, _ in sides),
        "second_right": sum(b for _, b in sides),
        "both": sum(a and b for a, b in sides),
        "n": len(sides),
    }


def _scene_latents(pipe, pairs: Sequence[Sequence[str]], radius, seed: int) -> torch.Tensor:
    """Clean latents of one rendered scene per concept list (the denoiser's latent scale)."""
    rng = np.random.default_rng(seed)
    size = pipe.vae.config.sample_size
    images = np.stack([render(place(rng, list(c), size, tuple(radius)), size) for c in pairs])
    vae = pipe.vae
    with torch.no_grad():
        z = vae.encode(to_tensor(images)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


def _noised(pipe, z: torch.Tensor, sigma: float, g: torch.Generator):
    """(noisy latents, the denoiser's timesteps) at noise level sigma."""
    noise = torch.randn(z.shape, generator=g)
    n = len(z)
    if family(pipe) != "unet":  # flow matching
        return (1 - sigma) * z + sigma * noise, torch.full((n,), sigma * 1000.0)
    scheduler = pipe.scheduler
    t = torch.full((n,), int(round(sigma * (scheduler.config.num_train_timesteps - 1))))
    return scheduler.add_noise(z, noise, t), t[0]


def text_share(
    pipe,
    pairs: Sequence[Sequence[str]],
    radius,
    seed: int,
    levels: Sequence[float] = NOISE_LEVELS,
    resolutions: Sequence[int] = (16, 8),
) -> dict:
    """Per layer and noise level, the mean share of the image queries' attention on the
    object tokens (all of them together), the start token and the rest of the text (module
    doc). One scene per concept list of `pairs`, noised with one generator seeded by `seed`."""
    model = denoiser_of(pipe)
    prompts = [prompt_for(list(c)) for c in pairs]
    positions = [text_positions(pipe, p, list(c)) for p, c in zip(prompts, pairs)]
    size = pipe.vae.config.sample_size
    cond = encode(pipe, prompts, 1.0, size, size)
    z = _scene_latents(pipe, pairs, radius, seed)
    side = z.shape[-1]
    joint = is_joint(model)
    if joint:
        store = install_joint_capture(model, None, side, "joint", detach_start_token=False)
    else:
        saved = dict(model.attn_processors)
        store = install_capture(model, list(resolutions), side, detach_start_token=False)
    store.columns = None  # every text column
    call, g = Denoiser(model), torch.Generator().manual_seed(seed)
    out: dict = {}
    try:
        for sigma in levels:
            noisy, t = _noised(pipe, z, sigma, g)
            store.reset()
            with torch.no_grad():
                call(noisy, t, cond.emb, cond.added)
            for name, maps in zip(store.layer_names, store.maps):  # (B, heads, h, w, T)
                text = maps.float().mean((1, 2, 3))  # (B, T): mean over heads and queries
                objects = torch.stack(
                    [
                        text[b, sorted({p for c in positions[b] for p in c})].sum()
                        for b in range(len(text))
                    ]
                )
                total, start = text.sum(-1), text[:, 0]
                out.setdefault(name, {})[f"{sigma:g}"] = {
                    "objects": float(objects.mean()),
                    "start": float(start.mean()),
                    "rest_of_text": float((total - objects - start).mean()),
                    "image": float((1 - total).mean()) if joint else 0.0,
                }
    finally:
        if joint:
            restore_processors(model, store)
        else:
            model.set_attn_processor(saved)
    return out


SWAPS = {  # (token sequence, pooled vector) from (prompt, empty, prompt pooled, empty pooled)
    "prompt": lambda e, n, p, q: (e, p),
    "sequence_only": lambda e, n, p, q: (e, q),  # the prompt's tokens, the empty pooled vector
    "pooled_only": lambda e, n, p, q: (n, p),  # the empty prompt's tokens, the prompt's pooled
}


def swap_images(pipe, prompts: Sequence[str], seeds: Sequence[int], sampling: dict, variant: str):
    """Images of `prompts` (image i seeded by seeds[i]) conditioned as `variant` of SWAPS says,
    with classifier-free guidance against the empty prompt (an SD3-style pipeline)."""
    if family(pipe) != "sd3":
        raise ValueError("the swap test needs an SD3-style pipeline (a pooled text vector)")
    length, out = pipe.tokenizer_max_length, []
    for lo in range(0, len(prompts), sampling["batch_size"]):
        chunk = list(prompts[lo : lo + sampling["batch_size"]])
        e, n, p, q = pipe.encode_prompt(
            chunk, None, None, do_classifier_free_guidance=True, max_sequence_length=length
        )
        emb, pooled = SWAPS[variant](e, n, p, q)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[lo : lo + len(chunk)]]
        with torch.no_grad():
            out.append(
                pipe(
                    prompt_embeds=emb,
                    negative_prompt_embeds=n,
                    pooled_prompt_embeds=pooled,
                    negative_pooled_prompt_embeds=q,
                    num_inference_steps=sampling["steps"],
                    guidance_scale=sampling["guidance_scale"],
                    generator=gens,
                    output_type="np",
                    max_sequence_length=length,
                ).images
            )
    return to_uint8(np.concatenate(out))


def swap_test(
    pipe, concept_lists: Sequence[Sequence[str]], seeds: Sequence[int], sampling: dict
) -> dict:
    """Success and hit rate of the plain prompts and of the two swaps (module doc) on the same
    seeds, and the share of the plain prompts' success each swap keeps."""
    prompts = [prompt_for(list(c)) for c in concept_lists for _ in seeds]
    named = [list(c) for c in concept_lists for _ in seeds]
    all_seeds = [s for _ in concept_lists for s in seeds]
    results: dict = {}
    for variant in SWAPS:
        r = rates(image_scores(swap_images(pipe, prompts, all_seeds, sampling, variant), named))
        results[variant] = {"success": r["success"], "hit_rate": r["hit_rate"]}
    base = results["prompt"]["success"]["mean"]
    for variant in ("sequence_only", "pooled_only"):
        kept = results[variant]["success"]["mean"]
        results[variant]["kept_of_base"] = kept / base if base else None
    return results
