"""The world card: steering, key and map arithmetic on constructed inputs, the diagnosis of a
delta, and the card of a tiny pretrained toy model end to end."""

import json

import numpy as np
import pytest
import torch

from sepen.toy.card import criteria
from sepen.toy.detect import regions
from sepen.toy.geometry import key_cosine, soft_iou, spearman
from sepen.toy.steering import (
    SteeringProcessor,
    object_side,
    steered,
    steering_bias,
    steering_counts,
)
from sepen.toy.world import Placed, render


def test_steering_bias_favours_each_token_on_its_half_only():
    b = steering_bias(4, 6, left=[2], right=[4, 5], strength=3.0).reshape(4, 4, 6)
    assert torch.all(b[:, :2, 2] == 3.0) and torch.all(b[:, 2:, 2] == -3.0)
    for p in (4, 5):
        assert torch.all(b[:, :2, p] == -3.0) and torch.all(b[:, 2:, p] == 3.0)
    assert torch.all(b[..., [0, 1, 3]] == 0)
    # row-major cells: cell (row 0, col 0) is query 0, (row 0, col 3) is query 3
    flat = steering_bias(4, 6, [2], [4], 1.0)
    assert flat[0, 2] == 1.0 and flat[3, 2] == -1.0 and flat[3, 4] == 1.0


def _attention_layer():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=8, cross_attention_dim=8, heads=2, dim_head=4).eval()


def test_steering_processor_moves_attention_to_the_steered_half_in_the_conditional_half():
    from diffusers.models.attention_processor import AttnProcessor2_0

    attn = _attention_layer()
    x = torch.randn(2, 16, 8)  # [unconditional, conditional], a 4x4 grid
    text = torch.randn(2, 5, 8)
    plain = AttnProcessor2_0()(attn, x, text)
    none = SteeringProcessor(lambda side, tokens: torch.zeros(side * side, tokens))(attn, x, text)
    assert torch.allclose(plain, none, atol=1e-6)  # no bias: diffusers' processor exactly
    # read the probabilities through a hand computation with the same bias
    bias = steering_bias(4, 5, [1], [3], 20.0)
    q = attn.to_q(x).view(2, 16, 2, 4).transpose(1, 2)
    k = attn.to_k(text).view(2, 5, 2, 4).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) * attn.scale
    steered_p = (logits + torch.stack([torch.zeros_like(bias), bias])[:, None]).softmax(-1)
    cond = steered_p[1].mean(0).reshape(4, 4, 5)
    assert cond[:, :2, 1].min() > 0.9 and cond[:, 2:, 3].min() > 0.9
    assert torch.equal(steered_p[0], logits[0].softmax(-1))  # unconditional half untouched
    # the processor computes exactly this attention
    with torch.no_grad():
        v = attn.to_v(text).view(2, 5, 2, 4).transpose(1, 2)
        expect = (steered_p @ v).transpose(1, 2).reshape(2, 16, 8)
        expect = attn.to_out[0](expect)
    got = SteeringProcessor(lambda side, tokens: steering_bias(side, tokens, [1], [3], 20.0))(
        attn, x, text
    )
    assert torch.allclose(got, expect, atol=1e-5)


def test_colour_centroids_see_objects_the_detector_cannot_recognise():
    from sepen.toy.probes import centroid_counts, colour_side

    left = render([Placed("circle", 8, 16, 6), Placed("star", 24, 16, 6)])
    blob = render([Placed("circle", 8, 16, 6)])
    blob[12:20, 20:28] = (255, 255, 0)  # the star's colour as a square: no star to the detector
    assert object_side(regions(blob), "star", 32) is None
    assert colour_side(blob, "star") == "right" and colour_side(blob, "circle") == "left"
    assert colour_side(render([Placed("circle", 8, 16, 6)]), "star") is None
    mirrored = left[:, ::-1]
    counts = centroid_counts(np.stack([left, blob, mirrored]), ["circle", "star"])
    assert counts == {"first_left": 2, "second_right": 2, "both": 2, "n": 3}


