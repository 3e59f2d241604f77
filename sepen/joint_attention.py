"""Image->text attention capture in the joint attention of MMDiT models (SD3/SD3.5, FLUX.1).

MMDiT models have no cross-attention: text and image tokens are projected separately
(`add_k_proj` for the text keys) and attend jointly. The processors here replace diffusers'
`JointAttnProcessor2_0` (SD3: image tokens first, tensors (B, heads, S, D)) and
`FluxAttnProcessor` (FLUX.1 double-stream blocks: text first, (B, S, heads, D), RoPE) on the
joint blocks. In captured blocks they compute the joint softmax explicitly, after the QK norms
and RoPE, record the image queries' probabilities on the text tokens (only the columns the
losses read, as `AttentionStore.columns` asks), optionally renormalised over the text tokens,
and multiply the probabilities with the values; elsewhere they call scaled-dot-product
attention. Their outputs equal diffusers' processors.

The maps go into the same `AttentionStore` as the UNet's, with shape (B, heads, h, w, K) on the
grid of image tokens, so the losses, aggregation and early exit (`run_until_captured`) are the
UNet's. FLUX.1's single-stream blocks project text and image keys with one `to_k`: a text-key
change does not fit there, so they are never captured or trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sepen.attention import AttentionStore, ForwardStopped, _grid
from sepen.errors import ResolutionError

MAPS = ("joint", "text")  # probabilities of the joint softmax, or renormalised over the text


def is_joint(model) -> bool:
    """Whether a denoiser is an MMDiT (SD3/SD3.5 or FLUX.1 transformer)."""
    return type(model).__name__ in ("SD3Transformer2DModel", "FluxTransformer2DModel")


def text_first(model) -> bool:
    """FLUX.1 puts the text tokens first in its joint sequence; SD3 puts the image first."""
    return type(model).__name__ == "FluxTransformer2DModel"


def joint_layers(model) -> list[str]:
    """The joint-attention modules whose text keys can be trained, in forward order.

    SD3/SD3.5: `transformer_blocks.{i}.attn` (never SD3.5's image-only `attn2`); FLUX.1: the
    double-stream `transformer_blocks.{i}.attn` (never `single_transformer_blocks`).
    """
    return [f"transformer_blocks.{i}.attn" for i in range(len(model.transformer_blocks))]


def patch_factor(model) -> int:
    """Latent pixels per image token along a side: SD3's patch size, FLUX.1's 2x2 packing."""
    if text_first(model):
        return 2 * int(model.config.patch_size)
    return int(model.config.patch_size)


class JointCaptureProcessor:
    """Joint attention with optional capture of image->text probabilities.

    `text_first` selects FLUX.1's layout (and its processor's signature: RoPE); otherwise
    SD3's. `detach_start_token` detaches the key and value of text position 0 (CLIP's start
    token, SD3), which thus stays fixed during finetuning, as in the UNet (docs/method.md).
    `text_query_keys`: (weight, bias) of a frozen text-key projection that the text queries
    read instead of `add_k_proj` (`finetune.key_scope: image_queries`): the image queries read
    the trained text keys, the text queries the base model's, so the text stream is the base
    model's (a diagnostic; such a delta is no plain LoRA on add_k_proj).
    """

    def __init__(
        self,
        name: str,
        store: AttentionStore | None,
        factor: int,
        text_first: bool,
        detach_start_token: bool = False,
        bias=None,
        text_query_keys: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> None:
        self.name = name
        self.store = store
        self.factor = factor
        self.text_first = text_first
        self.detach_start_token = detach_start_token
        self.bias = bias  # bias(side, tokens) -> (side * side, tokens): the card's steering
        self.text_query_keys = text_query_keys

    @property
    def captures(self) -> bool:
        return self.store is not None and self.store.enabled

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb=None,
    ):
        if encoder_hidden_states is None:
            raise RuntimeError(f"joint layer {self.name} was called without text tokens")
        batch, length = hidden_states.shape[:2]
        heads = attn.heads
        text_k = attn.add_k_proj(encoder_hidden_states)
        text_v = attn.add_v_proj(encoder_hidden_states)
        if self.detach_start_token and torch.is_grad_enabled():
            text_k = torch.cat([text_k[:, :1].detach(), text_k[:, 1:]], 1)
            text_v = torch.cat([text_v[:, :1].detach(), text_v[:, 1:]], 1)
        parts = [
            (attn.to_q(hidden_states), attn.norm_q),
            (attn.to_k(hidden_states), attn.norm_k),
            (attn.to_v(hidden_states), None),
            (attn.add_q_proj(encoder_hidden_states), attn.norm_added_q),
            (text_k, attn.norm_added_k),
            (text_v, None),
        ]
        q, k, v, tq, tk, tv = [self._heads(x, heads, norm) for x, norm in parts]
        query, key, value = self._joined((q, k, v), (tq, tk, tv))
        base_key = None
        if self.text_query_keys is not None:
            weight, bias = self.text_query_keys
            like = encoder_hidden_states
            base = F.linear(
                like, weight.to(like.device, like.dtype), None if bias is None else bias.to(like)
            )
            base_key = self._joined((k,), (self._heads(base, heads, attn.norm_added_k),))[0]
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=2)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=2)
            if base_key is not None:
                base_key = apply_rotary_emb(base_key, image_rotary_emb, sequence_dim=2)
        mask = attention_mask if self.text_first else None  # SD3's processor ignores masks
        n_text = tk.shape[2]
        if self.bias is not None:
            mask = self._steering(query, length, n_text, mask)
        if self.captures:
            out = self._capture(query, key, value, mask, length, n_text)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        if base_key is not None:  # the text queries' rows again, on the base model's text keys
            rows = slice(0, n_text) if self.text_first else slice(length, length + n_text)
            if mask is not None and mask.dim() == 4 and mask.shape[-2] == query.shape[2]:
                mask = mask[:, :, rows]
            text_rows = F.scaled_dot_product_attention(
                query[:, :, rows], base_key, value, attn_mask=mask
            )
            out = torch.cat([out[:, :, : rows.start], text_rows, out[:, :, rows.stop :]], 2)
        out = out.transpose(1, 2).reshape(batch, -1, heads * out.shape[-1]).to(query.dtype)
        if self.text_first:
            text_out, image_out = out[:, :n_text], out[:, n_text:]
        else:
            image_out, text_out = out[:, :length], out[:, length:]
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        if getattr(attn, "context_pre_only", False) and not self.text_first:
            return image_out, text_out  # SD3's last block drops the text output
        return image_out, attn.to_add_out(text_out.contiguous())

    def _steering(self, query, length: int, n_text: int, mask):
        """An additive mask with the steering bias on the conditional half's image->text logits
        (with classifier-free guidance the batch is [unconditional, conditional])."""
        if mask is not None:
            raise RuntimeError("the steering test does not combine with an attention mask")
        side = int(round(length**0.5))
        total = query.shape[2]
        bias = self.bias(side, n_text).to(query.device, query.dtype)
        steer = torch.zeros(query.shape[0], 1, total, total, dtype=query.dtype, device=query.device)
        rows = slice(n_text, total) if self.text_first else slice(0, length)
        cols = slice(0, n_text) if self.text_first else slice(length, total)
        steer[query.shape[0] // 2 :, 0, rows, cols] = bias
        return steer

    def _joined(self, image: tuple, text: tuple) -> tuple:
        """Image and text parts (B, heads, S, D) side by side in the model's token order."""
        first, second = (text, image) if self.text_first else (image, text)
        return tuple(torch.cat([a, b], 2) for a, b in zip(first, second))

    @staticmethod
    def _heads(x: torch.Tensor, heads: int, norm) -> torch.Tensor:
        x = x.unflatten(-1, (heads, -1))  # (B, S, heads, D): the layout both norms act on
        if norm is not None:
            x = norm(x)
        return x.transpose(1, 2)

    def _capture(self, query, key, value, mask, length: int, n_text: int) -> torch.Tensor:
        scale = query.shape[-1] ** -0.5
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
        if mask is not None:
            scores = (
                scores.masked_fill(~mask, float("-inf"))
                if mask.dtype == torch.bool
                else scores + mask.float()
            )
        probs = scores.softmax(-1)  # (B, heads, S, S), S = image + text
        rows, cols = (
            (slice(n_text, None), slice(None, n_text))
            if self.text_first
            else (slice(None, length), slice(length, None))
        )
        store = self.store
        # renormalised over the text: the softmax of the text logits alone (the same values as
        # dividing by the text's share, which can underflow to 0 in the joint softmax)
        text = scores[:, :, rows, cols].softmax(-1) if store.text_only else probs[:, :, rows, cols]
        kept = text if store.columns is None else text.index_select(-1, store.columns)
        h, w = _grid(store.latent_size, self.factor, length)
        batch, heads = kept.shape[:2]
        store.record(self.name, kept.reshape(batch, heads, h, w, kept.shape[-1]))
        if store.stop_after == self.name:
            raise ForwardStopped(self.name)
        return torch.matmul(probs.to(value.dtype), value)


