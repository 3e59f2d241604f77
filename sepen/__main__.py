"""`sepen <step> ...`: the command-line entry point; each step is a module with cli(argv)."""

from __future__ import annotations

import importlib
import sys

STEPS = {
    "concepts": ("sepen.plan:concepts_cli", "concept lists with seen/unseen splits"),
    "prompts": ("sepen.plan:prompts_cli", "prompt sets, seeds and models to finetune (the plan)"),
    "finetune": ("sepen.finetune", "SepEn finetuning of the cross-attention keys"),
    "sample": ("sepen.sample", "images of one method for one shard of prompts (resumable)"),
    "metrics": ("sepen.metrics", "per-image metrics of one sampling shard"),
    "fid": ("sepen.metrics:fid_cli", "FID of a method's images against reference images"),
    "aggregate": ("sepen.aggregate", "per-set metrics with bootstrap CIs and paired differences"),
    "report": ("sepen.report", "the report's tables and figures"),
    "generate": ("sepen.generate", "images of your prompts with a base model and SepEn deltas"),
    "export-lora": ("sepen.lora", "a delta as a LoRA file for diffusers, ComfyUI, AUTOMATIC1111"),
    "lora-rank": ("sepen.lora:rank_cli", "the LoRA rank a delta's key change needs"),
    "models": ("sepen.models.required", "every model a config needs: present or missing"),
    "tiny-model": ("sepen.models.tiny", "save a tiny random SD-architecture pipeline"),
    "toy": ("sepen.toy.cli", "the toy world: pretrain, evaluate, premise, study"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STEPS:
        width = max(map(len, STEPS))
        lines = [f"  {name:<{width}}  {text}" for name, (_, text) in STEPS.items()]
        print("usage: sepen <step> [options]\n\nsteps:\n" + "\n".join(lines), file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nsepen: error: unknown step {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    module, _, func = STEPS[argv[0]][0].partition(":")
    return getattr(importlib.import_module(module), func or "cli")(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
