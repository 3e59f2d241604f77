"""Every `sepen` command that README.md and docs/ document parses with the command's real
parser, with its required flags, and the repository files it names exist. (The release notes
name old flags as history, not commands to run; the generated reference pages print the
parsers' own help.) The `snakemake` lines are dry-run in
tests/workflow/test_documented_commands_run.py."""

from pathlib import Path

import pytest

from sepen.docs_commands import check_sepen, documented_commands, sepen_argv

ROOT = Path(__file__).resolve().parents[2]
SKIP = {"docs/release-notes.md"}
PAGES = [
    p
    for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    if str(p.relative_to(ROOT)) not in SKIP and "reference" not in p.parts
]


def sepen_commands():
    return [
        d for p in PAGES for d in documented_commands(p, ROOT) if not d.text.startswith("snakemake")
    ]


def test_the_docs_document_commands_and_the_extractor_finds_them():
    found = sepen_commands()
    assert len(found) >= 20
    texts = {d.text for d in found}
    assert any(t.startswith("sepen finetune --config config/custom_example.yaml") for t in texts)
    # a bare command name is a mention, not a command
    assert "sepen finetune" not in texts


@pytest.mark.parametrize("cmd", sepen_commands(), ids=str)
def test_every_documented_sepen_command_parses_and_its_files_exist(cmd):
    assert check_sepen(cmd.text, ROOT) is None


def test_a_command_without_a_required_flag_or_with_a_missing_file_is_caught(tmp_path):
    ok = "sepen toy diagnose --model M --delta D --concepts a b --out FILE"
    assert check_sepen(ok, ROOT) is None
    dropped = ok.replace(" --out FILE", "")
    assert "required: --out" in check_sepen(dropped, ROOT)
    assert "no such file" in check_sepen(
        "sepen toy card --config config/nope.yaml --model M --out F", ROOT
    )
    assert "invalid choice" in check_sepen("sepen tiny-model --kind sd9 --out D", ROOT)
    assert check_sepen("sepen --help", ROOT) is None
    assert "no sepen command" in check_sepen("sepen fly --now", ROOT)
    page = tmp_path / "page.md"
    page.write_text("Run `sepen toy pretrain --config config/config.yaml`.\n")
    [cmd] = documented_commands(page, tmp_path)
    assert cmd.line == 1 and "required: --out" in check_sepen(cmd.text, ROOT)
    assert sepen_argv("python3 -m sepen report table\\|grid --out x") == [
        "report",
        "table",
        "--out",
        "x",
    ]
