"""`sepen toy premise` on the tiny toy model."""

import json

from sepen.config import load_config


def test_premise_step_measures_base_and_sepen_on_the_plans_pair_prompts(toy_setup):
    from sepen.cli.toy.premise import cli
    from sepen.delta import save_delta, unet_delta_tensors
    from sepen.models import load_pipeline
    from sepen.trainable import prepare_trainable, trainable_layers

    d = toy_setup["dir"]
    base = load_pipeline(load_config(toy_setup["config"])["model"]["pretrained"])
    prepare_trainable(base.unet, trainable_layers(base.unet, [], True), "to_k")
    save_delta(
        d / "models" / "joint.safetensors",
        unet_delta_tensors(base.unet, "to_k"),
        base_model="base",
        revision=None,
        trainable="to_k",
        config={},
    )
    args = ["--config", str(toy_setup["config"]), "--plan", str(toy_setup["plan_path"])]
    args += ["--set", "toy.premise_images=2", "--out", str(d / "premise.json")]
    assert cli([*args, "--deltas-dir", str(d / "models")]) == 0
    premise = json.loads((d / "premise.json").read_text())
    assert premise["images_per_prompt"] == 2 and set(premise["methods"]) == {"base", "sepen"}
    base_, same = (premise["methods"][m]["held_out_pairs"] for m in ("base", "sepen"))
    assert base_["images"] == 4  # 2 prompts x 2 seeds
    # the delta holds the base weights: the same records. The tiny model draws nothing the
    # detector finds, so the shares and AUCs are empty here; their values are checked on the
    # shipped model in test_premise.py
    assert same == base_
    assert base_["objects_found"] == 0 and base_["own"] is None and base_["failures"] == 4
