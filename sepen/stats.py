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


def format_ci(ci: dict, key: str = "mean", signed: bool = False) -> str:
    """'0.794 [0.731, 0.856]': a value of `bootstrap_ci` / `auc_ci` (its `key`) with its CI;
    `signed` for differences ('+0.096 [+0.050, +0.143]')."""
    f = "+.3f" if signed else ".3f"
    return f"{ci[key]:{f}} [{ci['lo']:{f}}, {ci['hi']:{f}}]"


def roc_auc(scores: Sequence[float], labels: Sequence[float]) -> float:
    """Area under the ROC curve: the chance that a random positive (label 1) scores higher
    than a random negative, ties counting one half (the Mann-Whitney statistic)."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"AUC needs both classes; got {pos.size} positives, {neg.size} negatives")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def auc_ci(
    scores: Sequence[float],
    labels: Sequence[float],
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """ROC AUC with a percentile bootstrap CI over items: {'auc', 'lo', 'hi', 'n', 'positives'}.

    Resamples that hold only one class are skipped.
    """
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    auc = roc_auc(s, y)
    rng = np.random.default_rng(seed)
    draws = []
    for idx in rng.integers(0, s.size, size=(n_boot, s.size)):
        if 0 < y[idx].sum() < idx.size:
            draws.append(roc_auc(s[idx], y[idx]))
    alpha = (1 - level) / 2
    lo, hi = np.quantile(draws, [alpha, 1 - alpha])
    return {
        "auc": auc,
        "lo": float(lo),
        "hi": float(hi),
        "n": int(s.size),
        "positives": int(y.sum()),
    }
