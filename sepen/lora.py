"""A SepEn delta as a standard LoRA file for diffusers, ComfyUI, A1111 (`sepen export-lora`).

A delta of full key weights is turned into the weight change against its base model and
factorised by truncated SVD at the chosen rank (dW ~ up @ down with up = U_r sqrt(S_r),
down = sqrt(S_r) V_r^T); the relative Frobenius error of each layer's change, and overall, is
reported and stored in the file's metadata. A LoRA delta is converted as it is (its scale
folded into the up factor). Formats:

- `diffusers`: PEFT keys `unet.<module>.lora_A.weight` (down) and `.lora_B.weight` (up), for
  `pipe.load_lora_weights(FILE)` on a stock pipeline (an MMDiT's: `transformer.<module>...`,
  which ComfyUI also reads);
- `kohya`: `lora_unet_<module with _ for .>.lora_down.weight`, `.lora_up.weight` and `.alpha`,
  the names ComfyUI and AUTOMATIC1111 read; a reader scales each layer by alpha / its rank.
  FLUX.1: kohya stores the text stream's q, k and v fused (`lora_unet_double_blocks_<i>_
  txt_attn_qkv`), so the up factor has q's and v's rows zero and k's rows in the middle. SD3
  has no kohya form that diffusers reads: use `diffusers`.

The rank is one number for every layer (capped by the smallest layer's full rank), or `full`:
each layer at its own full rank, min(out, in) of its key projection (a LoRA delta: its own
rank), so that the file is exact on models whose attention layers have different widths. Both
formats carry each layer's rank in its factors' shapes (diffusers builds PEFT's rank pattern
from them). kohya's alpha is the same in every layer, the smallest rank (= the rank when all
are equal, a scale of 1), and a layer of a higher rank r carries r / alpha in its up factor:
diffusers' kohya loader (0.42) applies the most common alpha to every layer (its per-layer
alpha pattern does not reach the UNet's modules), so a per-layer alpha would scale the other
layers wrongly there (measured: a rank-48 layer by 32/48).
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch

from sepen.delta import check_base_model, key_scope, read_delta, write_safetensors
from sepen.errors import SepenError
from sepen.models.loading import load_unet

log = logging.getLogger("sepen.lora")
FORMATS = ("diffusers", "kohya")
FULL = "full"


def weight_changes(
    delta: str | Path, model: str | None = None
) -> tuple[dict[str, torch.Tensor], dict, int | None]:
    """Each trained layer's weight change (module path -> dW, float64), the delta's metadata,
    and the LoRA rank of a LoRA delta (None for full weights, which need the base model)."""

    tensors, meta = read_delta(delta)
    base = meta.get("base_model", "")
    if model is not None:
        fix = f"export it with --model {base} (a LoRA of one base model does not fit another)"
        check_base_model(delta, model, base, fix)
    if meta["trainable"] == "lora":
        scale = float(meta["lora_scale"])
        changes = {}
        for key in sorted(k for k in tensors if k.endswith(".lora_A")):
            layer = key.removesuffix(".lora_A")
            down, up = tensors[key].double(), tensors[f"{layer}.lora_B"].double()
            changes[layer] = scale * up @ down
        rank = next(iter(tensors.values())).shape[0] if tensors else None
        return changes, meta, rank

    unet = load_unet(model or base, meta.get("revision") or None)
    params = dict(unet.named_parameters())
    changes = {}
    for name, value in sorted(tensors.items()):
        if name not in params or tuple(params[name].shape) != tuple(value.shape):
            raise SepenError(
                f"delta {str(delta)!r} does not fit base model {model or base!r} ({name}): "
                f"give the model it was trained on with --model"
            )
        changes[name.removesuffix(".weight")] = value.double() - params[name].detach().double()
    return changes, meta, None


def factorise(change: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down (rank x in), up (out x rank), relative Frobenius error) of a weight change."""
    u, s, vh = torch.linalg.svd(change, full_matrices=False)
    root = s[:rank].sqrt()
    up, down = u[:, :rank] * root, root[:, None] * vh[:rank]
    total = float(s.pow(2).sum())
    error = math.sqrt(float(s[rank:].pow(2).sum()) / total) if total > 0 else 0.0
    return down, up, error


def rank_for(singular: torch.Tensor, error: float) -> int:
    """The smallest rank whose truncated SVD keeps the relative Frobenius error of a change
    with these singular values at or below `error` (0 for a zero change)."""
    energy = singular.double().pow(2)
    total = float(energy.sum())
    if total == 0:
        return 0
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    return int(torch.nonzero((tail / total).sqrt() <= error)[0])


def ranks_needed(changes: dict[str, torch.Tensor], errors) -> dict[str, dict[float, int]]:
    """Per layer: the rank each relative error in `errors` needs."""
    out = {}
    for module, change in changes.items():
        s = torch.linalg.svdvals(change)
        out[module] = {e: rank_for(s, e) for e in errors}
    return out


def kohya_name(module: str) -> str:
    """The kohya / ComfyUI / AUTOMATIC1111 name of a diffusers UNet module (FLUX.1: the fused
    text q/k/v of its double-stream block)."""
    joint = re.fullmatch(r"transformer_blocks\.(\d+)\.attn\.add_k_proj", module)
    if joint:
        return f"lora_unet_double_blocks_{joint.group(1)}_txt_attn_qkv"
    return "lora_unet_" + module.replace(".", "_")


