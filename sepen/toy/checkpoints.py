"""Resumable toy pretraining: complete checkpoints of the whole training state.

A checkpoint `checkpoint-<step>` holds everything the next step depends on: the weights of the
autoencoder, UNet and text encoder, the optimizer's moments, the learning-rate schedule's
position, the data stream's numpy generator, the noise generator and torch's global generator.
Tensors are safetensors files, the rest JSON (nothing is unpickled). Writing, finding and
pruning follow `sepen.checkpoints`, the protocol finetuning uses too; resuming from a
checkpoint continues the run bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from sepen import checkpoints as protocol

WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
PARTS = ("vae", "unet", "transformer", "text_encoder", "text_encoder_2")


def _parts(pipe) -> list[str]:
    """The trained parts a pipeline has (world v3: vae, unet, text_encoder)."""
    return [part for part in PARTS if getattr(pipe, part, None) is not None]


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
    """The checkpoint to continue from (sepen.checkpoints' protocol): a given folder, or the
    newest complete one ('latest') of a step <= `at_most` (when given). Each checkpoint carries
    its world and pretraining settings; one of other settings would give another model."""
    return protocol.find_checkpoint(
        state_dir,
        resume,
        checkpoint_problem,
        what="pretraining checkpoint",
        at_most=at_most,
        same_settings=lambda folder: read_state(folder)["settings"] == settings,
        settings_name="toy settings",
    )


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

    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = protocol.partial_folder(state_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {
        f"{part}.{k}": v.detach().contiguous()
        for part in _parts(pipe)
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
    return protocol.publish(tmp, state_dir, step)


def load_weights(folder: Path, pipe) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(Path(folder) / WEIGHTS))
    for part in _parts(pipe):
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


# the protocol's own steps, under the names pretraining uses
step_of = protocol.step_of
prune = protocol.prune
clean_partial = protocol.clean_partial
