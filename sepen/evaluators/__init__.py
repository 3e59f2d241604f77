"""Metrics of real text-to-image models (Attend-and-Excite protocol, docs/method.md).

`protocol` holds the pure arithmetic (prompt splitting, template averaging, detection outcome);
`clip`, `blip` and `detection` load their models once and score batches of images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from sepen.errors import ModelNotAvailableError
from sepen.evaluators.blip import BlipScorer
from sepen.evaluators.clip import ClipScorer, check_available
from sepen.evaluators.detection import Detector

MODEL_METRICS = ("clip", "blip", "detection")


def _check_hub_model(model: str, key: str) -> None:
    if Path(model).exists():
        return
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(model, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any lookup failure means "not here"
        raise ModelNotAvailableError(
            f"{key} model {model!r} is not in the local Hugging Face cache and the hub is "
            f"unreachable: copy a cache that has it (HF_HOME) or set {key} to a local folder "
            f"written by save_pretrained"
        ) from err


def preflight(config: dict) -> None:
    """Check, before any sampling, that every metric's model can be loaded offline."""
    ev = config["evaluation"]
    names = ev["metrics"]
    if "clip" in names or "blip" in names:
        check_available(ev["clip"]["model"], ev["clip"]["pretrained"])
    if "blip" in names:
        _check_hub_model(ev["blip"]["model"], "evaluation.blip.model")
    if "detection" in names:
        _check_hub_model(ev["detection"]["model"], "evaluation.detection.model")


def build(names: Sequence[str], config: dict, device: str) -> dict[str, Callable]:
    """Scorers by metric name, each loaded once: f(images (PIL), prompts, vocabularies) -> rows."""
    ev = config["evaluation"]
    out: dict[str, Callable] = {}
    clip = None
    if "clip" in names or "blip" in names:
        clip = ClipScorer(
            ev["clip"]["model"], ev["clip"]["pretrained"], device, ev["clip"]["batch_size"]
        )
    if "clip" in names:
        out["clip"] = lambda images, prompts, vocab: clip(images, prompts)
    if "blip" in names:
        b = ev["blip"]
        blip = BlipScorer(b["model"], clip, device, b["max_new_tokens"], b["batch_size"])
        out["blip"] = lambda images, prompts, vocab: blip(images, prompts)
    if "detection" in names:
        d = ev["detection"]
        detector = Detector(d["detector"], d["model"], device, d["threshold"], d["batch_size"])
        out["detection"] = detector
    return out
