"""The report's figures: the failure taxonomy per prompt set and method, the sample grid
(the same seeds side by side for every method) and the SepEn loss curves."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from sepen.errors import SepenError
from sepen.report.tables import FAILURE_KINDS
from sepen.toy.geometry import spearman
from sepen.toy.world import Placed, render


def taxonomy_figure(result: dict) -> bytes:
    """Bars per prompt set and method: the share of images with each kind of failure
    (an image can fail in more than one way), with their 95% CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in FAILURE_KINDS if f"fail_{k}" in result["metrics"]]
    if not kinds:
        raise SepenError("the metrics hold no failure taxonomy (fail_*): use toy_detection")
    sets = [s for s in result["sets"] if s != "overall"]
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.2), squeeze=False)
    top = max(
        (v[f"fail_{k}"]["hi"] for s in sets for v in result["sets"][s].values() for k in kinds),
        default=0.0,
    )
    handles: dict = {}
    order = list(
        dict.fromkeys([*result.get("methods", []), *(m for s in sets for m in result["sets"][s])])
    )
    for ax, name in zip(axes[0], sets):
        methods = list(result["sets"][name])
        width = 0.8 / len(methods)
        for j, method in enumerate(methods):
            values = [result["sets"][name][method][f"fail_{k}"] for k in kinds]
            x = np.arange(len(kinds)) + (j - (len(methods) - 1) / 2) * width
            mean = np.array([v["mean"] for v in values])
            err = np.array([[v["mean"] - v["lo"], v["hi"] - v["mean"]] for v in values]).T
            handles[method] = ax.bar(
                x, mean, width, yerr=err, capsize=2, color=f"C{order.index(method)}"
            )
        ax.set_xticks(np.arange(len(kinds)), [k.replace("_", "\n") for k in kinds], fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("share of images", fontsize=8)
        ax.set_ylim(0, min(1.0, max(0.1, 1.15 * top)))  # one scale for every panel
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="upper right")
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _label(image, text: str):
    from PIL import ImageDraw

    ImageDraw.Draw(image).text((4, 2), text, fill=(0, 0, 0))
    return image


LABEL_W = 110  # the method's name left of its row


def sample_grid(
    plan: dict,
    manifests: list[dict],
    prompts_per_set: int,
    seeds: int,
    cell: int = 128,
    sets: list[str] | None = None,
):
    """One block per prompt (the first `prompts_per_set` of each of `sets`, default all): a row
    per method, the same `seeds` seeds in columns."""
    from PIL import Image

    paths: dict[tuple[str, str, int], str] = {}
    methods: list[str] = []
    for m in manifests:
        if m["method"] not in methods:
            methods.append(m["method"])
        for im in m["images"]:
            paths[(m["method"], im["prompt_id"], im["seed"])] = im["path"]
    unknown = sorted(set(sets or []) - set(plan["sets"]))
    if unknown:
        raise SepenError(
            f"prompt sets {unknown} are not in the plan: choose from {sorted(plan['sets'])}"
        )
    chosen = [
        pid
        for name, ids in plan["sets"].items()
        if sets is None or name in sets
        for pid in ids[:prompts_per_set]
    ]
    chosen = list(dict.fromkeys(chosen))
    seed_list = plan["seeds"][:seeds]
    label_h = 16
    rows = []
    for pid in chosen:
        title = Image.new("RGB", (cell * len(seed_list) + LABEL_W, label_h), "white")
        rows.append(_label(title, plan["prompts"][pid]["prompt"]))
        for method in methods:
            if (method, pid, seed_list[0]) not in paths:  # A&E samples pair prompts only
                continue
            row = Image.new("RGB", (cell * len(seed_list) + LABEL_W, cell), "white")
            _label(row, method)
            for j, s in enumerate(seed_list):
                with Image.open(paths[(method, pid, s)]) as im:
                    tile = im.convert("RGB").resize((cell, cell), Image.NEAREST)
                row.paste(tile, (LABEL_W + j * cell, 0))
            rows.append(row)
    grid = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height
    return grid


