"""Bootstrap confidence intervals for rates over images (and paired differences)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Mean with a percentile bootstrap CI: {'mean', 'lo', 'hi', 'n'}."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return {"mean": float(x.mean()), "lo": float(lo), "hi": float(hi), "n": int(x.size)}


def paired_difference(after: Sequence[float], before: Sequence[float], **kwargs) -> dict:
    """Bootstrap CI of mean(after - before) over paired samples (same prompt and seed)."""
    a, b = np.asarray(after, dtype=np.float64), np.asarray(before, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in number: {a.size} vs {b.size}")
    return bootstrap_ci(a - b, **kwargs)