PREFIX = {
    "UNet2DConditionModel": "unet",
    "SD3Transformer2DModel": "transformer",
    "FluxTransformer2DModel": "transformer",
}


def check_format(fmt: str, architecture: str) -> None:
    if fmt not in FORMATS:
        raise SepenError(f"format {fmt!r} is not one of {list(FORMATS)}")
    if fmt == "kohya" and architecture == "SD3Transformer2DModel":
        raise SepenError(
            "--format kohya has no SD3 form that diffusers reads: use --format diffusers (PEFT "
            "keys, which diffusers' load_lora_weights and ComfyUI read)"
        )


def layer_ranks(
    changes: dict[str, torch.Tensor], rank: int | str, lora_rank: int | None = None
) -> dict[str, int]:
    """Each layer's rank: `rank` for all, or with 'full' each layer's own full rank (at most
    a LoRA delta's rank `lora_rank`)."""
    if rank == FULL:
        return {m: min(*c.shape, lora_rank or min(c.shape)) for m, c in changes.items()}
    limit = min(min(c.shape) for c in changes.values())
    if not 1 <= rank <= limit:
        raise SepenError(
            f"rank {rank} is outside 1..{limit} (the smallest trained layer's full rank): "
            f"choose a rank in that range, or --rank full (each layer at its own full rank)"
        )
    return dict.fromkeys(changes, rank)


def lora_state(
    changes: dict[str, torch.Tensor],
    ranks: dict[str, int],
    fmt: str,
    architecture: str = "UNet2DConditionModel",
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The LoRA file's tensors (float32) and each layer's relative error, each layer at its
    rank in `ranks` (see `layer_ranks`); `architecture`: the delta's denoiser class."""
    check_format(fmt, architecture)
    prefix = PREFIX[architecture]
    tensors, errors = {}, {}
    alpha = min(ranks.values())  # kohya: one alpha for every layer (see the module's text)
    for module, change in changes.items():
        down, up, errors[module] = factorise(change, ranks[module])
        if fmt == "diffusers":
            tensors[f"{prefix}.{module}.lora_A.weight"] = down.float().contiguous()
            tensors[f"{prefix}.{module}.lora_B.weight"] = up.float().contiguous()
        else:
            name = kohya_name(module)
            if prefix == "transformer" and not name.endswith("_txt_attn_qkv"):
                raise SepenError(
                    f"{module}: kohya's FLUX.1 form fuses the text q/k/v, so only key deltas "
                    f"export to it; use --format diffusers for a delta with values"
                )
            up = up * ranks[module] / alpha
            if name.endswith("_txt_attn_qkv"):  # q and v rows zero: only the keys change
                up = torch.cat([torch.zeros_like(up), up, torch.zeros_like(up)])
            tensors[f"{name}.lora_down.weight"] = down.float().contiguous()
            tensors[f"{name}.lora_up.weight"] = up.float().contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    return tensors, errors


def overall_error(changes: dict[str, torch.Tensor], errors: dict[str, float]) -> float:
    """The relative Frobenius error of all layers' changes together."""
    norms = {m: float(c.pow(2).sum()) for m, c in changes.items()}
    total = sum(norms.values())
    return math.sqrt(sum(errors[m] ** 2 * n for m, n in norms.items()) / total) if total else 0.0


def export_lora(
    delta: str | Path,
    out: str | Path,
    rank: int | str | None,
    fmt: str,
    model: str | None = None,
) -> dict:
    """Write the LoRA file; returns its report (rank, each layer's rank, errors per layer and
    overall). `rank`: a number for every layer, 'full', or None (a LoRA delta's own rank)."""

    check_format(fmt, "UNet2DConditionModel")
    if rank != FULL and rank is not None and (not isinstance(rank, int) or rank < 1):
        raise SepenError(f"rank {rank!r} must be a number of at least 1 or {FULL!r}")
    if key_scope(read_delta(delta)[1]) == "image_queries":
        raise SepenError(
            f"delta {str(delta)!r} was trained with finetune.key_scope: image_queries: its keys "
            "serve the image queries only, and a LoRA on add_k_proj changes the text queries' "
            "keys too, so no LoRA file draws what it draws; finetune with key_scope: all to "
            "export one"
        )
    changes, meta, lora_rank = weight_changes(delta, model)
    architecture = meta.get("architecture", "UNet2DConditionModel")
    check_format(fmt, architecture)
    if not changes:
        raise SepenError(f"delta {str(delta)!r} holds no trained layer to export")
    if rank is None:
        if lora_rank is None:
            raise SepenError(
                "a delta of full key weights needs --rank (e.g. 16, or full for an exact file)"
            )
        rank = lora_rank
    if lora_rank is not None and rank != FULL and rank > lora_rank:
        raise SepenError(
            f"rank {rank} is above the LoRA delta's rank {lora_rank}: choose at most {lora_rank}"
        )
    ranks = layer_ranks(changes, rank, lora_rank)
    tensors, errors = lora_state(changes, ranks, fmt, architecture)
    report = {
        "rank": rank,
        "ranks": ranks,
        "format": fmt,
        "base_model": meta.get("base_model", ""),
        "relative_error": {"overall": overall_error(changes, errors), "layers": errors},
    }
    metadata = {
        "format": f"sepen-lora-{fmt}",
        "source_delta": Path(delta).name,
        "base_model": report["base_model"],
        "rank": str(rank),
        "ranks": json.dumps(ranks),
        "relative_error": json.dumps(report["relative_error"]),
    }
    write_safetensors(out, tensors, metadata)
    return report
