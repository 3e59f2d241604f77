"""Detection success with an open-vocabulary detector from transformers (OWLv2 or Grounding DINO).

Text queries are the concepts of the prompt's set; an object counts when a box of its label
scores at least the threshold (the paper: 0.3, with Detic; absolute values differ by detector).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sepen.errors import ModelNotAvailableError
from sepen.evaluators.protocol import detection_outcome


class Detector:
    def __init__(self, kind: str, model: str, device: str, threshold: float, batch_size: int = 8):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(model)
            self.model = (
                AutoModelForZeroShotObjectDetection.from_pretrained(model).to(device).eval()
            )
        except OSError as err:
            raise ModelNotAvailableError(
                f"detector {model!r} is not available offline ({err}): copy a Hugging Face cache "
                f"that has it (HF_HOME), or set evaluation.detection.model to a local folder"
            ) from err
        self.kind, self.device, self.threshold, self.batch_size = (
            kind,
            device,
            threshold,
            batch_size,
        )

    @torch.no_grad()
    def detect(
        self, images: Sequence, vocabularies: Sequence[list[str]]
    ) -> list[list[tuple[str, float]]]:
        """(label, score) of every box scoring at least the threshold, per image."""
        out = []
        for lo in range(0, len(images), self.batch_size):
            ims = list(images[lo : lo + self.batch_size])
            vocab = [list(v) for v in vocabularies[lo : lo + self.batch_size]]
            if self.kind == "grounding_dino":
                text = [". ".join(v) + "." for v in vocab]
            else:
                text = vocab
            inputs = self.processor(text=text, images=ims, return_tensors="pt", padding=True)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            outputs = self.model(**inputs)
            sizes = [(im.height, im.width) for im in ims]
            kwargs = {"threshold": self.threshold, "target_sizes": sizes, "text_labels": vocab}
            if self.kind == "grounding_dino":
                kwargs["input_ids"] = inputs["input_ids"]
                kwargs["text_threshold"] = self.threshold
            results = self.processor.post_process_grounded_object_detection(outputs, **kwargs)
            for r in results:
                labels = r.get("text_labels") or r.get("labels")
                out.append([(str(lab), float(s)) for lab, s in zip(labels, r["scores"].tolist())])
        return out

    def __call__(self, images: Sequence, prompts: Sequence[dict], vocabularies) -> list[dict]:
        found = self.detect(images, vocabularies)
        return [detection_outcome(d, p["concepts"], self.threshold) for d, p in zip(found, prompts)]