def test_failing_objects_name_the_shape_a_wrong_shape_object_was_drawn_in():
    from sepen.toy.detect import failing_summary

    both = render([Placed("circle", 8, 16, 6), Placed("star", 24, 16, 6)])
    blob = render([Placed("circle", 8, 16, 6)])
    blob[12:20, 20:28] = (255, 255, 0)  # the star's colour as a square, apart from the circle
    blob[2:5, 2:7] = (255, 255, 0)  # and a smaller region of it: the biggest one is named
    lonely = render([Placed("circle", 8, 16, 6)])
    named = [["circle", "star"]] * 4
    summary = failing_summary(np.stack([both, blob, lonely, blob]), named)
    assert summary["counts"] == {"missing": 1, "too_small": 0, "merged": 0, "wrong_shape": 2}
    assert summary["wrong_shape_drawn_as"] == {"star": {"square": 2}}
    assert summary["missing_or_merged_share"] == pytest.approx(1 / 3)
    assert failing_summary(np.stack([both]), named[:1]) == {
        "counts": dict.fromkeys(("missing", "too_small", "merged", "wrong_shape"), 0),
        "wrong_shape_drawn_as": {},
        "missing_or_merged_share": None,
    }


def test_object_sizes_compare_each_outcome_with_the_concept_drawn_alone():
    from sepen.toy.detect import object_sizes

    singles = np.stack([render([Placed("star", 16, 16, 7)]), render([Placed("circle", 16, 16, 6)])])
    star_alone = int((singles[0] == (255, 255, 0)).all(-1).sum())
    both = render([Placed("circle", 8, 16, 6), Placed("star", 24, 16, 7)])
    small = render([Placed("circle", 8, 16, 6)])
    small[14:18, 22:26] = (255, 255, 0)  # a star drawn as a 4x4 blob, apart from the circle
    lonely = render([Placed("circle", 8, 16, 6)])
    sizes = object_sizes(
        singles, [["star"], ["circle"]], np.stack([both, small, lonely]), [["circle", "star"]] * 3
    )
    circle_alone = int((singles[1] == (255, 0, 0)).all(-1).sum())
    assert sizes["alone"] == {"star": star_alone, "circle": circle_alone}
    wrong = sizes["held_out_pairs"]["wrong_shape"]
    assert wrong["n"] == 1 and wrong["median_area"] == 16
    assert wrong["vs_alone"] == pytest.approx(16 / star_alone)
    assert wrong["per_concept"]["star"]["vs_alone"] == pytest.approx(16 / star_alone)
    found = sizes["held_out_pairs"]["found"]
    assert found["n"] == 4 and found["vs_alone"] == pytest.approx(1.0)  # as big as alone
    assert "missing" not in sizes["held_out_pairs"]  # no region to measure


def test_object_side_and_steering_counts_read_the_detected_objects():
    left = render([Placed("circle", 8, 16, 6), Placed("star", 24, 16, 6)])
    right = render([Placed("circle", 24, 16, 6), Placed("star", 8, 16, 6)])
    lonely = render([Placed("circle", 8, 16, 6)])
    assert object_side(regions(left), "circle", 32) == "left"
    assert object_side(regions(right), "circle", 32) == "right"
    assert object_side(regions(lonely), "star", 32) is None
    counts = steering_counts(np.stack([left, right, lonely]), ["circle", "star"])
    assert counts == {"first_left": 2, "second_right": 1, "both": 1, "n": 3}


def test_soft_iou_of_attention_maps():
    a = np.zeros((4, 4))
    a[:2] = 1
    b = np.zeros((4, 4))
    b[2:] = 1
    assert soft_iou(a, a * 7) == pytest.approx(1.0)  # scale does not matter
    assert soft_iou(a, b) == 0.0
    c = np.zeros((4, 4))
    c[1:3] = 1  # half of a's mass on half of c's cells
    assert soft_iou(a, c) == pytest.approx(0.25 / 0.75)


def test_spearman_ranks_and_refuses_constant_input():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    assert spearman([1, 2], [1, 2]) is None


