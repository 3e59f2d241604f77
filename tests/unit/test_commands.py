"""One CLI: every command is built on one parser helper with the shared --config/--set, one
name means one thing, old spellings still work with a one-line note, and `sepen --help` and
`sepen toy --help` list every command."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from sepen.__main__ import COMMANDS, TOY_COMMANDS, command_modules, main
from sepen.docs_reference import command_parsers

PARSERS = command_parsers()


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {o: a for a in parser._actions for o in a.option_strings}


def _parts(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser itself, or each part of a command with parts (report, workflow)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {part: sub for a in subs for part, sub in a.choices.items()} or {"": parser}


def test_every_command_of_both_tables_has_a_parser():
    expected = {f"sepen {k}" for k, (m, _) in COMMANDS.items() if m}
    expected |= {f"sepen toy {k}" for k in TOY_COMMANDS}
    assert set(PARSERS) == expected == set(command_modules())
    assert len(PARSERS) == 22


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_help_of_every_command_shows_the_shared_config_and_set_options(name, capsys):
    parser = PARSERS[name]
    assert parser.prog == name
    for part, sub in _parts(parser).items():
        opts = _options(sub)
        assert {"--config", "--set"} <= set(opts), (name, part)
        assert opts["--config"].help and "schema" in opts["--config"].help
        assert opts["--set"].help and "KEY=VALUE" == opts["--set"].metavar
        assert opts["--set"].default == [] and opts["--set"].nargs is None
    argv = name.split()[1:] + ["--help"]
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: {name}" in out and "--config CONFIG" in out and "--set KEY=VALUE" in out


def test_one_name_for_one_thing_across_commands():
    """A checkpoint folder is --state-dir, a folder of deltas --deltas-dir, one delta --delta;
    the old spellings are hidden aliases only."""
    meaning = {
        "--state-dir": "state_dir",
        "--deltas-dir": "deltas_dir",
        "--delta": "delta",
    }
    retired = {"--output-dir", "--model-dir", "--deltas"}
    for name, parser in PARSERS.items():
        for part, sub in _parts(parser).items():
            opts = _options(sub)
            for option, dest in meaning.items():
                if option in opts:
                    assert opts[option].dest == dest, (name, part, option)
            for option in retired & set(opts):
                assert opts[option].help == argparse.SUPPRESS, (name, part, option)
            # an input grid of settings is --cells; --grid is only ever an output picture
            if "--grid" in opts and opts["--grid"].help != argparse.SUPPRESS:
                assert "PNG" in opts["--grid"].help, (name, part)


@pytest.mark.parametrize(
    "argv, dest, value, new",
    [
        (["finetune", "--out", "d", "--output-dir", "s"], "state_dir", "s", "--state-dir"),
        (
            ["sample", "--config", "c", "--plan", "p", "--method", "base", "--images-dir", "i",
             "--out", "o", "--model-dir", "m"],
            "deltas_dir", "m", "--deltas-dir",
        ),
        (["toy", "premise", "--config", "c", "--plan", "p", "--out", "o", "--model-dir", "m"],
         "deltas_dir", "m", "--deltas-dir"),
        (["generate", "--deltas", "m", "--out", "o"], "deltas_dir", "m", "--deltas-dir"),
        (["toy", "study", "--config", "c", "--grid", "g.yaml", "--out-dir", "o"], "cells",
         "g.yaml", "--cells"),
        (["export-lora", "d.safetensors", "--out", "o"], "delta", "d.safetensors", "--delta"),
    ],
)  # fmt: skip
def test_old_spellings_still_work_with_a_one_line_deprecation_note(argv, dest, value, new, capsys):
    name = "sepen " + " ".join(argv[:2] if argv[0] == "toy" else argv[:1])
    rest = argv[2:] if argv[0] == "toy" else argv[1:]
    args = PARSERS[name].parse_args(rest)
    assert str(getattr(args, dest)) == value
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "deprecated" in err[0] and f"use {new}" in err[0]


def test_report_attention_takes_the_deltas_folder_under_its_new_name():
    args = PARSERS["sepen report"].parse_args(
        ["attention", "--config", "c", "--plan", "p", "--deltas-dir", "m", "--out", "o"]
    )
    assert args.deltas_dir == Path("m")


@pytest.mark.parametrize("argv, table", [(["--help"], COMMANDS), (["toy", "--help"], TOY_COMMANDS)])
def test_top_level_help_lists_every_command_with_its_description(argv, table):
    done = subprocess.run(
        [sys.executable, "-m", "sepen", *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0
    for name, (_, text) in table.items():
        assert f"  {name} " in done.stdout and text in done.stdout, name
