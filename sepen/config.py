"""Config loading and validation against the one sepen schema (sepen/schemas/)."""

from __future__ import annotations

import copy
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from sepen.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """YAML 1.1 SafeLoader that also reads 1e-5 (no dot) as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


SCHEMA_PATH = Path(str(resources.files("sepen").joinpath("schemas/config.schema.yaml")))


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _fill_defaults(config: dict, schema: dict) -> None:
    for key, sub in schema.get("properties", {}).items():
        if key not in config and "default" in sub:
            config[key] = copy.deepcopy(sub["default"])
        if isinstance(config.get(key), dict) and sub.get("type") == "object":
            _fill_defaults(config[key], sub)


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def validate_config(config: dict) -> dict:
    """A validated copy of `config` with every default filled in.

    Raises ConfigError naming the offending key, its value and what is allowed.
    """
    schema = load_schema()
    config = copy.deepcopy(config or {})
    if not isinstance(config, dict):
        raise ConfigError(f"a config must be a mapping of keys; got {type(config).__name__}")
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        if e.validator == "additionalProperties":
            allowed = sorted(e.schema.get("properties", {}))
            raise ConfigError(
                f"config key {_key_path(e)!s}: {e.message}; allowed keys here: {allowed}"
            )
        raise ConfigError(f"config key {_key_path(e)} = {e.instance!r} is invalid: {e.message}")
    _fill_defaults(config, schema)
    # `extends` is a loading directive (read_config_file resolves it), not a setting: kept out
    # of the validated config, so deltas, checkpoint stamps and params carry settings only
    config.pop("extends", None)
    return config


def set_override(config: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) in place."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key.sub=value")
    key, value = assignment.split("=", 1)
    node = config
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {part!r} is not a section")
    node[parts[-1]] = read_yaml(value)


def merge_configs(base: dict, top: dict) -> dict:
    """`top` layered over `base`: sections merged key by key, any other value replaced (as
    Snakemake merges a --configfile into the workflow's config)."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_configs(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_extends(config: dict, folder: str | Path, seen: tuple = ()) -> dict:
    """The config with the chain of files it `extends` merged in below it (no `extends` left)."""
    base = (config or {}).get("extends")
    if not base:
        return {k: v for k, v in (config or {}).items() if k != "extends"}
    path = (Path(folder) / base).resolve()
    if path in seen:
        raise ConfigError(f"config key extends = {base!r} makes a cycle: {[str(p) for p in seen]}")
    if not path.is_file():
        raise ConfigError(
            f"config key extends = {base!r} names no file ({path}): give a path relative to "
            "the extending config's folder"
        )
    parent = read_yaml(path.read_text()) or {}
    below = resolve_extends(parent, path.parent, (*seen, path))
    return merge_configs(below, {k: v for k, v in config.items() if k != "extends"})


def read_config_file(path: str | Path) -> dict:
    """A config file's keys, with the files it extends merged in (not yet validated)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    return resolve_extends(read_yaml(path.read_text()) or {}, path.parent)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """Read a YAML config (or start empty) with the files it extends, apply `key=value`
    overrides, validate."""
    config: dict[str, Any] = {}
    if path is not None:
        config = read_config_file(path)
    for assignment in overrides or []:
        set_override(config, assignment)
    return validate_config(config)
