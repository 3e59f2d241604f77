"""`sepen generate`: images of your prompts and seeds with a base model and SepEn deltas.

Give one delta (`--delta`), or a folder of them (`--deltas-dir`, e.g. the per-pair models of a
workflow run): each prompt then uses the delta trained on exactly the concepts it names (or a
joint delta that covers them all). `--test-time attend_excite|sepen_test_time` with
`--concepts` guides each image at sampling time instead (or on top of a delta), with the
config's settings of that method (docs/test-time.md); no finetuning needed. Images go where
`sepen sample` puts them, `<out>/<prompt id>/seed-<seed>.png` (written atomically; a re-run
keeps finished images), with a manifest `<out>/generate.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path

from sepen.atomic import write_json
from sepen.command import add_deprecated, command_parser, config_from, run_step
from sepen.delta import check_base_model, read_delta
from sepen.errors import SepenError
from sepen.image_store import draw_and_save, image_path, is_complete
from sepen.models import load_pipeline
from sepen.pipelines import DeltaSwitcher, device_and_dtype, group_by
from sepen.plan import find_concepts, slugify
from sepen.sampling import sample
from sepen.test_time import METHODS as TEST_TIME_METHODS
from sepen.test_time import GuidanceMethod

log = logging.getLogger("sepen.generate")


def delta_concepts(path: Path) -> tuple[list[str], str]:
    """The concepts a delta was finetuned on, and its mode (pairs or joint)."""

    meta = read_delta(path)[1]
    ft = json.loads(meta.get("config", "{}")).get("finetune", {})
    if not ft.get("concepts"):
        raise SepenError(f"delta {str(path)!r} records no concepts: write it with `sepen finetune`")
    return list(ft["concepts"]), ft.get("mode", "pairs")


def choose_delta(prompt: str, deltas: dict[Path, tuple[list[str], str]]) -> Path:
    """The delta for a prompt: the one trained on exactly its concepts, else a joint one that
    covers them; an error naming the prompt and the deltas there are when none fits."""

    vocabulary = sorted({c for concepts, _ in deltas.values() for c in concepts})
    named = find_concepts(prompt, vocabulary)
    exact = [p for p, (c, mode) in deltas.items() if Counter(c) == Counter(named)]
    if named and exact:
        return sorted(exact)[0]
    covering = [
        p for p, (c, mode) in deltas.items() if mode == "joint" and named and set(named) <= set(c)
    ]
    if covering:
        return sorted(covering)[0]
    have = "; ".join(f"{p.name}: {c}" for p, (c, _) in sorted(deltas.items()))
    raise SepenError(
        f"no delta covers prompt {prompt!r} (it names {named}); the deltas are {have}: "
        f"finetune one for its concepts (`sepen finetune --concepts {' '.join(named) or '...'}`)"
    )


def parse_seeds(values: list[str]) -> list[int]:
    """Seeds from '0 1 5' or ranges '0-3' (inclusive)."""
    seeds: list[int] = []
    for v in values:
        lo, sep, hi = v.partition("-")
        try:
            seeds += list(range(int(lo), int(hi) + 1)) if sep else [int(v)]
        except ValueError as err:
            raise SepenError(f"seed {v!r} is not a number or a range like 0-3") from err
    if not seeds or min(seeds) < 0:
        raise SepenError(f"seeds {values} must be non-negative numbers or ranges like 0-3")
    return list(dict.fromkeys(seeds))


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts is not None:
        if not args.prompts.is_file():
            raise SepenError(f"prompt file {str(args.prompts)!r} does not exist")
        prompts += [line.strip() for line in args.prompts.read_text().splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise SepenError("no prompt given: use --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def main(args: argparse.Namespace) -> dict:
    config = config_from(args)
    prompts = read_prompts(args)
    seeds = parse_seeds(args.seeds)
    if args.deltas_dir is not None:
        if not args.deltas_dir.is_dir():
            raise SepenError(f"delta folder {str(args.deltas_dir)!r} does not exist")
        found = sorted(args.deltas_dir.glob("*.safetensors"))
        if not found:
            raise SepenError(f"delta folder {str(args.deltas_dir)!r} holds no .safetensors delta")
        deltas = {p: delta_concepts(p) for p in found}
        chosen = {prompt: choose_delta(prompt, deltas) for prompt in prompts}
    else:
        if args.delta is not None:
            read_delta(args.delta)  # a missing or corrupt delta fails here, before loading
        chosen = {prompt: args.delta for prompt in prompts}
    used = sorted({str(d) for d in chosen.values() if d is not None})
    model = args.model or (read_delta(used[0])[1].get("base_model") if used else None)
    model = model or config["model"]["pretrained"]
    for delta in used:
        check_base_model(delta, model)
    sp = config["sampling"]
    steps = args.steps or sp["steps"]
    guidance = sp["guidance_scale"] if args.guidance is None else args.guidance
    guided = None
    if args.test_time is not None:
        if not args.concepts or len(args.concepts) < 2:
            raise SepenError(
                f"--test-time {args.test_time} needs --concepts naming two or more objects of "
                f"the prompts (got {args.concepts or []}), e.g. --concepts cat dog"
            )
        config["sampling"]["steps"] = steps
        guided = GuidanceMethod.from_config(args.test_time, config)
    elif args.concepts:
        raise SepenError("--concepts is read with --test-time only: add --test-time METHOD")
    items = [(prompt, s) for prompt in prompts for s in seeds]
    todo = [(p, s) for p, s in items if not is_complete(image_path(args.out, slugify(p), s))]
    if todo:
        device, dtype = device_and_dtype(sp)
        pipe = load_pipeline(model, config["model"]["revision"], dtype=dtype, device=device)
        if guided is not None:  # every prompt checked before the first image
            guided.check(pipe)
            entries = {p: {"prompt": p, "concepts": list(args.concepts)} for p in prompts}
            where = dict(zip(prompts, guided.positions(pipe, list(entries.values()))))

        def draw(chunk):
            prompts_, seeds_ = [p for p, _ in chunk], [s for _, s in chunk]
            if guided is not None:
                return guided.sample(
                    pipe, [entries[p] for p in prompts_], [where[p] for p in prompts_], seeds_,
                    guidance,
                )  # fmt: skip
            return sample(pipe, prompts_, seeds_, steps, guidance, len(chunk))

        draw_and_save(
            group_by(items, lambda item: chosen[item[0]]),
            draw,
            lambda item: image_path(args.out, slugify(item[0]), item[1]),
            sp["batch_size"],
            "generate",
            DeltaSwitcher(pipe),
            missing=set(todo),
        )
    manifest = {
        "model": model,
        "steps": steps,
        "guidance_scale": guidance,
        "test_time": args.test_time,
        "generated": len(todo),
        "reused": len(items) - len(todo),
        "images": [
            {
                "prompt": p,
                "prompt_id": slugify(p),
                "seed": s,
                "delta": None if chosen[p] is None else str(chosen[p]),
                "path": str(image_path(args.out, slugify(p), s)),
            }
            for p, s in items
        ],
    }
    write_json(Path(args.out) / "generate.json", manifest)
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("sepen generate", __doc__.split("\n")[0].split(": ", 1)[1])
    p.add_argument("--model", help="base model (default: the one the delta was trained on)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--delta", type=Path, help="one SepEn delta for every prompt")
    which.add_argument("--deltas-dir", type=Path, help="a folder of deltas, chosen per prompt")
    add_deprecated(which, "--deltas", "--deltas-dir", "deltas_dir", type=Path)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", type=Path, help="a text file, one prompt per line")
    p.add_argument("--seeds", nargs="+", default=["0-3"], help="seeds or ranges (0-3)")
    p.add_argument("--steps", type=int, help="denoising steps (default: sampling.steps)")
    p.add_argument("--guidance", type=float, help="guidance scale (sampling.guidance_scale)")
    p.add_argument(
        "--test-time",
        choices=TEST_TIME_METHODS,
        help="guide each image at sampling time with this method (evaluation.<method> settings)",
    )
    p.add_argument("--concepts", nargs="+", help="with --test-time: the objects every prompt names")
    p.add_argument("--out", type=Path, required=True, help="the images' folder")
    return p


def cli(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_step("sepen generate", lambda: main(args))
