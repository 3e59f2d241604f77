"""Training of the toy world's base text-to-image model from scratch (`sepen toy pretrain`).

First a one-level autoencoder (latents at pixel resolution), then the denoiser (world v3's UNet,
or the toy MMDiT's joint transformer, sepen.toy.mmdit) and the text encoder(s) jointly, with
empty prompts for classifier-free guidance. Deterministic for a seed on CPU.
Ends with validation numbers from the exact detector: single objects, trained pairs and
held-out pairs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sepen.architecture import denoiser_of
from sepen.attention import install_capture
from sepen.errors import SepenError
from sepen.joint_attention import install_joint_capture, is_joint, restore_processors
from sepen.models.loading import load_pipeline
from sepen.tokens import concept_token_positions, prompt_ids
from sepen.toy import checkpoints as ck
from sepen.toy.evaluate import generate, prompt_kinds, score
from sepen.toy.grounding import grounded, grounding_labels, grounding_loss
from sepen.toy.mmdit import build_toy_mmdit_pipeline, flow_loss
from sepen.toy.model import build_toy_pipeline
from sepen.toy.seeds import VALIDATION_SEED
from sepen.toy.world import prepare_world, prompt_for, scene_batch

log = logging.getLogger("sepen.toy.pretrain")
LOSS_LOG_STEPS = 100  # steps per line of the loss curve in the log


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _progress(total: int, desc: str, enabled: bool, start: int = 0):
    """Steps start..total-1 with a bar counting from `start` (a resumed run)."""
    return tqdm(
        range(start, total),
        initial=start,
        total=total,
        desc=desc,
        disable=not enabled,
        miniters=max(1, total // 100),
        mininterval=10,
    )


def train_vae(vae, rng, toy: dict, steps: int, batch: int, progress: bool) -> float:
    concepts, pairs = toy["concepts"], toy.trained_pairs
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    vae.train()
    loss = torch.tensor(0.0)
    for _ in _progress(steps, "autoencoder", progress):
        x = to_tensor(
            scene_batch(rng, batch, concepts, pairs, toy["pair_fraction"], toy["radius"])[0]
        )
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn_like(posterior.mean)
        loss = F.mse_loss(vae.decode(z).sample, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = to_tensor(
            scene_batch(rng, 256, concepts, pairs, toy["pair_fraction"], toy["radius"])[0]
        )
        z = vae.encode(x).latent_dist.mean
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
        recon = F.mse_loss(vae.decode(z).sample, x).item()
    log.info(
        "autoencoder: reconstruction MSE %.5f, latent scale %.4f", recon, vae.config.scaling_factor
    )
    return recon


class Run:
    """The live state of the denoiser's training, saved and restored by checkpoints."""

    def __init__(self, pipe, pre: dict, rng: np.random.Generator):
        self.pipe, self.pre, self.rng = pipe, pre, rng
        self.params = [
            p
            for name in ("unet", "transformer", "text_encoder", "text_encoder_2")
            if getattr(pipe, name, None) is not None
            for p in getattr(pipe, name).parameters()
        ]
        self.opt = torch.optim.AdamW(self.params, lr=pre["learning_rate"], weight_decay=0.01)
        steps, warm = pre["steps"], pre["warmup_steps"]

        def lr_lambda(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda)
        self.g = torch.Generator().manual_seed(pre["seed"])
        self.step, self.losses, self.seconds, self.recon = 0, [], 0.0, None


def build_model(m: dict, seed: int):
    """An untrained toy pipeline of `toy.model.architecture`."""
    if m["architecture"] == "mmdit":
        return build_toy_mmdit_pipeline(m, seed=seed)
    return build_toy_pipeline(m, seed=seed)


def _encoders(pipe) -> list:
    return [getattr(pipe, n) for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None)]


def _grounding_capture(model, pre: dict):
    """World v3: the UNet's cross-attention at `grounding_resolutions`; the toy MMDiT: every
    joint block's image->text maps renormalised over the text (start token not detached)."""
    if is_joint(model):
        return install_joint_capture(model, None, None, "text", detach_start_token=False)
    side = model.config.sample_size
    return install_capture(model, pre["grounding_resolutions"], side, detach_start_token=False)


