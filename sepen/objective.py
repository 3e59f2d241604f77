"""One finetuning step's objective, as a module that accelerate can wrap (DDP, autocast).

The cheap way to compute the Separate-and-Enhance losses (docs/method.md, Eqs. 1-4;
docs/performance.md):

- the denoiser (UNet or MMDiT, sepen.architecture) runs on the multi-object prompts only until
  the last layer whose maps the losses read (`run_until_captured`); nothing after it runs or
  is kept for the backward pass, and the backward pass stops at the first trainable layer by
  itself (nothing earlier needs a gradient);
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

from sepen.architecture import Denoiser
from sepen.attention import AttentionStore, run_until_captured
from sepen.losses import norm_loss, total_loss
from sepen.tokens import aggregate_token_maps
from sepen.trainable import original_weights


@dataclass
class StepInputs:
    """The tensors of one micro-batch.

    `positions[b][i]` are the token positions of concept i of sample b (sepen.tokens);
    `single` holds (noisy latents, timesteps, text embeddings) of the single-object prompts of
    the norm loss, or None without it. `added` and `single_added` are the extra conditioning of
    `sepen.architecture.Denoiser`: SDXL's `added_cond_kwargs` (pooled text embedding and
    size/crop time ids), the MMDiTs' pooled projections; None for SD 1.x.
    """

    noisy: torch.Tensor
    timesteps: torch.Tensor
    emb: torch.Tensor
    positions: Sequence[Sequence[Sequence[int]]]
    single: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    added: dict | None = None
    single_added: dict | None = None


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
    can measure what each saves; both are on in finetuning. `guidance`: FLUX.1-dev's embedded
    guidance scale (ignored by other models).
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
        guidance: float | None = None,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.call = Denoiser(unet, guidance)
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
        # the columns stay set until the next call: with gradient checkpointing the backward
        # pass runs the captured layers again, and they must keep the same columns then
        if self.capture_columns:
            columns, groups = token_columns(inputs.positions)
            self.store.columns = columns.to(inputs.noisy.device)
        else:
            groups = inputs.positions
            self.store.columns = None
        args = (inputs.noisy, inputs.timesteps, inputs.emb, inputs.added)
        if self.early_exit:
            maps = run_until_captured(self.call, self.store, *args)
        else:
            self.store.reset()
            self.call(*args)
            maps = self.store.aggregate()
        return torch.stack(
            [aggregate_token_maps(maps[b], g, self.how) for b, g in enumerate(groups)]
        )

    def frozen(self, single, added: dict | None = None) -> torch.Tensor:
        """The original keys' prediction for the norm loss (no gradient).

        It runs before any forward pass of the step that keeps weights for the backward pass:
        the keys are swapped in place, and in an MMDiT a later block's text-key projection is
        kept for the gradient of an earlier block's (its input depends on them), so a swap
        after that forward would invalidate it."""
        noisy, timesteps, emb = single
        self.store.enabled = False
        try:
            with torch.no_grad(), original_weights(self.unet, self.originals):
                return self.call(noisy, timesteps, emb, added)
        finally:
            self.store.enabled = True

    def norm(self, single, added: dict | None, frozen: torch.Tensor) -> torch.Tensor:
        """MSE between this denoiser's prediction and the original keys' prediction.

        With gradient checkpointing the backward pass runs the blocks of both passes again in
        the store's state of that moment, so this pass keeps the capture on as the maps pass
        had it (its maps are dropped): the recomputed attention then takes the same path."""
        noisy, timesteps, emb = single
        checkpointing = getattr(self.unet, "is_gradient_checkpointing", False)
        self.store.enabled = checkpointing
        try:
            prediction = self.call(noisy, timesteps, emb, added)
        finally:
            self.store.enabled = True
            self.store.reset()
        return norm_loss(prediction, frozen)

    def forward(self, inputs: StepInputs) -> dict[str, torch.Tensor]:
        single, added = inputs.single, inputs.single_added
        frozen = self.frozen(single, added) if single is not None else None
        maps = self.concept_maps(inputs)
        norm = self.norm(single, added, frozen) if single is not None else None
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
