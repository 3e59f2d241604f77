"""`sepen workflow`: the workflow's generated files and the code each step depends on.

- `dvc-yaml`: write dvc.yaml from the step table and the plan (`--check`: fail when the file
  differs from what would be written);
- `code STEP`: the files of a step's code and their hash (what re-runs the step);
- `docs`: write the generated reference pages, configuration (from the schema) and CLI (from
  the parsers), and the README's tables (from the files sepen.docs_numbers names) (`--check`
  likewise).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sepen.atomic import write_text
from sepen.command import add_config_options, command_parser, run_step
from sepen.docs_numbers import readme_tables
from sepen.docs_reference import reference_pages
from sepen.dvc_pipeline import dvc_yaml_text
from sepen.errors import SepenError
from sepen.workflow import STEP_COMMANDS, code_hash, step_code


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("sepen workflow", "The workflow's generated files and code hashes.")
    sub = p.add_subparsers(dest="what", required=True, metavar="PART")
    shared = argparse.ArgumentParser(add_help=False)
    add_config_options(shared)
    d = sub.add_parser("dvc-yaml", parents=[shared], help="write dvc.yaml from the step table")
    d.add_argument("--out", type=Path, default=Path("dvc.yaml"), help="default: dvc.yaml")
    d.add_argument("--check", action="store_true", help="fail if --out differs; write nothing")
    c = sub.add_parser("code", parents=[shared], help="a step's code files and their hash")
    c.add_argument("step", choices=sorted(STEP_COMMANDS), help="a workflow step")
    r = sub.add_parser("docs", parents=[shared], help="write the generated reference pages")
    r.add_argument("--out-dir", type=Path, default=Path("docs/reference"), help="their folder")
    r.add_argument("--check", action="store_true", help="fail if a page differs; write nothing")
    return p


def _write_or_check(path: Path, text: str, check: bool, how: str) -> None:
    if check:
        if not path.is_file() or path.read_text() != text:
            raise SepenError(f"{path} is not what `{how}` writes: run it and commit the file")
        return
    write_text(path, text)
    print(f"wrote {path}", file=sys.stderr)


def main(args: argparse.Namespace) -> None:
    if args.what == "dvc-yaml":
        config = str(args.config or "config/config.yaml")
        if args.set:
            raise SepenError("dvc.yaml reads its params from a file: give --config, not --set")
        how = f"sepen workflow dvc-yaml --config {config}"
        _write_or_check(args.out, dvc_yaml_text(config), args.check, how)
    elif args.what == "code":
        print("\n".join(step_code(args.step)))
        print(f"sha256 {code_hash(args.step)}")
    else:
        for name, text in reference_pages().items():
            _write_or_check(args.out_dir / name, text, args.check, "sepen workflow docs")
        readme = Path("README.md")
        if readme.is_file():  # its tables, from the files the docs render theirs from
            text = readme_tables(readme.read_text(), Path("."))
            _write_or_check(readme, text, args.check, "sepen workflow docs")


def cli(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_step("sepen workflow", lambda: main(args))
