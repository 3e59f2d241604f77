"""The Separate-and-Enhance losses (docs/method.md, Eqs. 1-4), as pure functions of attention
maps.

Maps are given per sample: `maps` has shape (B, N, H, h, w) for B samples, N >= 2 concepts,
H heads (or 1 after head averaging) and an h x w grid. Each loss is computed per sample and, with
`reduction="mean"`, averaged over the batch. All arithmetic runs in float32 so that fp16/bf16
maps neither overflow nor divide by zero.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

EPS = 1e-8


def _check_maps(maps: torch.Tensor) -> torch.Tensor:
    if maps.ndim != 5:
        raise ValueError(f"maps must have shape (B, N, H, h, w); got {tuple(maps.shape)}")
    if maps.shape[1] < 2:
        raise ValueError(f"the losses need N >= 2 concept maps per sample; got N={maps.shape[1]}")
    return maps.float()


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction {reduction!r} is not 'mean' or 'none'")


def separate_loss(maps: torch.Tensor, reduction: str = "mean", eps: float = EPS) -> torch.Tensor:
    """L_sep (docs/method.md, Eq. 1): the largest soft intersection A_i A_j / (A_i + A_j) over
    heads, pixels and pairs.

    Identical maps A give max(A) / 2; disjoint maps give 0.
    """
    maps = _check_maps(maps)
    flat = maps.flatten(2)  # (B, N, H*h*w)
    overlaps = [
        (flat[:, i] * flat[:, j] / (flat[:, i] + flat[:, j] + eps)).amax(-1)
        for i, j in itertools.combinations(range(flat.shape[1]), 2)
    ]
    return _reduce(torch.stack(overlaps, 1).amax(1), reduction)


KERNELS = ("authors", "textbook")


def gaussian_kernel(size: int = 3, sigma: float = 0.5, form: str = "authors") -> torch.Tensor:
    """A normalised 2-D Gaussian kernel of odd `size`.

    form "authors": exp(-(x / (2 sigma))^2) per axis, the kernel of the authors' code and of
    diffusers' Attend-and-Excite (3x3, sigma 0.5: centre 0.332), which the paper's numbers come
    from (docs/method.md, Eq. 2); "textbook": exp(-x^2 / (2 sigma^2)) (centre 0.619).
    """
    if form not in KERNELS:
        raise ValueError(f"kernel form {form!r} is not one of {KERNELS}")
    half = size // 2
    x = torch.arange(-half, half + 1, dtype=torch.float32)
    g = (
        torch.exp(-((x / (2 * sigma)) ** 2))
        if form == "authors"
        else torch.exp(-(x**2) / (2 * sigma**2))
    )
    g = g / g.sum()
    return torch.outer(g, g)


def smooth_maps(
    maps: torch.Tensor, size: int = 3, sigma: float = 0.5, form: str = "authors"
) -> torch.Tensor:
    """Gaussian smoothing of the last two dims with reflect padding."""
    shape = maps.shape
    x = maps.reshape(-1, 1, shape[-2], shape[-1])
    pad = size // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    kernel = gaussian_kernel(size, sigma, form).to(device=maps.device, dtype=maps.dtype)
    return F.conv2d(x, kernel[None, None]).reshape(shape)


def enhance_loss(
    maps: torch.Tensor,
    reduction: str = "mean",
    size: int = 3,
    sigma: float = 0.5,
    kernel: str = "authors",
) -> torch.Tensor:
    """L_en = 1 - min_i max(G * A_i) (docs/method.md, Eq. 2): lift the weakest concept's
    smoothed peak.

    The peak of concept i is the maximum of its smoothed map over heads and pixels.
    """
    maps = _check_maps(maps)
    peaks = smooth_maps(maps, size, sigma, kernel).flatten(2).amax(-1)  # (B, N)
    return _reduce(1.0 - peaks.amin(1), reduction)


def norm_loss(
    prediction: torch.Tensor, frozen_prediction: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """L_norm (docs/method.md, Eq. 3): MSE between the finetuned and the frozen model's noise
    predictions, per sample."""
    if prediction.shape != frozen_prediction.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and frozen prediction "
            f"{tuple(frozen_prediction.shape)} differ in shape"
        )
    diff = prediction.float() - frozen_prediction.float().detach()
    return _reduce(diff.pow(2).flatten(1).mean(1), reduction)


def total_loss(
    maps: torch.Tensor,
    lambda_sep: float = 1.0,
    lambda_en: float = 0.5,
    norm: torch.Tensor | None = None,
    lambda_norm: float = 0.5,
    kernel: str = "authors",
) -> dict[str, torch.Tensor]:
    """L = lambda_sep L_sep + lambda_en L_en (+ lambda_norm L_norm) (docs/method.md, Eq. 4),
    with each part for logging."""
    parts = {"separate": separate_loss(maps), "enhance": enhance_loss(maps, kernel=kernel)}
    loss = lambda_sep * parts["separate"] + lambda_en * parts["enhance"]
    if norm is not None:
        parts["norm"] = norm
        loss = loss + lambda_norm * norm
    parts["loss"] = loss
    return parts
