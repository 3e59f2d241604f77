"""Running one step on a tiny toy experiment (helpers.toy.toy_experiment), as the tests do."""

import json


def sample_shard(setup, method="base", extra=()):
    from sepen.cli.sample import cli

    d = setup["dir"]
    out = d / f"{method}.json"
    args = ["--config", str(setup["config"]), "--plan", str(setup["plan_path"])]
    args += ["--method", method, "--images-dir", str(d / method), "--out", str(out)]
    assert cli([*args, "--deltas-dir", str(d / "models"), *extra]) == 0
    return json.loads(out.read_text())


def metrics_shard(method, plan, value):
    rows = [
        {"prompt_id": pid, "seed": s, "success": value(i, s)}
        for i, pid in enumerate(plan["order"])
        for s in plan["seeds"]
    ]
    return {"method": method, "shard": 0, "rows": rows}
