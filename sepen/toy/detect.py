"""The toy world's exact detector: which concepts an image shows, and how many of each.

A pixel belongs to a concept when its colour is nearest to that concept's colour (and near
enough); each connected region of one colour counts as the concept only if its outline matches
the concept's shape (best IoU of the shape fitted to the region's box). So two objects merged
into one blob, or an object drawn with another concept's shape, do not count. Over many
images: the named objects that fail, by kind of failure (the taxonomy), and how big each kind
is drawn (the world card's `failing_objects` and `object_sizes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from sepen.toy.world import BACKGROUND, CONCEPTS, shape_mask

# half extents of each shape's box per unit radius (x, y)
_EXTENT = {"square": (0.8, 0.8), "bar": (1.0, 0.4)}


def color_labels(image: np.ndarray, max_distance: float = 110.0) -> np.ndarray:
    """(h, w) index of the nearest concept colour per pixel; -1 for background or no match."""
    names = list(CONCEPTS)
    palette = np.array([BACKGROUND] + [CONCEPTS[n].color for n in names], dtype=np.float64)
    pixels = np.asarray(image, dtype=np.float64)[..., :3]
    dist = np.linalg.norm(pixels[:, :, None, :] - palette[None, None], axis=-1)
    nearest = dist.argmin(-1)
    labels = nearest - 1  # background -> -1
    labels[dist.min(-1) > max_distance] = -1
    return labels


def fit_iou(region: np.ndarray, shape: str) -> float:
    """Best IoU between a boolean region and `shape` fitted around the region's box."""
    ys, xs = np.nonzero(region)
    if len(xs) == 0:
        return 0.0
    size = region.shape[0]
    cx0, cy0 = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    ax, ay = _EXTENT.get(shape, (1.0, 1.0))
    w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    # a shape of radius r covers a box of 2r * extent pixels, give or take one pixel
    extent = ax if w / (2 * ax) >= h / (2 * ay) else ay
    r0 = max(w / (2 * ax), h / (2 * ay))
    best = 0.0
    for shrink in (0.0, 0.25, 0.5, 0.75):
        r = r0 - shrink / extent
        for dx in (-0.5, 0.0, 0.5):
            for dy in (-0.5, 0.0, 0.5):
                template = shape_mask(shape, cx0 + dx, cy0 + dy, r, size)
                inter = np.logical_and(template, region).sum()
                union = np.logical_or(template, region).sum()
                best = max(best, inter / union if union else 0.0)
    return float(best)


SHAPES = sorted({c.shape for c in CONCEPTS.values()})


def best_shape(region: np.ndarray) -> tuple[str, float]:
    """The shape that fits the region best, and its IoU."""
    fits = {shape: fit_iou(region, shape) for shape in SHAPES}
    shape = max(fits, key=fits.get)
    return shape, fits[shape]


@dataclass(frozen=True)
class Region:
    """One connected region of a concept's colour: its mask, and whether it counts."""

    concept: str
    mask: np.ndarray
    area: int
    shape: str | None  # best-fitting shape (None below min_area: not fitted)
    iou: float
    counts: bool  # big enough and best fitted by the concept's own shape


def regions(
    image: np.ndarray, min_area: int = 8, min_iou: float = 0.6, max_distance: float = 110.0
) -> list[Region]:
    """Every connected region of a concept colour in an (h, w, 3) uint8 image."""
    labels = color_labels(image, max_distance)
    out = []
    for k, name in enumerate(CONCEPTS):
        found, n = ndimage.label(labels == k)
        for i in range(1, n + 1):
            mask = found == i
            area = int(mask.sum())
            if area < min_area:
                out.append(Region(name, mask, area, None, 0.0, False))
                continue
            shape, iou = best_shape(mask)
            ok = shape == CONCEPTS[name].shape and iou >= min_iou
            out.append(Region(name, mask, area, shape, iou, ok))
    return out


def detect(
    image: np.ndarray, min_area: int = 8, min_iou: float = 0.6, max_distance: float = 110.0
) -> dict[str, int]:
    """Count of each concept in an (h, w, 3) uint8 image (only concepts seen appear).

    A region of a concept's colour counts when the concept's shape fits it best of all shapes,
    with IoU >= min_iou.
    """
    return counts_of(regions(image, min_area, min_iou, max_distance))


