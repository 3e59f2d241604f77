"""Toy pretraining that survives a stop, and world v3's pretraining options."""

import copy
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers.toy import TINY_TOY
from safetensors.torch import load_file

from sepen.config import validate_config
from sepen.errors import SepenError
from sepen.toy.grounding import grounded
from sepen.toy.pretrain import pretrain, world_settings
from sepen.toy.world import Placed, prepare_world, scene_batch

PARTS = (
    "unet/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
)


def v3_config(steps=8, every=3, **toy):
    cfg = copy.deepcopy(TINY_TOY)
    cfg["toy"]["pretrain"].update(
        steps=steps, checkpointing_steps=every, grounding=1.0, grounding_images="single"
    )
    cfg["toy"]["model"]["text_layers"] = 1
    cfg["toy"].update({"one_name_fraction": 0.5, "pair_fraction": 0.5, **toy})
    return validate_config(cfg)


def weights(folder):
    return {part: load_file(str(folder / part)) for part in PARTS}


def same_weights(a, b) -> bool:
    wa, wb = weights(a), weights(b)
    return all(torch.equal(wa[p][k], wb[p][k]) for p in PARTS for k in wa[p])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    pretrain(v3_config(), root / "full", progress=False, state_dir=root / "full.state")
    return root


def test_a_stopped_pretraining_resumed_from_latest_equals_an_uninterrupted_run(
    tmp_path, uninterrupted
):
    config = v3_config()
    state = tmp_path / "run.state"
    assert pretrain(config, tmp_path / "run", progress=False, state_dir=state, stop_after=5) is None
    assert not (tmp_path / "run").exists()  # stopped: no model written
    assert sorted(p.name for p in state.iterdir()) == [
        "checkpoint-0",
        "checkpoint-3",
        "checkpoint-5",
    ]
    pretrain(config, tmp_path / "run", progress=False, state_dir=state, resume="latest")
    assert same_weights(tmp_path / "run", uninterrupted / "full")
    assert sorted(p.name for p in state.iterdir()) == [
        "checkpoint-0",
        "checkpoint-3",
        "checkpoint-5",
        "checkpoint-6",
        "checkpoint-8",
    ]
    summary = json.loads((tmp_path / "run" / "sepen_toy.json").read_text())
    assert summary["step"] == 8


def test_until_writes_the_model_of_a_chosen_checkpoint(tmp_path, uninterrupted):
    from sepen.toy.checkpoints import WEIGHTS

    state = uninterrupted / "full.state"
    pretrain(
        v3_config(), tmp_path / "at3", progress=False, state_dir=state, resume="latest", until=3
    )
    stored = load_file(str(state / "checkpoint-3" / WEIGHTS))
    unet = load_file(str(tmp_path / "at3" / PARTS[0]))
    assert all(torch.equal(unet[k], stored[f"unet.{k}"]) for k in unet)
    final = load_file(str(uninterrupted / "full" / PARTS[0]))
    assert not all(torch.equal(unet[k], final[k]) for k in unet)  # step 3 is not step 8
    assert json.loads((tmp_path / "at3" / "sepen_toy.json").read_text())["step"] == 3


def test_resume_skips_an_incomplete_checkpoint_and_ignores_other_settings(tmp_path):
    from sepen.toy.checkpoints import WEIGHTS, find_checkpoint

    config = v3_config()
    state = tmp_path / "s"
    pretrain(config, tmp_path / "m", progress=False, state_dir=state, stop_after=6)
    (state / "checkpoint-6" / WEIGHTS).write_bytes(b"cut short")
    settings = world_settings(prepare_world(config))
    assert find_checkpoint(state, "latest", settings).name == "checkpoint-3"
    other = world_settings(prepare_world(v3_config(one_name_fraction=0.1)))
    assert find_checkpoint(state, "latest", other) is None
    with pytest.raises(SepenError, match="other toy settings"):
        find_checkpoint(state, str(state / "checkpoint-3"), other)
    with pytest.raises(SepenError, match="cannot be resumed"):
        find_checkpoint(state, str(state / "checkpoint-6"), settings)
    # a hidden, half-written checkpoint is removed when the run starts again
    (state / ".checkpoint-9.tmp").mkdir()
    pretrain(config, tmp_path / "m", progress=False, state_dir=state, resume="latest")
    assert not (state / ".checkpoint-9.tmp").exists()
    assert (tmp_path / "m" / "sepen_toy.json").is_file()


