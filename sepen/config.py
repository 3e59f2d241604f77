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


_JSON_TYPES = {
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "string": lambda v: isinstance(v, str),
}


def coerce_strings(config: dict, schema: dict | None = None) -> dict:
    """`config` with the strings the schema does not allow read as YAML, in place.

    Snakemake hands nested `--config` values over as strings (`--config
    'toy={pretrain: {run: true}}'` gives run = 'true'); each string at a key whose schema types
    exclude strings becomes its YAML value when that value has an allowed type, else it stays
    (and validation names it). Lists are walked item by item.
    """
    schema = load_schema() if schema is None else schema

    def coerce(value, sub: dict):
        types = sub.get("type")
        types = [types] if isinstance(types, str) else (types or [])
        if isinstance(value, dict):
            props = sub.get("properties", {})
            extra = sub.get("additionalProperties")
            for key in value:
                inner = props.get(key, extra if isinstance(extra, dict) else None)
                if inner is not None:
                    value[key] = coerce(value[key], inner)
            return value
        if isinstance(value, list) and isinstance(sub.get("items"), dict):
            return [coerce(v, sub["items"]) for v in value]
        if isinstance(value, str) and types and "string" not in types:
            parsed = read_yaml(value)
            if any(_JSON_TYPES[t](parsed) for t in types if t in _JSON_TYPES):
                return coerce(parsed, sub) if isinstance(parsed, (dict, list)) else parsed
        return value

    return coerce(config, schema)


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
