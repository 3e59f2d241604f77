"""CLIP image-text similarity (Attend-and-Excite protocol) with open_clip.

Full prompt and minimum-object score (the prompt split at 'and'/'with', the minimum of the
parts' similarities). The same model's text tower embeds captions for the BLIP score.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sepen.errors import ModelNotAvailableError
from sepen.evaluators.protocol import cosine, object_phrases


def model_name(model: str) -> str:
    """An open_clip model name; a path to a JSON model config is registered under its stem."""
    path = Path(model)
    if model.endswith(".json"):
        if not path.is_file():
            raise ModelNotAvailableError(f"open_clip model config {model!r} does not exist")
        import open_clip

        open_clip.add_model_config(path)
        return path.stem
    return model


def check_available(model: str, pretrained: str | None) -> None:
    """Raise ModelNotAvailableError (before any work) if the weights cannot be had offline."""
    import open_clip

    name = model_name(model)
    if name not in open_clip.list_models():
        raise ModelNotAvailableError(
            f"open_clip has no model {name!r}: choose one of open_clip.list_models() or give a "
            f"JSON model config"
        )
    if not pretrained:
        return
    if Path(pretrained).exists():
        return
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        raise ModelNotAvailableError(
            f"open_clip has no pretrained tag {pretrained!r} for {name!r}: see "
            f"open_clip.list_pretrained_tags_by_model({name!r}), or give a checkpoint file"
        )
    hub = cfg.get("hf_hub", "").rstrip("/")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(hub, filename), str):
                return
        raise ModelNotAvailableError(
            f"CLIP weights {name}/{pretrained} (hub repo {hub!r}) are not in the local Hugging "
            f"Face cache and the hub is unreachable: copy a cache that has them "
            f"(HF_HOME), or set evaluation.clip.pretrained to a local checkpoint file"
        )


class ClipScorer:
    """An open_clip model loaded once; scores batches of PIL images against prompts."""

    def __init__(self, model: str, pretrained: str | None, device: str, batch_size: int = 64):
        import open_clip

        check_available(model, pretrained)
        name = model_name(model)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained or None, device=device
        )
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.device = device
        self.batch_size = batch_size

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for lo in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[lo : lo + self.batch_size])).to(self.device)
            out.append(self.model.encode_text(tokens).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def encode_images(self, images: Sequence) -> torch.Tensor:
        out = []
        for lo in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[lo : lo + self.batch_size]])
            out.append(self.model.encode_image(batch.to(self.device)).float().cpu())
        return torch.cat(out)

    def __call__(self, images: Sequence, prompts: Sequence[dict]) -> list[dict[str, float]]:
        image_emb = self.encode_images(images)
        texts = sorted(
            {p["prompt"] for p in prompts}
            | {part for p in prompts for part in object_phrases(p["prompt"])}
        )
        text_emb = dict(zip(texts, self.encode_text(texts)))
        rows = []
        for emb, p in zip(image_emb, prompts):
            full = float(cosine(emb[None], text_emb[p["prompt"]][None])[0])
            parts = [
                float(cosine(emb[None], text_emb[t][None])[0]) for t in object_phrases(p["prompt"])
            ]
            rows.append({"clip_full": full, "clip_min_object": float(np.min(parts))})
        return rows
