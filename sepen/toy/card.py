"""The world card of a toy base model (`sepen toy card`).

What a base model's world is like, measured before any SepEn number is looked at, on card seeds
that no reported number uses (`toy.card.seed` onwards; the seed ranges: sepen.toy.seeds):

- success of the exact detector per single concept, trained pair and held-out pair, and the
  failure taxonomy of the held-out pairs' failing objects, with how big each kind of failing
  object is drawn against its concept drawn alone (`object_sizes`);
- steering: is the attention causal? One object token's cross-attention logits get +b on the
  left half of the image and -b on the right (the other token the mirror), in every
  cross-attention layer; how often does each object land on its steered side, against the
  same seeds unsteered, by the detector and by the centre of mass of the object's colour
  (sepen.toy.probes: seen where the detector cannot recognise the shape), with a paired CI;
- the text-share probe: per layer and noise level, the image queries' attention on the object
  tokens, the start token and the rest (sepen.toy.probes.text_share); on an SD3-style MMDiT
  also the swap test (the prompt's token sequence with the empty prompt's pooled vector, and
  the reverse);
- per held-out pair, the cosine similarity of the two object tokens' keys (mean over the
  cross-attention layers; an MMDiT's joint blocks, recorded while the map images are drawn:
  its text keys depend on the timestep and the image) and the overlap (soft IoU) of their
  step-averaged attention maps, and how well each predicts the pair's failure rate
  (Spearman's rank correlation);
- Attend-and-Excite at a grid of step sizes on the held-out pairs (the chosen step size is the
  one the evaluation should use);
- the world's acceptance criteria, each with its value (`criteria`: a world that draws every
  concept alone and fails at composition as Stable Diffusion does, through its object tokens).

Writes `world_card.json` beside the model (or --out).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from diffusers import FlowMatchEulerDiscreteScheduler

from sepen.architecture import denoiser_of, family, text_positions
from sepen.errors import SepenError
from sepen.models import load_pipeline
from sepen.sampling import sample_with_maps
from sepen.stats import bootstrap_ci, paired_difference
from sepen.test_time import GuidanceMethod
from sepen.toy.detect import failing_summary, object_sizes
from sepen.toy.evaluate import generate, image_scores, prompt_kinds, rates, to_uint8
from sepen.toy.geometry import drawing_key_cosine, soft_iou, spearman
from sepen.toy.probes import centroid_sides, side_counts, swap_test, text_share
from sepen.toy.seeds import seed_range
from sepen.toy.steering import steered, steering_bias, steering_counts
from sepen.toy.world import prepare_world, prompt_for

log = logging.getLogger("sepen.toy.card")

CARD_FILE = "world_card.json"


def _success(rows) -> list[float]:
    return [r["success"] for r in rows]


def _pair_key(pair) -> str:
    return " + ".join(pair)


SWEEP_KEYS = ("guidance", "shift", "steps")


def parse_setting(text: str) -> dict:
    """One sampling setting of `sepen toy sweep --try`: 'guidance=1.5,steps=40' -> a dict."""
    out = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in SWEEP_KEYS or not value:
            raise SepenError(
                f"--try {text!r}: {part!r} is not KEY=VALUE with KEY one of {list(SWEEP_KEYS)} "
                "(e.g. --try guidance=1.5,steps=40)"
            )
        try:
            number = int(value) if key == "steps" else float(value)
        except ValueError as err:
            raise SepenError(f"--try {text!r}: {key} = {value!r} is not a number") from err
        if number <= 0:
            raise SepenError(f"--try {text!r}: {key} = {value!r} must be above 0")
        out[key] = number
    if not out:
        raise SepenError(f"--try {text!r} sets nothing: give e.g. guidance=1.5")
    return out


def sampling_sweep(config: dict, model: str, settings: Sequence[dict]) -> dict:
    """Single objects and held-out pairs on the card seeds at other sampling settings of the
    same weights: per setting (guidance, shift, steps; each key left out is the config's, the
    first setting is the config's own) the success rates, the weakest concept alone and the
    held-out pairs' failing objects by kind. A shift needs a flow-matching model."""
    toy = prepare_world(config)
    cc, sp = toy["card"], config["sampling"]
    seeds = seed_range(cc["seed"], cc["images_per_prompt"])
    pipe = load_pipeline(model)
    flow = isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    own = {"guidance": float(sp["guidance_scale"]), "steps": int(sp["steps"])}
    if flow:
        own["shift"] = float(pipe.scheduler.config.shift)
    elif any("shift" in s for s in settings):
        raise SepenError(
            f"{model}: a shift is a flow-matching sampler's setting; this model samples with "
            f"{type(pipe.scheduler).__name__}: leave shift out"
        )
    scheduler_config = dict(pipe.scheduler.config)
    kinds = prompt_kinds(toy)
    rows = []
    for setting in [own] + [{**own, **s} for s in settings]:
        if flow:
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
                scheduler_config, shift=setting["shift"]
            )
        row: dict = {"setting": setting}
        for kind in ("single", "held_out_pairs"):
            options = kinds[kind]
            named = [list(c) for c in options for _ in seeds]
            ims = generate(
                pipe,
                [prompt_for(c) for c in options for _ in seeds],
                [s for _ in options for s in seeds],
                setting["steps"],
                setting["guidance"],
                sp["batch_size"],
            )
            success = _success(image_scores(ims, named))
            row[kind] = bootstrap_ci(success)
            if kind == "single":
                n = len(seeds)
                row["weakest_single"] = min(
                    float(np.mean(success[i * n : (i + 1) * n])) for i in range(len(options))
                )
            else:
                row["failing_objects"] = failing_summary(ims, named)
        log.info(
            "sweep %s: singles %.3f (weakest %.2f), held-out pairs %.3f",
            setting,
            row["single"]["mean"],
            row["weakest_single"],
            row["held_out_pairs"]["mean"],
        )
        rows.append(row)
    return {"model": str(model), "seeds": [seeds[0], seeds[-1]], "settings": rows}


