"""Numbers in the docs come from files: the README's table is generated from them, the pages'
placeholders render from them, and every `mean [lo, hi]` a page of today quotes is a record of
a file in the repository (history pages quote runs whose files were not kept)."""

import json
import re
from pathlib import Path

import pytest

from sepen.config import load_config, read_yaml
from sepen.docs_numbers import (
    PLACEHOLDER,
    SOURCES,
    Sources,
    ci_triples,
    format_value,
    readme_tables,
    render,
    unsourced_intervals,
)
from sepen.errors import SepenError

ROOT = Path(__file__).resolve().parents[2]
HISTORY = {"docs/toy-world-history.md", "docs/release-notes.md", "docs/mmdit-history.md"}
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
TODAY = [p for p in PAGES if str(p.relative_to(ROOT)) not in HISTORY]


def repository_records() -> set:
    triples = set()
    for path in [*(ROOT / "data").rglob("*.json"), *(ROOT / "bench").rglob("*.json")]:
        triples |= ci_triples(json.loads(path.read_text()))
    return triples


def test_every_source_file_exists_and_names_the_command_that_wrote_it():
    for name, (path, made_by) in SOURCES.items():
        assert (ROOT / path).is_file(), name
        assert made_by


def test_the_readme_table_is_generated_from_the_default_runs_file():
    text = (ROOT / "README.md").read_text()
    assert "<!-- sepen:table default_run -->" in text
    assert readme_tables(text, ROOT) == text, "run `sepen workflow docs` and commit README.md"
    run = Sources(ROOT)["default_run"]["metrics"]
    base = run["sets"]["held_out_pairs"]["base"]["success"]
    assert f"| base model | {format_value(base)} | - |" in text
    # a changed number is seen
    mutated = text.replace(format_value(base), "0.530 [0.471, 0.589]", 1)
    assert readme_tables(mutated, ROOT) != mutated


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_placeholder_on_a_page_renders_from_its_file(page):
    text = page.read_text()
    rendered = render(text, ROOT)  # an unknown file, key or table raises
    # nothing left that looks like a placeholder but is not one (a typo in its format)
    assert not re.search(r"\{\{\s*[a-z_]+:", rendered)
    assert len(PLACEHOLDER.findall(text)) == text.count("{{ ") - text.count("{{ }}")


@pytest.mark.parametrize("page", TODAY, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_interval_a_page_quotes_is_a_record_of_a_repository_file(page):
    text = render(page.read_text(), ROOT)
    assert unsourced_intervals(text, repository_records()) == []


def test_a_quoted_interval_that_no_file_holds_is_found():
    records = {(0.52857, 0.47143, 0.58929)}
    assert unsourced_intervals("success 0.529 [0.471, 0.589] and 0.53 [0.47, 0.59]", records) == []
    assert unsourced_intervals("success 0.528 [0.471, 0.589]", records) == ["0.528 [0.471, 0.589]"]


def test_values_are_formatted_and_unknown_keys_named():
    record = {"mean": -0.0001, "lo": -0.02, "hi": 0.0234, "n": 5}
    assert format_value(record) == "0.000 [-0.020, 0.023]"
    assert format_value(record, "+.3f") == "+0.000 [-0.020, +0.023]"
    assert format_value(12) == "12" and format_value(0.5, ".2f") == "0.50"
    assert render("{{ paper:fid.base | .2f }}", ROOT) == "32.96"
    with pytest.raises(SepenError, match="'nope' is not in the file"):
        render("{{ paper:fid.nope }}", ROOT)
    with pytest.raises(SepenError, match="is not one of"):
        render("{{ table:nope }}", ROOT)


def test_the_paper_configs_anchors_are_the_papers_file():
    paper = read_yaml((ROOT / "data/paper.yaml").read_text())
    anchors = load_config(ROOT / "config/sd14_pairs.yaml")["report"]["anchors"]
    for metric, values in anchors.items():
        assert values == {k: paper[metric][k] for k in values}, metric
    text = "\n".join(p.read_text() for p in TODAY)
    text = re.sub(r"<!-- sepen:table .*?<!-- /sepen:table -->", "", text, flags=re.S)
    for value in paper["fid"].values():  # typed nowhere: rendered from the file
        assert not re.search(rf"\b{value:.2f}\b", text), value


def test_a_study_table_has_a_row_per_cell_read_from_its_file():
    from sepen.docs_numbers import study_table

    study = json.loads((ROOT / "data/toy_mmdit/study.json").read_text())
    lines = study_table(study).splitlines()
    assert len(lines) == 2 + 1 + len(study["cells"])  # head, rule, base, one per cell
    assert lines[2].startswith("| base | - | 0.161 [0.089, 0.232] | - | - | 0.080 |")
    text = next(line for line in lines if line.startswith("| text-lr1e-5 |"))
    cells = [c.strip() for c in text.strip("|").split("|")]
    assert cells[1] == "joint_maps text, learning_rate 1e-05"
    assert cells[3:5] == ["-0.027 [-0.080, +0.027]", "-0.027 [-0.054, +0.000]"]
