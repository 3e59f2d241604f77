"""The premise measure's arithmetic on constructed maps, masks and records."""

import json

import numpy as np
import pytest
import torch

from sepen.losses import enhance_loss, separate_loss
from sepen.stats import auc_ci, roc_auc
from sepen.toy.detect import regions
from sepen.toy.premise import (
    attention_shares,
    cell_fractions,
    loss_values,
    object_masks,
    summarise,
)
from sepen.toy.world import Placed, render


def test_cell_fractions_average_the_mask_over_each_cell():
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = mask[0, 1] = mask[1, 0] = True
    assert cell_fractions(mask, 2).tolist() == [[0.75, 0.0], [0.0, 0.0]]


def test_attention_shares_split_each_map_into_own_other_and_background():
    own = np.zeros((4, 4), bool)
    own[:2, :2] = True  # top-left cell of a 2x2 grid
    other = np.zeros((4, 4), bool)
    other[2:, 2:] = True  # bottom-right cell
    maps = np.array(
        [
            [[6.0, 1.0], [1.0, 2.0]],  # concept 0: 0.6 on its object, 0.2 on the other's
            [[1.0, 1.0], [0.0, 2.0]],  # concept 1: 0.5 on its object, 0.25 on the other's
        ]
    )
    first, second = attention_shares(maps, [own, other])
    assert first == pytest.approx({"own": 0.6, "other": 0.2, "background": 0.2, "area": 0.25})
    assert second == pytest.approx({"own": 0.5, "other": 0.25, "background": 0.25, "area": 0.25})
    # an object the detector did not find has no own share; the found one has no "other"
    missing = attention_shares(maps, [own, None])
    assert missing[1] is None
    assert missing[0] == pytest.approx({"own": 0.6, "other": 0.0, "background": 0.4, "area": 0.25})


def test_object_masks_are_the_detected_objects():
    objects = [Placed("circle", 8, 8, 6), Placed("square", 24, 24, 6)]
    found = regions(render(objects))
    circle, star = object_masks(found, ["circle", "star"])
    assert star is None
    assert (
        circle[8, 8] and not circle[24, 24] and circle.sum() == (render(objects[:1]).any(-1).sum())
    )


def test_loss_values_are_sepens_losses_of_the_maps():
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 8, 8, generator=gen)
    values = loss_values(maps.numpy())
    t = maps[None, :, None]
    assert values["separate"] == pytest.approx(separate_loss(t).item(), rel=1e-6)
    assert values["enhance"] == pytest.approx(enhance_loss(t).item(), rel=1e-6)
    assert values["total"] == pytest.approx(values["separate"] + 0.5 * values["enhance"])


def test_roc_auc_counts_ordered_pairs_and_ties():
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    # positives 0.5, 0.3; negatives 0.5, 0.1: pairs (>, =, >, <) -> (1 + 0.5 + 1 + 0) / 4
    assert roc_auc([0.5, 0.3, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.625)
    with pytest.raises(ValueError, match="needs both classes"):
        roc_auc([0.1, 0.2], [1, 1])


def test_auc_ci_brackets_the_auc_and_is_tight_for_separable_scores():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=300)
    labels = (scores + rng.normal(size=300)) > 0
    ci = auc_ci(scores, labels, n_boot=500)
    assert ci["lo"] < ci["auc"] < ci["hi"] and ci["n"] == 300
    assert ci["positives"] == int(labels.sum())
    assert 0.7 < ci["auc"] < 0.9  # the normal-normal model: AUC = Phi(1 / sqrt(1)) ~ 0.76-0.84
    perfect = auc_ci([0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1], n_boot=200)
    assert perfect == {"auc": 1.0, "lo": 1.0, "hi": 1.0, "n": 6, "positives": 3}


def test_summarise_pools_found_objects_and_scores_failure():
    def record(success, separate, own):
        share = {"own": own, "other": 0.1, "background": 0.9 - own, "area": 0.2}
        return {
            "success": success,
            "shares": [share, None],
            "separate": separate,
            "enhance": 1 - separate,
            "total": separate,
        }

    records = [record(1.0, 0.1, 0.5), record(1.0, 0.2, 0.5), record(0.0, 0.3, 0.2)]
    out = summarise(records, n_boot=200)
    assert out["images"] == 3 and out["objects_found"] == 3 and out["failures"] == 1
    assert out["own"]["mean"] == pytest.approx(0.4)
    assert out["auc"]["separate"]["auc"] == 1.0  # the failing image has the largest overlap
    assert out["auc"]["enhance"]["auc"] == 0.0
    assert summarise(records[:2], n_boot=10)["auc"]["separate"] is None  # no failure: no AUC


@pytest.mark.slow
def test_premise_on_the_shipped_model_puts_each_token_on_its_own_object(
    tmp_path, fresh_accelerator_state
):
    """The premise measured on the shipped v3 model's own samples (4 seeds per held-out pair):
    every share and AUC is a number in the range the model gives, the maps line up with the
    detector's masks (a flipped, transposed or token-swapped map drops the own share to about
    the object's area, 0.11-0.13 measured), and a finetuned delta changes images and values."""
    from pathlib import Path

    from sepen.cli.finetune import cli as finetune
    from sepen.config import load_config
    from sepen.plan import build_plan
    from sepen.toy.premise import premise_check

    root = Path(__file__).resolve().parents[2]
    config = load_config(root / "config/config.yaml", ["toy.premise_images=4"])
    model = str(root / "data/toy_base")
    plan = build_plan(config)
    held_out = plan["sets"]["held_out_pairs"]
    assert len(held_out) == 14
    base = premise_check(config, {**plan, "sets": {"held_out_pairs": held_out}}, model, None)
    found = base["methods"]["base"]["held_out_pairs"]
    assert found["images"] == 56 and 70 <= found["objects_found"] <= 112
    # each token's map sits on its own object: 0.60 measured where a uniform map gets 0.09
    assert 0.45 <= found["own"]["mean"] <= 0.8
    assert found["own"]["lo"] >= 4 * found["area"]["mean"]
    assert 0.04 <= found["area"]["mean"] <= 0.15
    assert 0 <= found["other"]["mean"] <= 0.1
    assert found["background"]["mean"] == pytest.approx(
        1 - found["own"]["mean"] - found["other"]["mean"], abs=1e-6
    )
    # failures occur and SepEn's values on the base maps predict them (0.79/0.86/0.88 measured)
    assert 10 <= found["failures"] <= 46
    for value in ("separate", "enhance", "total"):
        assert 0.65 <= found["auc"][value]["auc"] <= 1.0, value

    # one pair's SepEn model (the default config's settings): its images and maps change
    pid = next(p for p in held_out if plan["prompts"][p]["concepts"] == ["circle", "cross"])
    model_id = plan["prompts"][pid]["model"]
    plan_path = tmp_path / "prompts.json"
    plan_path.write_text(json.dumps(plan))
    args = ["--config", str(root / "config/config.yaml"), "--plan", str(plan_path)]
    args += ["--model-id", model_id, "--model", model, "--out"]
    assert finetune([*args, str(tmp_path / "models" / f"{model_id}.safetensors")]) == 0
    one = {**plan, "sets": {"held_out_pairs": [pid]}}
    both = premise_check(config, one, model, tmp_path / "models")["methods"]
    before, after = both["base"]["held_out_pairs"], both["sepen"]["held_out_pairs"]
    assert before["images"] == after["images"] == 4
    assert before["own"]["mean"] != after["own"]["mean"]
    assert after["failures"] < before["failures"]  # 1 of 4 images fails before, 0 after
    assert 0.45 <= after["own"]["mean"] <= 0.8
