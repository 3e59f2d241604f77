"""`sepen report <figure>`: the report's tables and figures (embedded by `snakemake --report`).

- `table`: metrics per prompt set and method with 95% CIs and paired differences to the base
  model; the toy world's premise check and settings study when given.
- `grid`: sample images, the same seeds side by side for every method.
- `losses`: SepEn loss curves.
- `attention`: object-token cross-attention maps before and after finetuning.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
from pathlib import Path

import numpy as np

from sepen.atomic import write_bytes, write_text
from sepen.command import run_step
from sepen.config import load_config
from sepen.errors import SepenError
from sepen.plan import read_plan

# ---------------------------------------------------------------- table


def _ci(v: dict) -> str:
    return f"{v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"


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
        row = [name, str(by_method[methods[0]][metric]["n"])]
        row += [_ci(by_method[m][metric]) for m in methods]
        diffs = result["differences"].get(name, {})
        row += [_ci(diffs[m][metric]) for m in others if m in diffs]
        rows.append(row)
        anchor = anchor_row(anchors or {}, metric, name, methods, len(header))
        if anchor:
            rows.append(anchor)
    return rows


def premise_rows(premise: dict) -> list[list[str]]:
    rows = [["model", "pairs", "own object", "other object", "maps"]]
    for model in ("base", "sepen"):
        for kind, v in premise.get(model, {}).items():
            rows.append([model, kind, f"{v['own']:.3f}", f"{v['other']:.3f}", str(v["n"])])
    return rows


def study_rows(study: dict) -> list[list[str]]:
    """The settings study: each cell's held-out, trained and single-object success and change."""
    results, shares = study["results"], study.get("attention_share", {})
    kinds = [k for k in ("held_out_pairs", "trained_pairs", "single") if k in results]
    header = ["cell", "settings"]
    for k in kinds:
        header += [k, "change vs base"]
    header.append("own-object attention (held-out)")
    rows = [header]
    names = ["base"] + [c["name"] for c in study["cells"]]
    settings = {
        c["name"]: ", ".join(f"{k}={v}" for k, v in c["set"].items()) for c in study["cells"]
    }
    for name in names:
        row = [name, settings.get(name, "-")]
        for k in kinds:
            row.append(_ci(results[k][name]["success"]))
            diff = results[k].get(f"{name}_minus_base")
            row.append(_ci(diff["success"]) if diff else "")
        share = shares.get(name, {}).get("held_out_pairs")
        row.append(f"{share['own']:.3f}" if share else "")
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
) -> str:
    parts = [
        "<html><head><meta charset='utf-8'><style>",
        "body{font-family:sans-serif} table{border-collapse:collapse;margin:1em 0}",
        "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}",
        "</style></head><body>",
    ]
    if notes:
        parts.append(f"<p>{html.escape(notes)}</p>")
    for metric in result["metrics"]:
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
            "<h3>Premise check: share of an object token's attention on its own object</h3>"
        )
        parts.append(html_table(premise_rows(premise)))
    if study:
        parts.append(
            f"<h3>Settings study ({study['n_images']} images per kind; success [95% CI])</h3>"
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
    import torch

    from sepen.attention import install_capture
    from sepen.tokens import aggregate_token_maps, concept_token_positions

    unet = pipe.unet
    original = dict(unet.attn_processors)
    store = install_capture(unet, list(resolutions), unet.config.sample_size)
    positions = concept_token_positions(pipe.tokenizer, prompt, concepts)
    acc = []

    def on_step(p, i, t, kwargs):
        maps = store.aggregate()[-1].mean(0).float()  # conditional half, heads averaged
        acc.append(aggregate_token_maps(maps, positions, how))
        store.reset()
        return kwargs

    try:
        with torch.no_grad():
            image = pipe(
                prompt,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator().manual_seed(seed),
                output_type="np",
                callback_on_step_end=on_step,
            ).images[0]
    finally:
        unet.set_attn_processor(original)
    maps = torch.stack(acc).mean(0)
    maps = maps / maps.sum((-1, -2), keepdim=True)
    return image, maps.cpu().numpy()


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
    t.add_argument("--out", type=Path, required=True)
    g = sub.add_parser("grid", help="sample grid (PNG)")
    g.add_argument("--config", type=Path, required=True)
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--plan", type=Path, required=True)
    g.add_argument("--manifests", type=Path, nargs="+", required=True)
    g.add_argument("--out", type=Path, required=True)
    lo = sub.add_parser("losses", help="loss curves (PNG)")
    lo.add_argument("--csv", type=Path, nargs="+", required=True)
    lo.add_argument("--out", type=Path, required=True)
    a = sub.add_parser("attention", help="object-token attention before/after (PNG)")
    a.add_argument("--config", type=Path, required=True)
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a.add_argument("--plan", type=Path, required=True)
    a.add_argument("--model", help="base model (default: model.pretrained)")
    a.add_argument("--model-dir", type=Path, help="folder of the finetuned deltas")
    a.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def _read_json(path: Path | None):
    if path is None:
        return None
    if not path.is_file():
        raise SepenError(f"{str(path)!r} does not exist: run the step that writes it first")
    return json.loads(path.read_text())


def main(args: argparse.Namespace) -> None:
    if args.figure == "table":
        anchors = load_config(args.config)["report"]["anchors"] if args.config else {}
        result = _read_json(args.metrics)
        models = result.get("models", {})
        notes = "; ".join(f"{k}: {v}" for k, v in models.items())
        page = table_page(
            result,
            _read_json(args.premise),
            _read_json(args.study),
            f"Models: {notes}" if notes else "",
            anchors,
        )
        write_text(args.out, page)
    elif args.figure == "grid":
        config = load_config(args.config, args.set)
        manifests = [_read_json(m) for m in args.manifests]
        image = sample_grid(
            read_plan(args.plan),
            manifests,
            config["report"]["grid_prompts"],
            config["report"]["grid_seeds"],
        )
        write_bytes(args.out, _png(image))
    elif args.figure == "losses":
        missing = [str(p) for p in args.csv if not p.is_file()]
        if missing:
            raise SepenError(f"loss logs missing: {missing[:3]}: run `sepen finetune` first")
        write_bytes(args.out, loss_figure(args.csv))
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
