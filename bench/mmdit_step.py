"""SepEn finetuning steps on full-size MMDiT transformers with random weights: step time, peak
memory and trainable weights (SD3.5 Medium / Large, FLUX.1 [dev]; tiny layouts on CPU).

The transformer is built with its published configuration directly on the device (random
weights: the cost of a step does not depend on them), the text keys of every joint block are
made trainable, every joint block is captured (finetune.blocks null), and each step runs
sepen's own objective (early exit after the last captured block, the key-swap norm loss in
joint mode) with the text sequence and pooled vector random at the real shapes (the text
encoders are outside a step, as in finetuning, where their outputs are frozen).

    python bench/mmdit_step.py --arch sd35-medium --latent 64 --batch 4 --dtype bfloat16
    python bench/mmdit_step.py --arch tiny-flux --device cpu      # seconds, for the tests
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sepen.architecture import install
from sepen.models.tiny_mmdit import tiny_flux_transformer_config, tiny_sd3_transformer_config
from sepen.objective import SepenObjective, StepInputs
from sepen.trainable import prepare_trainable, trainable_layers

# published configurations (the models' transformer/config.json)
ARCHS = {
    "sd35-medium": dict(
        cls="SD3Transformer2DModel", text=77 + 256, sample_size=128, patch_size=2,
        in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
        dual_attention_layers=tuple(range(13)),
    ),
    "sd35-large": dict(
        cls="SD3Transformer2DModel", text=77 + 256, sample_size=128, patch_size=2,
        in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
        num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
        pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm",
    ),
    "flux-dev": dict(
        cls="FluxTransformer2DModel", text=512, patch_size=1, in_channels=64, num_layers=19,
        num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
}  # fmt: skip
ARCHS["tiny-sd35"] = dict(
    cls="SD3Transformer2DModel", text=93, **tiny_sd3_transformer_config(16, True)
)
ARCHS["tiny-flux"] = dict(cls="FluxTransformer2DModel", text=16, **tiny_flux_transformer_config())


def build(arch: str, device: str, dtype: torch.dtype):
    import diffusers

    spec = dict(ARCHS[arch])
    cls, text = spec.pop("cls"), spec.pop("text")
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(diffusers, cls)(**spec)
    return model.to(dtype), text


def peak_memory(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


def measure(args) -> dict:
    dtype = getattr(torch, args.dtype)
    model, text = build(args.arch, args.device, dtype)
    flux = type(model).__name__ == "FluxTransformer2DModel"
    channels = model.config.in_channels // (4 if flux else 1)
    store = install(model, {"blocks": None, "joint_maps": "joint"}, args.latent)
    norm = args.mode == "joint"
    params = prepare_trainable(model, trainable_layers(model, store.captured, norm), "to_k")
    for p in params.values():
        p.data = p.data.float()  # trained weights in float32, as finetuning keeps them
    if args.checkpointing:
        model.enable_gradient_checkpointing()
    originals = {n: p.detach().clone() for n, p in params.items()} if norm else None
    objective = SepenObjective(model, store, originals=originals, guidance=3.5)
    optimizer = torch.optim.AdamW(params.values(), lr=1e-6)
    g = torch.Generator().manual_seed(0)

    def draw():
        b, dev = args.batch, args.device
        noisy = torch.randn(b, channels, args.latent, args.latent, generator=g).to(dev, dtype)
        emb = torch.randn(b, text, model.config.joint_attention_dim, generator=g).to(dev, dtype)
        pooled = torch.randn(b, model.config.pooled_projection_dim, generator=g).to(dev, dtype)
        t = torch.full((b,), 500.0, device=dev)
        return noisy, t, emb, {"pooled_projections": pooled}

    def step():
        noisy, t, emb, extra = draw()
        positions = [[[5, 6], [9]]] * args.batch
        single = (noisy, t, emb) if norm else None
        inputs = StepInputs(noisy, t, emb, positions, single, extra, extra if norm else None)
        with torch.autocast(args.device.split(":")[0], dtype, enabled=dtype != torch.float32):
            parts = objective(inputs)
        parts["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {k: float(v) for k, v in parts.items()}

    step()  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        parts = step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    assert all(v == v for v in parts.values()), f"non-finite loss {parts}"
    memory = peak_memory(args.device)
    return {
        "arch": args.arch,
        "mode": args.mode,
        "latent": args.latent,
        "image_tokens": (args.latent // 2) ** 2,
        "text_tokens": text,
        "batch": args.batch,
        "dtype": args.dtype,
        "gradient_checkpointing": args.checkpointing,
        "trainable_weights": sum(p.numel() for p in params.values()),
        "total_weights": sum(p.numel() for p in model.parameters()),
        "step_seconds_median": statistics.median(times),
        "peak_memory_gib": None if memory is None else memory / 2**30,
        "loss": parts,
    }  # fmt: skip


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default="tiny-sd35")
    p.add_argument("--latent", type=int, default=16, help="latent side (64 = 512 px)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mode", choices=["pairs", "joint"], default="pairs")
    p.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    result = measure(args)
    memory = result["peak_memory_gib"]
    print(
        f"{result['arch']} {result['mode']}: {result['trainable_weights'] / 1e6:.1f}M trainable "
        f"of {result['total_weights'] / 1e6:.0f}M, {result['image_tokens']} image + "
        f"{result['text_tokens']} text tokens, batch {result['batch']}, {result['dtype']}: "
        f"{result['step_seconds_median']:.3f} s/step, peak memory "
        + ("n/a (CPU)" if memory is None else f"{memory:.1f} GiB")
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
