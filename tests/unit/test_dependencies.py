"""The dependency files agree: constraints.txt pins torch, torchvision and diffusers' tested
minor version; environment.yml and the rules' conda environment carry the same pins and
pyproject's runtime dependencies; the installed diffusers is the pinned one."""

import re
from importlib.metadata import version
from pathlib import Path

import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]


def constraints() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pins = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {r.name: str(r.specifier) for r in pins}


def pip_section(path: Path) -> list[str]:
    deps = yaml.safe_load(path.read_text())["dependencies"]
    return next(d["pip"] for d in deps if isinstance(d, dict))


def project_dependencies() -> dict[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {(r := Requirement(d)).name: str(r.specifier) for d in data["project"]["dependencies"]}


def test_constraints_pin_torch_torchvision_and_a_diffusers_minor_version():
    pins = constraints()
    assert pins["torch"] == "==2.14.1" and pins["torchvision"] == "==0.29.1"
    assert re.fullmatch(r"==0\.\d+\.\*", pins["diffusers"])
    assert version("diffusers") in SpecifierSet(pins["diffusers"])
    # the pinned minor version lies in the range pyproject allows
    allowed = SpecifierSet(project_dependencies()["diffusers"])
    assert pins["diffusers"].removeprefix("==").replace("*", "0") in allowed


def test_environment_yml_carries_the_constraints_pins():
    listed = pip_section(ROOT / "environment.yml")
    for name, spec in constraints().items():
        assert f"{name}{spec}" in listed, name
    assert "-e .[dev]" in listed


def test_the_rules_conda_environment_is_pyprojects_dependencies_with_the_pins():
    listed = {
        (r := Requirement(d)).name: str(r.specifier)
        for d in pip_section(ROOT / "workflow/envs/sepen.yaml")
    }
    expected = {**project_dependencies(), **constraints()}
    assert listed == expected
