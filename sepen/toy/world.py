"""A synthetic world of coloured shapes, rendered deterministically.

Each concept is one shape in its own colour, drawn with hard edges on a black background, so
that the exact detector (`sepen.toy.detect`) can tell which concepts an image shows. Shapes are
defined by a centre (cx, cy) and a radius r: every shape's bounding box is centred on (cx, cy).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

BACKGROUND = (0, 0, 0)


def _polygon_mask(xs, ys, vertices) -> np.ndarray:
    """Even-odd point-in-polygon test of pixel centres against a closed polygon."""
    inside = np.zeros(xs.shape, dtype=bool)
    n = len(vertices)
    for k in range(n):
        x1, y1 = vertices[k]
        x2, y2 = vertices[(k + 1) % n]
        crosses = (y1 > ys) != (y2 > ys)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (ys - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (xs < x_at)
    return inside


def _star(cx, cy, r):
    # five points; the outer radius is scaled so that the bounding box is centred on (cx, cy)
    pts = []
    for k in range(10):
        angle = -math.pi / 2 + k * math.pi / 5
        radius = 1.0 if k % 2 == 0 else 0.45
        pts.append((math.cos(angle) * radius, math.sin(angle) * radius))
    xs, ys = zip(*pts)
    mx, my = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    s = 2 / max(max(xs) - min(xs), max(ys) - min(ys))
    return [(cx + (x - mx) * s * r, cy + (y - my) * s * r) for x, y in pts]


@functools.lru_cache(maxsize=8)
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    ys.flags.writeable = xs.flags.writeable = False
    return ys, xs


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean (size, size) mask of `shape` at centre (cx, cy) with radius r (pixels)."""
    ys, xs = _pixel_centres(size)
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    if shape == "triangle":
        return _polygon_mask(xs, ys, [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)])
    if shape == "star":
        return _polygon_mask(xs, ys, _star(cx, cy, r))
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "cross":
        arm = r / 3
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.5 * r) ** 2)
    if shape == "bar":
        return (np.abs(dx) <= r) & (np.abs(dy) <= 0.4 * r)
    raise ValueError(f"unknown shape {shape!r}")


@dataclass(frozen=True)
class Concept:
    name: str
    shape: str
    color: tuple[int, int, int]


# Colours at the corners of the RGB cube plus grey: every pair is >= 220 apart.
CONCEPTS: dict[str, Concept] = {
    c.name: c
    for c in [
        Concept("circle", "circle", (255, 0, 0)),
        Concept("square", "square", (0, 0, 255)),
        Concept("triangle", "triangle", (0, 255, 0)),
        Concept("star", "star", (255, 255, 0)),
        Concept("diamond", "diamond", (255, 0, 255)),
        Concept("cross", "cross", (0, 255, 255)),
        Concept("ring", "ring", (255, 255, 255)),
        Concept("bar", "bar", (128, 128, 128)),
    ]
}


@dataclass(frozen=True)
class Placed:
    concept: str
    cx: float
    cy: float
    r: float


def render(objects: list[Placed], size: int = 32) -> np.ndarray:
    """(size, size, 3) uint8 image; later objects are drawn over earlier ones."""
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj in objects:
        c = CONCEPTS[obj.concept]
        image[shape_mask(c.shape, obj.cx, obj.cy, obj.r, size)] = c.color
    return image


def _box(obj: Placed, margin: float) -> tuple[float, float, float, float]:
    return (
        obj.cx - obj.r - margin,
        obj.cy - obj.r - margin,
        obj.cx + obj.r + margin,
        obj.cy + obj.r + margin,
    )


def box_overlap(a: Placed, b: Placed, margin: float = 1.0) -> float:
    """Area of the intersection of the two (margin-grown) boxes over the smaller box."""
    ax0, ay0, ax1, ay1 = _box(a, margin)
    bx0, by0, bx1, by1 = _box(b, margin)
    w = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    h = max(0.0, min(ay1, by1) - max(ay0, by0))
    smaller = min((ax1 - ax0) * (ay1 - ay0), (bx1 - bx0) * (by1 - by0))
    return w * h / smaller


