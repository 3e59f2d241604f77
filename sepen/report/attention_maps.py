"""Object-token cross-attention maps before and after finetuning, for the report's
attention figure."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from sepen.architecture import text_positions
from sepen.models import load_pipeline
from sepen.pipelines import DeltaSwitcher, delta_for, device_and_dtype
from sepen.plan import attention_prompts
from sepen.sampling import sample_with_maps


def averaged_token_maps(
    pipe,
    prompt: str,
    concepts: list[str],
    resolutions,
    steps: int,
    guidance: float,
    seed: int,
    how: str = "mean",
):
    """Image and per-concept cross-attention maps averaged over the denoising steps.

    Maps are the conditional half of the guidance batch, heads averaged, at the largest
    captured resolution; returns (image (h, w, 3) in [0, 1], maps (N, h, w) each summing to 1).
    """
    positions = text_positions(pipe, prompt, concepts)
    images, maps = sample_with_maps(
        pipe, [prompt], [positions], [seed], steps, guidance, resolutions, 1, how
    )
    return images[0], maps[0] / maps[0].sum((-1, -2), keepdims=True)


def attention_figure(rows: list[tuple[str, str, np.ndarray, np.ndarray, list[str]]]) -> bytes:
    """rows: (method, prompt, image, maps, concepts) -> a PNG with image and maps per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + max(len(r[4]) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols, 2.3 * len(rows)), squeeze=False)
    for ax_row, (method, prompt, image, maps, concepts) in zip(axes, rows):
        for ax in ax_row:
            ax.axis("off")
        ax_row[0].imshow(image)
        ax_row[0].set_title(f"{method}: {prompt}", fontsize=7, loc="left")
        for ax, m, c in zip(ax_row[1:], maps, concepts):
            ax.imshow(m, cmap="viridis")
            ax.set_title(c, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def attention_rows(config: dict, plan: dict, model: str, model_dir: Path | None, n_prompts: int):
    picked = attention_prompts(plan, n_prompts)
    device, dtype = device_and_dtype(config["sampling"])
    pipe = load_pipeline(model, config["model"]["revision"], dtype=dtype, device=device)
    switcher = DeltaSwitcher(pipe)
    methods = [m for m in ("base", "sepen") if m in config["evaluation"]["methods"]]
    ft, rep = config["finetune"], config["report"]
    rows = []
    for pid in picked:
        entry = plan["prompts"][pid]
        for method in methods:
            switcher.use(delta_for(plan, method, pid, model_dir))
            image, maps = averaged_token_maps(
                pipe,
                entry["prompt"],
                entry["concepts"],
                ft["resolutions"],
                rep["attention_steps"],
                config["sampling"]["guidance_scale"],
                plan["seeds"][0],
                ft["token_aggregation"],
            )
            rows.append((method, entry["prompt"], image, maps, entry["concepts"]))
    return rows