def test_checkpointing_settings_are_not_world_settings():
    a = world_settings(prepare_world(v3_config(every=3)))
    b = world_settings(prepare_world(v3_config(every=5)))
    assert a == b
    assert a != world_settings(prepare_world(v3_config(one_name_fraction=0.2)))


def test_a_longer_training_starts_from_the_init_models_weights(tmp_path, uninterrupted):
    """toy.pretrain.init: the second run starts from the first run's model (its autoencoder is
    not trained again), trains its own steps, and records where it started."""
    first = uninterrupted / "full"
    config = v3_config(steps=2)
    config["toy"]["pretrain"].update(init=str(first), seed=1, vae_steps=50)
    start = tmp_path / "start.state"
    assert pretrain(config, tmp_path / "x", progress=False, state_dir=start, stop_after=0) is None
    from sepen.toy.checkpoints import WEIGHTS

    stored = load_file(str(start / "checkpoint-0" / WEIGHTS))  # before the first step
    for part, prefix in zip(PARTS, ("unet", "text_encoder", "vae")):
        saved = load_file(str(first / part))
        assert all(torch.equal(stored[f"{prefix}.{k}"], saved[k]) for k in saved)
    pretrain(config, tmp_path / "second", progress=False, state_dir=start, resume="latest")
    a, b = weights(tmp_path / "second"), weights(first)
    vae = PARTS[2]
    assert all(torch.equal(a[vae][k], b[vae][k]) for k in a[vae])  # not trained again
    assert not all(torch.equal(a[PARTS[0]][k], b[PARTS[0]][k]) for k in a[PARTS[0]])
    summary = json.loads((tmp_path / "second" / "sepen_toy.json").read_text())
    assert (summary["step"], summary["init_step"]) == (2, 8)
    assert summary["config"]["pretrain"]["init"] == str(first)
    assert "init" not in json.loads((first / "sepen_toy.json").read_text())["config"]["pretrain"]


def test_an_init_model_of_another_world_or_no_model_is_refused_before_any_work(
    tmp_path, uninterrupted
):
    config = v3_config(one_name_fraction=0.2)
    config["toy"]["pretrain"]["init"] = str(uninterrupted / "full")
    with pytest.raises(SepenError, match="of another world: its toy.one_name_fraction is 0.5"):
        pretrain(config, tmp_path / "x", progress=False, state_dir=tmp_path / "s")
    config["toy"]["pretrain"]["init"] = str(tmp_path)
    with pytest.raises(SepenError, match="is not a toy base model"):
        pretrain(config, tmp_path / "x", progress=False, state_dir=tmp_path / "s")
    assert not (tmp_path / "s").exists() and not (tmp_path / "x").exists()


def test_a_longer_training_may_give_pairs_and_concepts_other_shares_without_changing_the_world(
    tmp_path, uninterrupted, monkeypatch
):
    """toy.pretrain.pair_fraction / concept_weights: this run's share of pair scenes and of each
    concept; the world (and so the init check) keeps toy.pair_fraction, and a run that leaves
    them null has the settings of before."""
    import sepen.toy.pretrain as pretraining

    shares = []

    def recording(rng, n, concepts, pairs, pair_fraction, *args, **kwargs):
        shares.append((pair_fraction, kwargs["concept_weights"]))
        return scene_batch(rng, n, concepts, pairs, pair_fraction, *args, **kwargs)

    monkeypatch.setattr(pretraining, "scene_batch", recording)
    config = v3_config(steps=2)
    before = world_settings(prepare_world(config))["pretrain"]
    assert "pair_fraction" not in before and "concept_weights" not in before
    config["toy"]["pretrain"].update(
        init=str(uninterrupted / "full"), pair_fraction=0.9, concept_weights={"star": 3.0}
    )
    pretrain(config, tmp_path / "more", progress=False, state_dir=tmp_path / "s")
    assert shares == [(0.9, {"star": 3.0})] * 2  # the world's toy.pair_fraction is 0.5
    summary = json.loads((tmp_path / "more" / "sepen_toy.json").read_text())
    assert summary["config"]["pair_fraction"] == 0.5
    assert summary["config"]["pretrain"]["pair_fraction"] == 0.9
    assert summary["config"]["pretrain"]["concept_weights"] == {"star": 3.0}