def png(image) -> bytes:
    """PNG bytes of a PIL image or a uint8 (h, w, 3) array."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def loss_figure(files: list[Path]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ("loss", "separate", "enhance", "norm")
    fig, axes = plt.subplots(1, len(columns), figsize=(4 * len(columns), 3), squeeze=False)
    for path in files:
        with open(path) as f:
            rows = list(csv.DictReader(f))
        if not rows:
            continue
        steps = [int(r["step"]) for r in rows]
        alpha = 1.0 if len(files) == 1 else max(0.15, 1 / len(files) ** 0.5)
        for ax, col in zip(axes[0], columns):
            ax.plot(steps, [float(r[col]) for r in rows], lw=1, alpha=alpha)
    for ax, col in zip(axes[0], columns):
        ax.set_title(col)
        ax.set_xlabel("step")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def mean_losses_csv(files: list[Path]) -> str:
    """The loss parts per step, averaged over the models' logs (one curve for `dvc plots`)."""
    columns = ("loss", "separate", "enhance", "norm")
    sums: dict[int, list] = {}
    for path in files:
        with open(path) as f:
            for r in csv.DictReader(f):
                entry = sums.setdefault(int(r["step"]), [0, [0.0] * len(columns)])
                entry[0] += 1
                entry[1] = [a + float(r[c]) for a, c in zip(entry[1], columns)]
    lines = ["step," + ",".join(columns)]
    for step in sorted(sums):
        n, total = sums[step]
        lines.append(f"{step}," + ",".join(f"{v / n:.6g}" for v in total))
    return "\n".join(lines) + "\n"


def concepts_figure(concepts: list[str], radius: float, size: int = 32, cell: int = 96):
    """The toy world's concepts, each drawn alone at the centre (radius `radius`), named below:
    what the exact detector looks for (sepen.toy.world)."""
    from PIL import Image

    label_h = 16
    sheet = Image.new("RGB", (cell * len(concepts), cell + label_h), "white")
    for k, name in enumerate(concepts):
        image = render([Placed(name, size / 2, size / 2, radius)], size)
        tile = Image.fromarray(image).resize((cell, cell), Image.NEAREST)
        sheet.paste(tile, (k * cell, 0))
        caption = Image.new("RGB", (cell, label_h), "white")
        sheet.paste(_label(caption, name), (k * cell, cell))
    return sheet


def card_figure(cards: list[tuple[str, dict]]) -> bytes:
    """World cards side by side: each concept drawn alone (success on the card seeds, the
    12-of-16 line), and per held-out pair its failure rate against its object tokens' key
    cosine (the premise: pairs whose keys look alike fail)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not cards:
        raise SepenError("no world card given: pass --card world_card.json (one per world)")
    fig, (bars, dots) = plt.subplots(1, 2, figsize=(10, 3.4))
    concepts = list(cards[0][1]["per_prompt"]["single"])
    width = 0.8 / len(cards)
    for j, (label, card) in enumerate(cards):
        singles = card["per_prompt"]["single"]
        x = np.arange(len(concepts)) + (j - (len(cards) - 1) / 2) * width
        bars.bar(x, [singles.get(c, np.nan) for c in concepts], width, label=label, color=f"C{j}")
        pairs = card["keys_and_maps"]["per_pair"]
        cosine, failure = [p["key_cosine"] for p in pairs], [p["failure_rate"] for p in pairs]
        rho = spearman(cosine, failure)
        dots.scatter(
            cosine,
            failure,
            s=18,
            color=f"C{j}",
            label=f"{label} (Spearman {rho:.2f})" if rho is not None else label,
        )
    bars.axhline(12 / 16, color="grey", lw=0.8, ls="--")
    bars.set_xticks(np.arange(len(concepts)), concepts, fontsize=8)
    bars.set_ylim(0, 1.05)
    bars.set_ylabel("drawn alone (card seeds)", fontsize=8)
    bars.set_title("each concept alone; dashed: 12 of 16", fontsize=9)
    bars.legend(fontsize=7, loc="lower left")
    dots.set_xlabel("key cosine of the pair's object tokens", fontsize=8)
    dots.set_ylabel("held-out pair's base failure rate", fontsize=8)
    dots.set_title("held-out pairs: alike keys fail", fontsize=9)
    dots.set_ylim(-0.05, 1.05)
    dots.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()