def test_key_cosine_is_the_mean_over_cross_attention_layers_of_the_object_keys(tiny_toy_model):
    from sepen.models import load_pipeline
    from sepen.tokens import concept_token_positions, prompt_ids

    pipe = load_pipeline(tiny_toy_model)
    prompt = "a photo of a circle and a star"
    pos = concept_token_positions(pipe.tokenizer, prompt, ["circle", "star"])
    hidden = pipe.text_encoder(prompt_ids(pipe.tokenizer, [prompt]))[0][0].detach()
    values = []
    for name, module in pipe.unet.named_modules():
        if name.endswith("attn2"):
            w = module.to_k.weight.detach()
            a, b = hidden[pos[0][0]] @ w.T, hidden[pos[1][0]] @ w.T
            values.append(float(a @ b / (a.norm() * b.norm())))
    assert len(values) == 7  # down 16 and 8 (one each), mid 4, up 8 and 16 (two each)
    assert key_cosine(pipe, prompt, pos) == pytest.approx(np.mean(values), abs=1e-6)
    assert key_cosine(pipe, prompt, pos[::-1]) == pytest.approx(np.mean(values), abs=1e-6)
    assert key_cosine(pipe, prompt, [pos[0], pos[0]]) == pytest.approx(1.0, abs=1e-6)


# the criteria of every world (an SD3-style MMDiT adds the swap test's two)
CRITERIA = {
    "every_single_concept_12_of_16",
    "singles_at_least_0.90",
    "held_out_pairs_0.30_to_0.60",
    "failing_objects_mostly_missing_or_merged",
    "attend_excite_lift_ci_above_0",
    "key_cosine_predicts_failure",
    "map_overlap_predicts_failure",
    "steering_first_left_centroid_lift_ci_above_0",
    "steering_second_right_centroid_lift_ci_above_0",
    "object_tokens_share_at_high_noise_0.05",
}


def _card(
    held=0.5,
    singles=(1.0, 0.9),
    shares=(3, 1, 1, 0),
    lift_lo=0.02,
    centroid_lo=(0.1, 0.05),
    spearman=(0.7, 0.4),
    object_share=0.06,
    swap=(0.6, 0.2),
):
    """A card with the values the criteria read (none measured: constructed)."""
    total = sum(shares)
    card = {
        "per_prompt": {"single": {"circle": singles[0], "star": singles[1]}},
        "success": {"single": {"mean": float(np.mean(singles))}, "held_out_pairs": {"mean": held}},
        "failing_objects": {"missing_or_merged_share": (shares[0] + shares[2]) / total},
        "steering": {
            "centroid": {
                "first_left": {"lo": centroid_lo[0]},
                "second_right": {"lo": centroid_lo[1]},
            }
        },
        "attend_excite": {
            "scales": {
                "5": {"minus_base": {"mean": 0.01, "lo": -0.05}},
                "20": {"minus_base": {"mean": 0.1, "lo": lift_lo}},
            }
        },
        "keys_and_maps": {
            "spearman_key_cosine_vs_failure": spearman[0],
            "spearman_map_iou_vs_failure": spearman[1],
        },
        "text_share": {
            "block0": {"0.9": {"objects": object_share + 0.02}},
            "block1": {"0.9": {"objects": object_share - 0.02}},
        },
    }
    if swap is not None:
        card["swap"] = {
            "held_out_pairs": {
                "sequence_only": {"kept_of_base": swap[0]},
                "pooled_only": {"kept_of_base": swap[1]},
            }
        }
    return card


def test_criteria_hold_only_at_the_issues_thresholds():
    ok = criteria(_card(), {})
    assert all(v["holds"] for v in ok.values()), ok
    assert set(ok) == CRITERIA | {
        "swap_token_sequence_keeps_most",
        "swap_pooled_vector_alone_loses_them",
    }
    assert ok["attend_excite_lift_ci_above_0"]["value"] == 0.02  # the best step size is judged
    assert ok["object_tokens_share_at_high_noise_0.05"]["value"] == pytest.approx(0.06)
    bad = criteria(
        _card(
            held=0.61,
            singles=(1.0, 0.7),
            shares=(1, 1, 0, 2),
            lift_lo=0.0,
            centroid_lo=(0.0, -0.1),
            spearman=(0.29, None),
            object_share=0.049,
            swap=(0.49, 0.26),
        ),
        {},
    )
    assert not any(v["holds"] for v in bad.values()), bad
    assert not criteria(_card(held=0.29), {})["held_out_pairs_0.30_to_0.60"]["holds"]
    low_singles = criteria(_card(singles=(0.85, 0.9)), {})  # each >= 12/16, mean 0.875
    assert low_singles["every_single_concept_12_of_16"]["holds"]
    assert not low_singles["singles_at_least_0.90"]["holds"]
    unet = criteria(_card(swap=None), {})  # no pooled vector: no swap rows
    assert not any(k.startswith("swap") for k in unet)