def _unet_loss(pipe, z, prompts, g) -> torch.Tensor:
    scheduler = pipe.scheduler
    noise = torch.randn(z.shape, generator=g)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z),), generator=g)
    noisy = scheduler.add_noise(z, noise, t)
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(z, noise, t) if v_prediction else noise
    ids = prompt_ids(pipe.tokenizer, prompts)
    return F.mse_loss(pipe.unet(noisy, t, pipe.text_encoder(ids)[0]).sample, target)


def train_denoiser(run: Run, toy: dict, until: int, progress: bool, save=None) -> list[float]:
    """Train from `run.step` to step `until`; `save(step)` at every checkpointing step."""
    pipe, pre, rng, g = run.pipe, run.pre, run.rng, run.g
    model, tokenizer, vae = denoiser_of(pipe), pipe.tokenizer, pipe.vae
    joint = is_joint(model)
    model.train()
    for encoder in _encoders(pipe):
        encoder.train()
    losses, flow = run.losses, []
    bar = _progress(until, "pretrain", progress, start=run.step)
    store, weight = None, pre["grounding"]
    if weight > 0:  # attention grounding (TokenCompose-style): each object's cells attend its token
        processors = None if joint else dict(model.attn_processors)
        store = _grounding_capture(model, pre)
    # this run's share of pair scenes (a continuation may give pairs more practice)
    pair_share = toy["pair_fraction"] if pre["pair_fraction"] is None else pre["pair_fraction"]
    for step in bar:
        images, prompts, named, layouts = scene_batch(
            rng,
            pre["batch_size"],
            toy["concepts"],
            toy.trained_pairs,
            pair_share,
            toy["radius"],
            one_name_fraction=toy["one_name_fraction"],
            concept_weights=pre["concept_weights"],
        )
        drop = rng.random(len(prompts)) < pre["empty_prompt_fraction"]
        prompts = ["" if d else p for p, d in zip(prompts, drop)]
        with torch.no_grad():
            z = vae.encode(to_tensor(images)).latent_dist.mean * vae.config.scaling_factor
        if store is not None:
            store.reset()
        if joint:
            loss = flow_loss(pipe, z, prompts, g, pre["sigmas"])
        else:
            loss = _unet_loss(pipe, z, prompts, g)
        flow_part = loss.item()
        if store is not None:
            keep = [
                not p or grounded(c, objs, pre["grounding_images"])
                for p, c, objs in zip(prompts, named, layouts)
            ]
            positions = [
                [] if not (p and k) else concept_token_positions(tokenizer, p, c)
                for p, c, k in zip(prompts, named, keep)
            ]
            shown = [objs if k else [] for objs, k in zip(layouts, keep)]
            maps = store.aggregate().mean(1)  # (B, h, w, T)
            labels = grounding_labels(shown, positions, maps.shape[1], images.shape[1])
            labels[~torch.tensor(keep)] = -1
            if (labels >= 0).any():
                loss = loss + weight * grounding_loss(maps, labels)
        if not torch.isfinite(loss):
            raise SepenError(
                f"pretraining diverged at step {step + 1}: the loss is {loss.item()}; resume "
                f"from the last checkpoint (--resume latest, which holds finite weights) or "
                f"lower toy.pretrain.learning_rate (now {pre['learning_rate']:g})"
            )
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.params, 1.0)
        run.opt.step()
        run.sched.step()
        losses.append(loss.item())
        flow.append(flow_part)
        run.step = step + 1
        if run.step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if run.step % LOSS_LOG_STEPS == 0:  # the loss curve, in the run's log
            log.info(
                "step %d loss %.4f (flow matching %.4f), mean of the last %d steps",
                run.step,
                np.mean(losses[-LOSS_LOG_STEPS:]),
                np.mean(flow[-LOSS_LOG_STEPS:]),
                LOSS_LOG_STEPS,
            )
        if save is not None and (run.step % pre["checkpointing_steps"] == 0 or run.step == until):
            save(run.step)
    if store is not None:  # the processors it had before the capture
        if joint:
            restore_processors(model, store)
        else:
            model.set_attn_processor(processors)
    model.eval().requires_grad_(False)
    for encoder in _encoders(pipe):
        encoder.eval().requires_grad_(False)
    return losses


