"""One finetuning step's objective, as a module that accelerate can wrap (DDP, autocast).

The cheap way to compute the Separate-and-Enhance losses (docs/method.md, Eqs. 1-4;
docs/performance.md):

- the UNet runs on the multi-object prompts only until the last layer whose maps the losses
  read (`run_until_captured`); nothing after it runs or is kept for the backward pass, and the
  backward pass stops at the first trainable layer by itself (nothing earlier needs a gradient);
- attention outside the captured layers is scaled-dot-product attention, and the captured
  layers keep only the object tokens' columns;
- the norm loss's frozen prediction (docs/method.md, Eq. 3) swaps the original key weights in
  under `no_grad`, so there is no second UNet in memory.

`bench/finetune_step.py` checks that the losses equal those of a loop built the way the
authors' code works (explicit attention everywhere, all maps stored, a frozen UNet copy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sepen.attention import AttentionStore, run_until_captured
from sepen.losses import norm_loss, total_loss
from sepen.tokens import aggregate_token_maps
from sepen.trainable import original_weights


@dataclass
class StepInputs:
    """The tensors of one micro-batch.

    `positions[b][i]` are the token positions of concept i of sample b (sepen.tokens);
    `single` holds (noisy latents, timesteps, text embeddings) of the single-object prompts of
    the norm loss, or None without it. `added` and `single_added` are the UNet's
    `added_cond_kwargs` (SDXL's pooled text embedding and size/crop time ids), None for SD 1.x.
    """

    noisy: torch.Tensor
    timesteps: torch.Tensor
    emb: torch.Tensor
    positions: Sequence[Sequence[Sequence[int]]]
    single: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    added: dict | None = None
    single_added: dict | None = None


def _extra(added: dict | None) -> dict:
    return {} if added is None else {"added_cond_kwargs": added}


def token_columns(positions) -> tuple[torch.Tensor, list[list[list[int]]]]:
    """The token columns a batch needs, and each concept's sub-tokens as indices into them."""
    columns = sorted({p for sample in positions for concept in sample for p in concept})
    index = {p: i for i, p in enumerate(columns)}
    groups = [[[index[p] for p in concept] for concept in sample] for sample in positions]
    return torch.tensor(columns, dtype=torch.long), groups


class SepenObjective(torch.nn.Module):
    """L = lambda_sep L_sep + lambda_en L_en (+ lambda_norm L_norm) for one micro-batch.

    `originals`: the starting values of the trained tensors (None for a LoRA, whose adapters
    are switched off instead). `early_exit` and `capture_columns` exist so that the benchmark
    can measure what each saves; both are on in finetuning.
    """

    def __init__(
        self,
        unet,
        store: AttentionStore,
        *,
        lambda_sep: float = 1.0,
        lambda_en: float = 0.5,
        lambda_norm: float = 0.5,
        token_aggregation: str = "mean",
        enhance_kernel: str = "authors",
        originals: dict[str, torch.Tensor] | None = None,
        early_exit: bool = True,
        capture_columns: bool = True,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.store = store
        self.lambdas = (lambda_sep, lambda_en, lambda_norm)
        self.how = token_aggregation
        self.kernel = enhance_kernel
        self.originals = originals
        self.early_exit = early_exit
        self.capture_columns = capture_columns

    @classmethod
    def from_settings(cls, unet, store, ft: dict, originals, **switches) -> SepenObjective:
        """The objective of a `finetune` config section (its lambdas and token aggregation)."""
        return cls(
            unet,
            store,
            lambda_sep=ft["lambda_sep"],
            lambda_en=ft["lambda_en"],
            lambda_norm=ft["lambda_norm"],
            token_aggregation=ft["token_aggregation"],
            enhance_kernel=ft["enhance_kernel"],
            originals=originals,
            **switches,
        )

    def concept_maps(self, inputs: StepInputs) -> torch.Tensor:
        """(B, N, H, h, w): each sample's concept maps, from one (early-exit) UNet call."""
        if self.capture_columns:
            columns, groups = token_columns(inputs.positions)
            self.store.columns = columns.to(inputs.noisy.device)
        else:
            groups = inputs.positions
        args = (inputs.noisy, inputs.timesteps, inputs.emb)
        extra = _extra(inputs.added)
        try:
            if self.early_exit:
                maps = run_until_captured(self.unet, self.store, *args, **extra)
            else:
                self.store.reset()
                self.unet(*args, **extra)
                maps = self.store.aggregate()
        finally:
            self.store.columns = None
        return torch.stack(
            [aggregate_token_maps(maps[b], g, self.how) for b, g in enumerate(groups)]
        )

    def norm(self, single, added: dict | None = None) -> torch.Tensor:
        """MSE between this UNet's prediction and the original keys' prediction."""
        noisy, timesteps, emb = single
        extra = _extra(added)
        self.store.enabled = False
        try:
            prediction = self.unet(noisy, timesteps, emb, **extra).sample
            with torch.no_grad(), original_weights(self.unet, self.originals):
                frozen = self.unet(noisy, timesteps, emb, **extra).sample
        finally:
            self.store.enabled = True
        return norm_loss(prediction, frozen)

    def forward(self, inputs: StepInputs) -> dict[str, torch.Tensor]:
        maps = self.concept_maps(inputs)
        norm = self.norm(inputs.single, inputs.single_added) if inputs.single is not None else None
        lambda_sep, lambda_en, lambda_norm = self.lambdas
        with torch.autocast(maps.device.type, enabled=False):  # the losses run in float32
            return total_loss(maps, lambda_sep, lambda_en, norm, lambda_norm, self.kernel)


def compile_blocks(unet, captured: Sequence[str] = ()) -> int:
    """`torch.compile` the UNet's repeated blocks in place (regional compilation).

    Every ResNet block and every transformer block whose cross-attention is not captured is
    compiled; captured blocks stay eager, since they record maps and may stop the forward pass.
    Returns the number of blocks compiled.
    """
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    skip = {name.removesuffix(".attn2") for name in captured}
    count = 0
    for name, module in unet.named_modules():
        if isinstance(module, ResnetBlock2D) or (
            isinstance(module, BasicTransformerBlock) and name not in skip
        ):
            module.compile()
            count += 1
    return count