def test_steered_context_restores_the_processors(tiny_toy_model):
    from sepen.models import load_pipeline

    pipe = load_pipeline(tiny_toy_model)
    before = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    with steered(pipe.unet, lambda side, tokens: torch.zeros(side * side, tokens)):
        inside = pipe.unet.attn_processors
        assert all(isinstance(v, SteeringProcessor) for k, v in inside.items() if ".attn2." in k)
        assert not any(
            isinstance(v, SteeringProcessor) for k, v in inside.items() if ".attn1." in k
        )
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == before


def test_card_cli_on_a_tiny_model_writes_every_section(tmp_path, tiny_toy_model):
    import shutil

    from helpers.toy import write_toy_config

    from sepen.cli.toy.card import cli

    model = tmp_path / "model"
    shutil.copytree(tiny_toy_model, model)
    config = write_toy_config(tmp_path / "c.yaml", model)
    sets = [
        "toy.card.images_per_prompt=2",
        "toy.card.steer_images=2",
        "toy.card.map_images=1",
        "toy.card.attend_excite_images=1",
        "toy.card.attend_excite_scales=[5, 20]",
        "toy.concepts=[circle, square, star]",  # a small world: 3 singles, 2 + 1 pairs
        "toy.held_out_pairs=1",
    ]
    args = ["--config", str(config), "--model", str(model)]
    assert cli(args + sum((["--set", s] for s in sets), [])) == 0
    card = json.loads((model / "world_card.json").read_text())
    assert card["seeds"] == [50000, 50001]
    assert set(card["per_prompt"]["single"]) == {"circle", "square", "star"}
    assert len(card["per_prompt"]["trained_pairs"]) == 2
    assert len(card["steering"]["per_pair"]) == 1 and card["steering"]["images_per_pair"] == 2
    assert card["steering"]["per_pair"][0]["steered"]["n"] == 2
    assert all(
        0 <= r["map_iou"] <= 1 and -1 <= r["key_cosine"] <= 1
        for r in card["keys_and_maps"]["per_pair"]
    )
    assert set(card["attend_excite"]["scales"]) == {"5", "20"}
    centroid = card["steering"]["centroid"]
    assert all(0 <= centroid[k]["steered"] <= 1 and centroid[k]["n"] == 2 for k in centroid)
    shares = card["text_share"]  # a UNet reads only text: the three shares sum to 1
    assert len(shares) == 6 and all(  # the cross-attention layers at 16 and 8 (not mid's 4)
        sum(v[level].values()) == pytest.approx(1, abs=1e-5) and v[level]["image"] == 0
        for v in shares.values()
        for level in ("0.9", "0.6", "0.3")
    )
    assert "swap" not in card  # no pooled text vector in a UNet
    assert set(card["criteria"]) == CRITERIA
    assert cli(["--config", str(config), "--model", str(tmp_path / "nothing")]) == 2


def test_token_groups_cover_every_position_once():
    from sepen.toy.diagnose import token_groups
    from sepen.toy.model import build_tokenizer

    tok = build_tokenizer(max_length=16)
    groups = token_groups(tok, "a photo of a circle and a star", ["circle", "star"])
    # <bos> a photo of a circle and a star <eos> <pad>...
    assert groups == {
        "start": [0],
        "circle": [5],
        "star": [8],
        "words": [1, 2, 3, 4, 6, 7],
        "end": list(range(9, 16)),
    }


def test_key_change_is_the_relative_norm_of_each_changed_tensor(tmp_path, tiny_toy_model):
    from sepen.delta import save_delta
    from sepen.models import load_pipeline
    from sepen.toy.diagnose import key_change

    pipe = load_pipeline(tiny_toy_model)
    name = next(n for n, _ in pipe.unet.named_parameters() if n.endswith("attn2.to_k.weight"))
    w = dict(pipe.unet.named_parameters())[name].detach()
    save_delta(
        tmp_path / "d.safetensors",
        {name: 1.1 * w},
        base_model="m",
        revision=None,
        trainable="to_k",
        config={},
    )
    assert key_change(pipe, tmp_path / "d.safetensors") == {name: pytest.approx(0.1, rel=1e-5)}


