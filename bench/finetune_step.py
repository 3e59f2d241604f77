"""One SepEn finetuning step, ours vs a reference loop built the way the authors' code works.

A step is forward + losses + backward + optimizer step (AdamW, gradient clipping) on the same
model (same seed), batch, prompts, noise and timesteps. The reference, written here from the
description of the authors' research code (docs/method.md), computes explicit attention
probabilities in every attention layer, self and cross, keeps every map of at most 32x32 positions
with its graph (an attention store), runs the whole UNet, takes the losses from the stored maps
and gets the norm loss's frozen prediction from a full frozen copy of the UNet. Ours is
`sepen.objective.SepenObjective`, the module `sepen finetune` runs. Rows "- early exit" and
"- token columns" switch one speed-up off.

Each variant runs in its own process, so that its peak memory is its own, and the processes take
turns step by step (one warm-up step, then `--repeats` timed steps; the order reverses every
round), so that a change of the machine's speed hits all alike. Peak memory: on CUDA the peak
allocated above the base UNet, on CPU the peak resident set (VmHWM, reset after the base UNet is
built) above the resident set at that point.
Before any time is printed, every variant's per-step losses must equal the reference's within
`--tolerance` (1e-5); in bf16/fp16 that check runs first in float32.

    python bench/finetune_step.py --size sd-quarter --repeats 5           # CPU, about 3 min
    python bench/finetune_step.py --size sd14 --repeats 2                 # CPU, 32x32 latents
    python bench/finetune_step.py --size sd14 --latent 64 --dtype bfloat16 --device cuda
    python bench/finetune_step.py --size sdxl-quarter --repeats 3        # SDXL layout, CPU
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SIZES = {  # name: (UNet width relative to SD 1.4 / SDXL, or "tiny", default latent side)
    "tiny": ("tiny", 16),
    "sd-quarter": (0.25, 32),
    "sd14": (1.0, 32),
    "sdxl-tiny": ("tiny", 16),  # SDXL's layout at a tiny width (tests)
    "sdxl-quarter": (0.25, 32),  # SDXL's layout at a quarter of its width
    "sdxl": (1.0, 128),
}
VARIANTS = {
    "reference": "reference loop (authors' structure)",
    "ours": "sepen (SepenObjective)",
    "ours-no-exit": "sepen - early exit",
    "ours-all-columns": "sepen - token columns",
    "ours-channels-last": "sepen + channels-last",
    "ours-compile": "sepen + torch.compile",
}
CONCEPTS = {
    "pairs": ["cat", "dog"],
    "joint": ["cat", "dog", "horse", "bird", "car", "chair", "apple", "clock"],
}
PARTS = ("loss", "separate", "enhance", "norm")


# ---------------------------------------------------------------- the reference loop
class ReferenceStore:
    """Every attention map of at most `max_positions` query positions, kept with its graph."""

    def __init__(self, max_positions: int = 32 * 32):
        self.max_positions = max_positions
        self.maps: dict[tuple[str, int], list[torch.Tensor]] = {}

    def reset(self) -> None:
        self.maps = {}

    def record(self, kind: str, probs: torch.Tensor) -> None:
        if probs.shape[1] <= self.max_positions:
            self.maps.setdefault((kind, probs.shape[1]), []).append(probs)


class ReferenceProcessor:
    """Explicit attention in the classic (B*heads, L, T) layout; every map goes to the store."""

    def __init__(self, store: ReferenceStore, cross: bool):
        self.store, self.cross = store, cross

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key, value = attn.to_k(context), attn.to_v(context)
        if self.cross:  # the start token's key and value stay fixed (Custom Diffusion style)
            keep = torch.ones_like(key)
            keep[:, 0] = 0
            key = keep * key + (1 - keep) * key.detach()
            value = keep * value + (1 - keep) * value.detach()
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
        probs = attn.get_attention_scores(query, key, None)
        self.store.record("cross" if self.cross else "self", probs)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        return out


def reference_maps(store: ReferenceStore, sides, batch: int) -> torch.Tensor:
    """(B, H, h, w, T): the stored cross-attention maps of the chosen grids, each layer's maps
    resized (bilinear) to the largest grid, averaged over layers (over each layer's heads
    first where layers differ in head count, as SDXL's levels do)."""
    top = max(sides)
    maps = []
    for side in sides:
        for m in store.maps[("cross", side * side)]:
            heads = m.shape[0] // batch
            m = m.reshape(batch, heads, side, side, m.shape[-1])
            if side != top:
                x = m.permute(0, 1, 4, 2, 3).reshape(batch, -1, side, side)
                x = F.interpolate(x, size=(top, top), mode="bilinear", align_corners=False)
                m = x.reshape(batch, heads, -1, top, top).permute(0, 1, 3, 4, 2)
            maps.append(m)
    if len({m.shape[1] for m in maps}) > 1:
        maps = [m.mean(1, keepdim=True) for m in maps]
    return torch.stack(maps).mean(0)


class ReferenceLoop:
    def __init__(self, unet, ft: dict, sides, norm: bool):
        from sepen.attention import cross_attention_factors

        self.frozen = copy.deepcopy(unet).requires_grad_(False) if norm else None
        self.unet = unet
        self.store = ReferenceStore()
        cross = set(cross_attention_factors(unet))
        unet.set_attn_processor(
            {
                k: ReferenceProcessor(self.store, k.removesuffix(".processor") in cross)
                for k in unet.attn_processors
            }
        )
        unet.requires_grad_(False)
        self.params = []
        for name in cross:  # every key is trained, as in the authors' code
            weight = unet.get_submodule(name).to_k.weight
            weight.requires_grad_(True)
            self.params.append(weight)
        self.ft, self.sides = ft, list(sides)

    def __call__(self, inputs) -> dict[str, torch.Tensor]:
        from sepen.losses import norm_loss, total_loss
        from sepen.tokens import aggregate_token_maps

        n = inputs.noisy.shape[0]
        noisy, t, emb = inputs.noisy, inputs.timesteps, inputs.emb
        added = inputs.added
        if inputs.single is not None:  # one batch: pair prompts, then single-object prompts
            noisy, t, emb = (torch.cat([a, b]) for a, b in zip((noisy, t, emb), inputs.single))
            if added is not None:
                added = {k: torch.cat([v, inputs.single_added[k]]) for k, v in added.items()}
        extra = {} if added is None else {"added_cond_kwargs": added}
        self.store.reset()
        pred = self.unet(noisy, t, emb, **extra).sample
        maps = reference_maps(self.store, self.sides, noisy.shape[0])[:n]
        how = self.ft["token_aggregation"]
        concept = torch.stack(
            [aggregate_token_maps(maps[b], p, how) for b, p in enumerate(inputs.positions)]
        )
        norm = None
        if inputs.single is not None:
            single_extra = (
                {} if inputs.single_added is None else {"added_cond_kwargs": inputs.single_added}
            )
            with torch.no_grad():
                frozen = self.frozen(*inputs.single, **single_extra).sample
            norm = norm_loss(pred[n:], frozen)
        ft = self.ft
        return total_loss(
            concept,
            ft["lambda_sep"],
            ft["lambda_en"],
            norm,
            ft["lambda_norm"],
            ft["enhance_kernel"],
        )


# ---------------------------------------------------------------- shared set-up
def build_unet(size: str, latent: int, seed: int = 0):
    from diffusers import UNet2DConditionModel

    from sepen.models.tiny import (
        sd_unet_config,
        sdxl_unet_config,
        tiny_sdxl_unet_config,
        tiny_unet_config,
    )

    width = SIZES[size][0]
    torch.manual_seed(seed)
    if size == "sdxl-tiny":
        return UNet2DConditionModel(**tiny_sdxl_unet_config(latent))
    if width == "tiny":
        return UNet2DConditionModel(**tiny_unet_config(latent, cross_attention_dim=32))
    if size.startswith("sdxl"):
        return UNet2DConditionModel(**sdxl_unet_config(width, latent))
    return UNet2DConditionModel(**sd_unet_config(width, latent))


def map_resolution(size: str, latent: int) -> int:
    """The grid whose maps feed the losses: SD 1.x's 16 at 64 latents (latent / 4); SDXL's
    32 at 128 latents, its coarser cross-attention level (also latent / 4)."""
    return latent // 2 if size == "tiny" else latent // 4


def settings(mode: str, batch: int) -> dict:
    from sepen.config import load_config

    overrides = [
        f"finetune.mode={mode}",
        f"finetune.concepts={json.dumps(CONCEPTS[mode])}",
        f"finetune.batch_size={batch}",
    ]
    return dict(load_config(None, overrides)["finetune"])


class RandomText:
    """Text conditioning: a fixed random tensor per prompt (the text encoder is outside a
    step); for SDXL also a random pooled embedding and the size/crop time ids."""

    def __init__(self, unet, device, dtype, pixels: int):
        self.dim = unet.config.cross_attention_dim
        self.pooled = None
        if unet.config.addition_embed_type == "text_time":
            time_dims = 6 * unet.config.addition_time_embed_dim
            self.pooled = unet.config.projection_class_embeddings_input_dim - time_dims
        self.time_ids = torch.tensor([pixels, pixels, 0, 0, pixels, pixels], dtype=torch.float32)
        self.device, self.dtype, self.cache = device, dtype, {}

    def __call__(self, prompts):
        import zlib

        for p in prompts:
            if p not in self.cache:
                g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
                pooled = torch.randn(self.pooled, generator=g) if self.pooled else None
                self.cache[p] = (torch.randn(77, self.dim, generator=g), pooled)
        emb = torch.stack([self.cache[p][0] for p in prompts]).to(self.device, self.dtype)
        if self.pooled is None:
            return emb, None
        pooled = torch.stack([self.cache[p][1] for p in prompts]).to(self.device, self.dtype)
        time_ids = self.time_ids.expand(len(prompts), -1).to(self.device, self.dtype)
        return emb, {"text_embeds": pooled, "time_ids": time_ids}


def make_batches(ft: dict, unet, latent: int, steps: int, device, dtype):
    from diffusers import DDPMScheduler

    from sepen.finetune.conditioning import Positions, step_inputs
    from sepen.finetune.signal import SignalSampler, Task
    from sepen.models import build_clip_tokenizer
    from sepen.models.tiny import SD_SCHEDULER
    from sepen.tokens import concept_token_positions

    scheduler = DDPMScheduler(**SD_SCHEDULER)
    sampler = SignalSampler(
        Task.from_settings(ft), (unet.config.in_channels, latent, latent), 1000, 0.18215, 1
    )
    embed = RandomText(unet, device, dtype, latent * 8)
    tokenizer = build_clip_tokenizer()
    positions = Positions(lambda prompt, names: concept_token_positions(tokenizer, prompt, names))

    def add_noise(latents, noise, t):
        return scheduler.add_noise(latents, noise, t), t

    return [
        step_inputs(*sampler.step(s, 0, 0), embed, positions, add_noise, device, dtype)
        for s in range(steps)
    ]


# ---------------------------------------------------------------- memory
def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory above the moment `start()` is called, in bytes (CUDA allocator or VmHWM)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.base = _status("VmRSS")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _status("VmHWM") - self.base


# ---------------------------------------------------------------- one variant (a worker process)
def run_variant(spec: dict) -> dict:
    from sepen.attention import install_capture
    from sepen.finetune.signal import uses_norm_loss
    from sepen.objective import SepenObjective
    from sepen.trainable import prepare_trainable, trainable_layers

    device, variant = spec["device"], spec["variant"]
    dtype = getattr(torch, spec["dtype"])
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = spec["dtype"] != "float32"
        torch.backends.cudnn.allow_tf32 = spec["dtype"] != "float32"
    unet = build_unet(spec["size"], spec["latent"]).to(device)
    ft = settings(spec["mode"], spec["batch"])
    norm = uses_norm_loss(ft)
    batches = make_batches(ft, unet, spec["latent"], spec["repeats"] + 1, device, dtype)
    resolutions = spec.get("resolutions") or [map_resolution(spec["size"], spec["latent"])]
    memory = PeakMemory(device)
    memory.start()

    if variant == "reference":
        loop = ReferenceLoop(unet, ft, resolutions, norm)
        params, forward = loop.params, loop
    else:
        store = install_capture(unet, resolutions, spec["latent"])
        unet.requires_grad_(False)
        layers = trainable_layers(unet, store.captured, norm)
        params = list(prepare_trainable(unet, layers, "to_k").values())
        originals = {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}
        if variant == "ours-channels-last":
            unet.to(memory_format=torch.channels_last)
        forward = SepenObjective.from_settings(
            unet,
            store,
            ft,
            originals,
            early_exit=variant != "ours-no-exit",
            capture_columns=variant != "ours-all-columns",
        )
        if variant == "ours-compile":
            from sepen.objective import compile_blocks

            compile_blocks(unet, store.captured)
    if dtype != torch.float32:  # frozen weights in half precision, trained ones in float32
        for module in [unet] + ([loop.frozen] if variant == "reference" and norm else []):
            module.to(dtype)
        for p in params:
            p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=ft["learning_rate"], weight_decay=ft["weight_decay"])
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)

    def step(inputs):
        with autocast:
            parts = forward(inputs)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, ft["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {k: float(v.detach()) for k, v in parts.items()}

    def timed(inputs) -> dict:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        losses = step(inputs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return {"seconds": time.perf_counter() - start, "losses": losses}

    def finish() -> dict:
        result = {"peak_bytes": memory.peak()}
        if spec.get("flops"):  # after the peak is read: the counter's own tensors do not count
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with counter:
                step(batches[-1])
            result["flops"] = counter.get_total_flops()
        return result

    return batches, timed, finish


MARK = "@@sepen-bench "


def worker(spec: dict) -> None:
    """Set up one variant, then run a step per "step" line on stdin; "finish" ends it."""
    batches, timed, finish = run_variant(spec)
    print(MARK + json.dumps({"ready": True}), flush=True)
    done = 0
    for line in sys.stdin:
        if line.strip() == "step":
            print(MARK + json.dumps(timed(batches[done])), flush=True)
            done += 1
        else:
            print(MARK + json.dumps(finish()), flush=True)
            return


class Variant:
    """A worker process of one variant, driven step by step."""

    def __init__(self, spec: dict, logs: Path):
        self.spec = spec
        self.log = (logs / f"{spec['mode']}-{spec['variant']}-{spec['dtype']}.log").open("w+")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )

    def reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        self.proc.wait()
        self.log.seek(0)
        raise SystemExit(
            f"variant {self.spec['variant']} ({self.spec['mode']}, {self.spec['dtype']}) "
            f"failed (exit {self.proc.returncode}):\n{self.log.read()[-3000:]}"
        )

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.reply()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.log.close()


def run_interleaved(specs: dict[str, dict], steps: int) -> dict[str, dict]:
    """Run the variants' steps in turns (order reversed every round), each in its own process.

    The first step of each is a warm-up and is not timed. Returns, per variant, its per-step
    losses, the timed steps' seconds and its peak memory (and FLOPs of a step if asked).
    """
    out = {v: {"losses": [], "times": []} for v in specs}
    with tempfile.TemporaryDirectory() as tmp:
        workers = {}
        try:
            for v, spec in specs.items():  # start-ups side by side (imports take one core each)
                workers[v] = Variant(spec, Path(tmp))
            for w in workers.values():  # each has built its model before any step is timed
                w.reply()
            order = list(specs)
            for i in range(steps):
                for v in order if i % 2 == 0 else order[::-1]:
                    r = workers[v].ask("step")
                    out[v]["losses"].append(r["losses"])
                    if i > 0:
                        out[v]["times"].append(r["seconds"])
            for v, w in workers.items():
                out[v].update(w.ask("finish"))
        finally:
            for w in workers.values():
                w.close()
    return out


def matmul_tflops(device: str, dtype: str, n: int | None = None, repeats: int = 10) -> float:
    """The device's measured dense matmul rate (TFLOP/s) in `dtype`: the yardstick of a step."""
    n = n or (8192 if device.startswith("cuda") else 1024)
    a, b = (torch.randn(n, n, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
    a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def max_loss_gap(a: list[dict], b: list[dict]) -> float:
    return max(
        abs(x[k] - y[k]) for x, y in zip(a, b, strict=True) for k in PARTS if k in x or k in y
    )


def measure(args) -> dict:
    rows = []
    base = {
        "size": args.size,
        "latent": args.latent,
        "batch": args.batch,
        "device": args.device,
        "repeats": args.repeats,
        "resolutions": args.resolutions,
    }
    for mode in args.modes:
        variants = ["reference", "ours"] + (args.ablations if mode == "pairs" else [])
        if args.dtype != "float32":  # the equality check runs in float32 first
            check = {**base, "mode": mode, "dtype": "float32"}
            done = run_interleaved({v: {**check, "variant": v} for v in variants}, 1)
            for v in variants[1:]:
                gap = max_loss_gap(done["reference"]["losses"], done[v]["losses"])
                if gap > args.tolerance:
                    raise SystemExit(f"{mode}/{v}: losses differ from the reference by {gap:.3g}")
        specs = {
            v: {**base, "mode": mode, "dtype": args.dtype, "variant": v, "flops": args.flops}
            for v in variants
        }
        results = run_interleaved(specs, args.repeats + 1)
        for v in variants:
            gap = max_loss_gap(results["reference"]["losses"], results[v]["losses"])
            if args.dtype == "float32" and gap > args.tolerance:
                raise SystemExit(
                    f"{mode}/{v}: losses differ from the reference by {gap:.3g} "
                    f"(> {args.tolerance}); no times reported"
                )
            rows.append(
                {
                    "mode": mode,
                    "variant": v,
                    "step_s": statistics.median(results[v]["times"]),
                    "peak_mb": results[v]["peak_bytes"] / 2**20,
                    "loss_gap": gap,
                    "flops": results[v].get("flops"),
                }
            )
        ref_row = next(r for r in rows if r["mode"] == mode and r["variant"] == "reference")
        for r in rows:
            if r["mode"] == mode:
                r["speedup"] = ref_row["step_s"] / r["step_s"]
                r["memory_ratio"] = (
                    r["peak_mb"] / ref_row["peak_mb"] if ref_row["peak_mb"] > 0 else None
                )
    out = {**base, "dtype": args.dtype, "threads": torch.get_num_threads(), "rows": rows}
    if args.flops:
        out["matmul_tflops"] = matmul_tflops(args.device, args.dtype)
        for row in rows:
            row["tflops"] = row["flops"] / row["step_s"] / 1e12
            row["of_matmul"] = row["tflops"] / out["matmul_tflops"]
    if args.device.startswith("cuda"):
        out["card"] = torch.cuda.get_device_name()
    return out


def table(r: dict) -> str:
    where = r.get("card") or f"CPU, {r['threads']} threads"
    lines = [
        f"finetuning step: {r['size']} UNet, {r['latent']}x{r['latent']} latents, "
        f"batch {r['batch']}, {r['dtype']}, {where}; median of {r['repeats']} steps",
        f"{'mode':<7}{'variant':<40}{'step s':>9}{'x faster':>10}{'peak MiB':>10}"
        f"{'x memory':>10}{'|dloss|':>10}",
    ]
    if "matmul_tflops" in r:
        lines[1] += f"{'TFLOP/s':>9}{'of mm':>7}"
    for row in r["rows"]:
        mem = f"{row['memory_ratio']:.2f}" if row["memory_ratio"] is not None else "-"
        line = (
            f"{row['mode']:<7}{VARIANTS[row['variant']]:<40}{row['step_s']:>9.3f}"
            f"{row['speedup']:>10.2f}{row['peak_mb']:>10.0f}{mem:>10}{row['loss_gap']:>10.1e}"
        )
        if "tflops" in row:
            line += f"{row['tflops']:>9.2f}{row['of_matmul']:>7.0%}"
        lines.append(line)
    if "matmul_tflops" in r:
        lines.append(
            f"measured {r['dtype']} matmul rate: {r['matmul_tflops']:.2f} TFLOP/s; "
            "step FLOPs counted by torch.utils.flop_counter"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="sd-quarter")
    p.add_argument("--latent", type=int, help="latent side (default: the size's; 64 = 512 px)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--modes", nargs="+", choices=["pairs", "joint"], default=["pairs", "joint"])
    p.add_argument(
        "--ablations",
        nargs="*",
        choices=[v for v in VARIANTS if v not in ("reference", "ours")],
        default=["ours-no-exit", "ours-all-columns"],
        help="extra rows of ours, pairs mode",
    )
    p.add_argument(
        "--resolutions",
        type=int,
        nargs="+",
        help="grids whose maps feed the losses (default: latent / 4, SD 1.x's 16 at 512 px)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--tolerance", type=float, default=1e-5)
    p.add_argument(
        "--flops", action="store_true", help="count the FLOPs of a step (FlopCounterMode)"
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return {}
    args.latent = args.latent or SIZES[args.size][1]
    r = measure(args)
    print(table(r))
    if args.json:
        from sepen.atomic import write_json

        write_json(args.json, r)
    return r


if __name__ == "__main__":
    main()