def card(config: dict, model: str, progress: bool = True) -> dict:
    """Measure the world card of the toy base model at `model` (see the module doc)."""

    toy = prepare_world(config)
    cc, sp = toy["card"], config["sampling"]
    n, seed0 = cc["images_per_prompt"], cc["seed"]
    seeds = seed_range(seed0, n)
    pipe = load_pipeline(model)
    desc = (lambda text: text) if progress else (lambda text: None)

    def draw(concept_lists, label, seeds=seeds):
        prompts = [prompt_for(c) for c in concept_lists for _ in seeds]
        all_seeds = [s for _ in concept_lists for s in seeds]
        return generate(
            pipe,
            prompts,
            all_seeds,
            sp["steps"],
            sp["guidance_scale"],
            sp["batch_size"],
            desc(label),
        )

    out: dict = {"model": str(model), "seeds": [seed0, seed0 + n - 1], "success": {}}
    per_prompt: dict = {}
    rows_by_kind, images_by_kind = {}, {}
    for kind, options in prompt_kinds(toy).items():
        ims = draw(options, f"card: {kind}")
        named = [list(c) for c in options for _ in seeds]
        rows = image_scores(ims, named)
        rows_by_kind[kind], images_by_kind[kind] = rows, ims
        out["success"][kind] = rates(rows)["success"]
        per_prompt[kind] = {
            _pair_key(c): float(np.mean(_success(rows[i * n : (i + 1) * n])))
            for i, c in enumerate(options)
        }
    out["per_prompt"] = per_prompt
    held = toy.held_out_pairs
    held_named = [list(c) for c in held for _ in seeds]
    out["taxonomy"] = {
        kind: {k: v["mean"] for k, v in rates(rows).items() if k.startswith("fail_")}
        for kind, rows in rows_by_kind.items()
        if kind != "single"
    }
    out["failing_objects"] = failing_summary(images_by_kind["held_out_pairs"], held_named)
    singles = prompt_kinds(toy)["single"]
    out["object_sizes"] = object_sizes(
        images_by_kind["single"],
        [list(c) for c in singles for _ in seeds],
        images_by_kind["held_out_pairs"],
        held_named,
    )

    # does the concept reach the image through the object tokens?
    out["text_share"] = text_share(pipe, held, toy["radius"], seed0)
    if family(pipe) == "sd3":
        swap_seeds = seeds[: cc["swap_images"]]
        out["swap"] = {
            "images_per_prompt": len(swap_seeds),
            "single": swap_test(pipe, prompt_kinds(toy)["single"], swap_seeds, sp),
            "held_out_pairs": swap_test(pipe, held, swap_seeds, sp),
        }

    # steering: first object left, second right, against the same seeds unsteered
    b = cc["steer_strength"]
    steer_seeds = seeds[: cc["steer_images"]]
    steering, sides = [], {"steered": [], "unsteered": []}
    for pair in held:
        prompt = prompt_for(pair)
        pos = text_positions(pipe, prompt, pair)
        plain = draw([pair], None, steer_seeds)

        def bias(side, tokens, pos=pos):
            return steering_bias(side, tokens, pos[0], pos[1], b)

        with steered(denoiser_of(pipe), bias):
            moved = draw([pair], None, steer_seeds)
        moved_sides, plain_sides = centroid_sides(moved, pair), centroid_sides(plain, pair)
        steering.append(
            {
                "pair": _pair_key(pair),
                "steered": steering_counts(moved, pair),
                "unsteered": steering_counts(plain, pair),
                "centroid_steered": side_counts(moved_sides),
                "centroid_unsteered": side_counts(plain_sides),
            }
        )
        sides["steered"] += moved_sides
        sides["unsteered"] += plain_sides
    n_steer = sum(s["steered"]["n"] for s in steering)

    def pooled(which, key):
        return sum(s[which][key] for s in steering) / n_steer

    out["steering"] = {
        "strength": b,
        "images_per_pair": len(steer_seeds),
        "per_pair": steering,
        "first_left": {
            "steered": pooled("steered", "first_left"),
            "unsteered": pooled("unsteered", "first_left"),
        },
        "second_right": {
            "steered": pooled("steered", "second_right"),
            "unsteered": pooled("unsteered", "second_right"),
        },
        "centroid": {  # the colour's centre of mass on the steered side, paired by seed
            which: paired_difference(
                [float(s[k]) for s in sides["steered"]],
                [float(s[k]) for s in sides["unsteered"]],
            )
            | {
                "steered": float(np.mean([s[k] for s in sides["steered"]])),
                "unsteered": float(np.mean([s[k] for s in sides["unsteered"]])),
            }
            for k, which in enumerate(("first_left", "second_right"))
        },
    }

    # keys and step-averaged maps per held-out pair, against the pair's failure rate
    rows = []
    for i, pair in enumerate(held):
        prompt = prompt_for(pair)
        pos = text_positions(pipe, prompt, pair)
        map_seeds = seeds[: cc["map_images"]]
        with drawing_key_cosine(pipe, prompt, pos) as cosine:
            _, maps = sample_with_maps(
                pipe,
                [prompt] * len(map_seeds),
                [pos] * len(map_seeds),
                map_seeds,
                sp["steps"],
                sp["guidance_scale"],
                config["finetune"],
                sp["batch_size"],
                config["finetune"]["token_aggregation"],
            )
        fails = 1.0 - np.mean(_success(rows_by_kind["held_out_pairs"][i * n : (i + 1) * n]))
        rows.append(
            {
                "pair": _pair_key(pair),
                "key_cosine": cosine(),
                "map_iou": float(np.mean([soft_iou(m[0], m[1]) for m in maps])),
                "failure_rate": float(fails),
            }
        )
    fail = [r["failure_rate"] for r in rows]
    out["keys_and_maps"] = {
        "per_pair": rows,
        "spearman_key_cosine_vs_failure": spearman([r["key_cosine"] for r in rows], fail),
        "spearman_map_iou_vs_failure": spearman([r["map_iou"] for r in rows], fail),
    }

    # Attend-and-Excite at a grid of step sizes, on the held-out pairs' first seeds
    ae_seeds = seeds[: cc["attend_excite_images"]]
    base_rows = [
        r
        for i in range(len(held))
        for r in rows_by_kind["held_out_pairs"][i * n : i * n + len(ae_seeds)]
    ]
    grid = {}
    for scale in cc["attend_excite_scales"]:
        ae_cfg = {**config["evaluation"]["attend_excite"], "scale_factor": scale}
        ae = GuidanceMethod.from_config(
            "attend_excite",
            {**config, "evaluation": {**config["evaluation"], "attend_excite": ae_cfg}},
        )
        ims = []
        for pair in held:
            entries = [{"prompt": prompt_for(pair), "concepts": list(pair)}] * len(ae_seeds)
            positions = ae.positions(pipe, entries)
            ims.append(
                to_uint8(ae.sample(pipe, entries, positions, ae_seeds, sp["guidance_scale"]))
            )
        ae_rows = image_scores(np.concatenate(ims), [list(c) for c in held for _ in ae_seeds])
        grid[str(scale)] = {
            "success": bootstrap_ci(_success(ae_rows)),
            "minus_base": paired_difference(_success(ae_rows), _success(base_rows)),
        }
        log.info("A&E scale %s: held-out success %.3f", scale, grid[str(scale)]["success"]["mean"])
    chosen = max(grid, key=lambda s: grid[s]["minus_base"]["mean"])
    out["attend_excite"] = {
        "images_per_pair": len(ae_seeds),
        "base": bootstrap_ci(_success(base_rows)),
        "scales": grid,
        "chosen_scale": float(chosen),
    }
    out["criteria"] = criteria(out, cc)
    return out


