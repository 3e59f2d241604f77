"""`sepen aggregate`: per-set rates with CIs and paired differences; bad shards."""

import pytest
from helpers.steps import metrics_shard

from sepen.aggregate import aggregate, collect, dvc_metrics, summary_rows
from sepen.errors import SepenError


def test_aggregate_gives_per_set_rates_and_paired_differences_to_base(toy_setup):
    plan = toy_setup["plan"]
    base = metrics_shard("base", plan, lambda i, s: float(s == 0))  # half the images succeed
    sepen = metrics_shard("sepen", plan, lambda i, s: 1.0)
    result = aggregate(plan, collect([base, sepen]), n_boot=200)
    overall = result["sets"]["overall"]
    assert overall["base"]["success"]["mean"] == 0.5 and overall["sepen"]["success"]["mean"] == 1
    diff = result["differences"]["held_out_pairs"]["sepen"]["success"]
    assert diff["mean"] == 0.5 and diff["n"] == 4
    assert 0 <= diff["lo"] <= 0.5 <= diff["hi"] <= 1
    assert dvc_metrics(result)["overall"]["sepen-base"]["success"] == 0.5
    rows = summary_rows(result)
    assert {r["group"] for r in rows} >= {"overall/base", "overall/sepen", "overall/sepen-base"}
    prompt = result["prompts"][plan["order"][0]]
    assert prompt["base"]["success"] == 0.5


def test_aggregate_rejects_missing_or_repeated_images(toy_setup):
    plan = toy_setup["plan"]
    partial = metrics_shard("base", plan, lambda i, s: 1.0)
    partial["rows"] = partial["rows"][:-1]
    with pytest.raises(SepenError, match="3 scored images, the plan has 4"):
        aggregate(plan, collect([partial]))
    with pytest.raises(SepenError, match="appears twice"):
        collect([partial, partial])
