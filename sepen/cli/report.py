"""`sepen report <figure>`: the report's tables and figures (embedded by `snakemake --report`).

- `table`: the headline, then metrics per prompt set and method (success first, then the
  failure kinds) with 95% CIs and paired differences to the base model; the toy world's card,
  premise check and settings study when given.
- `landing`: the report's landing text, the headline numbers first.
- `grid`: sample images, the same seeds side by side for every method.
- `taxonomy`: why images fail (missing, too small, merged, wrong shape, spurious), per prompt
  set and method.
- `losses`: SepEn loss curves.
- `attention`: object-token cross-attention maps before and after finetuning.
- `concepts`: the toy world's concepts, each drawn alone.
- `numbers`: a run's metrics and premise in one file, the source the docs render their
  numbers from (sepen.docs_numbers; data/toy_base/default_run.json is the default run's).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sepen.artifacts import read_json, read_manifest, shard_files
from sepen.atomic import write_bytes, write_text
from sepen.command import add_config_options, add_deprecated, command_parser, config_from, run_step
from sepen.errors import SepenError
from sepen.plan import read_plan
from sepen.report.attention_maps import attention_figure, attention_rows
from sepen.report.figures import (
    card_figure,
    concepts_figure,
    loss_figure,
    mean_losses_csv,
    png,
    sample_grid,
    taxonomy_figure,
)
from sepen.report.tables import landing_text, table_page


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("sepen report", "The report's tables and figures.")
    sub = p.add_subparsers(dest="figure", required=True, metavar="PART")
    shared = {required: argparse.ArgumentParser(add_help=False) for required in (False, True)}
    for required, parent in shared.items():
        add_config_options(parent, required)

    def part(name: str, text: str, config_required: bool = False) -> argparse.ArgumentParser:
        parents = [shared[config_required]]
        return sub.add_parser(name, parents=parents, help=text, description=text)

    t = part("table", "metrics table (HTML); the paper's numbers from report.anchors")
    t.add_argument("--metrics", type=Path, required=True, help="results of `sepen aggregate`")
    t.add_argument("--premise", type=Path, help="results of `sepen toy premise`")
    t.add_argument("--study", type=Path, help="study.json of `sepen toy study`")
    t.add_argument("--card", type=Path, help="world_card.json of `sepen toy card`")
    t.add_argument("--out", type=Path, required=True, help="the table (HTML)")
    la = part("landing", "the report's landing text: the headline (reST)")
    la.add_argument("--metrics", type=Path, required=True, help="results of `sepen aggregate`")
    la.add_argument("--card", type=Path, help="world_card.json of `sepen toy card`")
    la.add_argument("--description", type=Path, help="the workflow's description (reST)")
    la.add_argument("--out", type=Path, required=True, help="the landing text (reST)")
    g = part("grid", "sample grid (PNG): the same seeds side by side for every method", True)
    g.add_argument("--plan", type=Path, required=True, help="prompts.json of `sepen prompts`")
    which = g.add_mutually_exclusive_group(required=True)
    which.add_argument("--manifests", type=Path, nargs="+", help="shard manifests")
    which.add_argument(
        "--samples-dir",
        type=Path,
        help="folder of <method>/shard-<k>.json for the config's methods and shards",
    )
    g.add_argument("--sets", nargs="+", help="only these prompt sets (default: all)")
    g.add_argument("--cell", type=int, default=128, help="pixels per image (default: 128)")
    g.add_argument("--out", type=Path, required=True, help="the grid (PNG)")
    lo = part("losses", "loss curves (PNG)")
    which = lo.add_mutually_exclusive_group(required=True)
    which.add_argument("--csv", type=Path, nargs="+", help="loss logs of `sepen finetune`")
    which.add_argument("--losses-dir", type=Path, help="folder of <model>.csv loss logs")
    lo.add_argument("--plan", type=Path, help="the plan whose models' logs --losses-dir holds")
    lo.add_argument("--table", type=Path, help="mean loss per step over the models (CSV)")
    lo.add_argument("--out", type=Path, required=True, help="the curves (PNG)")
    f = part("taxonomy", "failure taxonomy per set and method (PNG)")
    f.add_argument("--metrics", type=Path, required=True, help="results of `sepen aggregate`")
    f.add_argument("--out", type=Path, required=True, help="the figure (PNG)")
    a = part("attention", "object-token attention before/after finetuning (PNG)", True)
    a.add_argument("--plan", type=Path, required=True, help="prompts.json of `sepen prompts`")
    a.add_argument("--model", help="base model (default: model.pretrained)")
    a.add_argument("--deltas-dir", type=Path, help="folder of the finetuned deltas")
    add_deprecated(a, "--model-dir", "--deltas-dir", "deltas_dir", type=Path)
    a.add_argument("--out", type=Path, required=True, help="the figure (PNG)")
    c = part("concepts", "the toy world's concepts, each drawn alone (PNG)")
    c.add_argument("--out", type=Path, required=True, help="the figure (PNG)")
    w = part("card", "world cards side by side: concepts alone, key cosine vs failure (PNG)")
    w.add_argument(
        "--card", type=Path, action="append", required=True, help="world_card.json (repeatable)"
    )
    w.add_argument("--out", type=Path, required=True, help="the figure (PNG)")
    n = part("numbers", "a run's metrics and premise in one file: the docs' source of its numbers")
    n.add_argument(
        "--run", type=Path, required=True, help="the run's folder (results/<experiment>)"
    )
    n.add_argument("--out", type=Path, required=True, help="the file (JSON)")
    return p


def run_numbers(run: Path) -> dict:
    """metrics.json and premise.json of a finished run, with where they came from."""
    metrics = _metrics(run / "metrics.json")
    premise = _read_json(run / "premise.json", "premise file", "sepen toy premise", ("methods",))
    config = run / "config.merged.yaml"
    return {
        "made_by": f"sepen report numbers --run {run}",
        "run": str(run),
        "config": str(config) if config.is_file() else None,
        "metrics": metrics,
        "premise": premise,
    }


def _read_json(path: Path | None, what: str, made_by: str, keys=()):
    return None if path is None else read_json(path, what, made_by, keys)


def _metrics(path: Path) -> dict:
    return _read_json(path, "metrics file", "sepen aggregate", ("methods", "metrics", "sets"))


def _card(path: Path | None) -> dict | None:
    if path is None or not Path(path).is_file():  # a model without a card: no card section
        return None
    return _read_json(path, "world card", "sepen toy card", ("criteria", "success"))


def main(args: argparse.Namespace) -> None:
    if args.figure == "table":
        anchors = config_from(args)["report"]["anchors"] if args.config else {}
        result = _metrics(args.metrics)
        models = result.get("models", {})
        notes = "; ".join(f"{k}: {v}" for k, v in models.items())
        page = table_page(
            result,
            _read_json(args.premise, "premise file", "sepen toy premise", ("methods",)),
            _read_json(args.study, "study file", "sepen toy study", ("cells", "results")),
            f"Models: {notes}" if notes else "",
            anchors,
            _card(args.card),
        )
        write_text(args.out, page)
    elif args.figure == "concepts":
        toy = config_from(args)["toy"]
        radius = sum(toy["radius"]) / 2
        write_bytes(
            args.out, png(concepts_figure(toy["concepts"], radius, toy["model"]["image_size"]))
        )
    elif args.figure == "numbers":
        import json

        # run_numbers reads metrics.json first: a missing or broken one is named before writing
        write_text(args.out, json.dumps(run_numbers(args.run), indent=1, sort_keys=True) + "\n")
    elif args.figure == "landing":
        description = args.description.read_text() if args.description else ""
        write_text(args.out, landing_text(_metrics(args.metrics), _card(args.card), description))
    elif args.figure == "grid":
        config = config_from(args)
        ev = config["evaluation"]
        files = args.manifests or shard_files(args.samples_dir, ev["methods"], ev["shards"])
        manifests = [read_manifest(m) for m in files]
        image = sample_grid(
            read_plan(args.plan),
            manifests,
            config["report"]["grid_prompts"],
            config["report"]["grid_seeds"],
            cell=args.cell,
            sets=args.sets,
        )
        write_bytes(args.out, png(image))
    elif args.figure == "card":
        keys = ("per_prompt", "keys_and_maps")
        cards = [
            (c.parent.name, _read_json(c, "world card", "sepen toy card", keys)) for c in args.card
        ]
        write_bytes(args.out, card_figure(cards))
    elif args.figure == "taxonomy":
        write_bytes(args.out, taxonomy_figure(_metrics(args.metrics)))
    elif args.figure == "losses":
        files = args.csv
        if args.losses_dir is not None:
            if args.plan is None:
                raise SepenError("--losses-dir needs --plan, whose models' loss logs it holds")
            models = sorted(read_plan(args.plan)["models"])
            files = [args.losses_dir / f"{m}.csv" for m in models]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise SepenError(f"loss logs missing: {missing[:3]}: run `sepen finetune` first")
        write_bytes(args.out, loss_figure(files))
        if args.table is not None:
            write_text(args.table, mean_losses_csv(files))
    else:
        config = config_from(args)
        rows = attention_rows(
            config,
            read_plan(args.plan),
            args.model or config["model"]["pretrained"],
            args.deltas_dir,
            config["report"]["attention_prompts"],
        )
        if not rows:
            raise SepenError("the plan has no multi-object prompt to show attention maps for")
        write_bytes(args.out, attention_figure(rows))


def cli(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_step("sepen report", lambda: main(args))
