"""`sepen export-lora`: a SepEn delta as a standard LoRA file for diffusers, ComfyUI, A1111.

A delta of full key weights is turned into the weight change against its base model and
factorised by truncated SVD at the chosen rank (dW ~ up @ down with up = U_r sqrt(S_r),
down = sqrt(S_r) V_r^T); the relative Frobenius error of each layer's change, and overall, is
reported and stored in the file's metadata. A LoRA delta is converted as it is (its scale
folded into the up factor). Formats:

- `diffusers`: PEFT keys `unet.<module>.lora_A.weight` (down) and `.lora_B.weight` (up), for
  `pipe.load_lora_weights(FILE)` on a stock pipeline;
- `kohya`: `lora_unet_<module with _ for .>.lora_down.weight`, `.lora_up.weight` and `.alpha`
  (= rank, so the scale is 1), the names ComfyUI and AUTOMATIC1111 read.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import torch

from sepen.errors import SepenError

log = logging.getLogger("sepen.lora")
FORMATS = ("diffusers", "kohya")


def weight_changes(
    delta: str | Path, model: str | None = None
) -> tuple[dict[str, torch.Tensor], dict, int | None]:
    """Each trained layer's weight change (module path -> dW, float64), the delta's metadata,
    and the LoRA rank of a LoRA delta (None for full weights, which need the base model)."""
    from sepen.delta import check_base_model, read_delta

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
    from sepen.models.loading import load_unet

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


def kohya_name(module: str) -> str:
    """The kohya / ComfyUI / AUTOMATIC1111 name of a diffusers UNet module."""
    return "lora_unet_" + module.replace(".", "_")


def lora_state(
    changes: dict[str, torch.Tensor], rank: int, fmt: str
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The LoRA file's tensors (float32) and each layer's relative error."""
    if fmt not in FORMATS:
        raise SepenError(f"format {fmt!r} is not one of {list(FORMATS)}")
    limit = min(min(c.shape) for c in changes.values())
    if not 1 <= rank <= limit:
        raise SepenError(
            f"rank {rank} is outside 1..{limit} (the smallest trained layer's full rank): "
            f"choose a rank in that range"
        )
    tensors, errors = {}, {}
    for module, change in changes.items():
        down, up, errors[module] = factorise(change, rank)
        if fmt == "diffusers":
            tensors[f"unet.{module}.lora_A.weight"] = down.float().contiguous()
            tensors[f"unet.{module}.lora_B.weight"] = up.float().contiguous()
        else:
            name = kohya_name(module)
            tensors[f"{name}.lora_down.weight"] = down.float().contiguous()
            tensors[f"{name}.lora_up.weight"] = up.float().contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    return tensors, errors


def overall_error(changes: dict[str, torch.Tensor], errors: dict[str, float]) -> float:
    """The relative Frobenius error of all layers' changes together."""
    norms = {m: float(c.pow(2).sum()) for m, c in changes.items()}
    total = sum(norms.values())
    return math.sqrt(sum(errors[m] ** 2 * n for m, n in norms.items()) / total) if total else 0.0


def export_lora(
    delta: str | Path, out: str | Path, rank: int | None, fmt: str, model: str | None = None
) -> dict:
    """Write the LoRA file; returns its report (rank, errors per layer and overall)."""
    from sepen.delta import write_safetensors

    if fmt not in FORMATS:
        raise SepenError(f"format {fmt!r} is not one of {list(FORMATS)}")
    if rank is not None and rank < 1:
        raise SepenError(f"rank {rank} must be at least 1")
    changes, meta, lora_rank = weight_changes(delta, model)
    if not changes:
        raise SepenError(f"delta {str(delta)!r} holds no trained layer to export")
    if rank is None:
        if lora_rank is None:
            raise SepenError("a delta of full key weights needs --rank (e.g. 16, or the full rank)")
        rank = lora_rank
    if lora_rank is not None and rank > lora_rank:
        raise SepenError(
            f"rank {rank} is above the LoRA delta's rank {lora_rank}: choose at most {lora_rank}"
        )
    tensors, errors = lora_state(changes, rank, fmt)
    report = {
        "rank": rank,
        "format": fmt,
        "base_model": meta.get("base_model", ""),
        "relative_error": {"overall": overall_error(changes, errors), "layers": errors},
    }
    metadata = {
        "format": f"sepen-lora-{fmt}",
        "source_delta": Path(delta).name,
        "base_model": report["base_model"],
        "rank": str(rank),
        "relative_error": json.dumps(report["relative_error"]),
    }
    write_safetensors(out, tensors, metadata)
    return report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sepen export-lora", description=__doc__.split("\n")[0])
    p.add_argument("delta", type=Path, help="a delta of `sepen finetune`")
    p.add_argument("--rank", type=int, help="LoRA rank (a LoRA delta: its own by default)")
    p.add_argument("--format", choices=FORMATS, default="diffusers")
    p.add_argument("--model", help="the delta's base model (default: the one it names)")
    p.add_argument("--out", type=Path, required=True, help="the LoRA file (.safetensors)")
    return p.parse_args(argv)


def cli(argv=None) -> int:
    from sepen.command import run_step

    args = parse_args(argv)

    def body():
        report = export_lora(args.delta, args.out, args.rank, args.format, args.model)
        err = report["relative_error"]
        for module, value in err["layers"].items():
            log.info("%s: relative error %.3g", module, value)
        print(
            f"wrote {args.out} ({args.format}, rank {report['rank']}, "
            f"{len(err['layers'])} layers): relative error of the weight change "
            f"{err['overall']:.3g} overall"
        )

    return run_step("sepen export-lora", body)
