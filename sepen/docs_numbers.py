"""Numbers in the docs, read from the files that hold them.

A page writes `{{ default_run:sets.held_out_pairs.sepen.success }}` where a number belongs and
`{{ table:default_run }}` where the default run's table belongs; the MkDocs hook
(sepen/mkdocs_hooks.py) renders them when the site builds, and `sepen workflow docs` writes the
README's table between its `<!-- sepen:table NAME -->` markers. A value is a number, or a
{mean, lo, hi} record written `mean [lo, hi]`; `| +.3f` after the key path sets the format
(default `.3f`; `+` signs paired differences). Every source is a file in the repository,
written by the command that measured it (SOURCES).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sepen.config import read_yaml
from sepen.errors import SepenError


def _card(folder: str, config: str) -> tuple[str, str]:
    return (
        f"data/{folder}/world_card.json",
        f"sepen toy card --config config/{config}.yaml --model data/{folder}",
    )


def _pretrain(folder: str, config: str) -> tuple[str, str]:
    return (
        f"data/{folder}/sepen_toy.json",
        f"sepen toy pretrain --config config/{config}.yaml --out data/{folder}",
    )


def _run(folder: str, config: str, file: str = "default_run") -> tuple[str, str]:
    return (
        f"data/{folder}/{file}.json",
        f"snakemake --cores all --configfile config/{config}.yaml, then sepen report numbers "
        f"--run results/{config} --out data/{folder}/{file}.json",
    )


def _sweep(folder: str, config: str, tries: tuple[str, ...]) -> tuple[str, str]:
    settings = " ".join(f"--try {t}" for t in tries)
    return (
        f"data/{folder}/sampling_sweep.json",
        f"sepen toy sweep --config config/{config}.yaml --model data/{folder} {settings} "
        f"--out data/{folder}/sampling_sweep.json",
    )


# the toy MMDiTs: docs name -> (model folder, config); today's is plain "mmdit"
TOY_MMDITS = {
    "mmdit": ("toy_mmdit_v8", "toy_mmdit"),
    "mmdit_v7": ("toy_mmdit_v7", "toy_mmdit_v7"),
    "mmdit_v6": ("toy_mmdit_v6", "toy_mmdit_v6"),
    "mmdit_v5": ("toy_mmdit_v5", "toy_mmdit_v5"),
    "mmdit_v4": ("toy_mmdit_v4", "toy_mmdit_v4"),
    "mmdit_v3": ("toy_mmdit_v3", "toy_mmdit_v3"),
    "mmdit_v2": ("toy_mmdit_v2", "toy_mmdit_v2"),
    "mmdit_v1": ("toy_mmdit", "toy_mmdit_v1"),
}
# those whose default run is shipped
_RUNS = ("mmdit", "mmdit_v6", "mmdit_v4", "mmdit_v3", "mmdit_v2")
_V4 = TOY_MMDITS["mmdit_v4"]

# name -> (file, the command that wrote it)
SOURCES = {
    "default_run": (
        "data/toy_base/default_run.json",
        "snakemake --cores all, then sepen report numbers --run results/toy "
        "--out data/toy_base/default_run.json",
    ),
    "paper": ("data/paper.yaml", "typed from the paper's tables (a secondary transcription)"),
    "card": ("data/toy_base/world_card.json", "sepen toy card --config config/config.yaml"),
    **{f"{name}_card": _card(*where) for name, where in TOY_MMDITS.items()},
    **{f"{name}_pretrain": _pretrain(*where) for name, where in TOY_MMDITS.items()},
    **{f"{name}_run": _run(*TOY_MMDITS[name]) for name in _RUNS},
    "mmdit_v6_sweep": _sweep(*TOY_MMDITS["mmdit_v6"], ("guidance=1.75", "guidance=1.5")),
    "mmdit_v7_sweep": _sweep(*TOY_MMDITS["mmdit_v7"], ("guidance=1.75",)),
    "mmdit_v4_sweep": _sweep(
        *_V4,
        ("steps=40", "shift=5", "guidance=3", "guidance=1.75", "guidance=1.5", "guidance=1.25"),
    ),
    "mmdit_image_queries_run": _run(_V4[0], "toy_mmdit_image_queries", "image_queries_run"),
    **{
        f"mmdit_probe_lr{lr.replace('-', '')}_{signal}": (
            f"data/toy_mmdit_v6/diagnose/circle_star_lr{lr}_{signal}.json",
            f"sepen finetune --config config/toy_mmdit_v6.yaml --set finetune.learning_rate={lr} "
            f"--set finetune.signal={signal} --plan results/toy_mmdit_v6/prompts.json --model-id "
            "circle-star_<hash> --out DELTA, then sepen toy diagnose --config "
            "config/toy_mmdit_v6.yaml --model data/toy_mmdit_v6 --delta DELTA --concepts circle "
            f"star --images 16 --out data/toy_mmdit_v6/diagnose/circle_star_lr{lr}_{signal}.json",
        )
        for lr in ("1e-5", "1e-4")
        for signal in ("random", "base_samples")
    },
    **{
        f"{name}_study": (
            f"data/{folder}/study.json",
            f"sepen toy study --config config/{config}.yaml --cells config/toy_study_mmdit_v6.yaml "
            f"--out-dir results/{config}/study --set evaluation.seed=50000 --set "
            'evaluation.images_per_prompt=8 --set "toy.study.seeds=[0]"',
        )
        for name, (folder, config) in TOY_MMDITS.items()
        if name in ("mmdit", "mmdit_v6")
    },
    **{
        f"mmdit_diagnose_{pair}{suffix}": (
            f"data/toy_mmdit_v4/diagnose/{pair}{suffix}.json",
            f"sepen toy diagnose --config config/{config}.yaml --model data/toy_mmdit_v4 "
            f"--delta results/{config}/models/{pair}_<hash>.safetensors --concepts "
            f"{pair.replace('_', ' ')} --images 8 "
            f"--out data/toy_mmdit_v4/diagnose/{pair}{suffix}.json",
        )
        for pair in ("square_cross", "diamond_ring")
        for suffix, config in (("", "toy_mmdit_v4"), ("_image_queries", "toy_mmdit_image_queries"))
    },
    "mmdit_v3_shift1_card": (
        "data/toy_mmdit_v3/world_card_shift1.json",
        "sepen toy pretrain --config config/toy_mmdit_v3.yaml --set toy.model.flow_shift=1.0 "
        "--out DIR --state-dir <state> --resume latest, then sepen toy card --config "
        "config/toy_mmdit_v3.yaml --model DIR",
    ),
    "mmdit_v2_step8000": (
        "data/toy_mmdit_v2/validation_step8000.json",
        "sepen toy pretrain --config config/toy_mmdit_v2.yaml --resume <state>/checkpoint-8000 "
        "--until 8000 --out DIR (its sepen_toy.json's validation)",
    ),
    "test_time_study": (
        "data/toy_base/test_time_study.json",
        "sepen toy test-time-study --config config/config.yaml",
    ),
}

PLACEHOLDER = re.compile(
    r"\{\{\s*([a-z0-9_]+):([A-Za-z0-9_.\-]+)\s*(?:\|\s*([+]?\.\d[fe%]))?\s*\}\}"
)
README_TABLE = re.compile(
    r"(<!-- sepen:table (?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /sepen:table -->)", re.S
)

METHOD_NAMES = {
    "base": "base model",
    "attend_excite": "Attend-and-Excite",
    "sepen": "SepEn (finetuned)",
    "sepen_test_time": "SepEn at test time",
}


def load_source(name: str, root: Path) -> dict:
    if name not in SOURCES:
        raise SepenError(f"docs source {name!r} is not one of {sorted(SOURCES)}")
    path = Path(root) / SOURCES[name][0]
    if not path.is_file():
        raise SepenError(f"docs source {name!r}: {path} is missing; made by: {SOURCES[name][1]}")
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else read_yaml(text)


def lookup(data, path: str, name: str = "source"):
    """The value at a dotted key path (list items by index)."""
    node = data
    for part in path.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise SepenError(f"docs number {name}:{path}: {part!r} is not in the file")
    return node


def _number(x: float, spec: str) -> str:
    text = format(float(x), spec)
    return format(0.0, spec) if float(text.rstrip("%")) == 0 else text  # no "-0.000"


CENTRES = ("mean", "auc", "value")  # a record's estimate beside its lo and hi


def _record(value) -> tuple | None:
    """(estimate, lo, hi) of a {mean|auc|value, lo, hi} record, else None."""
    if not isinstance(value, dict) or not {"lo", "hi"} <= set(value):
        return None
    centre = next((k for k in CENTRES if k in value), None)
    parts = (value.get(centre), value["lo"], value["hi"]) if centre else ()
    if not parts or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in parts):
        return None
    return tuple(float(x) for x in parts)


def format_value(value, spec: str | None = None) -> str:
    """A number, or a {mean, lo, hi} record (also auc or value) as `mean [lo, hi]`."""
    spec = spec or ".3f"
    record = _record(value)
    if record is not None:
        m, lo, hi = (_number(x, spec) for x in record)
        return f"{m} [{lo}, {hi}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SepenError(f"docs number: {value!r} is not a number or a mean/lo/hi record")
    if isinstance(value, int):
        return str(value)
    return _number(value, spec)


class Sources:
    """The docs' source files, each read once."""

    def __init__(self, root: Path) -> None:
        self.root, self.loaded = Path(root), {}

    def __getitem__(self, name: str):
        if name not in self.loaded:
            self.loaded[name] = load_source(name, self.root)
        return self.loaded[name]


