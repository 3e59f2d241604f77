"""The documentation: an entry README of at most 150 lines, every relative link resolving
inside the repository, nothing pointing outside it, the method, licence and citation in it,
and reference pages that list every schema key and every command."""

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from sepen.__main__ import command_modules
from sepen.docs_reference import reference_pages, schema_keys

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    names = out.stdout.split() if out.returncode == 0 else []
    kinds = (".py", ".md", ".yaml", ".yml", ".smk", ".rst", ".toml", ".txt", ".cff", ".sh")
    return [ROOT / n for n in names if n.endswith(kinds) or n in ("Snakefile", "LICENSE")]


def test_readme_is_an_entry_page_of_at_most_150_lines():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    for heading in ("## Install", "## Fix my prompt", "## Run the default", "## Documentation"):
        assert heading in text
    for heading in ("## Project layout", "## Citation", "## Licence"):
        assert heading in text
    # at most one timing: "the default run takes about N minutes on 2 CPU cores"
    timings = re.findall(r"\b\d+(?:\.\d+)? ?(?:min|minutes|s|seconds|h|hours)\b", text)
    assert len(timings) == 1, timings


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), (page.name, target)
        assert path.exists(), (page.name, target)


def test_nothing_in_the_repository_points_outside_it():
    files = tracked_text_files()
    assert len(files) > 100
    for path in files:
        if path == Path(__file__):
            continue
        text = path.read_text(errors="replace")
        assert "../shared" not in text and "METHOD.md" not in text, path


def test_method_licence_and_citation_are_in_the_repository():
    method = (ROOT / "docs/method.md").read_text()
    for n in (1, 2, 3, 4):
        assert f"(Eq. {n})" in method
    for part in ("## The losses", "## The paper's settings", "## The paper's evaluation"):
        assert part in method
    assert "authors' research code" in method
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] and cff["license"] == "MIT"
    assert "Separate-and-Enhance" in cff["preferred-citation"]["title"]
    # code cites the method's equations
    losses = (ROOT / "sepen/losses.py").read_text()
    assert all(f"docs/method.md, Eq. {n}" in losses for n in (1, 2, 3))


def test_the_generated_reference_pages_are_committed_as_generated():
    for name, text in reference_pages().items():
        assert (ROOT / "docs/reference" / name).read_text() == text, name


def test_the_configuration_page_lists_every_schema_key_with_type_and_default():
    page = (ROOT / "docs/reference/configuration.md").read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([\w.]+)` \|.*$", page, re.M)}
    keys = [k for k, _ in schema_keys()]
    assert len(keys) > 100
    sections = {k for k, node in schema_keys() if node.get("properties")}
    for key in keys:
        if key in sections and "." not in key:
            assert f"## `{key}`" in page, key
        else:
            assert key in rows, key
            assert rows[key].count("|") >= 5 and "| - |" not in rows[key], key


def test_the_cli_page_lists_every_command_with_its_help():
    page = (ROOT / "docs/reference/cli.md").read_text()
    commands = set(re.findall(r"^## `(sepen [\w -]+)`$", page, re.M))
    assert commands == set(command_modules())
    for name in command_modules():
        assert f"usage: {name}" in page, name


def test_mkdocs_nav_lists_every_page():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def pages(node):
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [p for item in node for p in pages(item)]
        return [p for value in node.values() for p in pages(value)]

    listed = set(pages(nav))
    on_disk = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert listed == on_disk


def test_every_schema_node_holds_only_json_schema_keywords():
    # an unquoted comma in a YAML flow mapping cuts a description short and adds a junk key
    # ("trained pair and held-out pair.": null); the configuration page then shows the stub
    from sepen.config import load_schema

    keywords = {
        "$schema", "title", "description", "type", "default", "enum", "const", "pattern",
        "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "items", "minItems",
        "maxItems", "uniqueItems", "properties", "additionalProperties", "required", "oneOf",
        "anyOf", "allOf", "not", "examples", "format", "propertyNames", "minLength", "maxLength",
    }  # fmt: skip

    def walk(node, path):
        assert set(node) <= keywords, (path, sorted(set(node) - keywords))
        for key, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{key}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}.{key}")

    walk(load_schema(), "<schema>")
