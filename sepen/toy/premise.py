"""`sepen toy premise`: the premise check before and after SepEn.

The share of each object token's attention mass that falls on its own object (and on the other
object) in rendered two-object scenes with known masks, for the base model and with a delta.
"""

from __future__ import annotations

from pathlib import Path

from sepen.atomic import write_json
from sepen.command import run_step, step_parser
from sepen.config import load_config
from sepen.errors import SepenError


def premise_check(config: dict, model: str, delta: str | None, scenes: int) -> dict:
    from sepen.delta import apply_delta
    from sepen.models import load_pipeline
    from sepen.toy.evaluate import premise
    from sepen.toy.pretrain import prepare_world

    toy = prepare_world(config)
    pipe = load_pipeline(model)
    out = {"scenes": scenes, "base": premise(pipe, toy, scenes)}
    if delta:
        pipe = load_pipeline(model)
        apply_delta(pipe, delta)
        out["sepen"] = premise(pipe, toy, scenes)
    return out


def cli(argv=None) -> int:
    p = step_parser("sepen toy premise", __doc__.split("\n")[0])
    p.add_argument("--model", help="the toy base model folder (default: model.pretrained)")
    p.add_argument("--delta", type=Path, help="a SepEn delta of that model")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    def body():
        config = load_config(args.config, args.set)
        scenes = config["toy"]["premise_scenes"]
        if scenes < 1:
            raise SepenError("toy.premise_scenes is 0: set it to 1 or more to run the check")
        if args.delta is not None and not args.delta.is_file():
            raise SepenError(f"delta {str(args.delta)!r} does not exist: run `sepen finetune`")
        model = args.model or config["model"]["pretrained"]
        write_json(args.out, premise_check(config, model, args.delta, scenes))

    return run_step("sepen toy premise", body)
