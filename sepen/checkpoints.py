"""The one checkpoint protocol of sepen (finetuning and toy pretraining).

A run keeps its state in a folder of `checkpoint-<step>/` folders. A checkpoint is written into
a hidden `.checkpoint-<step>.tmp/` folder, flushed, and renamed when complete, so a run stopped
at any moment leaves only complete checkpoints; a hidden folder left by a save cut short is
never resumed from and is removed by the next run (`clean_partial`). Resuming with 'latest'
takes the newest checkpoint whose `problem` is None, skipping damaged ones with a warning. Each
user of the protocol says what makes one of its checkpoints complete (`problem`), and whether
it was made with the settings of the run at hand (`same_settings`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from sepen.atomic import fsync_dir, fsync_tree, write_json
from sepen.errors import SepenError

log = logging.getLogger("sepen.checkpoints")

SETTINGS_STAMP = "run_settings.json"

Problem = Callable[[Path], "str | None"]


def step_of(folder: Path) -> int:
    return int(Path(folder).name.split("-")[1])


def checkpoints(state_dir: Path) -> list[Path]:
    """The visible checkpoints of `state_dir`, oldest first."""
    return sorted(Path(state_dir).glob("checkpoint-*"), key=step_of)


def clean_partial(state_dir: Path) -> None:
    """Remove the hidden folders of saves cut short."""
    for tmp in Path(state_dir).glob(".checkpoint-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def partial_folder(state_dir: Path, step: int) -> Path:
    return Path(state_dir) / f".checkpoint-{step}.tmp"


def publish(tmp: Path, state_dir: Path, step: int) -> Path:
    """Make a fully written hidden folder the visible `checkpoint-<step>`."""
    folder = Path(state_dir) / f"checkpoint-{step}"
    fsync_tree(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    fsync_dir(state_dir)
    return folder


def prune(state_dir: Path, keep: int | None) -> None:
    """Remove all but the newest `keep` checkpoints (None keeps them all)."""
    if keep is None:
        return
    found = checkpoints(state_dir)
    for old in found[: max(0, len(found) - keep)]:
        shutil.rmtree(old)


def find_checkpoint(
    state_dir: Path,
    resume: str | None,
    problem: Problem,
    what: str = "checkpoint",
    at_most: int | None = None,
    same_settings: Callable[[Path], bool] | None = None,
    settings_name: str = "settings",
) -> Path | None:
    """The checkpoint to continue from: a given folder, or the newest complete one ('latest')
    of a step <= `at_most` (when given).

    A given folder that cannot be resumed from is an error naming why and the fix. With
    'latest', damaged checkpoints are skipped with a warning; a checkpoint of other settings
    (`same_settings` false) means the run starts anew (None).
    """
    if not resume:
        return None
    if resume != "latest":
        path = Path(resume)
        why = "it does not exist" if not path.is_dir() else problem(path)
        if why:
            raise SepenError(
                f"{what} {resume!r} cannot be resumed from: {why}; "
                "use --resume latest (the newest complete checkpoint) or start anew"
            )
        if at_most is not None and step_of(path) > at_most:
            raise SepenError(
                f"{what} {resume!r} is past step {at_most} (--until); "
                "give an earlier checkpoint or a later --until"
            )
        if same_settings is not None and not same_settings(path):
            raise SepenError(
                f"{what} {resume!r} was made with other {settings_name}; "
                "use the config it was made with, or start anew without --resume"
            )
        return path
    for folder in reversed(checkpoints(state_dir)):
        if at_most is not None and step_of(folder) > at_most:
            continue
        why = problem(folder)
        if why is not None:
            log.warning("skipping %s: %s; trying an older checkpoint", folder, why)
            continue
        if same_settings is not None and not same_settings(folder):
            log.warning("%s is from other %s: starting anew", folder, settings_name)
            return None
        return folder
    return None


def discard_if_stale(state_dir: Path, settings: dict) -> bool:
    """For state folders stamped once per run (`run_settings.json`): remove the checkpoints
    when the stamp differs from `settings`; True when any were removed."""
    stamp = Path(state_dir) / SETTINGS_STAMP
    found = checkpoints(state_dir)
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return False
    for old in found:  # every process may get here: ignore what another removed first
        shutil.rmtree(old, ignore_errors=True)
    return bool(found)


def read_stamp(state_dir: Path) -> dict | None:
    """The settings stamp of a state folder (None when it has none)."""
    stamp = Path(state_dir) / SETTINGS_STAMP
    return json.loads(stamp.read_text()) if stamp.is_file() else None


def stamp_settings(state_dir: Path, settings: dict) -> None:
    write_json(Path(state_dir) / SETTINGS_STAMP, settings)
