"""The finetuning loop on accelerate: set-up of the trainable keys and the capture, the
optimisation steps, divergence checks, and the end-of-run agreement of data-parallel
processes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sepen.architecture import Noiser, denoiser_of, install, latent_channels, text_positions
from sepen.errors import SepenError
from sepen.finetune.conditioning import Positions, TextEmbeddings, step_inputs
from sepen.finetune.signal import SignalSampler, Task, base_sample_pool
from sepen.finetune.state import save_checkpoint
from sepen.objective import compile_blocks
from sepen.trainable import prepare_trainable, trainable_layers, value_layers

log = logging.getLogger("sepen.finetune")


@dataclass
class Training:
    """What the training loop needs, set up from the config and the base model."""

    unet: object
    pipe: object
    store: object
    params: dict
    sampler: SignalSampler
    noiser: Noiser
    weight_dtype: torch.dtype
    originals: dict | None


def latent_side(pipe, image_size: int) -> int:
    """Side of the latents of an `image_size` image (the VAE's downsampling factor)."""
    return image_size // pipe.vae_scale_factor


def prepare(config: dict, task: Task, pipe, accelerator) -> Training:
    """Trainable keys, the capture, the training signal (and its base-sample pool)."""
    ft = task.ft
    device = accelerator.device
    unet = denoiser_of(pipe)  # a UNet, or an MMDiT transformer
    side = latent_side(pipe, ft["image_size"])
    store = install(unet, ft, side)
    layers = trainable_layers(unet, store.captured, task.norm_loss)
    torch.manual_seed(ft["seed"])  # LoRA initialisation
    values = value_layers(unet, store.captured, task.norm_loss)
    params = prepare_trainable(unet, layers, ft["trainable"], ft["lora_rank"], values)
    noiser = Noiser(pipe)
    sampler = SignalSampler(
        task,
        (latent_channels(pipe), side, side),
        noiser.num_timesteps,
        pipe.vae.config.scaling_factor if ft["signal_scale"] is None else ft["signal_scale"],
        accelerator.num_processes,
    )
    if ft["signal"] == "base_samples":
        log.info(
            "generating %d base-model samples per prompt kind for the training signal",
            ft["signal_pool"],
        )
        pipe.to(device)
        store.enabled = False
        sampler.pool = base_sample_pool(
            pipe,
            sampler,
            ft["signal_pool"],
            config["sampling"],
            ft["seed"],
            task.norm_loss,
            show_progress=accelerator.is_local_main_process,
        )
        store.enabled = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        ft["mixed_precision"], torch.float32
    )
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        encoder = getattr(pipe, name, None)
        if encoder is not None:
            encoder.requires_grad_(False).to(device, weight_dtype)
    unet.to(device)
    if weight_dtype != torch.float32:  # frozen weights in half precision, trained ones in fp32
        unet.to(weight_dtype)
        for p in params.values():
            p.data = p.data.float()
    originals = (
        None if ft["trainable"] == "lora" else {n: p.detach().clone() for n, p in params.items()}
    )
    if config["performance"]["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    if config["performance"]["channels_last"]:
        unet.to(memory_format=torch.channels_last)
    if config["performance"]["compile"]:
        log.info("torch.compile: %d blocks", compile_blocks(unet, store.captured))
    return Training(
        unet,
        pipe,
        store,
        params,
        sampler,
        noiser,
        weight_dtype,
        originals,
    )


def diverged(step: int, parts: dict, ft: dict, lr: float, what: str) -> SepenError:
    values = ", ".join(f"{k} {float(v):.4g}" for k, v in parts.items())
    return SepenError(
        f"finetuning diverged at step {step}: {what} (loss parts {values}); lower "
        f"finetune.learning_rate (now {ft['learning_rate']:g}, {lr:g} after scaling by the "
        f"batch) or set finetune.mixed_precision to 'no' (now {ft['mixed_precision']!r}); "
        f"no checkpoint with non-finite weights was kept"
    )


def train(
    ft: dict, accelerator, t: Training, objective, optimizer, lr, start_step, stop_after=None
) -> bool:
    """The optimisation loop; returns False when stopped early after step `stop_after`."""
    device = accelerator.device
    output_dir = Path(accelerator.project_configuration.project_dir)
    progress = tqdm(
        range(start_step, ft["steps"]),
        initial=start_step,
        total=ft["steps"],
        disable=not accelerator.is_local_main_process,
        desc="finetune",
        miniters=max(1, ft["steps"] // 100),
        mininterval=5,
    )
    embed = TextEmbeddings(t.pipe, device, ft["image_size"])
    positions = Positions(lambda prompt, names: text_positions(t.pipe, prompt, names))
    for step in progress:
        done = step + 1
        totals = {"loss": 0.0, "separate": 0.0, "enhance": 0.0, "norm": 0.0}
        for micro in range(ft["gradient_accumulation_steps"]):
            with accelerator.accumulate(objective):
                pair, single = t.sampler.step(step, micro, accelerator.process_index)
                inputs = step_inputs(
                    pair,
                    single,
                    embed,
                    positions,
                    t.noiser,
                    device,
                    t.weight_dtype,
                )
                parts = objective(inputs)
                accelerator.backward(parts["loss"])
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(list(t.params.values()), ft["max_grad_norm"])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                for k, v in parts.items():
                    totals[k] += float(v.detach()) / ft["gradient_accumulation_steps"]
        # the trained weights are the same on every process (DDP), so every process stops here
        if not torch.stack([torch.isfinite(p).all() for p in t.params.values()]).all():
            raise diverged(done, totals, ft, lr, "the trained weights are not finite")
        if done % ft["log_every"] == 0 or done == ft["steps"]:
            values = torch.tensor(
                [totals[k] for k in ("loss", "separate", "enhance", "norm")], device=device
            )
            values = accelerator.reduce(values, "mean").tolist()
            record = dict(zip(("loss", "separate", "enhance", "norm"), values), lr=lr)
            if not all(v == v and abs(v) != float("inf") for v in values):
                raise diverged(done, record, ft, lr, "the loss is not finite")
            accelerator.log(record, step=done)
            progress.set_postfix(loss=f"{values[0]:.4f}")
        if done % ft["checkpointing_steps"] == 0 and done < ft["steps"]:
            save_checkpoint(accelerator, output_dir, done, ft["checkpoints_total_limit"])
        if stop_after is not None and done >= stop_after and done < ft["steps"]:
            log.info("stopping after step %d as asked (--stop-after)", done)
            return False
    return True


def check_ranks_agree(accelerator, params: dict) -> None:
    """Fail loudly if data-parallel processes ended with different weights."""
    g = torch.Generator().manual_seed(0)
    fingerprint = torch.stack(
        [
            torch.stack(
                [
                    p.detach().double().sum(),
                    p.detach().double().pow(2).sum(),
                    (
                        p.detach().double().flatten()
                        * torch.rand(p.numel(), generator=g, dtype=torch.float64).to(p.device)
                    ).sum(),
                ]
            )
            for p in params.values()
        ]
    ).flatten()
    every = accelerator.gather(fingerprint[None]).cpu()
    if not torch.equal(every, every[:1].expand_as(every)):
        raise RuntimeError("processes ended with different weights: data parallelism is broken")
    log.info("trained weights identical on %d process(es)", accelerator.num_processes)
