"""Reading the JSON files one step writes and the next reads (plans, manifests, metrics).

A missing, unreadable or foreign file is a SepenError whose one line names the file, what is
wrong and the step that writes it, before the reading step starts any work.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from sepen.errors import SepenError


def read_json(path: str | Path, what: str, made_by: str, keys: Sequence[str] = ()) -> dict:
    """The JSON object in `path`, which must hold `keys`; `what` names the file for the
    message ("plan", "shard manifest"), `made_by` the command that writes it."""
    p = Path(path)
    if not p.is_file():
        raise SepenError(f"{what} {str(p)!r} does not exist: run `{made_by}` first")
    try:
        data = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SepenError(
            f"{what} {str(p)!r} is not valid JSON ({err}): write it again with `{made_by}`"
        ) from err
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise SepenError(
            f"{str(p)!r} is not a {what} (no {', '.join(repr(k) for k in missing)}): "
            f"give the file `{made_by}` writes"
        )
    return data


MANIFEST_KEYS = ("method", "shard", "shards", "images")
METRICS_KEYS = ("method", "shard", "rows")


def read_manifest(path: str | Path) -> dict:
    return read_json(path, "shard manifest", "sepen sample", MANIFEST_KEYS)


def read_metrics(path: str | Path) -> dict:
    return read_json(path, "shard metrics file", "sepen metrics", METRICS_KEYS)


def shard_files(folder: str | Path, methods: Sequence[str], shards: int) -> list[Path]:
    """`<folder>/<method>/shard-<k>.json` for every method and shard of a config: the files a
    step reads from a folder of per-shard results (manifests, metrics)."""
    return [Path(folder) / m / f"shard-{k}.json" for m in methods for k in range(shards)]