def captured_blocks(model, blocks) -> list[str]:
    """The joint layers of `blocks` (indices; None: every joint block), in forward order."""
    layers = joint_layers(model)
    if blocks is None:
        return layers
    blocks = [int(b) for b in blocks]
    bad = [b for b in blocks if not 0 <= b < len(layers)]
    if bad or not blocks:
        single = len(getattr(model, "single_transformer_blocks", []))
        note = (
            f"; FLUX.1's {single} single-stream blocks share one key projection for text and "
            "image and cannot be trained or captured"
            if single
            else ""
        )
        raise ResolutionError(
            f"finetune.blocks {bad or blocks} are not joint blocks of this "
            f"{type(model).__name__}: it has {len(layers)} (0..{len(layers) - 1}){note}; "
            f"set finetune.blocks to indices in that range, or null for all"
        )
    return [layers[b] for b in sorted(set(blocks))]


def install_joint_capture(
    model,
    blocks=None,
    latent_side: int | None = None,
    maps: str = "joint",
    detach_start_token: bool | None = None,
    image_queries_only: bool = False,
) -> AttentionStore:
    """Set `JointCaptureProcessor` on every joint block; capture those of `blocks`.

    `latent_side`: the side of the (unpacked) latents; `maps`: "joint" keeps the joint
    softmax's probabilities, "text" renormalises them over the text tokens;
    `image_queries_only`: the text queries read a frozen copy of the text keys as they are now
    (`finetune.key_scope: image_queries`; otherwise a replaced processor's copy is kept).
    Returns the store; `restore_processors(model, store)` puts the previous processors back.
    """
    if maps not in MAPS:
        raise ResolutionError(f"joint attention maps {maps!r} are not one of {MAPS}")
    flux = text_first(model)
    side = latent_side or getattr(model.config, "sample_size", None) or 128
    captured = captured_blocks(model, blocks)
    store = AttentionStore(latent_size=(side, side), captured=captured, text_only=maps == "text")
    factor = patch_factor(model)
    detach = (not flux) if detach_start_token is None else detach_start_token
    modules = dict(model.named_modules())
    for name in joint_layers(model):
        previous = store.previous[name] = modules[name].processor
        keys = _base_text_keys(modules[name]) if image_queries_only else _kept(previous)
        modules[name].set_processor(
            JointCaptureProcessor(
                name, store if name in captured else None, factor, flux, detach, None, keys
            )
        )
    return store