def counts_of(found: Sequence[Region]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in found:
        if r.counts:
            counts[r.concept] = counts.get(r.concept, 0) + 1
    return counts


# Why a named object is not found (the failure taxonomy), in order of precedence.
FAILURES = ("missing", "too_small", "merged", "wrong_shape")


def _touches(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two masks share a pixel or are 8-neighbours."""
    return bool((ndimage.binary_dilation(a, structure=np.ones((3, 3), bool)) & b).any())


def biggest_fitted(concept: str, found: Sequence[Region]) -> Region | None:
    """The biggest region of `concept`'s colour that is large enough to be fitted a shape."""
    fitted = [r for r in found if r.concept == concept and r.shape is not None]
    return max(fitted, key=lambda r: r.area) if fitted else None


def object_outcome(concept: str, named: Sequence[str], found: Sequence[Region]) -> str:
    """'found', or why the named `concept` is not: the failure taxonomy.

    missing - no pixel region of its colour; too_small - only regions under min_area;
    merged - two named concepts mixed into one object: its biggest region touches a region of
    another named concept's colour (one blob), or has another named concept's shape (its colour
    on the partner's outline); wrong_shape - a free-standing region of its colour with an
    outline of no named concept.
    """
    own = [r for r in found if r.concept == concept]
    if any(r.counts for r in own):
        return "found"
    if not own:
        return "missing"
    biggest = biggest_fitted(concept, own)
    if biggest is None:
        return "too_small"
    partners = [c for c in named if c != concept]
    if biggest.shape in {CONCEPTS[c].shape for c in partners}:
        return "merged"
    others = [r for r in found if r.concept in partners]
    if any(_touches(biggest.mask, r.mask) for r in others):
        return "merged"
    return "wrong_shape"


def score_regions(found: Sequence[Region], named: Sequence[str]) -> dict[str, float]:
    """Per-image outcomes with the taxonomy of its failures.

    success, hit_rate, spurious, exact_count as `score_image`; for each failure kind of
    `FAILURES`, `fail_<kind>` is 1 when some named object fails that way; `fail_spurious` is
    `spurious` of a failing image (the detector found an unnamed concept).
    """
    scores = score_image(counts_of(found), named)
    outcomes = [object_outcome(c, named, found) for c in named]
    for kind in FAILURES:
        scores[f"fail_{kind}"] = float(kind in outcomes)
    scores["fail_spurious"] = float(scores["spurious"] and not scores["success"])
    return scores


def score_image(counts: dict[str, int], named: Sequence[str]) -> dict[str, float]:
    """Per-image outcomes: success (every named concept present), hits, spurious objects."""
    hits = [counts.get(c, 0) > 0 for c in named]
    spurious = [c for c in counts if c not in named]
    return {
        "success": float(all(hits)),
        "hit_rate": float(np.mean(hits)),
        "spurious": float(bool(spurious)),
        "exact_count": float(all(counts.get(c, 0) == 1 for c in named) and not spurious),
    }


def failing_objects(images: np.ndarray, named: Sequence[Sequence[str]]) -> dict:
    """Over images, the named objects that were not found: outcome counts, and for each
    concept drawn in a wrong shape the shapes its biggest region was drawn in."""

    counts = dict.fromkeys(FAILURES, 0)
    drawn_as: dict[str, dict[str, int]] = {}
    for im, names in zip(images, named):
        found = regions(im)
        for c in names:
            outcome = object_outcome(c, names, found)
            if outcome == "found":
                continue
            counts[outcome] += 1
            if outcome == "wrong_shape":  # the region object_outcome judged
                shape = biggest_fitted(c, found).shape
                per_shape = drawn_as.setdefault(c, {})
                per_shape[shape] = per_shape.get(shape, 0) + 1
    return {"counts": counts, "wrong_shape_drawn_as": drawn_as}


def failing_summary(images: np.ndarray, named: Sequence[Sequence[str]]) -> dict:
    """`failing_objects`' counts, the shapes wrong-shape objects were drawn in, and the share
    of failing objects missing or merged (None if none fail)."""
    failing = failing_objects(images, named)
    counts = failing["counts"]
    total = sum(counts.values())
    share = (counts["missing"] + counts["merged"]) / total if total else None
    return {**failing, "missing_or_merged_share": share}


def _biggest_area(concept: str, found) -> int:
    return max((r.area for r in found if r.concept == concept), default=0)


def object_sizes(
    singles: np.ndarray,
    single_named: Sequence[Sequence[str]],
    pairs: np.ndarray,
    pair_named: Sequence[Sequence[str]],
) -> dict:
    """How big each named object is drawn: the area (pixels) of its colour's biggest region.

    `alone` - per concept, the median area where it is found alone; `held_out_pairs` - per
    outcome of `object_outcome` (missing left out: no region), the number of objects, their
    median area and the median of each one's area over its concept's area alone (1 - as big
    as alone, 0.5 - half), overall and per concept.
    """
    alone_areas: dict[str, list[int]] = {}
    for im, names in zip(singles, single_named):
        found = regions(im)
        for c in names:
            if object_outcome(c, names, found) == "found":
                alone_areas.setdefault(c, []).append(_biggest_area(c, found))
    alone = {c: float(np.median(a)) for c, a in alone_areas.items()}
    drawn: dict[str, list[tuple[str, int]]] = {}
    for im, names in zip(pairs, pair_named):
        found = regions(im)
        for c in names:
            outcome = object_outcome(c, names, found)
            if outcome != "missing":
                drawn.setdefault(outcome, []).append((c, _biggest_area(c, found)))

    def summary(items):
        ratios = [area / alone[c] for c, area in items if c in alone]
        return {
            "n": len(items),
            "median_area": float(np.median([area for _, area in items])),
            "vs_alone": float(np.median(ratios)) if ratios else None,
        }

    held = {}
    for outcome in ("found", *FAILURES[1:]):
        items = drawn.get(outcome, [])
        if items:
            per = {
                c: summary([i for i in items if i[0] == c]) for c in sorted({c for c, _ in items})
            }
            held[outcome] = {**summary(items), "per_concept": per}
    return {"alone": alone, "held_out_pairs": held}
