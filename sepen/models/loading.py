"""Load Stable Diffusion 1.x/2.x pipelines by hub id or local folder, with clear offline errors."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from sepen.errors import ModelNotAvailableError

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _looks_like_path(model: str) -> bool:
    return (
        model.startswith((".", "/", "~"))
        or model.count("/") > 1
        or os.sep in model.replace("/", "")
    )


def _offline_help(model: str, revision: str | None) -> str:
    rev = f" (revision {revision})" if revision else ""
    return (
        f"model {model!r}{rev} could not be loaded: it is not in the Hugging Face cache "
        f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}) and the hub is not reachable. "
        f"Provide it either by downloading it where there is internet "
        f"(`huggingface-cli download {model}`) and copying the cache folder here, "
        f"or by saving it with `save_pretrained` to a folder and giving that folder's path "
        f"as the model."
    )


def load_pipeline(
    model: str | Path,
    revision: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
):
    """A diffusers `StableDiffusionPipeline` (safety checker off) on `device` in `dtype`.

    `model` is a hub id ("CompVis/stable-diffusion-v1-4") or a folder saved with
    `save_pretrained`. Raises ModelNotAvailableError naming the model and how to provide it.
    """
    from diffusers import StableDiffusionPipeline

    model = str(model)
    torch_dtype = resolve_dtype(dtype)
    local = Path(model).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise ModelNotAvailableError(
                f"model folder {str(local)!r} has no model_index.json: give a folder written "
                f"by a diffusers pipeline's save_pretrained"
            )
        source = str(local)
    elif _looks_like_path(model):
        raise ModelNotAvailableError(
            f"model folder {model!r} does not exist: check the path, or give a hub id such as "
            f"'CompVis/stable-diffusion-v1-4'"
        )
    else:
        source = model
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source,
            revision=revision,
            dtype=torch_dtype,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError) as err:  # hub errors subclass OSError
        if source is model:
            raise ModelNotAvailableError(_offline_help(model, revision)) from err
        raise ModelNotAvailableError(f"model folder {source!r} could not be loaded: {err}") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
