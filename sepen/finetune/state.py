"""A finetuning run's state on disk: checkpoints of the trained tensors (sepen.checkpoints'
protocol, through accelerate's save_state), the settings they depend on, and the loss log."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import torch

from sepen import checkpoints as protocol
from sepen.errors import SepenError

LOSS_COLUMNS = ("step", "loss", "separate", "enhance", "norm", "lr")


class CSVTracker:
    """An accelerate tracker (GeneralTracker API) appending logged values to a CSV file."""

    name = "csv"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, path: Path, start_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if self.path.is_file() and start_step > 0:  # a resumed run drops rows it will redo
            with self.path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, LOSS_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    @property
    def tracker(self):
        return self

    def start(self):
        pass

    def store_init_configuration(self, values: dict):
        self.path.with_suffix(".config.json").write_text(
            json.dumps(values, indent=2, sort_keys=True)
        )

    def log(self, values: dict, step: int | None = None, **kwargs):
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, LOSS_COLUMNS, extrasaction="ignore").writerow(
                {"step": step, **values}
            )

    def finish(self):
        pass


def make_tracker(path: Path, start_step: int):
    """The CSV loss log as an accelerate tracker."""
    from accelerate.tracking import GeneralTracker

    cls = type("SepenCSVTracker", (CSVTracker, GeneralTracker), {})
    return cls(path, start_step)


CHECKPOINT_WEIGHTS = "trainable.safetensors"


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (None when it is complete)."""
    from safetensors import safe_open

    weights = folder / CHECKPOINT_WEIGHTS
    if not weights.is_file():
        return f"{CHECKPOINT_WEIGHTS} is missing"
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                if not torch.isfinite(f.get_tensor(key)).all():
                    return f"{CHECKPOINT_WEIGHTS} holds non-finite weights ({key})"
    except Exception as err:  # noqa: BLE001 - any read failure means "not complete"
        return f"{CHECKPOINT_WEIGHTS} cannot be read ({err})"
    if not any(folder.glob("optimizer*.bin")):
        return "the optimizer state is missing"
    return None


def find_checkpoint(state_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from (sepen.checkpoints' protocol): a given folder, or the
    newest complete one ('latest'); an incomplete or damaged one is skipped with a warning."""
    return protocol.find_checkpoint(state_dir, resume, checkpoint_problem)


def world_size() -> int:
    """The number of processes this run trains with, as the launcher set it (accelerate,
    torchrun and sepen's SLURM mapping set WORLD_SIZE; a plain run is one process)."""
    import os

    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise SepenError(f"WORLD_SIZE={value!r} is not a process count: unset it or give N >= 1")
    return int(value)


def training_shape(config: dict, processes: int) -> dict:
    """How many processes train and the global batch they make (batch per process x processes
    x accumulation steps): a checkpoint made with another shape must not be resumed."""
    ft = config["finetune"]
    batch = ft["batch_size"] * processes * ft["gradient_accumulation_steps"]
    return {"processes": processes, "global_batch": batch}


def check_same_shape(stamp: dict | None, shape: dict, state_dir) -> None:
    """A one-line error when the checkpoints in `state_dir` were made with another process
    count or global batch than this run's (`stamp`: their run_settings.json, None if absent)."""
    made = (stamp or {}).get("training")
    if made is None or made == shape:
        return
    raise SepenError(
        f"the checkpoints in {state_dir} were made by {made['processes']} process(es) with a "
        f"global batch of {made['global_batch']}; this run has {shape['processes']} process(es) "
        f"and a global batch of {shape['global_batch']}: resume with {made['processes']} "
        "process(es) and the same batch settings, or give another --state-dir (or drop "
        "--resume) to start anew"
    )


def run_settings(config: dict, processes: int = 1) -> dict:
    """What a checkpoint depends on: the base model, every finetuning setting, and the
    training's shape (processes and global batch).

    Keys that only change speed or bookkeeping (checkpoint interval, logging) are left out, so
    changing them keeps the checkpoints.
    """
    ft = {
        k: v
        for k, v in config["finetune"].items()
        if k not in ("checkpointing_steps", "checkpoints_total_limit", "log_every")
    }
    sampling = {k: config["sampling"][k] for k in ("steps", "guidance_scale")}
    training = training_shape(config, processes)
    return {"model": config["model"], "finetune": ft, "sampling": sampling, "training": training}


def register_checkpoint_hooks(accelerator, raw_unet) -> None:
    """Checkpoints hold only the trained tensors (safetensors), not the frozen UNet."""

    def save_hook(models, weights, folder):
        if accelerator.is_main_process:
            from safetensors.torch import save_file

            save_file(
                {
                    n: p.detach().float().cpu().contiguous()
                    for n, p in raw_unet.named_parameters()
                    if p.requires_grad
                },
                str(Path(folder) / CHECKPOINT_WEIGHTS),
            )
        weights.clear()

    def load_hook(models, folder):
        from safetensors.torch import load_file

        state = load_file(str(Path(folder) / CHECKPOINT_WEIGHTS))
        named = dict(raw_unet.named_parameters())
        with torch.no_grad():
            for n, v in state.items():
                named[n].copy_(v)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, state_dir: Path, step: int, limit: int) -> None:
    """`checkpoint-<step>` by accelerate's save_state, written and published with the
    protocol's hidden folder and rename; every process takes part, the main one publishes."""
    tmp = protocol.partial_folder(state_dir, step)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        protocol.publish(tmp, state_dir, step)
        protocol.prune(state_dir, limit)
    accelerator.wait_for_everyone()
