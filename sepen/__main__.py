"""`sepen <step> ...`: the command-line entry point; each step is a module with cli(argv)."""

from __future__ import annotations

import importlib
import sys

STEPS = {
    "finetune": ("sepen.finetune", "SepEn finetuning of the cross-attention keys"),
    "tiny-model": ("sepen.models.tiny", "save a tiny random SD-architecture pipeline"),
    "toy": ("sepen.toy.cli", "the toy world: `sepen toy pretrain` trains its base model"),
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
    module = importlib.import_module(STEPS[argv[0]][0])
    return module.cli(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
