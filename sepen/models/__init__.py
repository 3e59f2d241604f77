"""Loading real Stable Diffusion pipelines and building tiny random-weight ones."""

from sepen.models.clip_tokenizer import build_clip_tokenizer
from sepen.models.loading import load_pipeline, resolve_dtype
from sepen.models.tiny import build_tiny_pipeline, save_tiny_pipeline

__all__ = [
    "build_clip_tokenizer",
    "build_tiny_pipeline",
    "load_pipeline",
    "resolve_dtype",
    "save_tiny_pipeline",
]
