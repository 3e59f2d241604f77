"""`sepen metrics` and `sepen fid` on the tiny toy model."""

import json

import numpy as np
import pytest
from PIL import Image

from sepen.errors import SepenError


def test_toy_detection_metric_scores_rendered_scenes_exactly(toy_setup):
    from sepen.metrics import build_metrics, shard_metrics
    from sepen.toy.world import place, render

    plan = toy_setup["plan"]
    rng = np.random.default_rng(0)
    images = []
    for k, pid in enumerate(plan["order"]):
        concepts = plan["prompts"][pid]["concepts"]
        shown = concepts if k == 0 else concepts[:1]  # the second prompt misses an object
        path = toy_setup["dir"] / f"{k}.png"
        Image.fromarray(render(place(rng, shown))).save(path)
        images.append({"prompt_id": pid, "seed": 0, "path": str(path)})
    metrics = build_metrics(["toy_detection"], {})
    rows = shard_metrics({"images": images}, plan, metrics)
    assert [(r["success"], r["hit_rate"], r["spurious"]) for r in rows] == [
        (1.0, 1.0, 0.0),
        (0.0, 0.5, 0.0),
    ]
    with pytest.raises(SepenError, match="unknown metrics"):
        build_metrics(["fid"], {})


def test_fid_without_a_reference_folder_names_the_key(toy_setup, capsys):
    from sepen.__main__ import main

    manifest = toy_setup["dir"] / "m.json"
    manifest.write_text(json.dumps({"method": "base", "shard": 0, "images": []}))
    args = ["fid", "--config", str(toy_setup["config"]), "--manifests", str(manifest)]
    assert main([*args, "--out", str(toy_setup["dir"] / "f.json")]) == 2
    assert "evaluation.fid.reference is not set" in capsys.readouterr().err
    missing = ["--set", f"evaluation.fid.reference={toy_setup['dir']}/real"]
    assert main([*args, *missing, "--out", str(toy_setup["dir"] / "f.json")]) == 2
    assert "real' does not exist" in capsys.readouterr().err
