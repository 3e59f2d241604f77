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
"""

from __future__ import annotations

import argparse
import csv
import html
import io
from pathlib import Path

import numpy as np

from sepen.atomic import write_bytes, write_text
from sepen.command import run_step
from sepen.config import load_config
from sepen.errors import SepenError
from sepen.plan import read_plan
from sepen.stats import format_ci

# ---------------------------------------------------------------- table


def anchor_row(anchors: dict, metric: str, name: str, methods: list[str], width: int):
    """The paper's reported values for a metric and prompt set ('metric@set', or 'metric' for
    the overall set), labelled as such; None when the paper reports none."""
    key = metric if name == "overall" else f"{metric}@{name}"
    values = anchors.get(key)
    if not values:
        return None
    row = [f"{name}: paper (reported)", ""] + [
        f"{values[m]:.3f}" if m in values else "" for m in methods
    ]
    return row + [""] * (width - len(row))


def metrics_table(result: dict, metric: str, anchors: dict | None = None) -> list[list[str]]:
    """Rows: prompt set, n images, each method's mean [CI], each method's difference to base;
    after a set's row, the paper's reported values for it where given (`report.anchors`)."""
    methods = result["methods"]
    others = [m for m in methods if m != "base"]
    header = (
        ["prompt set", "images"] + methods + [f"{m} - base" for m in others if "base" in methods]
    )
    rows = [header]
    for name, by_method in result["sets"].items():
        row = [name, str(next(iter(by_method.values()))[metric]["n"])]
        row += [format_ci(by_method[m][metric]) if m in by_method else "-" for m in methods]
        diffs = result["differences"].get(name, {})
        if "base" in methods:
            row += [format_ci(diffs[m][metric]) if m in diffs else "-" for m in others]
        rows.append(row)
        anchor = anchor_row(anchors or {}, metric, name, methods, len(header))
        if anchor:
            rows.append(anchor)
    return rows


def premise_rows(premise: dict) -> list[list[str]]:
    """Per method and pair set: attention shares on the detected objects, and the AUC of
    SepEn's per-image values for failure."""
    rows = [
        [
            "method",
            "prompt set",
            "images (failed)",
            "own object",
            "other object",
            "background",
            "object area",
            "AUC separate",
            "AUC enhance",
            "AUC sep + en/2",
        ]
    ]
    for method, by_set in premise["methods"].items():
        for name, v in by_set.items():
            shares = [
                format_ci(v[k]) if v[k] else "-" for k in ("own", "other", "background", "area")
            ]
            aucs = [
                format_ci(a, "auc") if a else "-"
                for a in (v["auc"][k] for k in ("separate", "enhance", "total"))
            ]
            rows.append([method, name, f"{v['images']} ({v['failures']})", *shares, *aucs])
    return rows


FAILURE_KINDS = ("missing", "too_small", "merged", "wrong_shape", "spurious")
# the metrics page leads with the answer: success, then why images fail, then the rest
LEADING_METRICS = ("success", *(f"fail_{k}" for k in FAILURE_KINDS))


def ordered_metrics(metrics: list[str]) -> list[str]:
    first = [m for m in LEADING_METRICS if m in metrics]
    return first + [m for m in metrics if m not in first]


def headline(result: dict) -> list[str]:
    """One sentence per prompt set: base -> each method with CIs and paired differences, in the
    first metric of `ordered_metrics` (success for the toy world)."""
    metric = ordered_metrics(result["metrics"])[0]
    lines = []
    for name, by_method in result["sets"].items():
        if name == "overall" and len(result["sets"]) > 1:
            continue
        diffs = result["differences"].get(name, {})
        parts = []
        for m in result["methods"]:
            if m not in by_method:
                continue
            text = f"{m} {format_ci(by_method[m][metric])}"
            if m in diffs:
                d = diffs[m][metric]
                text += f" (paired {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}])"
            parts.append(text)
        n = next(iter(by_method.values()))[metric]["n"]
        lines.append(f"{name} ({n} images), {metric}: " + " -> ".join(parts))
    return lines


def card_rows(card: dict) -> list[list[str]]:
    """The world card's acceptance criteria: value and whether each holds."""
    rows = [["criterion", "value", "holds"]]
    for name, row in card["criteria"].items():
        value = "-" if row["value"] is None else f"{row['value']:.3f}"
        rows.append([name.replace("_", " "), value, "yes" if row["holds"] else "no"])
    return rows


