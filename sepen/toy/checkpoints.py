"""Resumable toy pretraining: complete checkpoints of the whole training state.

A checkpoint `checkpoint-<step>` holds everything the next step depends on: the weights of the
autoencoder, UNet and text encoder, the optimizer's moments, the learning-rate schedule's
position, the data stream's numpy generator, the noise generator and torch's global generator.
Tensors are safetensors files, the rest JSON (nothing is unpickled). A checkpoint is written
into a hidden folder and renamed when complete, so a run stopped at any moment leaves only
complete checkpoints; resuming from one continues the run bit for bit.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from sepen.errors import SepenError

log = logging.getLogger("sepen.toy.checkpoints")

WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
PARTS = ("vae", "unet", "text_encoder")


def step_of(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from, or None when it is complete and finite."""
    from safetensors import safe_open

    for name in (WEIGHTS, OPTIMIZER, STATE):
        if not (folder / name).is_file():
            return f"{name} is missing"
    try:
        json.loads((folder / STATE).read_text())
        with safe_open(str(folder / WEIGHTS), framework="pt") as f:
            for key in f.keys():
                if not torch.isfinite(f.get_tensor(key)).all():
                    return f"{WEIGHTS} holds non-finite weights ({key})"
        with safe_open(str(folder / OPTIMIZER), framework="pt") as f:
            list(f.keys())
    except Exception as err:  # noqa: BLE001 - any read failure means "not complete"
        return f"cannot be read ({err})"
    return None


def find_checkpoint(
    state_dir: Path, resume: str | None, settings: dict, at_most: int | None = None
) -> Path | None:
    """The checkpoint to continue from: a given folder, or the newest complete one ('latest')
    of a step <= `at_most` (when given).

    'latest' skips incomplete or damaged checkpoints (with a warning) and ignores checkpoints
    of other world or pretraining settings (they would give another model), starting anew.
    """
    if not resume:
        return None
    if resume != "latest":
        path = Path(resume)
        problem = "it does not exist" if not path.is_dir() else checkpoint_problem(path)
        if problem:
            raise SepenError(
                f"pretraining checkpoint {resume!r} cannot be resumed from: {problem}; "
                "use --resume latest (the newest complete checkpoint) or start anew"
            )
        if at_most is not None and step_of(path) > at_most:
            raise SepenError(
                f"pretraining checkpoint {resume!r} is past step {at_most} (--until); "
                "give an earlier checkpoint or a later --until"
            )
        if read_state(path)["settings"] != settings:
            raise SepenError(
                f"pretraining checkpoint {resume!r} was made with other toy settings; "
                "use the config it was made with, or start anew without --resume"
            )
        return path
    found = sorted(state_dir.glob("checkpoint-*"), key=step_of, reverse=True)
    for folder in [f for f in found if at_most is None or step_of(f) <= at_most]:
        problem = checkpoint_problem(folder)
        if problem is not None:
            log.warning("skipping %s: %s; trying an older checkpoint", folder, problem)
            continue
        if read_state(folder)["settings"] != settings:
            log.warning("%s is from other toy settings: starting anew", folder)
            return None
        return folder
    return None


def read_state(folder: Path) -> dict:
    return json.loads((Path(folder) / STATE).read_text())


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, plain = {}, {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous()
            else:
                plain[f"{index}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "plain": plain}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["plain"].items()):
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(state_dir: Path, step: int, pipe, opt, sched, rng, g, extra: dict) -> Path:
    """Write `checkpoint-<step>` (hidden until complete) and return it."""
    from safetensors.torch import save_file

    from sepen.atomic import fsync_dir, fsync_tree

    state_dir.mkdir(parents=True, exist_ok=True)
    folder, tmp = state_dir / f"checkpoint-{step}", state_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {
        f"{part}.{k}": v.detach().contiguous()
        for part in PARTS
        for k, v in getattr(pipe, part).state_dict().items()
    }
    save_file(weights, str(tmp / WEIGHTS))
    opt_tensors, opt_meta = _optimizer_tensors(opt) if opt is not None else ({}, None)
    rng_tensors = {"rng.noise": g.get_state(), "rng.torch": torch.get_rng_state()}
    save_file({**opt_tensors, **rng_tensors}, str(tmp / OPTIMIZER))
    state = {
        "step": step,
        "optimizer": opt_meta,
        "lr_schedule": sched.state_dict() if sched is not None else None,
        "data_rng": rng.bit_generator.state,
        **extra,
    }
    if state["lr_schedule"] is not None:  # the schedule's function is code, not state
        state["lr_schedule"].pop("lr_lambdas", None)
    (tmp / STATE).write_text(json.dumps(state))
    fsync_tree(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    fsync_dir(state_dir)
    return folder


def load_weights(folder: Path, pipe) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(Path(folder) / WEIGHTS))
    for part in PARTS:
        prefix = f"{part}."
        own = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        getattr(pipe, part).load_state_dict(own, strict=True)


def load_checkpoint(folder: Path, pipe, opt, sched, rng, g) -> dict:
    """Restore a checkpoint into the live objects; returns its JSON state."""
    from safetensors.torch import load_file

    load_weights(folder, pipe)
    state = read_state(folder)
    tensors = load_file(str(Path(folder) / OPTIMIZER))
    g.set_state(tensors.pop("rng.noise"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    if opt is not None and state["optimizer"] is not None:
        _load_optimizer(opt, tensors, state["optimizer"])
    if sched is not None and state["lr_schedule"] is not None:
        sched.load_state_dict({**state["lr_schedule"], "lr_lambdas": [None]})
    rng.bit_generator.state = state["data_rng"]
    return state


def prune(state_dir: Path, keep: int | None) -> None:
    """Remove all but the newest `keep` checkpoints (None keeps them all)."""
    if keep is None:
        return
    found = sorted(state_dir.glob("checkpoint-*"), key=step_of)
    for old in found[: max(0, len(found) - keep)]:
        shutil.rmtree(old)


def clean_partial(state_dir: Path) -> None:
    for tmp in state_dir.glob(".checkpoint-*"):
        shutil.rmtree(tmp, ignore_errors=True)