def default_run_table(sources: Sources) -> str:
    """The default run's held-out pairs per method beside the paper's reported rows."""
    run, paper = sources["default_run"]["metrics"], sources["paper"]
    held = run["sets"]["held_out_pairs"]
    diffs = run["differences"]["held_out_pairs"]
    n = held["base"]["success"]["n"]
    lines = [
        f"| method ({n} images) | success | minus base | paper: success | paper: FID |",
        "|---|---|---|---|---|",
    ]
    for method in paper["methods"]:
        if method not in held:
            continue
        delta = "-" if method == "base" else format_value(diffs[method]["success"], "+.3f")
        lines.append(
            f"| {METHOD_NAMES[method]} | {format_value(held[method]['success'])} | {delta} "
            f"| {paper['detection_success'][method]:.3f} | {paper['fid'][method]:.2f} |"
        )
    return "\n".join(lines) + "\n"


def card_criteria_table(sources: Sources) -> str:
    """The toy MMDiT's world card criteria beside the earlier toy MMDiTs' (the third also
    sampled at shift 1): each value and whether it holds (the cards' own `criteria`)."""
    cards = [
        ("toy MMDiT", sources["mmdit_card"]),
        ("seventh toy MMDiT", sources["mmdit_v7_card"]),
        ("sixth toy MMDiT", sources["mmdit_v6_card"]),
        ("fifth toy MMDiT", sources["mmdit_v5_card"]),
        ("fourth toy MMDiT", sources["mmdit_v4_card"]),
        ("third toy MMDiT", sources["mmdit_v3_card"]),
        ("third, shift 1", sources["mmdit_v3_shift1_card"]),
        ("second toy MMDiT", sources["mmdit_v2_card"]),
        ("first toy MMDiT", sources["mmdit_v1_card"]),
    ]
    names = list(dict.fromkeys(n for _, card in cards for n in card["criteria"]))
    lines = [
        "| criterion | " + " | ".join(label for label, _ in cards) + " |",
        "|---|" + "---|" * len(cards),
    ]
    for name in names:
        cells = []
        for _, card in cards:
            c = card["criteria"].get(name)
            cells.append(
                "-" if c is None else f"{c['value']:.3f} ({'holds' if c['holds'] else 'fails'})"
            )
        lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _failure_cells(rates: dict) -> str:
    """A set's missing, merged and wrong-shape rates as table cells."""
    return " | ".join(
        format_value(rates[k]["mean"]) for k in ("fail_missing", "fail_merged", "fail_wrong_shape")
    )


