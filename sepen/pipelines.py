"""Pipelines for sampling: the job's device and precision, and finetuned deltas switched per
prompt on one loaded pipeline."""

from __future__ import annotations

from pathlib import Path

import torch

from sepen.architecture import denoiser_of
from sepen.delta import apply_delta, read_delta
from sepen.errors import SepenError
from sepen.plan import shard_prompts


def device_and_dtype(sampling: dict, shard: int = 0) -> tuple[str, str]:
    """The device and precision of a job. With several GPUs visible (a workstation, where jobs
    are not given their own), shard k takes GPU k mod count, so shards run side by side."""
    device = sampling["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SepenError(
            "sampling.device is 'cuda' but no CUDA device is visible: use 'auto' or 'cpu'"
        )
    if device == "cuda" and torch.cuda.device_count() > 1:
        device = f"cuda:{shard % torch.cuda.device_count()}"
    dtype = sampling["dtype"]
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    return device, dtype


class DeltaSwitcher:
    """Applies one finetuned delta at a time to a pipeline, restoring the base weights between."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.saved: dict[str, torch.Tensor] = {}
        self.current: str | None = None

    def _names(self, path: Path) -> set[str]:
        tensors, _ = read_delta(path)
        return {k.rsplit(".lora_", 1)[0] + ".weight" if ".lora_" in k else k for k in tensors}

    def use(self, path: Path | None) -> None:
        key = str(path) if path else None
        if key == self.current:
            return
        params = dict(denoiser_of(self.pipe).named_parameters())
        with torch.no_grad():
            for name, value in self.saved.items():
                params[name].copy_(value)
        if path is not None:
            for name in self._names(path) - set(self.saved):
                if name in params:
                    self.saved[name] = params[name].detach().clone()
            apply_delta(self.pipe, path)
        self.current = key


def group_by(items: list, key) -> dict:
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def plan_items(plan: dict, shard: int, shards: int, method: str, sets=()) -> list[tuple[str, int]]:
    ids = shard_prompts(plan, shard, shards, method, sets)
    return [(pid, s) for pid in ids for s in plan["seeds"]]


def delta_for(plan: dict, method: str, prompt_id: str, model_dir: Path | None) -> Path | None:
    model = plan["prompts"][prompt_id]["model"]
    if method != "sepen" or model is None:
        return None
    return Path(model_dir) / f"{model}.safetensors"


def prompts_by_delta(plan: dict, method: str, ids, model_dir: Path | None) -> dict:
    """{delta (None: the base model): the prompt ids drawn with it}, in the order of `ids`."""
    return group_by(list(ids), lambda pid: delta_for(plan, method, pid, model_dir))