def validate(pipe, toy: dict, sampling: dict, n: int, seed: int = VALIDATION_SEED) -> dict:
    """Exact-detector rates (with 95% CIs) for single objects, trained and held-out pairs."""

    rng = np.random.default_rng(seed)
    results = {}
    for kind, options in prompt_kinds(toy).items():
        named = [list(options[i]) for i in rng.integers(0, len(options), n)]
        prompts = [prompt_for(c) for c in named]
        images = generate(
            pipe,
            prompts,
            range(seed, seed + n),
            sampling["steps"],
            sampling["guidance_scale"],
            sampling["batch_size"],
        )
        results[kind] = score(images, named)
    return results


# Settings added after models had been shipped, with the value every model made before them
# had: left at it, a setting is left out of the saved settings, so those models stay of the world.
MMDIT_BEFORE = {"patch_size": 2, "qk_norm": None}  # the first toy MMDiT's
PRETRAIN_BEFORE = {
    "grounding_images": "all",
    "sigmas": "uniform",  # (and a UNet does not read it)
    "init": None,  # trained from random weights
    "pair_fraction": None,  # the world's share of pairs
    "concept_weights": None,  # every concept and trained pair drawn equally often
}


def _without(settings: dict, before: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in before or v != before[k]}


def world_settings(toy: dict) -> dict:
    """The toy settings a base model depends on (not the workflow's switches and checks)."""
    keep = ("concepts", "held_out_pairs", "split_seed", "radius", "pair_fraction", "model")
    out = {k: toy[k] for k in keep}
    if toy.get("one_name_fraction"):  # (absent from the models made before it existed)
        out["one_name_fraction"] = toy["one_name_fraction"]
    mmdit_only = ("architecture", "layers", "head_dim", "patch_size", "qk_norm")
    if out["model"].get("architecture", "unet") == "unet":  # likewise: world v3's settings
        out["model"] = {k: v for k, v in out["model"].items() if k not in mmdit_only}
    else:
        out["model"] = _without(out["model"], MMDIT_BEFORE)
    # the sampling schedule's shift is saved in the model's scheduler config; training does not
    # read it, so a checkpoint serves any shift
    out["model"] = {k: v for k, v in out["model"].items() if k != "flow_shift"}
    run_only = ("run", "checkpointing_steps", "checkpoints_total_limit")
    pretrain = {k: v for k, v in toy["pretrain"].items() if k not in run_only}
    out["pretrain"] = _without(pretrain, PRETRAIN_BEFORE)
    return out


def read_init(settings: dict) -> dict | None:
    """The summary of the model `toy.pretrain.init` starts from, checked to be of this world
    (everything but its pretraining settings), or None. An error names the folder and the key."""
    folder = settings["pretrain"].get("init")
    if folder is None:
        return None
    summary_file = Path(folder) / "sepen_toy.json"
    if not summary_file.is_file():
        raise SepenError(
            f"toy.pretrain.init {folder!r} is not a toy base model (no sepen_toy.json): give a "
            "folder written by `sepen toy pretrain`, or null to start from random weights"
        )
    summary = json.loads(summary_file.read_text())
    theirs = {k: v for k, v in summary["config"].items() if k != "pretrain"}
    ours = {k: v for k, v in settings.items() if k != "pretrain"}
    for key in sorted(set(theirs) | set(ours)):
        if theirs.get(key) != ours.get(key):
            raise SepenError(
                f"toy.pretrain.init {folder!r} is of another world: its toy.{key} is "
                f"{theirs.get(key)!r}, this config's {ours.get(key)!r}; start from a model of "
                "this world or give its settings"
            )
    return summary


