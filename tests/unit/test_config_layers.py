"""Layered configs: the paper's configs and world v2 extend the default run and list only what
differs from it; layering merges as Snakemake merges a --configfile."""

import copy
from pathlib import Path

import pytest
from snakemake.utils import update_config

from sepen.config import ConfigError, load_config, merge_configs, read_yaml, resolve_extends

ROOT = Path(__file__).resolve().parents[2]
LAYERED = [
    "sd14_pairs",
    "sd14_joint",
    "sd21_pairs",
    "sdxl_pairs",
    "sdxl_joint",
    "toy_v2",
    "test/smoke",
    "test/sdxl_smoke",
    "sd35_pairs",
    "sd35_joint",
    "flux_pairs",
    "flux_joint",
    "toy_mmdit",
    "toy_mmdit_image_queries",
    "toy_mmdit_v7",
    "toy_mmdit_v6",
    "toy_mmdit_v5",
    "toy_mmdit_v4",
    "toy_mmdit_v3",
    "toy_mmdit_v2",
    "test/sd3_smoke",
    "test/flux_smoke",
]


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("anchors", "thresholds"):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("name", LAYERED)
def test_a_layered_config_lists_only_what_differs_from_the_default_run(name):
    """A layered config extends the default run or another layered config (each toy MMDiT
    extends the one before) and lists only what differs from it."""
    raw = read_yaml((ROOT / f"config/{name}.yaml").read_text())
    parent = (ROOT / f"config/{name}.yaml").parent.joinpath(raw["extends"]).resolve()
    layered_files = {(ROOT / f"config/{n}.yaml").resolve() for n in LAYERED}
    assert parent == ROOT / "config/config.yaml" or parent in layered_files
    base = _leaves(load_config(parent))
    own = _leaves({k: v for k, v in raw.items() if k != "extends"})
    same = [k for k, v in own.items() if base.get(k) == v]
    assert same == [], f"{name} repeats the values of {parent.name}: {same}"
    layered = load_config(ROOT / f"config/{name}.yaml")
    for key, value in own.items():  # its own keys win, the rest are the default run's
        assert _leaves(layered)[key] == value
    assert layered["experiment"] == name.split("/")[-1]


def test_the_paper_configs_keep_the_papers_settings():
    pairs = load_config(ROOT / "config/sd14_pairs.yaml")
    ft, ev = pairs["finetune"], pairs["evaluation"]
    assert (ft["mode"], ft["steps"], ft["batch_size"], ft["learning_rate"]) == (
        "pairs",
        200,
        4,
        2e-6,
    )
    assert (ev["images_per_prompt"], ev["sets"], ev["attend_excite"]["scale_factor"]) == (
        64,
        [],
        20,
    )
    assert pairs["sampling"]["steps"] == 50 and pairs["sampling"]["guidance_scale"] == 6.0
    joint = load_config(ROOT / "config/sd14_joint.yaml")["finetune"]
    assert (joint["mode"], joint["steps"], joint["norm_loss"]) == ("joint", 10000, True)
    xl = load_config(ROOT / "config/sdxl_pairs.yaml")
    assert xl["report"]["anchors"] == {} and xl["evaluation"]["methods"] == [
        "base",
        "sepen",
        "attend_excite",
        "sepen_test_time",
    ]


def test_layering_merges_as_snakemake_merges_a_configfile():
    base = {"a": {"b": 1, "c": [1, 2], "d": {"e": 1}}, "f": 1}
    top = {"a": {"c": [3], "d": {"g": 2}}, "f": None, "h": "x"}
    expected = copy.deepcopy(base)
    update_config(expected, top)
    assert merge_configs(base, top) == expected
    assert base["a"]["c"] == [1, 2]  # the inputs stay as they were


def test_extends_errors_name_the_value_and_the_fix(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="makes a cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="extends = 'nowhere.yaml' names no file"):
        load_config(tmp_path / "c.yaml")
    assert resolve_extends({"experiment": "x"}, tmp_path) == {"experiment": "x"}


def test_snakemake_command_line_strings_are_read_as_the_schema_types():
    from snakemake.cli import parse_config

    from sepen.config import coerce_strings, validate_config

    given = parse_config(
        [
            "toy={pretrain: {run: true, steps: 12}, radius: [6, 8.5]}",
            "evaluation={images_per_prompt: 8, sets: [single]}",
            "sampling={dtype: float32, guidance_scale: 3}",
            "finetune={blocks: null, learning_rate: 1e-5}",
        ]
    )
    assert given["toy"]["pretrain"]["run"] == "true"  # what Snakemake hands over
    config = coerce_strings(given)
    assert config["toy"]["pretrain"] == {"run": True, "steps": 12}
    assert config["toy"]["radius"] == [6, 8.5]
    assert config["evaluation"] == {"images_per_prompt": 8, "sets": ["single"]}
    assert config["sampling"] == {"dtype": "float32", "guidance_scale": 3}
    assert config["finetune"] == {"blocks": None, "learning_rate": 1e-5}
    validate_config(config)
    # a string the schema allows stays one; a value of no allowed type stays and is named
    assert coerce_strings({"experiment": "12"}) == {"experiment": "12"}
    bad = coerce_strings({"evaluation": {"images_per_prompt": "many"}})
    with pytest.raises(ConfigError, match="images_per_prompt = 'many'"):
        validate_config(bad)