def run_table(run: dict) -> str:
    """A run's held-out pairs per method: success, paired difference to base, failure kinds."""
    held = run["metrics"]["sets"]["held_out_pairs"]
    diffs = run["metrics"]["differences"]["held_out_pairs"]
    lines = [
        "| method | success | minus base | missing | merged | wrong shape |",
        "|---|---|---|---|---|---|",
    ]
    for method in METHOD_NAMES:
        if method not in held:
            continue
        delta = "-" if method == "base" else format_value(diffs[method]["success"], "+.3f")
        kinds = _failure_cells(held[method])
        success = format_value(held[method]["success"])
        lines.append(f"| {METHOD_NAMES[method]} | {success} | {delta} | {kinds} |")
    return "\n".join(lines) + "\n"


def study_table(study: dict) -> str:
    """A settings study (`sepen toy study`) with one finetuning seed: per cell, its settings,
    the held-out pairs' success and failure kinds, and the paired changes to base."""
    seed = str(study["seeds"][0])
    lines = [
        "| cell | settings | held-out pairs | minus base | each pair model's objects alone, "
        "minus base | missing | merged | wrong shape |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = study["base"]["held_out_pairs"]
    lines.append(f"| base | - | {format_value(base['success'])} | - | - | {_failure_cells(base)} |")
    for cell in study["cells"]:
        result = study["results"][cell["name"]]
        held = result["held_out_pairs"]["seeds"][seed]
        alone = result["model_singles"]["seeds"][seed]["minus_base"]["success"]
        settings = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in cell["set"].items())
        lines.append(
            f"| {cell['name']} | {settings} | {format_value(held['success'])} "
            f"| {format_value(held['minus_base']['success'], '+.3f')} "
            f"| {format_value(alone, '+.3f')} | {_failure_cells(held)} |"
        )
    return "\n".join(lines) + "\n"


