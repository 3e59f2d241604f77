"""Which parameters SepEn finetunes: the text keys (default), keys and values, or a LoRA.

Text keys are the cross-attention `to_k` of a UNet and the joint blocks' `add_k_proj` of an
MMDiT (sepen.architecture); only their weights train (biases stay frozen, so a LoRA is exact).
Everything else is frozen (no gradient, bit-identical after training).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from sepen.architecture import key_layers, projections

MODES = ("to_k", "to_k+to_v", "lora")


def trainable_layers(unet, captured: list[str], norm_loss: bool) -> list[str]:
    """Text-key layers whose keys can change the loss, in forward order.

    Without the norm loss only the attention maps enter the loss, so layers after the last
    captured one cannot affect it and are left frozen.
    """
    layers = key_layers(unet)
    if norm_loss or not captured:
        return layers
    last = max(layers.index(name) for name in captured)
    return layers[: last + 1]


def value_layers(unet, captured: list[str], norm_loss: bool) -> list[str]:
    """Text-key layers whose values can change the loss.

    A layer's values reach the maps only through later layers, so without the norm loss the
    last captured layer's values (and everything after it) cannot affect the loss.
    """
    layers = key_layers(unet)
    if norm_loss or not captured:
        return layers
    return layers[: max(layers.index(name) for name in captured)]


def _projections(unet, mode: str) -> tuple[str, ...]:
    if mode not in MODES:
        raise ValueError(f"trainable {mode!r} is not one of {MODES}")
    return projections(unet, mode)


def prepare_trainable(
    unet,
    layers: list[str],
    mode: str = "to_k",
    lora_rank: int = 4,
    values: list[str] | None = None,
) -> dict[str, torch.nn.Parameter]:
    """Freeze the UNet, then enable gradients for the chosen projections of `layers`.

    With mode "to_k+to_v", values are trained in `values` (default: `layers`).
    Returns the trainable parameters by their name in `unet.named_parameters()`.
    """
    names = _projections(unet, mode)
    unet.requires_grad_(False)
    if mode == "lora":
        from peft import LoraConfig

        targets = [f"{layer}.{names[0]}" for layer in layers]
        unet.add_adapter(
            LoraConfig(
                r=lora_rank, lora_alpha=lora_rank, target_modules=targets, init_lora_weights=True
            )
        )
        params = {n: p for n, p in unet.named_parameters() if "lora_" in n}
        for p in params.values():
            p.requires_grad_(True)
        return params
    named = dict(unet.named_parameters())
    params = {}
    values = layers if values is None else values
    for layer in layers:
        for i, proj in enumerate(names):
            if i == 1 and layer not in values:
                continue
            name = f"{layer}.{proj}.weight"
            named[name].requires_grad_(True)
            params[name] = named[name]
    return params


@contextmanager
def original_weights(unet, originals: dict[str, torch.Tensor] | None):
    """Run the UNet with its original (pre-finetuning) weights, without a second copy.

    For key/value finetuning `originals` holds the starting values of the trained tensors, which
    are swapped in and back; for LoRA (`originals` None) the adapters are disabled.
    """
    if originals is None:
        unet.disable_adapters()
        try:
            yield
        finally:
            unet.enable_adapters()
        return
    named = dict(unet.named_parameters())
    saved = {}
    with torch.no_grad():
        for name, value in originals.items():
            saved[name] = named[name].detach().clone()
            named[name].copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                named[name].copy_(value)