SHARE_LEVEL = "0.9"  # the noise level of the text-share criterion: where the layout is decided


def object_share(card: dict, level: str = SHARE_LEVEL) -> float | None:
    """The object tokens' share of the image queries' attention at `level`, mean over layers."""
    layers = card.get("text_share")
    if not layers:
        return None
    return float(np.mean([v[level]["objects"] for v in layers.values()]))


def criteria(card: dict, cc: dict) -> dict:
    """The world's acceptance criteria (docs/mmdit.md, "the card"), each with its measured
    value and whether it holds: every concept drawn alone, composition failing as in Stable
    Diffusion (held-out pairs 0.30-0.60, failing objects mostly missing or merged), the concept
    reaching the image through the object tokens (text share; the swap test on an SD3-style
    MMDiT), attention as a lever (steering by colour centroids and A&E, CIs above 0), and keys
    and maps predicting failure. A measurement the card lacks gives no row."""
    singles = card["per_prompt"]["single"]
    chosen = max(card["attend_excite"]["scales"].values(), key=lambda v: v["minus_base"]["mean"])
    share = card["failing_objects"]["missing_or_merged_share"]
    held = card["success"]["held_out_pairs"]["mean"]
    km = card["keys_and_maps"]
    rows = {
        "every_single_concept_12_of_16": (min(singles.values()), min(singles.values()) >= 0.75),
        "singles_at_least_0.90": (
            card["success"]["single"]["mean"],
            card["success"]["single"]["mean"] >= 0.90,
        ),
        "held_out_pairs_0.30_to_0.60": (held, 0.30 <= held <= 0.60),
        "failing_objects_mostly_missing_or_merged": (share, share is not None and share > 0.5),
        "attend_excite_lift_ci_above_0": (
            chosen["minus_base"]["lo"],
            chosen["minus_base"]["lo"] > 0,
        ),
        "key_cosine_predicts_failure": (
            km["spearman_key_cosine_vs_failure"],
            (km["spearman_key_cosine_vs_failure"] or 0) >= 0.3,
        ),
        "map_overlap_predicts_failure": (
            km["spearman_map_iou_vs_failure"],
            (km["spearman_map_iou_vs_failure"] or 0) >= 0.3,
        ),
    }
    centroid = card["steering"].get("centroid")
    if centroid:
        for which in ("first_left", "second_right"):
            lift = centroid[which]["lo"]
            rows[f"steering_{which}_centroid_lift_ci_above_0"] = (lift, lift > 0)
    objects = object_share(card)
    if objects is not None:
        rows["object_tokens_share_at_high_noise_0.05"] = (objects, objects >= 0.05)
    swap = card.get("swap")
    if swap:
        kept = swap["held_out_pairs"]["sequence_only"]["kept_of_base"]
        lost = swap["held_out_pairs"]["pooled_only"]["kept_of_base"]
        rows["swap_token_sequence_keeps_most"] = (kept, kept is not None and kept >= 0.5)
        rows["swap_pooled_vector_alone_loses_them"] = (lost, lost is not None and lost <= 0.25)
    return {k: {"value": v, "holds": bool(ok)} for k, (v, ok) in rows.items()}