def sweep_table(sweep: dict) -> str:
    """A toy model at several sampling settings on the card seeds (`sepen toy sweep`)."""
    lines = [
        "| guidance | shift | steps | single objects (weakest concept) | held-out pairs "
        "| failing objects missing or merged |",
        "|---|---|---|---|---|---|",
    ]
    for row in sweep["settings"]:
        s = row["setting"]
        share = row["failing_objects"]["missing_or_merged_share"]
        lines.append(
            f"| {s['guidance']:g} | {s.get('shift', '-')} | {s['steps']} "
            f"| {format_value(row['single'])} ({row['weakest_single']:.2f}) "
            f"| {format_value(row['held_out_pairs'])} "
            f"| {'-' if share is None else format(share, '.3f')} |"
        )
    return "\n".join(lines) + "\n"


def stream_table(sources: Sources, pairs=("square_cross", "diamond_ring")) -> str:
    """Per joint block, how much one pair model's delta changes the block's text-stream and
    image-stream outputs (`sepen toy diagnose`'s stream_change), with the trained keys read by
    every query and by the image queries only."""
    head, rule, cells = ["block"], ["---"], {}
    for pair in pairs:
        for suffix, label in (("", "all queries"), ("_image_queries", "image queries only")):
            change = sources[f"mmdit_diagnose_{pair}{suffix}"]["stream_change"]
            for stream in ("text", "image"):
                head.append(f"{pair.replace('_', ' + ')}, {label}: {stream}")
                rule.append("---")
                for block, row in change.items():
                    value = row[f"{stream}_stream"]
                    cells.setdefault(block, []).append("-" if value is None else f"{value:.3f}")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
    lines += [f"| {block} | " + " | ".join(row) + " |" for block, row in cells.items()]
    return "\n".join(lines) + "\n"


