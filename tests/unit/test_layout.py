"""The package's shape: modules of one concern (none over 450 lines), command modules as
leaves, internal imports at module top, and one checkpoint protocol."""

import ast
from pathlib import Path

import pytest

from sepen.__main__ import command_modules
from sepen.workflow import PACKAGE_DIR, module_file

MODULES = sorted(PACKAGE_DIR.rglob("*.py"))
COMMAND_MODULES = set(command_modules().values())


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported sepen module, at module top?) of every import statement in a file."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sepen"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found += [(n, id(node) in top) for n in names if module_file(n) is not None]
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names if a.name.startswith("sepen")]
    return found


def test_every_module_is_found_and_the_commands_are_modules_of_sepen_cli():
    assert len(MODULES) > 60
    assert COMMAND_MODULES and all(m.startswith("sepen.cli.") for m in COMMAND_MODULES)
    assert all(module_file(m) is not None for m in COMMAND_MODULES)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _name(p))
def test_no_module_is_over_450_lines(path):
    assert len(path.read_text().splitlines()) <= 450


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _name(p))
def test_no_module_imports_a_command_and_internal_imports_sit_at_the_top(path):
    for module, at_top in _imports(path):
        assert module not in COMMAND_MODULES, f"{_name(path)} imports the command {module}"
        assert at_top, f"{_name(path)} imports {module} inside a function"


def test_one_checkpoint_protocol():
    """Hidden folders, renames and pruning of checkpoints live in sepen.checkpoints only."""
    owners = set()
    for path in MODULES:
        text = path.read_text()
        if ".checkpoint-" in text or "os.rename(" in text or 'glob("checkpoint-' in text:
            owners.add(_name(path))
    assert owners == {"sepen.checkpoints"}
    for user in ("sepen.finetune.state", "sepen.toy.checkpoints", "sepen.cli.finetune"):
        assert any(m == "sepen.checkpoints" for m, _ in _imports(module_file(user))), user


def test_test_files_have_unique_names():
    """pytest imports test modules by basename (rootdir mode, no packages): two files of one
    name in different layers stop the whole collection."""
    tests = Path(__file__).resolve().parents[1]
    names = [p.name for p in tests.rglob("test_*.py")]
    assert len(names) > 30
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
