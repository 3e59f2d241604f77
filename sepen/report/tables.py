"""The report's tables and landing text: the headline (success first, then the failure
kinds) with 95% CIs and paired differences to the base model, the paper's reported numbers
beside ours, and the toy world's card, premise check and settings study."""

from __future__ import annotations

import html

from sepen.stats import format_ci

# The paper's four rows on Stable Diffusion 1.4 (Attend-and-Excite prompts): detection success
# (Detic) as the paper reports it; FID from a secondary transcription of the paper's table.
# Shown in every report and in the README beside our numbers, labelled as reported.
PAPER_SD14 = (
    ("base", "Stable Diffusion 1.4", 0.209, 32.96),
    ("attend_excite", "Attend-and-Excite", 0.383, 45.65),
    ("sepen", "SepEn (finetuned)", 0.410, 36.85),
    ("sepen_test_time", "SepEn at test time", 0.441, 41.74),
)
PAPER_NOTE = (
    "reported by the paper, not measured here: Stable Diffusion 1.4, Attend-and-Excite prompts, "
    "detection success by Detic; the FID values are from a secondary transcription of the "
    "paper's table"
)


def paper_rows() -> list[list[str]]:
    """The paper's four rows (PAPER_SD14): method, detection success, FID."""
    rows = [["method (paper, reported)", "sepen method", "detection success", "FID"]]
    rows += [[name, key, f"{success:.3f}", f"{fid:.2f}"] for key, name, success, fid in PAPER_SD14]
    return rows


def cost_rows(cost: dict) -> list[list[str]]:
    """Sampling cost per method: images drawn, seconds, images/s, time per image vs base."""
    rows = [["method", "images drawn", "seconds", "images/s", "time per image / base"]]
    for method, c in cost.items():
        rate, ratio = c["images_per_s"], c["x_base_time"]
        rows.append(
            [
                method,
                str(c["images"]),
                f"{c['seconds']:.1f}",
                "-" if rate is None else f"{rate:.2f}",
                "-" if ratio is None else f"{ratio:.2f}x",
            ]
        )
    return rows


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
                text += f" (paired {format_ci(d, signed=True)})"
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
    out += [f"The paper's four rows ({PAPER_NOTE}):", ""]
    out += [
        f"- {name}: detection success {success:.3f}, FID {fid:.2f}"
        for _, name, success, fid in PAPER_SD14
    ] + [""]
    if description:
        out += ["What was run", "------------", "", description.strip(), ""]
    return "\n".join(out)


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
    parts.append(f"<h3>The paper's four rows ({html.escape(PAPER_NOTE)})</h3>")
    parts.append(html_table(paper_rows()))
    if result.get("sampling_cost"):
        parts.append(
            "<h3>Sampling cost per method (images drawn in this run, model loading excluded)</h3>"
        )
        parts.append(html_table(cost_rows(result["sampling_cost"])))
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