def landing_text(result: dict, card: dict | None = None, description: str = "") -> str:
    """The report's landing text (reStructuredText): the headline numbers first, then the
    workflow's description (`description`, reST, rendered by Snakemake like its own)."""
    out = ["The answer", "==========", ""]
    out += [f"- {line}" for line in headline(result)] + [""]
    if card is not None:
        held = card["success"]["held_out_pairs"]
        out += [
            f"The base model's world card (card seeds {card['seeds'][0]}-{card['seeds'][1]}, "
            f"not used by any number above): held-out pairs {format_ci(held)}; Attend-and-Excite "
            f"step size {card['attend_excite']['chosen_scale']:g} chosen on those seeds.",
            "",
        ]
    out += [
        "Each method samples the same prompts with the same seeds; [a, b] are bootstrap 95% "
        "confidence intervals and 'paired' differences compare the same prompt and seed. The "
        "metrics page (category 1) starts with success, then the failure kinds.",
        "",
    ]
    if description:
        out += ["What was run", "------------", "", description.strip(), ""]
    return "\n".join(out)


def taxonomy_figure(result: dict) -> bytes:
    """Bars per prompt set and method: the share of images with each kind of failure
    (an image can fail in more than one way), with their 95% CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in FAILURE_KINDS if f"fail_{k}" in result["metrics"]]
    if not kinds:
        raise SepenError("the metrics hold no failure taxonomy (fail_*): use toy_detection")
    sets = [s for s in result["sets"] if s != "overall"]
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.2), squeeze=False)
    top = max(
        (v[f"fail_{k}"]["hi"] for s in sets for v in result["sets"][s].values() for k in kinds),
        default=0.0,
    )
    handles: dict = {}
    order = list(
        dict.fromkeys([*result.get("methods", []), *(m for s in sets for m in result["sets"][s])])
    )
    for ax, name in zip(axes[0], sets):
        methods = list(result["sets"][name])
        width = 0.8 / len(methods)
        for j, method in enumerate(methods):
            values = [result["sets"][name][method][f"fail_{k}"] for k in kinds]
            x = np.arange(len(kinds)) + (j - (len(methods) - 1) / 2) * width
            mean = np.array([v["mean"] for v in values])
            err = np.array([[v["mean"] - v["lo"], v["hi"] - v["mean"]] for v in values]).T
            handles[method] = ax.bar(
                x, mean, width, yerr=err, capsize=2, color=f"C{order.index(method)}"
            )
        ax.set_xticks(np.arange(len(kinds)), [k.replace("_", "\n") for k in kinds], fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("share of images", fontsize=8)
        ax.set_ylim(0, min(1.0, max(0.1, 1.15 * top)))  # one scale for every panel
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="upper right")
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def study_rows(study: dict) -> list[list[str]]:
    """The settings study (`sepen toy study`): per evaluated set, each cell's success per
    finetuning seed, its paired change to base per seed, and the mean change over seeds with
    its range (min to max)."""
    sets = list(study["base"])
    header = ["cell", "settings"]
    for name in sets:
        header += [f"{name}: success per seed", "change per seed", "mean change (range)"]
    rows = [header, ["base", "-"]]
    for name in sets:
        rows[1] += [format_ci(study["base"][name]["success"]), "", ""]
    for cell in study["cells"]:
        result = study["results"][cell["name"]]
        settings = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in cell.get("set", {}).items())
        row = [cell["name"], settings or "-"]
        for name in sets:
            seeds = result[name]["seeds"].values()
            change = result[name]["success_change"]
            row += [
                "; ".join(format_ci(v["success"]) for v in seeds),
                "; ".join(format_ci(v["minus_base"]["success"]) for v in seeds),
                f"{change['mean']:+.3f} ({change['min']:+.3f} to {change['max']:+.3f})",
            ]
        rows.append(row)
    return rows


def html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:]
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def table_page(
    result: dict,
    premise: dict | None,
    study: dict | None,
    notes: str = "",
    anchors: dict | None = None,
    card: dict | None = None,
) -> str:
    parts = [
        "<html><head><meta charset='utf-8'><style>",
        "body{font-family:sans-serif} table{border-collapse:collapse;margin:1em 0}",
        "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}",
        "</style></head><body>",
    ]
    parts.append("<h2>The answer</h2><ul>")
    parts += [f"<li>{html.escape(line)}</li>" for line in headline(result)]
    parts.append("</ul>")
    if notes:
        parts.append(f"<p>{html.escape(notes)}</p>")
    if card:
        parts.append(
            f"<h3>World card of the base model (card seeds {card['seeds'][0]}-"
            f"{card['seeds'][1]}): acceptance criteria</h3>"
        )
        parts.append(html_table(card_rows(card)))
    for metric in ordered_metrics(result["metrics"]):
        parts.append(f"<h3>{html.escape(metric)} (mean [95% CI])</h3>")
        parts.append(html_table(metrics_table(result, metric, anchors)))
    if result.get("fid"):
        entries = result["fid"]
        parts.append("<h3>FID against the reference images (lower is better)</h3>")
        rows = [["method", "FID", "images", "reference images", "features"]]
        rows += [
            [m, f"{v['fid']:.2f}", str(v["n_images"]), str(v["n_reference"]), v["features"]]
            for m, v in entries.items()
        ]
        parts.append(html_table(rows))
    if premise:
        parts.append(
            "<h3>Premise check on the model's own samples: where each object token's "
            "step-averaged attention falls (shares of its map on the detected objects), and "
            "how well SepEn's per-image values predict failure (ROC AUC [95% CI]; 0.5 is "
            "chance)</h3>"
        )
        parts.append(html_table(premise_rows(premise)))
    if study:
        parts.append(
            f"<h3>Settings study ({study['images_per_prompt']} images per prompt, finetuning "
            f"seeds {study['seeds']}; success [95% CI], paired changes to base)</h3>"
        )
        parts.append(html_table(study_rows(study)))
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------- grid


def _label(image, text: str):
    from PIL import ImageDraw

    ImageDraw.Draw(image).text((4, 2), text, fill=(0, 0, 0))
    return image


def sample_grid(
    plan: dict, manifests: list[dict], prompts_per_set: int, seeds: int, cell: int = 128
):
    """One block per prompt: a row per method, the same `seeds` seeds in columns."""
    from PIL import Image

    paths: dict[tuple[str, str, int], str] = {}
    methods: list[str] = []
    for m in manifests:
        if m["method"] not in methods:
            methods.append(m["method"])
        for im in m["images"]:
            paths[(m["method"], im["prompt_id"], im["seed"])] = im["path"]
    chosen = [pid for ids in plan["sets"].values() for pid in ids[:prompts_per_set]]
    chosen = list(dict.fromkeys(chosen))
    seed_list = plan["seeds"][:seeds]
    label_h = 16
    rows = []
    for pid in chosen:
        title = Image.new("RGB", (cell * len(seed_list) + 60, label_h), "white")
        rows.append(_label(title, plan["prompts"][pid]["prompt"]))
        for method in methods:
            if (method, pid, seed_list[0]) not in paths:  # A&E samples pair prompts only
                continue
            row = Image.new("RGB", (cell * len(seed_list) + 60, cell), "white")
            _label(row, method)
            for j, s in enumerate(seed_list):
                with Image.open(paths[(method, pid, s)]) as im:
                    tile = im.convert("RGB").resize((cell, cell), Image.NEAREST)
                row.paste(tile, (60 + j * cell, 0))
            rows.append(row)
    grid = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height
    return grid


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- losses


def loss_figure(files: list[Path]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ("loss", "separate", "enhance", "norm")
    fig, axes = plt.subplots(1, len(columns), figsize=(4 * len(columns), 3), squeeze=False)
    for path in files:
        with open(path) as f:
            rows = list(csv.DictReader(f))
        if not rows:
            continue
        steps = [int(r["step"]) for r in rows]
        alpha = 1.0 if len(files) == 1 else max(0.15, 1 / len(files) ** 0.5)
        for ax, col in zip(axes[0], columns):
            ax.plot(steps, [float(r[col]) for r in rows], lw=1, alpha=alpha)
    for ax, col in zip(axes[0], columns):
        ax.set_title(col)
        ax.set_xlabel("step")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def mean_losses_csv(files: list[Path]) -> str:
    """The loss parts per step, averaged over the models' logs (one curve for `dvc plots`)."""
    columns = ("loss", "separate", "enhance", "norm")
    sums: dict[int, list] = {}
    for path in files:
        with open(path) as f:
            for r in csv.DictReader(f):
                entry = sums.setdefault(int(r["step"]), [0, [0.0] * len(columns)])
                entry[0] += 1
                entry[1] = [a + float(r[c]) for a, c in zip(entry[1], columns)]
    lines = ["step," + ",".join(columns)]
    for step in sorted(sums):
        n, total = sums[step]
        lines.append(f"{step}," + ",".join(f"{v / n:.6g}" for v in total))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- attention


