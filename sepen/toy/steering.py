"""The steering test of the world card: is the object tokens' attention causal? One object
token's cross-attention logits get +b on the left half of the image and -b on the right (the
other token the mirror), in every cross-attention layer (an MMDiT: every joint block's
image->text logits); the exact detector then says on which side each object landed."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch

from sepen.errors import SepenError
from sepen.joint_attention import is_joint, restore_processors, steer_joint
from sepen.toy.detect import regions


def steering_bias(side: int, tokens: int, left, right, strength: float) -> torch.Tensor:
    """(side * side, tokens) additive logit bias: the `left` token positions get +strength on
    the left half of a side x side grid and -strength on the right half; `right` the mirror.
    Other tokens get 0. Rows are the grid's cells in row-major order (as attention queries)."""
    bias = torch.zeros(side, side, tokens)
    half = side // 2
    for positions, sign in ((left, 1.0), (right, -1.0)):
        for p in positions:
            bias[:, :half, p] += sign * strength
            bias[:, half:, p] -= sign * strength
    return bias.reshape(side * side, tokens)


class SteeringProcessor:
    """diffusers' AttnProcessor2_0 with a steering bias added to the conditional half's logits.

    `bias(side, tokens)` gives the (side * side, tokens) bias for a layer's grid; with
    classifier-free guidance the batch is [unconditional, conditional] and only the second half
    is steered (`cond_only`).
    """

    def __init__(self, bias, cond_only: bool = True):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.bias, self.cond_only, self.inner = bias, cond_only, AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        if attention_mask is not None:
            raise SepenError("the steering test does not combine with an attention mask")
        batch, length = hidden_states.shape[0], hidden_states.shape[-2]
        if hidden_states.ndim == 4:
            length = hidden_states.shape[-1] * hidden_states.shape[-2]
        side = int(round(length**0.5))
        tokens = encoder_hidden_states.shape[1]
        bias = self.bias(side, tokens).to(hidden_states.device, hidden_states.dtype)
        mask = torch.zeros(batch, length, tokens, dtype=bias.dtype, device=bias.device)
        first = batch // 2 if self.cond_only else 0
        mask[first:] = bias
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask=mask, **kw)


@contextlib.contextmanager
def steered(unet, bias):
    """Context: every cross-attention layer (attn2; an MMDiT's joint blocks) steered by
    `bias`; processors restored."""
    if is_joint(unet):
        store = steer_joint(unet, bias)
        try:
            yield
        finally:
            restore_processors(unet, store)
        return
    original = dict(unet.attn_processors)
    processors = {
        k: (SteeringProcessor(bias) if ".attn2." in k else v) for k, v in original.items()
    }
    unet.set_attn_processor(processors)
    try:
        yield
    finally:
        unet.set_attn_processor(original)


def object_side(found, concept: str, width: int) -> str | None:
    """'left' or 'right': the half holding the centre of the concept's biggest counted region
    (None when the detector did not find it)."""
    own = [r for r in found if r.concept == concept and r.counts]
    if not own:
        return None
    biggest = max(own, key=lambda r: r.area)
    xs = np.nonzero(biggest.mask)[1] + 0.5
    return "left" if xs.mean() < width / 2 else "right"


def steering_counts(images: np.ndarray, pair: Sequence[str]) -> dict[str, int]:
    """How many images show the pair's first object on the left and the second on the right."""
    first = second = both = 0
    for im in images:
        found = regions(im)
        a = object_side(found, pair[0], im.shape[1]) == "left"
        b = object_side(found, pair[1], im.shape[1]) == "right"
        first, second, both = first + a, second + b, both + (a and b)
    return {"first_left": first, "second_right": second, "both": both, "n": len(images)}
