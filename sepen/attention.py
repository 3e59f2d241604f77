"""Cross-attention capture as a diffusers attention processor.

`SepenAttnProcessor` replaces the processor of every cross-attention layer (`attn2`) of a
`UNet2DConditionModel`. In layers chosen for capture it computes the attention probabilities
explicitly (softmax over all text tokens, per head), records them with their gradient in an
`AttentionStore`, and multiplies them with the values; elsewhere it calls scaled-dot-product
attention. Its output equals diffusers' `AttnProcessor2_0`. The start-of-text token's key (and
value) is detached, so that token's projection stays fixed during finetuning (docs/method.md,
"What is trained").

Two switches of the store make finetuning cheap (docs/performance.md): `columns` keeps only the
text tokens the losses read (the softmax still runs over all tokens), and `stop_after` ends the
UNet's forward pass with `ForwardStopped` right after that layer's maps are recorded, so the
layers after it (in SD 1.x the two highest-resolution up blocks) never run. `run_until_captured`
calls the UNet that way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sepen.errors import ResolutionError

_LAYER = re.compile(r"^(down_blocks\.(\d+)|mid_block|up_blocks\.(\d+))\.")


class ForwardStopped(Exception):
    """Raised by the capturing processor of `AttentionStore.stop_after` once its maps are kept."""


@dataclass
class AttentionStore:
    """Attention probabilities recorded during one UNet forward pass.

    Each entry of `maps` has shape (B, heads, h, w, T), or (B, heads, h, w, K) with `columns`
    set to K token positions. Call `reset()` before a forward pass.
    """

    maps: list[torch.Tensor] = field(default_factory=list)
    layer_names: list[str] = field(default_factory=list)
    latent_size: tuple[int, int] | None = None
    enabled: bool = True
    captured: list[str] = field(default_factory=list)  # layers set up to record, forward order
    columns: torch.Tensor | None = None  # keep only these text-token columns (None: all)
    stop_after: str | None = None  # raise ForwardStopped after recording this layer
    text_only: bool = False  # joint attention: maps renormalised over the text tokens
    previous: dict = field(default_factory=dict)  # joint attention: the processors replaced

    def reset(self) -> None:
        self.maps.clear()
        self.layer_names.clear()

    def record(self, name: str, probs: torch.Tensor) -> None:
        self.maps.append(probs)
        self.layer_names.append(name)

    def aggregate(self) -> torch.Tensor:
        """Mean over the captured layers: (B, H, h, w, T) at the largest captured grid.

        Layers of coarser grids are upsampled bilinearly; if layers differ in head count, each
        layer's heads are averaged first (H = 1).
        """
        if not self.maps:
            raise RuntimeError("no attention was captured: run the UNet after install_capture()")
        maps = list(self.maps)
        if len({m.shape[1] for m in maps}) > 1:
            maps = [m.mean(1, keepdim=True) for m in maps]
        h = max(m.shape[2] for m in maps)
        w = max(m.shape[3] for m in maps)
        resized = []
        for m in maps:
            if m.shape[2:4] != (h, w):
                b, heads, mh, mw, t = m.shape
                x = m.permute(0, 1, 4, 2, 3).reshape(b, heads * t, mh, mw)
                x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
                m = x.reshape(b, heads, t, h, w).permute(0, 1, 3, 4, 2)
            resized.append(m)
        return torch.stack(resized).mean(0)


def _grid(latent_size: tuple[int, int] | None, factor: int, length: int) -> tuple[int, int]:
    if latent_size is not None:
        h, w = latent_size
        f = factor
        while f > 1:  # stride-2 convolutions with padding 1 round up
            h, w, f = (h + 1) // 2, (w + 1) // 2, f // 2
        if h * w == length:
            return h, w
    side = int(round(length**0.5))
    if side * side != length:
        raise ValueError(
            f"cannot infer the attention grid of {length} positions; set store.latent_size"
        )
    return side, side


class SepenAttnProcessor:
    """Cross-attention processor with optional probability capture (AttnProcessor2_0 API)."""

    def __init__(
        self,
        name: str = "",
        store: AttentionStore | None = None,
        factor: int = 1,
        detach_start_token: bool = True,
    ) -> None:
        self.name = name
        self.store = store
        self.factor = factor
        self.detach_start_token = detach_start_token

    @property
    def captures(self) -> bool:
        return self.store is not None and self.store.enabled

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        length = hidden_states.shape[1]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if self.detach_start_token and torch.is_grad_enabled():
            key = torch.cat([key[:, :1].detach(), key[:, 1:]], 1)
            value = torch.cat([value[:, :1].detach(), value[:, 1:]], 1)

        tokens = key.shape[1]
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        if self.captures:
            scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
            if attention_mask is not None:
                scores = scores + attention_mask.float()
            probs = scores.softmax(-1)  # (B, heads, L, T)
            h, w = _grid(self.store.latent_size, self.factor, length)
            columns = self.store.columns
            kept = probs if columns is None else probs.index_select(-1, columns.to(probs.device))
            self.store.record(self.name, kept.view(batch, attn.heads, h, w, kept.shape[-1]))
            if self.store.stop_after == self.name:
                raise ForwardStopped(self.name)
            hidden_states = torch.matmul(probs.to(value.dtype), value)
        else:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_factors(unet) -> dict[str, int]:
    """Downsampling factor (relative to the latent) of every cross-attention layer, by name.

    Names are those of `unet.attn_processors` without the ".processor" suffix, in forward order.
    """
    down_factors, factor = [], 1
    for block in unet.down_blocks:
        down_factors.append(factor)
        if getattr(block, "downsamplers", None):
            factor *= 2
    mid_factor, up_factors = factor, []
    for block in unet.up_blocks:
        up_factors.append(factor)
        if getattr(block, "upsamplers", None):
            factor //= 2

    def order(name: str) -> tuple:
        m = _LAYER.match(name)
        section = 0 if m.group(2) else (1 if m.group(1) == "mid_block" else 2)
        index = int(m.group(2) or m.group(3) or 0)
        numbers = [int(n) for n in re.findall(r"\.(\d+)\.", name[m.end() - 1 :])]
        return (section, index, *numbers)

    factors = {}
    for key in unet.attn_processors:
        name = key.removesuffix(".processor")
        if not name.endswith("attn2"):
            continue
        m = _LAYER.match(name)
        if m is None:
            raise ValueError(f"unrecognised cross-attention layer {name!r}")
        if m.group(2) is not None:
            factors[name] = down_factors[int(m.group(2))]
        elif m.group(3) is not None:
            factors[name] = up_factors[int(m.group(3))]
        else:
            factors[name] = mid_factor
    return dict(sorted(factors.items(), key=lambda kv: order(kv[0])))


def available_resolutions(unet, latent_side: int) -> dict[int, list[str]]:
    """Map side length of each cross-attention grid -> the layers at that grid."""
    out: dict[int, list[str]] = {}
    for name, factor in cross_attention_factors(unet).items():
        side = latent_side
        while factor > 1:
            side, factor = (side + 1) // 2, factor // 2
        out.setdefault(side, []).append(name)
    return out


def captured_layers(unet, resolutions, latent_side: int) -> list[str]:
    """The cross-attention layers at the chosen map resolutions, in forward order."""
    available = available_resolutions(unet, latent_side)
    resolutions = [int(r) for r in resolutions]
    missing = [r for r in resolutions if r not in available]
    if missing or not resolutions:
        raise ResolutionError(
            f"no cross-attention layer at resolution {missing or resolutions} for "
            f"{latent_side}x{latent_side} latents; available: "
            f"{sorted(available, reverse=True)} (set finetune.resolutions to one of them)"
        )
    chosen = {name for r in resolutions for name in available[r]}
    return [name for name in cross_attention_factors(unet) if name in chosen]


def install_capture(
    unet,
    resolutions=(),
    latent_side: int | None = None,
    detach_start_token: bool = True,
) -> AttentionStore:
    """Set `SepenAttnProcessor` on every cross-attention layer; capture those at `resolutions`.

    Self-attention layers keep their processors. Returns the store that collects the maps.
    """
    latent_side = latent_side or unet.config.sample_size
    factors = cross_attention_factors(unet)
    captured = captured_layers(unet, resolutions, latent_side) if resolutions else []
    chosen = set(captured)
    store = AttentionStore(latent_size=(latent_side, latent_side), captured=captured)
    processors = {}
    for key, processor in unet.attn_processors.items():
        name = key.removesuffix(".processor")
        if name in factors:
            processors[key] = SepenAttnProcessor(
                name=name,
                store=store if name in chosen else None,
                factor=factors[name],
                detach_start_token=detach_start_token,
            )
        else:
            processors[key] = processor
    unet.set_attn_processor(processors)
    return store


def run_until_captured(unet, store: AttentionStore, *args, **kwargs) -> torch.Tensor:
    """The aggregated maps of one UNet call that stops after the last captured layer.

    Nothing after that layer runs, so nothing after it is stored for the backward pass either.
    `store.columns` is left as the caller set it.
    """
    if not store.captured:
        raise RuntimeError("no layer is set up to capture: pass resolutions to install_capture()")
    store.reset()
    store.stop_after = store.captured[-1]
    try:
        unet(*args, **kwargs)
    except ForwardStopped:
        pass
    else:
        raise RuntimeError(f"layer {store.captured[-1]!r} did not run: is the store enabled?")
    finally:
        store.stop_after = None
    return store.aggregate()
