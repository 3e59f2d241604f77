"""Load Stable Diffusion 1.x/2.x/XL/3/3.5 and FLUX.1 pipelines by hub id or local folder, with
clear offline errors."""

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


def _source(model: str) -> str:
    """The folder or hub id to load `model` from; a missing folder is an error here."""
    local = Path(model).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise ModelNotAvailableError(
                f"model folder {str(local)!r} has no model_index.json: give a folder written "
                f"by a diffusers pipeline's save_pretrained"
            )
        return str(local)
    if _looks_like_path(model):
        raise ModelNotAvailableError(
            f"model folder {model!r} does not exist: check the path, or give a hub id such as "
            f"'CompVis/stable-diffusion-v1-4'"
        )
    return model


def _loaded(model: str, revision: str | None, load):
    source = _source(model)
    try:
        return load(source)
    except ModelNotAvailableError:
        raise
    except (OSError, ValueError) as err:  # hub errors subclass OSError
        if source == model and not Path(model).expanduser().exists():
            raise ModelNotAvailableError(_offline_help(model, revision)) from err
        raise ModelNotAvailableError(f"model folder {source!r} could not be loaded: {err}") from err


PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "StableDiffusion3Pipeline",
    "FluxPipeline",
)
# the denoiser's folder and class in each pipeline
DENOISERS = {
    "StableDiffusionPipeline": ("unet", "UNet2DConditionModel"),
    "StableDiffusionXLPipeline": ("unet", "UNet2DConditionModel"),
    "StableDiffusion3Pipeline": ("transformer", "SD3Transformer2DModel"),
    "FluxPipeline": ("transformer", "FluxTransformer2DModel"),
}


def model_index(source: str, revision: str | None = None) -> dict:
    """A folder's or (cached) hub model's model_index.json."""
    import json

    from diffusers import DiffusionPipeline

    local = Path(source)
    if local.is_dir():
        return json.loads((local / "model_index.json").read_text())
    return dict(DiffusionPipeline.load_config(source, revision=revision))


def absent_components(index: dict) -> dict:
    """SD3's optional T5 (`text_encoder_3`, `tokenizer_3`) as None when a model has none (the
    toy MMDiT; SD3 saved without T5), which diffusers otherwise asks for."""
    if index.get("_class_name") != "StableDiffusion3Pipeline":
        return {}
    names = ("text_encoder_3", "tokenizer_3")
    return {n: None for n in names if index.get(n) in (None, [None, None])}


def pipeline_class(source: str, revision: str | None = None) -> str:
    """The pipeline class a folder or (cached) hub model names in its model_index.json."""
    name = model_index(source, revision).get("_class_name", "")
    if name not in PIPELINES:
        raise ModelNotAvailableError(
            f"model {source!r} is a {name or 'unknown'} pipeline; sepen works with "
            f"{', '.join(PIPELINES)} (Stable Diffusion 1.x, 2.x, XL, 3/3.5 and FLUX.1)"
        )
    return name


def is_sdxl(pipe) -> bool:
    """Whether a pipeline is Stable Diffusion XL (a UNet, two text encoders, size conditioning)."""
    return (
        getattr(pipe, "unet", None) is not None
        and getattr(pipe, "text_encoder_2", None) is not None
    )


def load_pipeline(
    model: str | Path,
    revision: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
):
    """A diffusers `StableDiffusionPipeline` (safety checker off), `StableDiffusionXLPipeline`
    (watermark off), `StableDiffusion3Pipeline` or `FluxPipeline` on `device` in `dtype`.

    `model` is a hub id ("CompVis/stable-diffusion-v1-4") or a folder saved with
    `save_pretrained`. Raises ModelNotAvailableError naming the model and how to provide it.
    """
    import diffusers

    def load(source):
        name = pipeline_class(source, revision)
        options = {"revision": revision, "dtype": resolve_dtype(dtype)}
        options.update(absent_components(model_index(source, revision)))
        if name == "StableDiffusionPipeline":
            options.update(safety_checker=None, requires_safety_checker=False)
        elif name == "StableDiffusionXLPipeline":
            options.update(add_watermarker=False)
        return getattr(diffusers, name).from_pretrained(source, **options)

    pipe = _loaded(str(model), revision, load)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_unet(model: str | Path, revision: str | None = None):
    """Only the denoiser of a pipeline (its UNet or MMDiT transformer; float32, CPU), with the
    same errors as `load_pipeline`."""
    import diffusers

    def load(source):
        folder, cls = DENOISERS[pipeline_class(source, revision)]
        return getattr(diffusers, cls).from_pretrained(source, subfolder=folder, revision=revision)

    return _loaded(str(model), revision, load)
