"""SepEn deltas: the finetuned weights as one small safetensors file with metadata.

A delta holds only what training changed (the keys, or keys and values, of the cross-attention
layers; or the LoRA factors of the keys) and applies to a stock diffusers pipeline of the same
base model. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from sepen.architecture import denoiser_of
from sepen.atomic import atomic_path
from sepen.errors import DeltaError
from sepen.joint_attention import is_joint, serve_image_queries_only

FORMAT = "sepen-delta"
VERSION = "1"


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    """A safetensors file whose bytes depend only on the tensors and metadata.

    safetensors writes its JSON header in hash-map order, which changes from process to
    process, so the same delta gave files with different hashes. The header is re-written with
    sorted keys, padded with spaces to 8 bytes as the format asks; its data offsets count from
    the start of the data section, so they stay valid.
    """
    raw = save(tensors, metadata=metadata)
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + size :]


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write `safetensors_bytes` atomically (a temp file, then a rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(safetensors_bytes(tensors, metadata))


def unet_delta_tensors(unet, trainable: str) -> dict[str, torch.Tensor]:
    """The tensors a delta stores, named after the UNet parameters they replace.

    For LoRA the factors are stored as `<layer>.to_k.lora_A` / `.lora_B`; the scale lies in the
    metadata.
    """
    tensors = {}
    for name, param in unet.named_parameters():
        if not param.requires_grad:
            continue
        if trainable == "lora":
            # peft names: <layer>.to_k.lora_A.default.weight
            base, kind = name.split(".lora_")[0], name.split(".lora_")[1].split(".")[0]
            tensors[f"{base}.lora_{kind}"] = param
        else:
            tensors[name] = param
    return {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}


def save_delta(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    *,
    base_model: str,
    revision: str | None,
    trainable: str,
    config: dict,
    lora_scale: float | None = None,
    architecture: str | None = None,
) -> Path:
    """Write the delta atomically (temp file + rename). `architecture`: the denoiser's class
    (UNet2DConditionModel, SD3Transformer2DModel, FluxTransformer2DModel)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "base_model": str(base_model),
        "revision": revision or "",
        "trainable": trainable,
        "parameters": json.dumps({k: list(v.shape) for k, v in sorted(tensors.items())}),
        "config": json.dumps(config, sort_keys=True),
    }
    if architecture is not None:
        metadata["architecture"] = architecture
    if lora_scale is not None:
        metadata["lora_scale"] = repr(float(lora_scale))
    write_safetensors(path, tensors, metadata)
    return path


def read_delta(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a delta; a missing, corrupt or foreign file is a DeltaError."""
    path = Path(path)
    if not path.is_file():
        raise DeltaError(f"delta file {str(path)!r} does not exist: run `sepen finetune` first")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise DeltaError(
            f"delta file {str(path)!r} is corrupt or not a safetensors file ({err}); "
            f"write it again with `sepen finetune`"
        ) from err
    if metadata.get("format") != FORMAT:
        raise DeltaError(
            f"{str(path)!r} is a safetensors file but not a sepen delta "
            f"(metadata format={metadata.get('format')!r})"
        )
    shapes = json.loads(metadata.get("parameters", "{}"))
    if set(shapes) != set(tensors) or any(list(tensors[k].shape) != shapes[k] for k in tensors):
        raise DeltaError(f"delta file {str(path)!r} is corrupt: tensors disagree with metadata")
    return tensors, metadata


def apply_delta(pipeline, path: str | Path) -> dict[str, str]:
    """Load a delta into a diffusers pipeline's denoiser (UNet or MMDiT), in place; returns the
    delta's metadata.

    Every tensor is checked against the denoiser before anything is changed, so a delta for
    another base model or architecture raises DeltaError and leaves the pipeline untouched. A
    delta trained with `finetune.key_scope: image_queries` first gives an MMDiT's text queries
    a frozen copy of the text keys as they are (the base model's), as in its training.
    """
    tensors, metadata = read_delta(path)
    unet = denoiser_of(pipeline)
    params = dict(unet.named_parameters())
    base = metadata.get("base_model", "?")
    made_for, here = metadata.get("architecture"), type(unet).__name__
    if made_for is not None and made_for != here:
        raise DeltaError(
            f"delta {str(path)!r} was trained for a {made_for} (base model {base!r}); this "
            f"pipeline's denoiser is a {here}: load a pipeline of that base model, or finetune "
            f"a delta for this one"
        )
    updates = {}
    if metadata["trainable"] == "lora":
        scale = float(metadata["lora_scale"])
        for key in sorted(k for k in tensors if k.endswith(".lora_A")):
            layer = key.removesuffix(".lora_A")
            name = f"{layer}.weight"
            if name not in params or f"{layer}.lora_B" not in tensors:
                raise DeltaError(_mismatch(path, base, f"{name} does not exist in this {here}"))
            down, up = tensors[key].float(), tensors[f"{layer}.lora_B"].float()
            weight = params[name]
            if (up.shape[0], down.shape[1]) != tuple(weight.shape):
                raise DeltaError(
                    _mismatch(
                        path,
                        base,
                        f"{name} has shape {tuple(weight.shape)}, the delta's "
                        f"LoRA gives {(up.shape[0], down.shape[1])}",
                    )
                )
            updates[name] = weight.detach().float() + scale * (up @ down).to(weight.device)
    else:
        for name, value in tensors.items():
            if name not in params:
                raise DeltaError(_mismatch(path, base, f"{name} does not exist in this {here}"))
            if tuple(params[name].shape) != tuple(value.shape):
                raise DeltaError(
                    _mismatch(
                        path,
                        base,
                        f"{name} has shape {tuple(params[name].shape)}, "
                        f"the delta's has {tuple(value.shape)}",
                    )
                )
            updates[name] = value
    if is_joint(unet):  # the text queries' keys: the base model's, or the delta's
        serve_image_queries_only(unet, key_scope(metadata) == "image_queries")
    with torch.no_grad():
        for name, value in updates.items():
            params[name].copy_(value.to(device=params[name].device, dtype=params[name].dtype))
    return metadata


def key_scope(metadata: dict) -> str:
    """Which queries a delta's keys serve (`finetune.key_scope`; deltas before it: all)."""
    config = json.loads(metadata.get("config") or "{}")
    return config.get("finetune", {}).get("key_scope", "all")


def same_model(a: str, b: str) -> bool:
    """Whether two base-model references name the same model (hub ids, or local folders by
    their resolved paths)."""
    pa, pb = Path(a), Path(b)
    if pa.is_dir() and pb.is_dir():
        return pa.resolve() == pb.resolve()
    return str(a) == str(b)


def check_base_model(
    path: str | Path, model: str, base: str | None = None, fix: str | None = None
) -> None:
    """A DeltaError when the delta at `path` was trained on another base model than `model`.

    `base` is the delta's recorded base model when already read; `fix` the advice to give.
    """
    if base is None:
        base = read_delta(path)[1].get("base_model", "")
    if not same_model(base, model):
        raise DeltaError(
            f"delta {str(path)!r} was trained on base model {base!r}, not on {model!r}: "
            + (fix or f"sample it with --model {base} (or finetune it again on {model!r})")
        )


def _mismatch(path, base: str, detail: str) -> str:
    return (
        f"delta {str(path)!r} does not fit this pipeline: {detail}. It was trained on base model "
        f"{base!r}; load that model (or retrain the delta on this one)"
    )
