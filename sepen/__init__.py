"""sepen: Separate-and-Enhance compositional finetuning for text-to-image diffusion models."""

__version__ = "0.7.2"
