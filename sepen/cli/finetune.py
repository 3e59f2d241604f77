"""`sepen finetune`: Separate-and-Enhance finetuning of the cross-attention keys on
accelerate; writes a safetensors delta (docs/method.md)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch

from sepen import checkpoints as protocol
from sepen.architecture import check_capture, denoiser_of, text_positions
from sepen.atomic import write_bytes
from sepen.command import add_deprecated, command_parser, run_step
from sepen.config import load_config
from sepen.delta import save_delta, unet_delta_tensors
from sepen.errors import SepenError
from sepen.finetune.loop import check_ranks_agree, latent_side, prepare, train
from sepen.finetune.signal import Task, check_prompts
from sepen.finetune.slurm import node_name, torch_env
from sepen.finetune.state import (
    check_same_shape,
    find_checkpoint,
    make_tracker,
    register_checkpoint_hooks,
    run_settings,
    world_size,
)
from sepen.models.loading import load_pipeline
from sepen.objective import SepenObjective
from sepen.plan import read_plan

log = logging.getLogger("sepen.finetune")


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("sepen finetune", __doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--model", help="base model: hub id or local folder (model.pretrained)")
    p.add_argument("--concepts", nargs="+", help="override finetune.concepts")
    p.add_argument(
        "--plan", type=Path, help="a plan of `sepen prompts`: take the concepts of --model-id"
    )
    p.add_argument("--model-id", help="which of the plan's models to train (with --plan)")
    p.add_argument("--losses-out", type=Path, help="copy the loss log (CSV) here at the end")
    p.add_argument("--out", type=Path, required=True, help="the delta file (.safetensors)")
    p.add_argument(
        "--state-dir",
        type=Path,
        help="checkpoints and loss log (default: <out without suffix>.state)",
    )
    add_deprecated(p, "--output-dir", "--state-dir", "state_dir", type=Path)
    p.add_argument("--resume", help="'latest' or a checkpoint folder to continue from")
    p.add_argument(
        "--cpu",
        action="store_true",
        help="train on CPU (gloo DDP when launched with several processes)",
    )
    p.add_argument(
        "--stop-after",
        type=int,
        metavar="STEP",
        help="exit after this optimizer step without writing the delta "
        "(simulates an interruption; checkpoints stay)",
    )
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def resolve_config(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """The run's config (the file, --set overrides, --model, --concepts, the plan's model) and
    the plan model's own prompts (custom prompts; empty otherwise)."""
    overrides = list(args.set)
    if args.model:
        overrides.append(f"model.pretrained={json.dumps(args.model)}")
    if args.concepts:
        overrides.append(f"finetune.concepts={json.dumps(args.concepts)}")
    if args.plan is not None or args.model_id is not None:
        if args.plan is None or args.model_id is None:
            raise SepenError("--plan and --model-id go together: give both or neither")
        models = read_plan(args.plan)["models"]
        if args.model_id not in models:
            raise SepenError(
                f"model id {args.model_id!r} is not in plan {str(args.plan)!r}: give one of "
                f"its models {sorted(models)[:5]}{' ...' if len(models) > 5 else ''}"
            )
        concepts = models[args.model_id]["concepts"]
        overrides.append(f"finetune.concepts={json.dumps(concepts)}")
        own = list(models[args.model_id].get("prompts", []))
    else:
        own = []
    return load_config(args.config, overrides), own


def main(args: argparse.Namespace) -> Path:
    config, own_prompts = resolve_config(args)
    task = Task.from_settings(config["finetune"], own_prompts)
    ft = task.ft
    out = Path(args.out)
    output_dir = Path(args.state_dir) if args.state_dir else out.with_suffix(".state")
    # a given checkpoint folder is checked now; 'latest' is looked up once the input is valid
    checkpoint = None if args.resume == "latest" else find_checkpoint(output_dir, args.resume)

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    # everything that can be wrong with the input is checked before anything is written
    pipe = load_pipeline(config["model"]["pretrained"], config["model"]["revision"])
    check_prompts(lambda prompt, names: text_positions(pipe, prompt, names), task)
    check_capture(denoiser_of(pipe), ft, latent_side(pipe, ft["image_size"]))

    os.environ.update(torch_env(os.environ))  # an srun task of a multi-node job: its rank
    settings = run_settings(config, world_size())
    if own_prompts:
        settings["prompts"] = own_prompts
    protocol.clean_partial(output_dir)  # a save cut short: never resumed from
    if args.resume:  # another process count or global batch: an error, not a silent resume
        check_same_shape(protocol.read_stamp(output_dir), settings["training"], output_dir)
    if args.resume == "latest":
        if protocol.discard_if_stale(output_dir, settings):
            log.warning(
                "checkpoints in %s are from other settings: starting from step 0", output_dir
            )
        checkpoint = find_checkpoint(output_dir, "latest")
    start_step = protocol.step_of(checkpoint) if checkpoint else 0
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=ft["mixed_precision"],
        gradient_accumulation_steps=ft["gradient_accumulation_steps"],
        log_with=[make_tracker(output_dir / "losses.csv", start_step)],
        project_config=ProjectConfiguration(project_dir=str(output_dir)),
    )
    log.info(
        "process %d of %d on node %s",
        accelerator.process_index,
        accelerator.num_processes,
        node_name(os.environ),
    )
    if accelerator.is_main_process:
        protocol.stamp_settings(output_dir, settings)

    t = prepare(config, task, pipe, accelerator)
    lr = ft["learning_rate"] * (t.sampler.per_step if ft["scale_lr"] else 1)
    optimizer = torch.optim.AdamW(t.params.values(), lr=lr, weight_decay=ft["weight_decay"])
    guidance = config["sampling"]["guidance_scale"]  # FLUX.1-dev's embedded guidance
    objective = SepenObjective.from_settings(t.unet, t.store, ft, t.originals, guidance=guidance)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    raw_unet = accelerator.unwrap_model(objective).unet
    register_checkpoint_hooks(accelerator, raw_unet)
    if checkpoint is not None:
        log.info("resuming from %s (step %d)", checkpoint, start_step)
        accelerator.load_state(str(checkpoint))
    elif args.resume:
        log.info("no checkpoint in %s: starting from step 0", output_dir)

    accelerator.init_trackers("sepen", config={**ft, "lr": lr})
    log.info(
        "training %d tensors (%s), lr %.3g, global batch %d, %d process(es)",
        len(t.params),
        ft["trainable"],
        lr,
        t.sampler.per_step,
        accelerator.num_processes,
    )
    if not train(ft, accelerator, t, objective, optimizer, lr, start_step, args.stop_after):
        accelerator.end_training()
        return output_dir

    check_ranks_agree(accelerator, t.params)
    if accelerator.is_main_process:
        save_delta(
            out,
            unet_delta_tensors(raw_unet, ft["trainable"]),
            base_model=config["model"]["pretrained"],
            revision=config["model"]["revision"],
            trainable=ft["trainable"],
            config=config,
            architecture=type(raw_unet).__name__,
            lora_scale=1.0 if ft["trainable"] == "lora" else None,
        )
        log.info("wrote %s", out)
        if args.losses_out is not None:
            write_bytes(args.losses_out, (output_dir / "losses.csv").read_bytes())
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def cli(argv=None) -> int:
    args = parse_args(argv)
    return run_step("sepen finetune", lambda: main(args))


if __name__ == "__main__":
    raise SystemExit(cli())