def card_pairs_table(card: dict) -> str:
    """Per held-out pair on the card seeds: the object tokens' key cosine and map overlap, and
    how often the base model fails (the premise: similar keys and overlapping maps fail)."""
    lines = ["| pair | key cosine | map IoU | failure rate |", "|---|---|---|---|"]
    for row in sorted(card["keys_and_maps"]["per_pair"], key=lambda r: -r["failure_rate"]):
        lines.append(
            f"| {row['pair']} | {row['key_cosine']:.2f} | {row['map_iou']:.2f} "
            f"| {row['failure_rate']:.2f} |"
        )
    return "\n".join(lines) + "\n"


TABLES = {
    "mmdit_card_pairs": lambda sources: card_pairs_table(sources["mmdit_card"]),
    "default_run": default_run_table,
    "card_criteria": card_criteria_table,
    "mmdit_run": lambda sources: run_table(sources["mmdit_run"]),
    "mmdit_v6_sweep": lambda sources: sweep_table(sources["mmdit_v6_sweep"]),
    "mmdit_study": lambda sources: study_table(sources["mmdit_study"]),
    "mmdit_v6_study": lambda sources: study_table(sources["mmdit_v6_study"]),
    "mmdit_stream_change": stream_table,
    "mmdit_image_queries_run": lambda sources: run_table(sources["mmdit_image_queries_run"]),
    "mmdit_v6_run": lambda sources: run_table(sources["mmdit_v6_run"]),
    "mmdit_v4_run": lambda sources: run_table(sources["mmdit_v4_run"]),
    "mmdit_v4_sweep": lambda sources: sweep_table(sources["mmdit_v4_sweep"]),
    "mmdit_v3_run": lambda sources: run_table(sources["mmdit_v3_run"]),
    "mmdit_v2_run": lambda sources: run_table(sources["mmdit_v2_run"]),
}


def render(text: str, root: Path, sources: Sources | None = None) -> str:
    """`text` with every placeholder replaced by its value (an unknown one raises)."""
    sources = sources or Sources(root)

    def one(m: re.Match) -> str:
        name, path, spec = m.groups()
        if name == "table":
            if path not in TABLES:
                raise SepenError(f"docs table {path!r} is not one of {sorted(TABLES)}")
            return TABLES[path](sources).rstrip("\n")
        return format_value(lookup(sources[name], path, name), spec)

    return PLACEHOLDER.sub(one, text)


def readme_tables(text: str, root: Path) -> str:
    """The README with each `<!-- sepen:table NAME -->` block rewritten from its source."""
    sources = Sources(root)

    def one(m: re.Match) -> str:
        name = m.group("name")
        if name not in TABLES:
            raise SepenError(f"README table {name!r} is not one of {sorted(TABLES)}")
        return m.group(1) + TABLES[name](sources) + m.group(4)

    return README_TABLE.sub(one, text)


def ci_triples(data) -> set[tuple[float, float, float]]:
    """Every {mean|auc|value, lo, hi} record in a loaded file, as (estimate, lo, hi)."""
    out = set()
    if isinstance(data, dict):
        record = _record(data)
        if record is not None:
            out.add(record)
        for v in data.values():
            out |= ci_triples(v)
    elif isinstance(data, list):
        for v in data:
            out |= ci_triples(v)
    return out


QUOTED_CI = re.compile(r"([+-]?\d\.\d{2,3}) \[([+-]?\d\.\d{2,3}), ([+-]?\d\.\d{2,3})\]")


def unsourced_intervals(text: str, triples: set[tuple[float, float, float]]) -> list[str]:
    """The `mean [lo, hi]` intervals quoted in `text` that no record of `triples` rounds to
    (at the quoted number of decimals)."""
    rounded = set()
    for t in triples:
        for d in (2, 3):
            rounded.add(tuple(round(x, d) + 0.0 for x in t))
    missing = []
    for m in QUOTED_CI.finditer(text):
        quoted = tuple(float(x) + 0.0 for x in m.groups())
        if quoted not in rounded:
            missing.append(m.group(0))
    return missing