def place(
    rng: np.random.Generator,
    concepts: list[str],
    size: int = 32,
    radius: tuple[float, float] = (5.0, 8.0),
    max_overlap: float = 0.0,
    tries: int = 1000,
) -> list[Placed]:
    """Random positions and radii for `concepts`, inside the image, with bounded overlap.

    Objects' boxes (grown by a 1 px margin) overlap by at most `max_overlap` of the smaller box.
    """
    for _ in range(tries):
        objects = []
        for name in concepts:
            r = float(rng.uniform(*radius))
            cx = float(rng.uniform(r + 0.5, size - r - 0.5))
            cy = float(rng.uniform(r + 0.5, size - r - 0.5))
            objects.append(Placed(name, cx, cy, r))
        if all(box_overlap(a, b) <= max_overlap for a, b in itertools.combinations(objects, 2)):
            return objects
    raise RuntimeError(f"could not place {concepts} in {size}x{size} after {tries} tries")


def prompt_for(concepts: list[str], conjunction: str = "and") -> str:
    """The paper's grammar: 'a photo of a circle', 'a photo of a circle and a square'."""
    return "a photo of " + f" {conjunction} ".join(f"a {c}" for c in concepts)


def pair_split(names: list[str], held_out: int, seed: int) -> tuple[list, list]:
    """All unordered pairs of `names`, split into (trained, held_out) pairs, seeded.

    The held-out pairs never appear together in training, so they test composition. Every
    concept still appears in some trained pair.
    """
    pairs = list(itertools.combinations(names, 2))
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        order = rng.permutation(len(pairs))
        held = sorted(pairs[i] for i in order[:held_out])
        trained = sorted(pairs[i] for i in order[held_out:])
        if {c for p in trained for c in p} == set(names):
            return [list(p) for p in trained], [list(p) for p in held]
    raise RuntimeError("no split keeps every concept in a trained pair")


def scene_batch(
    rng: np.random.Generator,
    n: int,
    concepts: list[str],
    pairs: list[list[str]],
    pair_fraction: float,
    radius=(5.0, 8.0),
    size: int = 32,
    one_name_fraction: float = 0.0,
    concept_weights: dict[str, float] | None = None,
):
    """n training scenes: single objects, or (with probability pair_fraction) a trained pair.

    A pair image's caption names only one of its two objects with probability
    `one_name_fraction` (as web captions often name only one object); with 0 the random stream
    is that of earlier versions, so their models stay reproducible.
    `concept_weights` (concept -> relative weight, 1 for a concept it leaves out) draws a
    concept alone in proportion to its weight and a pair in proportion to its two weights' mean;
    None draws them uniformly, with the random stream of earlier versions.

    Returns (images uint8 (n, size, size, 3), prompts, named concepts per image, the placed
    objects per image in drawing order; the named concepts lead, in their order).
    """
    single_p = pair_p = None
    if concept_weights is not None:
        w = {c: float(concept_weights.get(c, 1.0)) for c in concepts}
        single_p = np.array([w[c] for c in concepts]) / sum(w.values())
        pair_w = np.array([(w[a] + w[b]) / 2 for a, b in pairs])
        pair_p = pair_w / pair_w.sum() if len(pairs) else None
    images, prompts, named, layouts = [], [], [], []
    for _ in range(n):
        if pairs and rng.random() < pair_fraction:
            k = rng.integers(len(pairs)) if pair_p is None else rng.choice(len(pairs), p=pair_p)
            chosen = list(pairs[k])
            if rng.random() < 0.5:
                chosen.reverse()
            conjunction = "and" if rng.random() < 0.5 else "with"
        else:
            k = (
                rng.integers(len(concepts))
                if single_p is None
                else rng.choice(len(concepts), p=single_p)
            )
            chosen, conjunction = [concepts[k]], "and"
        layouts.append(place(rng, chosen, size, tuple(radius)))
        images.append(render(layouts[-1], size))
        if len(chosen) > 1 and one_name_fraction > 0 and rng.random() < one_name_fraction:
            chosen = chosen[:1]
        prompts.append(prompt_for(chosen, conjunction))
        named.append(chosen)
    return np.stack(images), prompts, named, layouts


@dataclass(frozen=True)
class World(Mapping):
    """A config's toy section (read as a mapping, as the config is) with the pairs its split
    gives: `trained_pairs` appear in training, `held_out_pairs` never together."""

    settings: dict
    trained_pairs: list
    held_out_pairs: list

    def __getitem__(self, key):
        return self.settings[key]

    def __iter__(self):
        return iter(self.settings)

    def __len__(self) -> int:
        return len(self.settings)


def prepare_world(config: dict) -> World:
    """The config's toy world with its trained and held-out pairs.

    Plain Python and numpy, so that building the workflow's DAG does not import torch.
    """
    toy = dict(config["toy"])
    trained, held = pair_split(toy["concepts"], toy["held_out_pairs"], toy["split_seed"])
    return World(toy, trained, held)
