"""`sepen toy pretrain`: train the toy world's base text-to-image model from scratch.

First a one-level autoencoder (latents at pixel resolution), then the UNet and the text encoder
jointly, with empty prompts for classifier-free guidance. Deterministic for a seed on CPU.
Ends with validation numbers from the exact detector: single objects, trained pairs and
held-out pairs.
"""

from __future__ import annotations

import argparse
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

from sepen.command import run_step, step_parser
from sepen.config import load_config
from sepen.tokens import concept_token_positions, prompt_ids
from sepen.toy.model import build_toy_pipeline
from sepen.toy.world import prepare_world, prompt_for, scene_batch

log = logging.getLogger("sepen.toy.pretrain")


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(
        range(total), desc=desc, disable=not enabled, miniters=max(1, total // 100), mininterval=10
    )


def train_vae(vae, rng, toy: dict, steps: int, batch: int, progress: bool) -> float:
    concepts, pairs = toy["concepts"], toy["_trained_pairs"]
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


def grounding_labels(layouts, positions, side: int, size: int) -> torch.Tensor:
    """Which text token each cell of a side x side attention grid should attend to.

    A cell at least half covered by a named object gets that object's token position; a cell no
    object touches gets 0, the start token (the attention sink of Stable Diffusion's
    background); partly covered cells get -1 (ignored). `positions[b]` are the token positions
    of image b's objects in layout order (an empty list for an empty prompt: every cell 0).
    """
    from sepen.toy.premise import cell_fractions
    from sepen.toy.world import CONCEPTS, shape_mask

    labels = torch.zeros((len(layouts), side, side), dtype=torch.long)
    for b, (objects, pos) in enumerate(zip(layouts, positions)):
        covered = np.zeros((side, side))
        for k, obj in enumerate(objects):
            mask = shape_mask(CONCEPTS[obj.concept].shape, obj.cx, obj.cy, obj.r, size)
            frac = cell_fractions(mask, side)
            covered = np.maximum(covered, frac)
            if pos:
                labels[b][torch.from_numpy(frac >= 0.5)] = int(pos[k][0])
        partial = (covered > 0) & ((covered < 0.5) | (not pos))
        labels[b][torch.from_numpy(partial)] = -1
    return labels


def grounding_loss(maps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean -log attention on the labelled token over the labelled cells.

    maps: (B, h, w, T) attention probabilities (heads and layers averaged); labels: (B, h, w)
    token positions, -1 ignored.
    """
    keep = labels >= 0
    picked = maps[keep].gather(-1, labels[keep][:, None]).squeeze(-1)
    return -(picked.clamp_min(1e-8).log()).mean()


def train_denoiser(pipe, rng, toy: dict, pre: dict, progress: bool) -> list[float]:
    unet, text_encoder, tokenizer, vae = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae
    scheduler = pipe.scheduler
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=pre["learning_rate"], weight_decay=0.01)
    steps, warm = pre["steps"], pre["warmup_steps"]

    def lr_lambda(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    unet.train()
    text_encoder.train()
    losses = []
    bar = _progress(steps, "pretrain", progress)
    g = torch.Generator().manual_seed(pre["seed"])
    store, weight = None, pre["grounding"]
    if weight > 0:  # attention grounding (TokenCompose-style): each object's cells attend its token
        from sepen.attention import install_capture

        side = unet.config.sample_size
        processors = dict(unet.attn_processors)
        store = install_capture(unet, pre["grounding_resolutions"], side, detach_start_token=False)
    for step in bar:
        images, prompts, named, layouts = scene_batch(
            rng,
            pre["batch_size"],
            toy["concepts"],
            toy["_trained_pairs"],
            toy["pair_fraction"],
            toy["radius"],
        )
        drop = rng.random(len(prompts)) < pre["empty_prompt_fraction"]
        prompts = ["" if d else p for p, d in zip(prompts, drop)]
        with torch.no_grad():
            z = vae.encode(to_tensor(images)).latent_dist.mean * vae.config.scaling_factor
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z),), generator=g)
        noisy = scheduler.add_noise(z, noise, t)
        target = (
            scheduler.get_velocity(z, noise, t)
            if (scheduler.config.prediction_type == "v_prediction")
            else noise
        )
        ids = prompt_ids(tokenizer, prompts)
        if store is not None:
            store.reset()
        pred = unet(noisy, t, text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, target)
        if store is not None:
            positions = [
                [] if not p else concept_token_positions(tokenizer, p, c)
                for p, c in zip(prompts, named)
            ]
            maps = store.aggregate().mean(1)  # (B, h, w, T)
            labels = grounding_labels(layouts, positions, maps.shape[1], images.shape[1])
            loss = loss + weight * grounding_loss(maps, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
            if not progress:
                log.info("step %d loss %.4f", step + 1, np.mean(losses[-50:]))
    if store is not None:  # the processors it had before the capture
        unet.set_attn_processor(processors)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return losses


def validate(pipe, toy: dict, sampling: dict, n: int, seed: int = 10_000) -> dict:
    """Exact-detector rates (with 95% CIs) for single objects, trained and held-out pairs."""
    from sepen.toy.evaluate import generate, prompt_kinds, score

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


def world_settings(toy: dict) -> dict:
    """The toy settings a base model depends on (not the workflow's switches and checks)."""
    keep = ("concepts", "held_out_pairs", "split_seed", "radius", "pair_fraction", "model")
    out = {k: toy[k] for k in keep}
    out["pretrain"] = {k: v for k, v in toy["pretrain"].items() if k != "run"}
    return out


def pretrain(config: dict, out: Path, progress: bool = True) -> dict:
    toy = prepare_world(config)
    pre = toy["pretrain"]
    started = time.perf_counter()
    torch.manual_seed(pre["seed"])
    rng = np.random.default_rng(pre["seed"])
    pipe = build_toy_pipeline(toy["model"], seed=pre["seed"])
    recon = train_vae(pipe.vae, rng, toy, pre["vae_steps"], pre["batch_size"], progress)
    losses = train_denoiser(pipe, rng, toy, pre, progress)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        summary = {
            "trained_pairs": toy["_trained_pairs"],
            "held_out_pairs": toy["_held_out_pairs"],
            "autoencoder_mse": recon,
            "final_loss": float(np.mean(losses[-50:])),
            "training_seconds": round(time.perf_counter() - started, 1),
            "config": world_settings(toy),
        }
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


def parse_args(argv=None) -> argparse.Namespace:
    p = step_parser("sepen toy pretrain", __doc__.split("\n")[0], config_required=False)
    p.add_argument("--out", type=Path, required=True, help="folder for the saved pipeline")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    summary = pretrain(load_config(args.config, args.set), args.out, progress=True)
    for kind, rates in summary.get("validation", {}).items():
        s = rates["success"]
        log.info(
            "validation %s: success %.3f [%.3f, %.3f] (n=%d)",
            kind,
            s["mean"],
            s["lo"],
            s["hi"],
            s["n"],
        )
    return summary


def cli(argv=None) -> int:
    args = parse_args(argv)
    return run_step("sepen toy pretrain", lambda: main(args))
