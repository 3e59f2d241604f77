"""`sepen toy <step>`: the toy world's commands."""

from __future__ import annotations

import importlib
import sys

STEPS = {
    "pretrain": "sepen.toy.pretrain",
    "evaluate": "sepen.toy.evaluate",
    "study": "sepen.toy.study",
    "premise": "sepen.toy.premise",
    "card": "sepen.toy.card",
    "diagnose": "sepen.toy.diagnose",
}


def cli(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in STEPS:
        print(f"usage: sepen toy {{{','.join(STEPS)}}} [options]", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return importlib.import_module(STEPS[argv[0]]).cli(argv[1:])