def _base_text_keys(attn) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A frozen copy of a joint block's text-key projection as it is now."""
    proj = attn.add_k_proj
    proj = getattr(proj, "base_layer", proj)  # a PEFT LoRA layer: its frozen base
    bias = None if proj.bias is None else proj.bias.detach().clone()
    return proj.weight.detach().clone(), bias


def _kept(previous):
    """The text queries' frozen keys of a replaced processor (None if it has none), so that a
    capture or a steering installed later keeps `finetune.key_scope: image_queries`."""
    return getattr(previous, "text_query_keys", None)


def serve_image_queries_only(model, on: bool = True) -> None:
    """With `on`, the text queries of every joint block read from now on a frozen copy of the
    text keys as they are now, so a delta applied afterwards changes what the image queries
    read only (`finetune.key_scope: image_queries`); without, they read `add_k_proj` again."""
    factor, flux = patch_factor(model), text_first(model)
    modules = dict(model.named_modules())
    for name in joint_layers(model):
        attn = modules[name]
        keys = _base_text_keys(attn) if on else None
        if isinstance(attn.processor, JointCaptureProcessor):
            attn.processor.text_query_keys = keys
        elif on:
            attn.set_processor(
                JointCaptureProcessor(name, None, factor, flux, text_query_keys=keys)
            )


def steer_joint(model, bias) -> AttentionStore:
    """Every joint block steered by `bias` (sepen.toy.steering); undo with restore_processors."""
    store = AttentionStore(enabled=False)
    factor, flux = patch_factor(model), text_first(model)
    modules = dict(model.named_modules())
    for name in joint_layers(model):
        previous = store.previous[name] = modules[name].processor
        modules[name].set_processor(
            JointCaptureProcessor(
                name, None, factor, flux, bias=bias, text_query_keys=_kept(previous)
            )
        )
    return store


def restore_processors(model, store: AttentionStore) -> None:
    """Put back the processors `install_joint_capture` replaced."""
    modules = dict(model.named_modules())
    for name, processor in store.previous.items():
        modules[name].set_processor(processor)
