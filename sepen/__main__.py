"""`sepen <command> ...`: the command-line entry point.

Each command is a module of `sepen.cli` with `build_parser()` and `cli(argv)`; the tables below
are the one list of commands (`sepen --help`, `sepen toy --help` and the CLI reference page
are made from them).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "concepts": ("sepen.cli.concepts", "concept lists with seen/unseen splits"),
    "prompts": ("sepen.cli.prompts", "prompt sets, seeds and models to finetune (the plan)"),
    "finetune": ("sepen.cli.finetune", "SepEn finetuning of the cross-attention keys"),
    "sample": ("sepen.cli.sample", "images of one method for one shard of prompts (resumable)"),
    "metrics": ("sepen.cli.metrics", "per-image metrics of one sampling shard"),
    "fid": ("sepen.cli.fid", "FID of a method's images against reference images"),
    "aggregate": (
        "sepen.cli.aggregate",
        "per-set metrics with bootstrap CIs and paired differences",
    ),
    "report": ("sepen.cli.report", "the report's tables and figures"),
    "generate": ("sepen.cli.generate", "images of your prompts with a base model and SepEn deltas"),
    "export-lora": (
        "sepen.cli.export_lora",
        "a delta as a LoRA file for diffusers, ComfyUI, A1111",
    ),
    "lora-rank": ("sepen.cli.lora_rank", "the LoRA rank a delta's key change needs"),
    "models": ("sepen.cli.models", "every model a config needs: present or missing"),
    "tiny-model": ("sepen.cli.tiny_model", "save a tiny random SD-architecture pipeline"),
    "workflow": ("sepen.cli.workflow", "the workflow's generated files (dvc.yaml) and code hashes"),
    "toy": (None, "the toy world's commands (sepen toy --help)"),
}

TOY_COMMANDS = {
    "pretrain": ("sepen.cli.toy.pretrain", "train the toy base model (resumable)"),
    "card": ("sepen.cli.toy.card", "the world card of a toy base model"),
    "sweep": ("sepen.cli.toy.sweep", "a toy base model at other sampling settings (card seeds)"),
    "evaluate": ("sepen.cli.toy.evaluate", "exact-detector metrics of a base model and a delta"),
    "premise": ("sepen.cli.toy.premise", "attention on each object, and SepEn's values vs failure"),
    "study": ("sepen.cli.toy.study", "a settings study: base vs SepEn per settings cell"),
    "diagnose": ("sepen.cli.toy.diagnose", "what one delta does to attention and keys"),
    "test-time": (
        "sepen.cli.toy.test_time",
        "test-time settings study: base vs A&E and SepEn at test time per cell",
    ),
}


def _usage(prog: str, table: dict) -> str:
    width = max(map(len, table))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in table.items()]
    return (
        f"usage: {prog} <command> [options]\n\ncommands:\n"
        + "\n".join(lines)
        + f"\n\n`{prog} <command> --help` lists a command's options; every command takes "
        "--config FILE and --set KEY=VALUE."
    )


def _dispatch(prog: str, table: dict, argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(prog, table), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] not in table:
        print(_usage(prog, table), file=sys.stderr)
        print(f"\n{prog}: error: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    if argv[0] == "toy" and table is COMMANDS:
        return _dispatch("sepen toy", TOY_COMMANDS, argv[1:])
    return importlib.import_module(table[argv[0]][0]).cli(argv[1:])


def command_modules() -> dict[str, str]:
    """{'sepen finetune': 'sepen.cli.finetune', ...}: every command and its module."""
    out = {f"sepen {k}": m for k, (m, _) in COMMANDS.items() if m}
    out.update({f"sepen toy {k}": m for k, (m, _) in TOY_COMMANDS.items()})
    return out


def main(argv=None) -> int:
    return _dispatch("sepen", COMMANDS, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())