def start_from(pipe, folder: str | Path) -> None:
    """Copy a saved toy model's weights (autoencoder, denoiser, text encoders) into `pipe`."""
    saved = load_pipeline(folder)
    for name in ("vae", "unet", "transformer", "text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).load_state_dict(getattr(saved, name).state_dict())
    pipe.vae.register_to_config(scaling_factor=saved.vae.config.scaling_factor)
    pipe.vae.eval().requires_grad_(False)


def _write_model(
    pipe, toy: dict, config: dict, run: Run, out: Path, until: int, init: dict | None
) -> dict:
    """Save the pipeline and its summary (with validation numbers) to `out`, atomically."""
    pre = toy["pretrain"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        summary = {
            "trained_pairs": toy.trained_pairs,
            "held_out_pairs": toy.held_out_pairs,
            "autoencoder_mse": run.recon,
            "final_loss": float(np.mean(run.losses[-50:])),
            "training_seconds": round(run.seconds, 1),
            "step": until,
            "config": world_settings(toy),
        }
        if init is not None:  # the steps before this run's
            summary["init_step"] = init["step"]
        if pre["validation_images"]:
            summary["validation"] = validate(
                pipe, toy, config["sampling"], pre["validation_images"]
            )
        (tmp / "sepen_toy.json").write_text(json.dumps(summary, indent=2))
        old = out.with_name(f".{out.name}.old") if out.exists() else None
        if old is not None:  # the previous model stays whole until the new one is in place
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return summary


def pretrain(
    config: dict,
    out: Path,
    progress: bool = True,
    state_dir: Path | None = None,
    resume: str | None = None,
    until: int | None = None,
    stop_after: int | None = None,
) -> dict | None:
    """Pretrain the toy base model into `out`.

    With `state_dir`, complete checkpoints are written every `toy.pretrain.checkpointing_steps`
    and `resume` ('latest' or a checkpoint folder) continues from one, bit for bit. `until`
    writes the model of that step (at most `toy.pretrain.steps`; a checkpoint of that step is
    used as it is), so a checkpoint chosen by the world card becomes a model. `stop_after`
    stops after that step without writing the model (an interruption).
    """

    toy = prepare_world(config)
    pre = toy["pretrain"]
    until = pre["steps"] if until is None else until
    if not 0 < until <= pre["steps"]:
        raise SepenError(
            f"--until {until} is outside 1..{pre['steps']} (toy.pretrain.steps); "
            "give a step of this run's schedule"
        )
    strangers = sorted(set(pre["concept_weights"] or {}) - set(toy["concepts"]))
    if strangers:
        raise SepenError(
            f"toy.pretrain.concept_weights names {', '.join(strangers)}, not a concept of this "
            f"world (toy.concepts: {', '.join(toy['concepts'])}); weigh only its concepts"
        )
    settings = world_settings(toy)
    init = read_init(settings)
    if resume and state_dir is None:
        raise SepenError("--resume needs a checkpoint folder: give --state-dir")
    checkpoint = ck.find_checkpoint(Path(state_dir), resume, settings, until) if resume else None
    out = Path(out)
    started = time.perf_counter()
    torch.manual_seed(pre["seed"])
    rng = np.random.default_rng(pre["seed"])
    pipe = build_model(toy["model"], seed=pre["seed"])
    run = Run(pipe, pre, rng)
    if state_dir is not None:
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        ck.clean_partial(state_dir)

    def save(step: int) -> None:
        if state_dir is None:
            return
        seconds = run.seconds + time.perf_counter() - started
        extra = {"settings": settings, "losses": run.losses, "seconds": seconds}
        extra.update(recon=run.recon, vae_scale=pipe.vae.config.scaling_factor)
        ck.save_checkpoint(state_dir, step, pipe, run.opt, run.sched, rng, run.g, extra)
        ck.prune(state_dir, pre["checkpoints_total_limit"])
        log.info("checkpoint-%d written (%.0f s of training so far)", step, seconds)

    if checkpoint is not None:
        log.info("resuming from %s", checkpoint)
        state = ck.load_checkpoint(checkpoint, pipe, run.opt, run.sched, rng, run.g)
        pipe.vae.eval().requires_grad_(False)
        pipe.vae.register_to_config(scaling_factor=state["vae_scale"])
        run.step, run.losses = state["step"], state["losses"]
        run.seconds, run.recon = state["seconds"], state["recon"]
    else:
        if resume:
            log.info("no usable checkpoint in %s: starting anew", state_dir)
        if init is not None:
            log.info("starting from %s (step %d of its run)", pre["init"], init["step"])
            start_from(pipe, pre["init"])
            run.recon = init["autoencoder_mse"]
        else:
            run.recon = train_vae(pipe.vae, rng, toy, pre["vae_steps"], pre["batch_size"], progress)
    if checkpoint is None:
        save(0)  # the autoencoder is not trained again after a stop
    stop = until if stop_after is None else min(until, stop_after)

    if run.step < stop:
        train_denoiser(run, toy, stop, progress, save)
    run.seconds += time.perf_counter() - started
    denoiser_of(pipe).eval().requires_grad_(False)
    for encoder in _encoders(pipe):
        encoder.eval().requires_grad_(False)
    if stop_after is not None and stop < until:
        log.info("stopped after step %d (--stop-after); the model is not written", stop)
        return None
    return _write_model(pipe, toy, config, run, out, until, init)