@pytest.mark.slow
def test_card_of_the_shipped_v3_model_on_a_few_images(tmp_path):
    """The shipped base model's card, 2 images per prompt: the world's character shows."""
    from pathlib import Path

    from sepen.config import load_config
    from sepen.toy.card import card

    root = Path(__file__).resolve().parents[2]
    config = load_config(
        root / "config/config.yaml",
        [
            "toy.card.images_per_prompt=4",
            "toy.card.steer_images=4",
            "toy.card.map_images=2",
            "toy.card.attend_excite_images=2",
            "toy.card.attend_excite_scales=[5]",
        ],
    )
    result = card(config, str(root / "data/toy_base"), progress=False)
    assert result["seeds"] == [50000, 50003]
    success = {k: v["mean"] for k, v in result["success"].items()}
    # single objects are drawn, held-out pairs fail far more often than trained pairs
    assert success["single"] >= 0.9
    assert success["held_out_pairs"] <= 0.6 < success["single"]
    assert success["held_out_pairs"] < success["trained_pairs"]
    # steering is causal: each object lands on its steered side more often than unsteered
    steer = result["steering"]
    for key in ("first_left", "second_right"):
        assert steer[key]["steered"] >= steer[key]["unsteered"] + 0.2
    # overlapping maps and similar keys go with failing pairs (SD's mechanism)
    km = result["keys_and_maps"]
    assert km["spearman_map_iou_vs_failure"] > 0.3
    assert km["spearman_key_cosine_vs_failure"] > 0.3
    assert result["failing_objects"]["missing_or_merged_share"] >= 0.5


def test_sweep_samples_the_shipped_toy_mmdit_at_other_settings(tmp_path, tiny_toy_model, capsys):
    from pathlib import Path

    from sepen.cli.toy.sweep import cli

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "sweep.json"
    common = ["--config", str(root / "config/toy_mmdit.yaml"), "--out", str(out)]
    quick = ["--set", "toy.card.images_per_prompt=2", "--set", "sampling.steps=4"]
    tries = ["--try", "guidance=2", "--try", "shift=1", "--try", "guidance=3,steps=3"]
    args = common + quick + ["--model", str(root / "data/toy_mmdit_v8")] + tries
    assert cli(args) == 0
    rows = json.loads(out.read_text())["settings"]
    assert [r["setting"] for r in rows] == [
        {"guidance": 2.0, "steps": 4, "shift": 3.0},  # the config's own first
        {"guidance": 2.0, "steps": 4, "shift": 3.0},
        {"guidance": 2.0, "steps": 4, "shift": 1.0},
        {"guidance": 3.0, "steps": 3, "shift": 3.0},
    ]

    def seen(r):
        failing = r["failing_objects"]["counts"]
        return (r["single"]["mean"], r["held_out_pairs"]["mean"], sorted(failing.items()))

    assert seen(rows[0]) == seen(rows[1])  # the same seeds draw the same images
    assert seen(rows[2]) != seen(rows[0])  # the shift reaches the sampler
    for r in rows:
        assert r["single"]["n"] == 16 and r["held_out_pairs"]["n"] == 28
        failing = sum(r["failing_objects"]["counts"].values())
        failed_images = 28 * (1 - r["held_out_pairs"]["mean"])  # each: one or two objects
        assert failed_images - 1e-9 <= failing <= 2 * failed_images + 1e-9
        assert r["failing_objects"]["missing_or_merged_share"] is None or failing > 0
    capsys.readouterr()
    assert cli(common + ["--model", str(tiny_toy_model), "--try", "shift=1"]) == 2
    assert "shift is a flow-matching sampler's setting" in capsys.readouterr().err
    assert cli(common + ["--model", str(tiny_toy_model), "--try", "cfg=2"]) == 2
    assert "'cfg=2' is not KEY=VALUE with KEY one of" in capsys.readouterr().err