def averaged_token_maps(
    pipe,
    prompt: str,
    concepts: list[str],
    resolutions,
    steps: int,
    guidance: float,
    seed: int,
    how: str = "mean",
):
    """Image and per-concept cross-attention maps averaged over the denoising steps.

    Maps are the conditional half of the guidance batch, heads averaged, at the largest
    captured resolution; returns (image (h, w, 3) in [0, 1], maps (N, h, w) each summing to 1).
    """
    from sepen.sampling import sample_with_maps
    from sepen.tokens import concept_token_positions

    positions = concept_token_positions(pipe.tokenizer, prompt, concepts)
    images, maps = sample_with_maps(
        pipe, [prompt], [positions], [seed], steps, guidance, resolutions, 1, how
    )
    return images[0], maps[0] / maps[0].sum((-1, -2), keepdims=True)


def attention_figure(rows: list[tuple[str, str, np.ndarray, np.ndarray, list[str]]]) -> bytes:
    """rows: (method, prompt, image, maps, concepts) -> a PNG with image and maps per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 1 + max(len(r[4]) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.2 * cols, 2.3 * len(rows)), squeeze=False)
    for ax_row, (method, prompt, image, maps, concepts) in zip(axes, rows):
        for ax in ax_row:
            ax.axis("off")
        ax_row[0].imshow(image)
        ax_row[0].set_title(f"{method}: {prompt}", fontsize=7, loc="left")
        for ax, m, c in zip(ax_row[1:], maps, concepts):
            ax.imshow(m, cmap="viridis")
            ax.set_title(c, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def attention_prompts(plan: dict, n: int) -> list[str]:
    """Up to n multi-object prompts for the attention figure, taking each prompt set in turn."""
    by_set = [
        [p for p in ids if len(plan["prompts"][p]["concepts"]) > 1] for ids in plan["sets"].values()
    ]
    picked: list[str] = []
    for k in range(max((len(ids) for ids in by_set), default=0)):
        for ids in by_set:
            if k < len(ids) and ids[k] not in picked and len(picked) < n:
                picked.append(ids[k])
    return picked


def attention_rows(config: dict, plan: dict, model: str, model_dir: Path | None, n_prompts: int):
    from sepen.models import load_pipeline
    from sepen.sample import DeltaSwitcher, delta_for, device_and_dtype

    picked = attention_prompts(plan, n_prompts)
    device, dtype = device_and_dtype(config["sampling"])
    pipe = load_pipeline(model, config["model"]["revision"], dtype=dtype, device=device)
    switcher = DeltaSwitcher(pipe)
    methods = [m for m in ("base", "sepen") if m in config["evaluation"]["methods"]]
    ft, rep = config["finetune"], config["report"]
    rows = []
    for pid in picked:
        entry = plan["prompts"][pid]
        for method in methods:
            switcher.use(delta_for(plan, method, pid, model_dir))
            image, maps = averaged_token_maps(
                pipe,
                entry["prompt"],
                entry["concepts"],
                ft["resolutions"],
                rep["attention_steps"],
                config["sampling"]["guidance_scale"],
                plan["seeds"][0],
                ft["token_aggregation"],
            )
            rows.append((method, entry["prompt"], image, maps, entry["concepts"]))
    return rows


# ---------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sepen report", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="figure", required=True)
    t = sub.add_parser("table", help="metrics table (HTML)")
    t.add_argument("--config", type=Path, help="config with the paper's anchors (report.anchors)")
    t.add_argument("--metrics", type=Path, required=True, help="results of `sepen aggregate`")
    t.add_argument("--premise", type=Path, help="results of `sepen toy premise`")
    t.add_argument("--study", type=Path, help="study.json of `sepen toy study`")
    t.add_argument("--card", type=Path, help="world_card.json of `sepen toy card`")
    t.add_argument("--out", type=Path, required=True)
    la = sub.add_parser("landing", help="the report's landing text: the headline (reST)")
    la.add_argument("--metrics", type=Path, required=True, help="results of `sepen aggregate`")
    la.add_argument("--card", type=Path, help="world_card.json of `sepen toy card`")
    la.add_argument("--description", type=Path, help="the workflow's description (reST)")
    la.add_argument("--out", type=Path, required=True)
    g = sub.add_parser("grid", help="sample grid (PNG)")
    g.add_argument("--config", type=Path, required=True)
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--plan", type=Path, required=True)
    which = g.add_mutually_exclusive_group(required=True)
    which.add_argument("--manifests", type=Path, nargs="+", help="shard manifests")
    which.add_argument(
        "--samples-dir",
        type=Path,
        help="folder of <method>/shard-<k>.json for the config's methods and shards",
    )
    g.add_argument("--out", type=Path, required=True)
    lo = sub.add_parser("losses", help="loss curves (PNG)")
    which = lo.add_mutually_exclusive_group(required=True)
    which.add_argument("--csv", type=Path, nargs="+", help="loss logs of `sepen finetune`")
    which.add_argument("--losses-dir", type=Path, help="folder of <model>.csv loss logs")
    lo.add_argument("--plan", type=Path, help="the plan whose models' logs --losses-dir holds")
    lo.add_argument("--table", type=Path, help="mean loss per step over the models (CSV)")
    lo.add_argument("--out", type=Path, required=True)
    f = sub.add_parser("taxonomy", help="failure taxonomy per set and method (PNG)")
    f.add_argument("--metrics", type=Path, required=True, help="results of `sepen aggregate`")
    f.add_argument("--out", type=Path, required=True)
    a = sub.add_parser("attention", help="object-token attention before/after (PNG)")
    a.add_argument("--config", type=Path, required=True)
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a.add_argument("--plan", type=Path, required=True)
    a.add_argument("--model", help="base model (default: model.pretrained)")
    a.add_argument("--model-dir", type=Path, help="folder of the finetuned deltas")
    a.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def _read_json(path: Path | None, what: str, made_by: str, keys=()):
    from sepen.artifacts import read_json

    return None if path is None else read_json(path, what, made_by, keys)


def _metrics(path: Path) -> dict:
    return _read_json(path, "metrics file", "sepen aggregate", ("methods", "metrics", "sets"))


def _card(path: Path | None) -> dict | None:
    if path is None or not Path(path).is_file():  # a model without a card: no card section
        return None
    return _read_json(path, "world card", "sepen toy card", ("criteria", "success"))


def main(args: argparse.Namespace) -> None:
    if args.figure == "table":
        anchors = load_config(args.config)["report"]["anchors"] if args.config else {}
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
    elif args.figure == "landing":
        description = args.description.read_text() if args.description else ""
        write_text(args.out, landing_text(_metrics(args.metrics), _card(args.card), description))
    elif args.figure == "grid":
        config = load_config(args.config, args.set)
        from sepen.artifacts import read_manifest, shard_files

        ev = config["evaluation"]
        files = args.manifests or shard_files(args.samples_dir, ev["methods"], ev["shards"])
        manifests = [read_manifest(m) for m in files]
        image = sample_grid(
            read_plan(args.plan),
            manifests,
            config["report"]["grid_prompts"],
            config["report"]["grid_seeds"],
        )
        write_bytes(args.out, _png(image))
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
        config = load_config(args.config, args.set)
        rows = attention_rows(
            config,
            read_plan(args.plan),
            args.model or config["model"]["pretrained"],
            args.model_dir,
            config["report"]["attention_prompts"],
        )
        if not rows:
            raise SepenError("the plan has no multi-object prompt to show attention maps for")
        write_bytes(args.out, attention_figure(rows))


def cli(argv=None) -> int:
    args = parse_args(argv)
    return run_step("sepen report", lambda: main(args))
