"""FID of a method's images against a folder of reference images (optional metric).

Features: torchvision's Inception-v3 pool features (2048-d) on 299x299 ImageNet-normalised
images. These weights are torchvision's, not the TF-Inception port of pytorch-fid/clean-fid, so
absolute values are comparable within this project only; the record says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sepen.errors import ModelNotAvailableError, SepenError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two Gaussians."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product: regularise
        eps = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(features) < 2:
        raise SepenError(f"FID needs at least 2 images per side; got {len(features)}")
    return features.mean(0), np.cov(features, rowvar=False)


def reference_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise SepenError(
            f"FID reference folder {str(folder)!r} does not exist: set evaluation.fid.reference "
            f"to a folder of real images"
        )
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise SepenError(f"FID reference folder {str(folder)!r} has {len(files)} images")
    return files


class InceptionFeatures:
    def __init__(self, weights: str | None, device: str, batch_size: int = 32):
        from torchvision.models import Inception_V3_Weights, inception_v3

        if weights is None:  # random weights: tests only
            model = inception_v3(weights=None, aux_logits=False, init_weights=True)
        elif Path(weights).is_file():
            model = inception_v3(weights=None, aux_logits=False, init_weights=False)
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=False)
        else:
            spec = getattr(Inception_V3_Weights, weights, None)
            if spec is None:
                raise SepenError(f"unknown torchvision Inception weights {weights!r}")
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(spec.url).name
            if not cached.is_file():
                raise ModelNotAvailableError(
                    f"Inception weights {weights} ({Path(spec.url).name}) are not in "
                    f"{cached.parent} and cannot be downloaded offline: copy the file there, or "
                    f"set evaluation.fid.weights to a local state-dict file"
                )
            model = inception_v3(weights=spec)
        model.fc = torch.nn.Identity()
        self.model = model.eval().to(device)
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def __call__(self, images: Sequence) -> np.ndarray:
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        out = []
        for lo in range(0, len(images), self.batch_size):
            batch = [
                torch.from_numpy(np.asarray(im.convert("RGB").resize((299, 299)), dtype=np.float32))
                for im in images[lo : lo + self.batch_size]
            ]
            x = (torch.stack(batch).permute(0, 3, 1, 2) / 255 - mean) / std
            out.append(self.model(x.to(self.device)).float().cpu().numpy())
        return np.concatenate(out)


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return frechet_distance(*statistics(features_a), *statistics(features_b))
