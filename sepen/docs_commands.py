"""The `sepen` and `snakemake` commands the README and docs/ document, found and checked.

A documented command is a line of a shell code block, or an inline code span that gives at
least one option (`sepen toy card --config ...`; a bare `sepen finetune` names a command and is
not one). Placeholders (`M`, `<command>`, `...`) stand for values. `check_sepen` parses a
`sepen` line with the command's real parser (required flags present, choices valid) and checks
that the repository files it reads exist; snakemake lines are dry-run by the workflow tests.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from sepen.docs_reference import command_parsers

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)?)`")
START = re.compile(r"^(sepen|snakemake|python3? -m sepen)(\s|$)")
SHELLS = ("bash", "sh", "shell", "console", "")
# a value under these folders names a file the repository ships: it must exist (outputs and
# files a run makes, such as results/..., are not checked)
SHIPPED = ("config/", "data/", "profiles/", "bench/")


@dataclass(frozen=True)
class Documented:
    page: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def _commands_in(line: str) -> list[str]:
    line = line.split(" #", 1)[0].strip()  # a trailing comment
    return [p.strip() for p in re.split(r"&&|;|\|\||\s\|\s", line) if START.match(p.strip())]


def documented_commands(page: Path, root: Path) -> list[Documented]:
    """The commands `page` documents (shell blocks, and inline spans with an option)."""
    text = page.read_text()
    name = str(page.relative_to(root))
    found = []
    for m in FENCE.finditer(text):
        if m.group(1) not in SHELLS:
            continue
        first = text[: m.start(2)].count("\n") + 1
        body = m.group(2).replace("\\\n", " \n")
        for k, line in enumerate(body.splitlines()):
            for cmd in _commands_in(line.replace("$ ", "", 1) if line.startswith("$ ") else line):
                found.append(Documented(name, first + k, cmd))
    outside = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for m in INLINE.finditer(outside):
        span = " ".join(m.group(1).split())
        if START.match(span) and " -" in span:
            line = outside[: m.start()].count("\n") + 1
            found += [Documented(name, line, cmd) for cmd in _commands_in(span)]
    return found


def _placeholder(token: str) -> bool:
    return (
        token in ("...", "…")
        or token.endswith("...")
        or (token.startswith("<") and token.endswith(">"))
        or bool(re.fullmatch(r"[A-Z][A-Z_]*", token))  # M, D, FILE, LR
        or token.startswith("$")
    )


def sepen_argv(command: str) -> list[str]:
    """The arguments after `sepen` (alternatives `a|b` read as their first)."""
    tokens = shlex.split(command.replace("\\|", "|"))
    tokens = tokens[3:] if tokens[0].startswith("python") else tokens[1:]
    return [t.split("|")[0] if "|" in t and not t.startswith("-") else t for t in tokens]


def _stand_ins(parser, argv: list[str]) -> list[str]:
    """`argv` with each placeholder replaced by a value its option accepts (a placeholder
    stands for a valid value: its first choice, 0 for a number, else a string)."""
    actions = {}
    for action in parser._actions:
        for option in action.option_strings:
            actions[option] = action
    out = []
    for k, token in enumerate(argv):
        if not _placeholder(token):
            out.append(token)
            continue
        action = actions.get(argv[k - 1]) if k else None
        if action is not None and action.choices:
            out.append(str(next(iter(action.choices))))
        elif action is not None and action.type in (int, float):
            out.append("0")
        else:
            out.append("x")
    return out


def check_sepen(command: str, root: Path) -> str | None:
    """None when `command` parses with its real parser and the files it reads exist, else why
    not (argparse's message, or the missing file)."""
    argv = sepen_argv(command)
    if argv and _placeholder(argv[0]):
        argv = []  # `sepen <command> --config ...`: only its files can be checked
    parsers = command_parsers()
    name = next(
        (
            n
            for n in sorted(parsers, key=len, reverse=True)
            if argv[: n.count(" ")] == n.split()[1:]
        ),
        None,
    )
    for value in argv:
        if value.startswith(SHIPPED) and not (root / value.split("=")[-1]).exists():
            return f"{value}: no such file in the repository"
    if name is None:  # `sepen --help`, `sepen toy --help`, or no command at all
        known = argv == [] or argv[-1] in ("--help", "-h") and len(argv) <= 2
        return None if known else f"no sepen command {' '.join(argv[:2])!r}"
    rest = _stand_ins(parsers[name], argv[name.count(" ") :])
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parsers[name].parse_args(rest)
        except SystemExit as e:
            if e.code not in (0, None):
                return err.getvalue().strip().splitlines()[-1]
    return None
