"""`sepen finetune`: Separate-and-Enhance finetuning on accelerate.

The training signal needs no images (METHOD.md): random clean latents, noise and timesteps.
Each optimizer step draws its whole global batch from a generator seeded by (seed, step), and
each process and micro-step takes its slice, so a run gives the same result for any split of the
same global batch over processes and accumulation steps, and a resumed run continues exactly.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sepen.attention import captured_layers, install_capture
from sepen.config import load_config
from sepen.errors import SepenError
from sepen.objective import SepenObjective, StepInputs
from sepen.sampling import sample
from sepen.tokens import concept_token_positions, prompt_ids

log = logging.getLogger("sepen.finetune")

LOSS_COLUMNS = ("step", "loss", "separate", "enhance", "norm", "lr")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="sepen finetune",
        description="Finetune the cross-attention keys of a Stable Diffusion UNet with the "
        "Separate-and-Enhance losses; writes a safetensors delta.",
    )
    p.add_argument("--config", type=Path, help="YAML config (sepen schema); defaults apply")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. finetune.steps=50 (repeatable)",
    )
    p.add_argument("--model", help="base model: hub id or local folder (model.pretrained)")
    p.add_argument("--concepts", nargs="+", help="override finetune.concepts")
    p.add_argument(
        "--plan", type=Path, help="a plan of `sepen prompts`: take the concepts of --model-id"
    )
    p.add_argument("--model-id", help="which of the plan's models to train (with --plan)")
    p.add_argument("--losses-out", type=Path, help="copy the loss log (CSV) here at the end")
    p.add_argument("--out", type=Path, required=True, help="the delta file (.safetensors)")
    p.add_argument(
        "--output-dir",
        type=Path,
        help="checkpoints and loss log (default: <out without suffix>.state)",
    )
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
    return p.parse_args(argv)


def _format(template: str, concepts) -> str:
    slots = template.count("{}")
    if slots != len(concepts):
        raise SepenError(
            f"template {template!r} has {slots} '{{}}' slots for {len(concepts)} concepts "
            f"{list(concepts)}: give one '{{}}' per concept"
        )
    return template.format(*concepts)


@dataclass
class Batch:
    prompts: list[str]
    concepts: list[list[str]]
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor


class SignalSampler:
    """The training signal, drawn per optimizer step from a seeded generator.

    With no pool, clean latents are random (the paper's image-free signal). With a pool
    (`signal: base_samples`), each sample's prompt and clean latent are drawn from latents the
    base model generated for its prompts.
    """

    def __init__(
        self,
        ft: dict,
        latent_shape,
        num_timesteps: int,
        latent_scale: float,
        processes: int,
        pool: dict[str, Batch] | None = None,
    ):
        self.ft = ft
        self.shape = tuple(latent_shape)
        self.num_timesteps = num_timesteps
        self.scale = latent_scale
        self.processes = processes
        self.pool = pool
        self.per_step = ft["batch_size"] * processes * ft["gradient_accumulation_steps"]

    def _noise(self, g: torch.Generator, n: int):
        noise = torch.randn((n, *self.shape), generator=g)
        timesteps = torch.randint(0, self.num_timesteps, (n,), generator=g)
        return noise, timesteps

    def _from_pool(self, g: torch.Generator, kind: str, n: int) -> Batch:
        pool = self.pool[kind]
        idx = torch.randint(0, len(pool.prompts), (n,), generator=g).tolist()
        return Batch(
            [pool.prompts[i] for i in idx],
            [pool.concepts[i] for i in idx],
            pool.latents[idx],
            *self._noise(g, n),
        )

    def prompts(self, g: torch.Generator, n: int, single: bool = False):
        """n (prompt, concepts) draws of the mode's grammar."""
        ft = self.ft
        concepts, templates = ft["concepts"], ft["templates"]
        if single:
            idx = torch.randint(0, len(concepts), (n,), generator=g).tolist()
            return (
                [_format(ft["single_template"], [concepts[i]]) for i in idx],
                [[concepts[i]] for i in idx],
            )
        if ft["mode"] == "pairs":
            own = ft.get("_prompts")
            if own:  # a custom prompt's model: its own prompts (the plan's)
                idx = torch.randint(0, len(own), (n,), generator=g).tolist()
                return [own[i] for i in idx], [list(concepts)] * n
            return [_format(templates[0], concepts)] * n, [list(concepts)] * n
        prompts, picked = [], []
        for _ in range(n):
            i, j = torch.randperm(len(concepts), generator=g)[:2].tolist()
            t = int(torch.randint(0, len(templates), (1,), generator=g))
            picked.append([concepts[i], concepts[j]])
            prompts.append(_format(templates[t], picked[-1]))
        return prompts, picked

    def _draw(self, g: torch.Generator, n: int, single: bool) -> Batch:
        if self.pool is not None:
            return self._from_pool(g, "single" if single else "pair", n)
        prompts, picked = self.prompts(g, n, single)
        latents = torch.randn((n, *self.shape), generator=g) * self.scale
        return Batch(prompts, picked, latents, *self._noise(g, n))

    def step(self, step: int, micro: int, rank: int) -> tuple[Batch, Batch | None]:
        ft, n = self.ft, self.per_step
        g = torch.Generator().manual_seed(ft["seed"] * 1_000_003 + step)
        pair = self._draw(g, n, single=False)
        single = self._draw(g, n, single=True) if ft["_norm_loss"] else None
        lo = (micro * self.processes + rank) * ft["batch_size"]
        hi = lo + ft["batch_size"]
        return _slice(pair, lo, hi), (_slice(single, lo, hi) if single else None)


def base_sample_pool(
    pipe,
    sampler: SignalSampler,
    size: int,
    sampling: dict,
    seed: int,
    norm_loss: bool,
    show_progress: bool = False,
) -> dict[str, Batch]:
    """Latents the base model generates for `size` prompts of each kind (pair, single)."""
    g = torch.Generator().manual_seed(seed + 7)
    pool = {}
    for kind in ["pair"] + (["single"] if norm_loss else []):
        prompts, concepts = sampler.prompts(g, size, single=kind == "single")
        first = seed + 100_000
        latents = sample(
            pipe,
            prompts,
            range(first, first + size),
            sampling["steps"],
            sampling["guidance_scale"],
            sampling["batch_size"],
            output_type="latent",
            desc=f"signal pool ({kind})" if show_progress else None,
        )
        empty = torch.zeros(0)
        pool[kind] = Batch(prompts, concepts, latents, empty, empty)
    return pool


def _slice(b: Batch, lo: int, hi: int) -> Batch:
    return Batch(
        b.prompts[lo:hi], b.concepts[lo:hi], b.latents[lo:hi], b.noise[lo:hi], b.timesteps[lo:hi]
    )


def check_prompts(tokenizer, ft: dict) -> None:
    """Fail before any model work if a concept cannot be found in its prompts."""
    concepts, templates = ft["concepts"], ft["templates"]
    if ft["mode"] == "pairs":
        for prompt in ft.get("_prompts") or [_format(templates[0], concepts)]:
            concept_token_positions(tokenizer, prompt, concepts)
        return
    if len(set(concepts)) < 2:
        raise SepenError(f"joint mode needs two or more distinct concepts; got {concepts}")
    partner = {c: next(d for d in concepts if d != c) for c in concepts}
    for c in concepts:
        for t in templates:
            for pair in ([c, partner[c]], [partner[c], c]):
                concept_token_positions(tokenizer, _format(t, pair), pair)
        if ft["_norm_loss"]:
            concept_token_positions(tokenizer, _format(ft["single_template"], [c]), [c])


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


def _tracker(path: Path, start_step: int):
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


def _step_of(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def find_checkpoint(output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: a given folder, or the newest complete one ('latest').

    An incomplete or corrupt checkpoint (a job killed while saving an older version's
    checkpoint, a damaged disk) is skipped with a warning, and the next older one is used.
    """
    if not resume:
        return None
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise SepenError(f"checkpoint {resume!r} does not exist; use --resume latest")
        problem = checkpoint_problem(path)
        if problem:
            raise SepenError(
                f"checkpoint {resume!r} cannot be resumed from: {problem}; "
                f"use --resume latest (the newest complete checkpoint) or start anew"
            )
        return path
    found = sorted(output_dir.glob("checkpoint-*"), key=_step_of, reverse=True)
    for folder in found:
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        log.warning("skipping %s: %s; trying an older checkpoint", folder, problem)
    return None


def run_settings(config: dict) -> dict:
    """What a checkpoint depends on: the base model and every finetuning setting.

    Keys that only change speed or bookkeeping (checkpoint interval, logging) are left out, so
    changing them keeps the checkpoints.
    """
    ft = {
        k: v
        for k, v in config["finetune"].items()
        if k not in ("checkpointing_steps", "checkpoints_total_limit", "log_every")
    }
    sampling = {k: config["sampling"][k] for k in ("steps", "guidance_scale")}
    return {"model": config["model"], "finetune": ft, "sampling": sampling}


def stale_checkpoints(output_dir: Path, settings: dict) -> bool:
    """True (and the old checkpoints removed) when `output_dir` holds another run's state."""
    stamp = output_dir / "run_settings.json"
    found = list(output_dir.glob("checkpoint-*"))
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return False
    for old in found:  # every process may get here: ignore what another removed first
        shutil.rmtree(old, ignore_errors=True)
    return bool(found)


def encode(tokenizer, text_encoder, prompts: list[str], device) -> torch.Tensor:
    ids = prompt_ids(tokenizer, prompts).to(device)
    with torch.no_grad():
        return text_encoder(ids)[0]


class Positions:
    """Concept token positions of prompts, looked up once per (prompt, concepts)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict = {}

    def __call__(self, prompts, concepts) -> list[list[list[int]]]:
        out = []
        for prompt, names in zip(prompts, concepts):
            key = (prompt, tuple(names))
            if key not in self.cache:
                self.cache[key] = concept_token_positions(self.tokenizer, prompt, names)
            out.append(self.cache[key])
        return out


def step_inputs(
    pair: Batch, single: Batch | None, embed, positions, add_noise, device, dtype
) -> StepInputs:
    """The objective's inputs from the drawn signal: noisy latents, timesteps, text conditioning.

    `embed(prompts)` gives (text embeddings, added_cond_kwargs or None), `positions(prompts,
    concepts)` token positions, `add_noise(latents, noise, timesteps)` the noisy latents (the
    scheduler's add_noise).
    """

    def tensors(b: Batch):
        t = b.timesteps.to(device)
        noisy = add_noise(b.latents.to(device), b.noise.to(device), t).to(dtype)
        emb, added = embed(b.prompts)
        return (noisy, t, emb), added

    (noisy, t, emb), added = tensors(pair)
    single_inputs, single_added = tensors(single) if single is not None else (None, None)
    return StepInputs(
        noisy,
        t,
        emb,
        positions=positions(pair.prompts, pair.concepts),
        single=single_inputs,
        added=added,
        single_added=single_added,
    )


class TextEmbeddings:
    """Frozen text conditioning of one batch of prompts: (embeddings, added_cond_kwargs).

    Stable Diffusion 1.x/2.x: the text encoder's last hidden states, no added conditioning.
    SDXL: the pipeline's own `encode_prompt` (both encoders' penultimate hidden states side by
    side, the second's pooled projection) and the size/crop time ids of a square
    `image_size` image without crop, as SDXL was trained.

    A batch of one repeated prompt (pairs mode) reuses that prompt's conditioning, encoded
    alone once; any other batch is encoded as a whole. Either way a step's conditioning does
    not depend on earlier steps, so a resumed run continues bit-exactly.
    """

    def __init__(self, pipe, device, image_size: int | None = None):
        from sepen.models.loading import is_sdxl

        self.pipe, self.device = pipe, device
        self.sdxl = is_sdxl(pipe)
        self.image_size = image_size
        self.cache: dict[str, tuple] = {}

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, dict | None]:
        if not self.sdxl:
            return encode(self.pipe.tokenizer, self.pipe.text_encoder, prompts, self.device), None
        with torch.no_grad():
            emb, _, pooled, _ = self.pipe.encode_prompt(
                prompts, device=self.device, do_classifier_free_guidance=False
            )
        size = (self.image_size, self.image_size)
        time_ids = self.pipe._get_add_time_ids(
            size,
            (0, 0),
            size,
            dtype=emb.dtype,
            text_encoder_projection_dim=self.pipe.text_encoder_2.config.projection_dim,
        ).to(self.device)
        return emb, {"text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)}

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, dict | None]:
        if len(set(prompts)) > 1:
            return self.encode(prompts)
        prompt = prompts[0]
        if prompt not in self.cache:
            self.cache = {prompt: self.encode([prompt])}
        emb, added = self.cache[prompt]
        n = len(prompts)
        if added is not None:
            added = {k: v.expand(n, *v.shape[1:]) for k, v in added.items()}
        return emb.expand(n, -1, -1), added


def resolve_config(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """The run's config (the file, --set overrides, --model, --concepts, the plan's model) and
    the plan model's own prompts (custom prompts; empty otherwise)."""
    overrides = list(args.set)
    if args.model:
        overrides.append(f"model.pretrained={json.dumps(args.model)}")
    if args.concepts:
        overrides.append(f"finetune.concepts={json.dumps(args.concepts)}")
    if args.plan is not None or args.model_id is not None:
        from sepen.plan import read_plan

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


@dataclass
class Training:
    """What the training loop needs, set up from the config and the base model."""

    unet: object
    pipe: object
    store: object
    params: dict
    sampler: SignalSampler
    noise_scheduler: object
    weight_dtype: torch.dtype
    originals: dict | None


def latent_side(pipe, image_size: int) -> int:
    """Side of the latents of an `image_size` image (the VAE's downsampling factor)."""
    return image_size // pipe.vae_scale_factor


def prepare(config: dict, ft: dict, pipe, accelerator) -> Training:
    """Trainable keys, the capture, the training signal (and its base-sample pool)."""
    from diffusers import DDPMScheduler

    from sepen.trainable import prepare_trainable, trainable_layers, value_layers

    device = accelerator.device
    text_encoder, unet = pipe.text_encoder, pipe.unet
    side = latent_side(pipe, ft["image_size"])
    store = install_capture(unet, ft["resolutions"], side)
    layers = trainable_layers(unet, store.captured, ft["_norm_loss"])
    torch.manual_seed(ft["seed"])  # LoRA initialisation
    values = value_layers(unet, store.captured, ft["_norm_loss"])
    params = prepare_trainable(unet, layers, ft["trainable"], ft["lora_rank"], values)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    sampler = SignalSampler(
        ft,
        (unet.config.in_channels, side, side),
        noise_scheduler.config.num_train_timesteps,
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
            ft["_norm_loss"],
            show_progress=accelerator.is_local_main_process,
        )
        store.enabled = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        ft["mixed_precision"], torch.float32
    )
    for encoder in (text_encoder, getattr(pipe, "text_encoder_2", None)):
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
    if config["performance"]["channels_last"]:
        unet.to(memory_format=torch.channels_last)
    if config["performance"]["compile"]:
        from sepen.objective import compile_blocks

        log.info("torch.compile: %d blocks", compile_blocks(unet, store.captured))
    return Training(
        unet,
        pipe,
        store,
        params,
        sampler,
        noise_scheduler,
        weight_dtype,
        originals,
    )


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


def diverged(step: int, parts: dict, ft: dict, lr: float, what: str) -> SepenError:
    values = ", ".join(f"{k} {float(v):.4g}" for k, v in parts.items())
    return SepenError(
        f"finetuning diverged at step {step}: {what} (loss parts {values}); lower "
        f"finetune.learning_rate (now {ft['learning_rate']:g}, {lr:g} after scaling by the "
        f"batch) or set finetune.mixed_precision to 'no' (now {ft['mixed_precision']!r}); "
        f"no checkpoint with non-finite weights was kept"
    )


def train(args, ft, accelerator, t: Training, objective, optimizer, lr, start_step):
    """The optimisation loop; returns False when stopped early by --stop-after."""
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
    positions = Positions(t.pipe.tokenizer)
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
                    t.noise_scheduler.add_noise,
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
            _save_checkpoint(accelerator, output_dir, done, ft["checkpoints_total_limit"])
        if args.stop_after is not None and done >= args.stop_after and done < ft["steps"]:
            log.info("stopping after step %d as asked (--stop-after)", done)
            return False
    return True


def main(args: argparse.Namespace) -> Path:
    config, own_prompts = resolve_config(args)
    ft = dict(config["finetune"])
    ft["_prompts"] = own_prompts
    ft["_norm_loss"] = ft["norm_loss"] if ft["norm_loss"] is not None else ft["mode"] == "joint"
    out = Path(args.out)
    output_dir = Path(args.output_dir) if args.output_dir else out.with_suffix(".state")
    # a given checkpoint folder is checked now; 'latest' is looked up once the input is valid
    checkpoint = None if args.resume == "latest" else find_checkpoint(output_dir, args.resume)

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from sepen.delta import save_delta, unet_delta_tensors
    from sepen.models.loading import load_pipeline

    # everything that can be wrong with the input is checked before anything is written
    pipe = load_pipeline(config["model"]["pretrained"], config["model"]["revision"])
    check_prompts(pipe.tokenizer, ft)
    captured_layers(pipe.unet, ft["resolutions"], latent_side(pipe, ft["image_size"]))

    settings = run_settings(config)
    if own_prompts:
        settings["prompts"] = own_prompts
    for tmp in output_dir.glob(".checkpoint-*"):  # a save cut short: never resumed from
        shutil.rmtree(tmp, ignore_errors=True)
    if args.resume == "latest":
        if stale_checkpoints(output_dir, settings):
            log.warning(
                "checkpoints in %s are from other settings: starting from step 0", output_dir
            )
        checkpoint = find_checkpoint(output_dir, "latest")
    start_step = _step_of(checkpoint) if checkpoint else 0
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=ft["mixed_precision"],
        gradient_accumulation_steps=ft["gradient_accumulation_steps"],
        log_with=[_tracker(output_dir / "losses.csv", start_step)],
        project_config=ProjectConfiguration(project_dir=str(output_dir)),
    )
    if accelerator.is_main_process:
        from sepen.atomic import write_json

        write_json(output_dir / "run_settings.json", settings)

    t = prepare(config, ft, pipe, accelerator)
    lr = ft["learning_rate"] * (t.sampler.per_step if ft["scale_lr"] else 1)
    optimizer = torch.optim.AdamW(t.params.values(), lr=lr, weight_decay=ft["weight_decay"])
    objective = SepenObjective.from_settings(t.unet, t.store, ft, t.originals)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    raw_unet = accelerator.unwrap_model(objective).unet
    register_checkpoint_hooks(accelerator, raw_unet)
    if checkpoint is not None:
        log.info("resuming from %s (step %d)", checkpoint, start_step)
        accelerator.load_state(str(checkpoint))
    elif args.resume:
        log.info("no checkpoint in %s: starting from step 0", output_dir)

    public = {k: v for k, v in ft.items() if not k.startswith("_")}
    accelerator.init_trackers("sepen", config={**public, "lr": lr})
    log.info(
        "training %d tensors (%s), lr %.3g, global batch %d, %d process(es)",
        len(t.params),
        ft["trainable"],
        lr,
        t.sampler.per_step,
        accelerator.num_processes,
    )
    if not train(args, ft, accelerator, t, objective, optimizer, lr, start_step):
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
            lora_scale=1.0 if ft["trainable"] == "lora" else None,
        )
        log.info("wrote %s", out)
        if args.losses_out is not None:
            from sepen.atomic import write_bytes

            write_bytes(args.losses_out, (output_dir / "losses.csv").read_bytes())
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


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


def _save_checkpoint(accelerator, output_dir: Path, step: int, limit: int) -> None:
    """`checkpoint-<step>`, made visible only when complete: saved into a hidden folder, then
    renamed. A job killed while saving leaves only the hidden folder, which is never resumed
    from and is removed by the next run."""
    folder = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from sepen.atomic import fsync_dir, fsync_tree

        fsync_tree(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
        fsync_dir(output_dir)
        found = sorted(output_dir.glob("checkpoint-*"), key=_step_of)
        for old in found[: max(0, len(found) - limit)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def cli(argv=None) -> int:
    from sepen.command import run_step

    args = parse_args(argv)
    return run_step("sepen finetune", lambda: main(args))


if __name__ == "__main__":
    raise SystemExit(cli())
