"""BLIP text-text similarity (Attend-and-Excite protocol).

A BLIP caption per image (transformers); the caption and the prompt are embedded with the CLIP
text tower, the prompt averaged over the ImageNet templates; the score is their cosine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sepen.errors import ModelNotAvailableError
from sepen.evaluators.protocol import cosine, template_average


def imagenet_templates():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return OPENAI_IMAGENET_TEMPLATES


class BlipScorer:
    def __init__(
        self, model: str, clip, device: str, max_new_tokens: int = 30, batch_size: int = 16
    ):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        try:
            self.processor = BlipProcessor.from_pretrained(model)
            self.model = BlipForConditionalGeneration.from_pretrained(model).to(device).eval()
        except OSError as err:
            raise ModelNotAvailableError(
                f"BLIP model {model!r} is not available offline ({err}): copy a Hugging Face "
                f"cache that has it (HF_HOME), or set evaluation.blip.model to a local folder"
            ) from err
        self.clip, self.device = clip, device
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self._prompt_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def captions(self, images: Sequence) -> list[str]:
        out = []
        for lo in range(0, len(images), self.batch_size):
            inputs = self.processor(
                images=list(images[lo : lo + self.batch_size]), return_tensors="pt"
            )
            ids = self.model.generate(
                pixel_values=inputs["pixel_values"].to(self.device, self.model.dtype),
                max_new_tokens=self.max_new_tokens,
            )
            out += [c.strip() for c in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return out

    def prompt_embedding(self, prompt: str) -> torch.Tensor:
        if prompt not in self._prompt_cache:
            self._prompt_cache[prompt] = template_average(
                self.clip.encode_text, prompt, imagenet_templates()
            )
        return self._prompt_cache[prompt]

    def __call__(self, images: Sequence, prompts: Sequence[dict]) -> list[dict]:
        captions = self.captions(images)
        cap_emb = self.clip.encode_text(captions)
        rows = []
        for c, emb, p in zip(captions, cap_emb, prompts):
            score = float(cosine(emb[None], self.prompt_embedding(p["prompt"])[None])[0])
            rows.append({"blip_similarity": score, "caption": c})
        return rows
