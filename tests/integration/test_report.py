"""`sepen report`: the table, grid, loss curves and attention maps."""

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.steps import metrics_shard, sample_shard

from sepen.aggregate import aggregate, collect
from sepen.config import load_config
from sepen.errors import SepenError


def test_report_table_grid_and_losses(toy_setup):
    from sepen.report.figures import loss_figure, sample_grid
    from sepen.report.tables import table_page

    plan = toy_setup["plan"]
    result = aggregate(
        plan,
        collect(
            [
                metrics_shard("base", plan, lambda i, s: 0.0),
                metrics_shard("sepen", plan, lambda i, s: 1.0),
            ]
        ),
        n_boot=50,
    )
    ci = {"mean": 0.2, "lo": 0.1, "hi": 0.3, "n": 4}
    auc = {"auc": 0.75, "lo": 0.6, "hi": 0.9, "n": 4, "positives": 2}
    premise = {
        "methods": {
            "base": {
                "held_out_pairs": {
                    "images": 4,
                    "failures": 2,
                    "own": ci,
                    "other": ci,
                    "background": ci,
                    "area": ci,
                    "auc": {"separate": auc, "enhance": None, "total": auc},
                }
            }
        }
    }
    page = table_page(result, premise, None)
    assert "held_out_pairs" in page and "1.000 [1.000, 1.000]" in page
    assert "0.200 [0.100, 0.300]" in page and "0.750 [0.600, 0.900]" in page
    assert "<td>4 (2)</td>" in page
    manifest = sample_shard(toy_setup)
    grid = sample_grid(plan, [manifest, {**manifest, "method": "sepen"}], 1, 2, cell=64)
    # one prompt (one set, 1 per set): a 16-pixel title row and a 64-pixel row per method;
    # 2 seeds + the label column (110 px: "sepen_test_time" fits)
    assert grid.size == (110 + 2 * 64, 16 + 2 * 64)
    sets = list(plan["sets"])
    only = sample_grid(plan, [manifest], 1, 2, cell=32, sets=sets[:1])
    assert only.size == (110 + 2 * 32, 16 + 32)
    with pytest.raises(SepenError, match="not in the plan"):
        sample_grid(plan, [manifest], 1, 2, sets=["nope"])
    csv_path = toy_setup["dir"] / "losses.csv"
    csv_path.write_text(
        "step,loss,separate,enhance,norm,lr\n1,1.0,0.5,0.4,0.1,1e-4\n2,0.9,0.4,0.4,0.1,1e-4\n"
    )
    png = loss_figure([csv_path])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_attention_maps_are_diffusers_own_cross_attention_averaged_over_steps(toy_setup):
    from sepen.models import load_pipeline
    from sepen.plan import attention_prompts
    from sepen.report.attention_maps import averaged_token_maps

    plan = toy_setup["plan"]
    pid = attention_prompts(plan, 1)[0]
    entry = plan["prompts"][pid]
    pipe = load_pipeline(load_config(toy_setup["config"])["model"]["pretrained"])
    image, maps = averaged_token_maps(pipe, entry["prompt"], entry["concepts"], [16], 2, 2.0, 0)
    assert image.shape == (32, 32, 3) and maps.shape == (2, 16, 16)
    # the same maps from diffusers' own attention: its AttnProcessor's probabilities
    # (Attention.get_attention_scores) of the cross-attention layers on the 16 x 16 grid,
    # conditional half, heads averaged, layers and steps averaged, normalised per concept
    from diffusers.models.attention_processor import Attention, AttnProcessor

    from sepen.sampling import sample
    from sepen.tokens import concept_token_positions

    seen, scores = [], Attention.get_attention_scores

    def recording(self, query, key, attention_mask=None):
        probs = scores(self, query, key, attention_mask)
        if self.is_cross_attention and query.shape[1] == 16 * 16:
            heads = self.heads
            seen.append(probs[heads:].mean(0))  # (256, tokens): the conditional half
        return probs

    Attention.get_attention_scores = recording
    try:
        pipe.unet.set_attn_processor(AttnProcessor())
        again = sample(pipe, [entry["prompt"]], [0], 2, 2.0, 1)
    finally:
        Attention.get_attention_scores = scores
    per_step = len(seen) // 2
    assert per_step >= 1 and len(seen) == 2 * per_step
    mean = torch.stack(seen).mean(0)  # the same number of layers in each step
    positions = concept_token_positions(pipe.tokenizer, entry["prompt"], entry["concepts"])
    expected = np.stack([mean[:, pos].mean(-1).reshape(16, 16).numpy() for pos in positions])
    expected /= expected.sum((1, 2), keepdims=True)
    assert np.abs(maps - expected).max() < 1e-5
    assert np.abs(image - again[0]).max() < 1e-4  # and the image the maps belong to
    assert np.abs(maps[0] - maps[1]).max() > 1e-3  # one map per concept, not one map twice
    # the capture processors are removed afterwards: sampling works as before
    assert all(type(p).__name__ != "SepenAttnProcessor" for p in pipe.unet.attn_processors.values())


def test_the_card_figure_draws_each_world_and_names_a_missing_card(tmp_path):
    """`sepen report card`: the shipped world cards side by side (a PNG of both panels); a
    missing card is named before anything is written."""
    import io
    import subprocess
    import sys

    from PIL import Image

    out = tmp_path / "card.png"
    cmd = [sys.executable, "-m", "sepen", "report", "card", "--out", str(out)]
    cards = ["--card", "data/toy_base/world_card.json", "--card", "data/toy_mmdit/world_card.json"]
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(cmd + cards, cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    image = np.asarray(Image.open(io.BytesIO(out.read_bytes())).convert("RGB"))
    assert image.shape[1] > 1.5 * image.shape[0]  # two panels side by side
    # the two worlds' colours (matplotlib's C0 blue, C1 orange) are both drawn
    blue = ((image[..., 2] > 150) & (image[..., 0] < 60)).sum()
    orange = ((image[..., 0] > 200) & (image[..., 1] > 100) & (image[..., 2] < 60)).sum()
    assert blue > 500 and orange > 500
    missing = subprocess.run(
        cmd + ["--card", str(tmp_path / "none.json")], cwd=root, capture_output=True, text=True
    )
    assert missing.returncode != 0 and "none.json" in missing.stderr
    assert "sepen toy card" in missing.stderr
