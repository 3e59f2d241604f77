"""The plan: concept lists, prompt sets, seeds, models and shards (sepen.plan)."""

import json
import re
from pathlib import Path

import pytest

from sepen.config import load_config
from sepen.errors import ConfigError, SepenError
from sepen.plan import build_plan, concept_lists, find_concepts, shard_prompts, slugify

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _in_project(monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name data files relative to the project


def test_slugify_is_file_safe_and_tells_apart_texts_that_differ_in_case_or_punctuation():
    names = [slugify(t) for t in ["A photo of a cat/dog", "a photo of a cat dog", "a " * 80]]
    assert len(set(names)) == 3
    assert all(re.fullmatch(r"[a-z0-9-]+_[0-9a-f]{8}", n) and len(n) <= 69 for n in names)
    assert names[0].startswith("a-photo-of-a-cat-dog_")
    assert slugify("a photo of a cat/dog") != slugify("a photo of a cat-dog")


def test_find_concepts_takes_whole_words_in_order_and_longer_names_first():
    vocab = ["glass", "wine glass", "cat", "car"]
    assert find_concepts("a wine glass and a cat", vocab) == ["wine glass", "cat"]
    assert find_concepts("a catalog next to a scar", vocab) == []
    assert find_concepts("a Cat with a glass", vocab) == ["cat", "glass"]


def test_attend_excite_plan_has_276_prompts_64_seeds_and_one_model_per_concept_pair():
    plan = build_plan(load_config("config/sd14_pairs.yaml"))
    assert {k: len(v) for k, v in plan["sets"].items()} == {
        "animals": 66,
        "animals_objects": 144,
        "objects": 66,
    }
    assert len(plan["order"]) == 276 and plan["seeds"] == list(range(64))
    pairs = {tuple(p["concepts"]) for p in plan["prompts"].values()}
    assert len(plan["models"]) == len(pairs)
    assert all(len(p["concepts"]) == 2 for p in plan["prompts"].values())
    entry = plan["prompts"][slugify("a monkey and a red car")]
    assert entry["concepts"] == ["monkey", "car"]
    assert plan["models"][entry["model"]] == {"concepts": ["monkey", "car"]}


def test_large_scale_plan_sorts_test_prompts_by_seen_and_unseen_concepts():
    config = load_config("config/sd14_joint.yaml")
    concepts = concept_lists(config)
    assert len(concepts["splits"]["seen"]) == 200 and len(concepts["splits"]["unseen"]) == 20
    plan = build_plan(config, concepts)
    assert {k: len(v) for k, v in plan["sets"].items()} == {
        "seen_seen": 100,
        "seen_unseen": 80,
        "unseen_unseen": 20,
    }
    seen = set(concepts["splits"]["seen"])
    for name, expected in [("seen_seen", 2), ("seen_unseen", 1), ("unseen_unseen", 0)]:
        for pid in plan["sets"][name]:
            assert sum(c in seen for c in plan["prompts"][pid]["concepts"]) == expected
    assert list(plan["models"]) == ["joint"]
    assert plan["models"]["joint"]["concepts"] == concepts["splits"]["seen"]


def test_toy_plan_has_single_trained_and_held_out_sets_from_the_world_split():
    from sepen.toy.world import pair_split

    config = load_config("config/config.yaml", ["evaluation.sets=[]"])  # every set
    plan = build_plan(config)
    toy = config["toy"]
    trained, held = pair_split(toy["concepts"], toy["held_out_pairs"], toy["split_seed"])
    assert {k: len(v) for k, v in plan["sets"].items()} == {
        "single": 8,
        "trained_pairs": len(trained),
        "held_out_pairs": len(held),
        "model_singles": 2 * (len(trained) + len(held)),  # each pair model's two objects
    }
    default = build_plan(load_config("config/config.yaml"))  # the default run's sets
    assert {k: len(v) for k, v in default["sets"].items()} == {
        "single": 8,
        "held_out_pairs": len(held),
        "model_singles": 2 * len(held),
    }
    held_concepts = [plan["prompts"][p]["concepts"] for p in plan["sets"]["held_out_pairs"]]
    assert held_concepts == held
    assert plan["seeds"] == list(range(config["evaluation"]["images_per_prompt"]))


def test_prompt_naming_fewer_than_two_known_concepts_is_rejected_with_the_prompt(tmp_path):
    data = tmp_path / "ae.yaml"
    data.write_text(
        "vocabulary: {animals: [cat, dog], objects: [car]}\n"
        "prompts: {animals: ['a cat and a dog', 'a cat and a hippo']}\n"
    )
    config = load_config(
        None, ["evaluation.prompts=attend_excite", f"evaluation.prompt_file={data}"]
    )
    with pytest.raises(ConfigError, match="'a cat and a hippo'.*fewer than two"):
        build_plan(config)


def test_unknown_prompt_set_and_missing_data_file_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown prompt sets \['animal'\]"):
        build_plan(load_config("config/sd14_pairs.yaml", ["evaluation.sets=[animal]"]))
    with pytest.raises(ConfigError, match="nope.yaml' does not exist"):
        build_plan(load_config(None, [f"evaluation.prompt_file={tmp_path}/nope.yaml"]))


def test_shards_split_the_prompts_without_overlap_or_loss():
    plan = build_plan(load_config("config/sd14_pairs.yaml"))
    shards = [shard_prompts(plan, k, 8) for k in range(8)]
    flat = [p for s in shards for p in s]
    assert sorted(flat) == sorted(plan["order"]) and len(flat) == len(set(flat))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(SepenError, match="shard 8 is outside 0..7"):
        shard_prompts(plan, 8, 8)


def test_concepts_and_prompts_commands_write_the_plan(tmp_path):
    from sepen.__main__ import main

    concepts, prompts = tmp_path / "c.json", tmp_path / "p.json"
    assert main(["concepts", "--config", "config/config.yaml", "--out", str(concepts)]) == 0
    args = ["prompts", "--config", "config/config.yaml", "--concepts", str(concepts)]
    assert main([*args, "--out", str(prompts)]) == 0
    plan = json.loads(prompts.read_text())
    assert plan == build_plan(load_config("config/config.yaml"))
    assert (
        main(
            [
                "prompts",
                "--config",
                "config/config.yaml",
                "--concepts",
                "nope.json",
                "--out",
                str(prompts),
            ]
        )
        == 2
    )


def test_the_workflow_builds_its_plan_without_importing_torch():
    """The Snakefile builds the plan at parse time: torch's import (seconds) must stay out of it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from sepen.config import load_config\n"
        "from sepen.plan import build_plan\n"
        "import sepen.workflow\n"
        "for path in ('config/config.yaml', 'config/sd14_joint.yaml'):\n"
        "    assert build_plan(load_config(path))['order']\n"
        "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