def test_until_outside_the_schedule_is_refused_before_any_work(tmp_path):
    with pytest.raises(SepenError, match="--until 9 is outside 1..8"):
        pretrain(v3_config(), tmp_path / "x", progress=False, state_dir=tmp_path / "s", until=9)
    assert not (tmp_path / "s").exists() and not (tmp_path / "x").exists()


def test_one_name_captions_name_one_of_the_two_drawn_objects():
    rng = np.random.default_rng(0)
    pairs = [["circle", "star"]]
    images, prompts, named, layouts = scene_batch(
        rng, 400, ["circle", "star"], pairs, 1.0, (6, 8), one_name_fraction=0.3
    )
    one = [i for i, n in enumerate(named) if len(n) == 1]
    assert 0.2 < len(one) / 400 < 0.4
    for i in one:
        assert len(layouts[i]) == 2 and named[i][0] == layouts[i][0].concept
        assert prompts[i] == f"a photo of a {named[i][0]}"
    # fraction 0 draws exactly the stream of earlier versions (their models stay reproducible)
    a = scene_batch(np.random.default_rng(1), 50, ["circle", "star"], pairs, 0.5, (6, 8))
    b = scene_batch(
        np.random.default_rng(1), 50, ["circle", "star"], pairs, 0.5, (6, 8), one_name_fraction=0.0
    )
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]


def test_grounding_reads_only_fully_named_images_and_with_single_only_one_object_images():
    one = [Placed("circle", 8, 8, 6)]
    two = one + [Placed("star", 24, 24, 6)]
    assert grounded(["circle"], one, "single") and grounded(["circle"], one, "all")
    assert not grounded(["circle", "star"], two, "single")
    assert grounded(["circle", "star"], two, "all")
    assert not grounded(["circle"], two, "all")  # a caption naming one of two objects


def test_pretrain_cli_resumes_latest(tmp_path):
    import yaml

    cfg = copy.deepcopy(TINY_TOY)
    cfg["toy"]["pretrain"].update(steps=4, checkpointing_steps=2)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "sepen", "toy", "pretrain", "--config", str(config)]
    out = tmp_path / "m"
    r = subprocess.run(
        cmd + ["--out", str(out), "--stop-after", "2"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert not out.exists() and (tmp_path / "m.state" / "checkpoint-2").is_dir()
    r = subprocess.run(
        cmd + ["--out", str(out), "--resume", "latest"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr and (out / "model_index.json").is_file()
    shutil.rmtree(out)


def test_concept_weights_draw_the_weighted_concepts_and_their_pairs_more_often():
    concepts = ["circle", "star", "cross"]
    pairs = [["circle", "star"], ["circle", "cross"]]
    rng = np.random.default_rng(0)
    _, _, named, layouts = scene_batch(
        rng, 3000, concepts, pairs, 0.4, (6, 8), concept_weights={"star": 4.0}
    )
    singles = [n[0] for n in named if len(n) == 1]
    share = {c: singles.count(c) / len(singles) for c in concepts}
    assert abs(share["star"] - 4 / 6) < 0.04 and abs(share["circle"] - 1 / 6) < 0.03
    two = [sorted(n) for n in named if len(n) == 2]
    # a pair in proportion to its weights' mean: circle+star 2.5, circle+cross 1
    assert abs(two.count(["circle", "star"]) / len(two) - 2.5 / 3.5) < 0.04
    assert all(len(p) == len(n) for p, n in zip(layouts, named))
    # None draws exactly the stream of earlier versions (their models stay reproducible)
    a = scene_batch(np.random.default_rng(1), 50, concepts, pairs, 0.5, (6, 8))
    b = scene_batch(
        np.random.default_rng(1), 50, concepts, pairs, 0.5, (6, 8), concept_weights=None
    )
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]


def test_concept_weights_of_another_world_are_refused_before_any_work(tmp_path):
    config = v3_config()
    config["toy"]["concepts"] = ["circle", "square", "triangle"]
    config["toy"]["held_out_pairs"] = 1
    config["toy"]["pretrain"]["concept_weights"] = {"star": 2.0}
    with pytest.raises(SepenError, match="concept_weights names star, not a concept of this"):
        pretrain(config, tmp_path / "x", progress=False, state_dir=tmp_path / "s")
    assert not (tmp_path / "s").exists() and not (tmp_path / "x").exists()
