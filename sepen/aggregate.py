"""Per-prompt, per-set and overall metrics with bootstrap 95% CIs.

Every method is sampled with the same prompts and seeds, so each method's difference to the
base model is paired per (prompt, seed) and bootstrapped as such.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from sepen.atomic import write_text
from sepen.errors import SepenError
from sepen.plan import method_prompts
from sepen.stats import bootstrap_ci, paired_difference

OVERALL = "overall"


def collect(shards: list[dict]) -> dict[str, dict[tuple[str, int], dict]]:
    """Rows by method, keyed by (prompt id, seed); a repeated image is an error."""
    out: dict[str, dict] = {}
    for shard in shards:
        rows = out.setdefault(shard["method"], {})
        for r in shard["rows"]:
            key = (r["prompt_id"], int(r["seed"]))
            if key in rows:
                raise SepenError(f"image {key} of method {shard['method']!r} appears twice")
            rows[key] = {k: v for k, v in r.items() if k not in ("prompt_id", "seed")}
    return out


def _values(rows: dict, keys: list, metric: str) -> list[float]:
    return [float(rows[k][metric]) for k in keys]


def aggregate(plan: dict, rows: dict[str, dict], n_boot: int = 2000, ae_sets=()) -> dict:
    """{'methods', 'metrics', 'sets': {set: {method: {metric: ci}}},
    'differences': {set: {method: {metric: ci}}}, 'prompts': {...}}; 'overall' is a set."""
    methods = list(rows)
    if not methods:
        raise SepenError("no metric rows to aggregate: list the shards' metric files")
    metrics = sorted(  # numbers only: captions and other per-image records are not averaged
        {m for r in rows[methods[0]].values() for m, v in r.items() if isinstance(v, int | float)}
    )
    sets = dict(plan["sets"])
    sets[OVERALL] = plan["order"]
    for method, r in rows.items():
        ids = method_prompts(plan, method, ae_sets)
        expected = {(pid, s) for pid in ids for s in plan["seeds"]}
        if set(r) != expected:
            raise SepenError(
                f"method {method!r} has {len(r)} scored images, the plan has {len(expected)}: "
                f"score every shard before aggregating"
            )
    out: dict = {
        "methods": methods,
        "metrics": metrics,
        "sets": {},
        "differences": {},
        "prompts": {},
    }
    for name, pids in sets.items():
        keys = [(pid, s) for pid in pids for s in plan["seeds"]]
        present = [m for m in methods if all(k in rows[m] for k in keys)]  # A&E: pair sets
        out["sets"][name] = {
            m: {k: bootstrap_ci(_values(rows[m], keys, k), n_boot=n_boot) for k in metrics}
            for m in present
        }
        if "base" in present:
            out["differences"][name] = {
                m: {
                    k: paired_difference(
                        _values(rows[m], keys, k), _values(rows["base"], keys, k), n_boot=n_boot
                    )
                    for k in metrics
                }
                for m in present
                if m != "base"
            }
    for pid in plan["order"]:
        keys = [(pid, s) for s in plan["seeds"]]
        out["prompts"][pid] = {
            "prompt": plan["prompts"][pid]["prompt"],
            **{
                m: {k: float(np.mean(_values(rows[m], keys, k))) for k in metrics}
                for m in methods
                if keys[0] in rows[m]
            },
        }
    return out


def sampling_cost(manifests: list[dict]) -> dict:
    """{method: images drawn, seconds, images/s and time per image relative to base}, from the
    sampling shards' manifests (images kept from an earlier run are not counted). The metric
    files do not carry these times, so that they stay byte-identical from run to run."""
    cost: dict = {}
    for manifest in manifests:
        entry = cost.setdefault(manifest["method"], {"images": 0, "seconds": 0.0})
        entry["images"] += int(manifest.get("drawn", 0))
        entry["seconds"] += float(manifest.get("seconds", 0.0))
    for entry in cost.values():
        entry["images_per_s"] = entry["images"] / entry["seconds"] if entry["seconds"] else None
    base = cost.get("base", {}).get("images_per_s")
    for entry in cost.values():
        rate = entry["images_per_s"]
        entry["x_base_time"] = base / rate if base and rate else None
    return cost


def summary_rows(result: dict) -> list[dict]:
    """One row per prompt set and method (and '<method>-base' difference): each metric's mean
    and CI bounds, for `dvc plots` and spreadsheets."""
    rows = []
    for name, by_method in result["sets"].items():
        entries = list(by_method.items())
        entries += [(f"{m}-base", v) for m, v in result["differences"].get(name, {}).items()]
        for m, values in entries:
            row = {"set": name, "method": m, "group": f"{name}/{m}"}
            for k, ci in values.items():
                row.update({k: ci["mean"], f"{k}_lo": ci["lo"], f"{k}_hi": ci["hi"]})
            rows.append(row)
    return rows


def dvc_metrics(result: dict) -> dict:
    """Compact nested means for `dvc metrics show`: {set: {method: {metric: mean}}}."""
    out: dict = {}
    for name, by_method in result["sets"].items():
        out[name] = {
            m: {k: round(v["mean"], 4) for k, v in vals.items()} for m, vals in by_method.items()
        }
        for m, vals in result["differences"].get(name, {}).items():
            out[name][f"{m}-base"] = {k: round(v["mean"], 4) for k, v in vals.items()}
    if result.get("fid"):
        out["fid"] = {m: round(v["fid"], 3) for m, v in result["fid"].items()}
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["set"])
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())
