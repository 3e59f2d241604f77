"""Sampling cost per image: stock pipeline vs the same with a SepEn delta vs Attend-and-Excite.

Random weights, so no download: `--arch sd14` builds the Stable Diffusion 1.4 architecture
(UNet, CLIP ViT-L/14 text encoder, VAE) at 512 px; `--arch tiny` the tiny test model. Each
method samples the same prompt and seed; the methods run in turns, `--repeats` times after one
warm-up each, and the median is reported with its ratio to the stock pipeline. Prints a table;
`--json` writes it.

    python bench/sampling_cost.py --arch sd14 --device cuda --dtype float16     # a GPU
    python bench/sampling_cost.py --arch tiny --steps 4 --repeats 1             # CPU, seconds
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def sd14_pipeline(seed: int = 0):
    """Stable Diffusion 1.4's architecture (diffusers' defaults are SD 1.x) with random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sepen.models import build_clip_tokenizer
    from sepen.models.tiny import SD_SCHEDULER, assemble_pipeline, sd_unet_config

    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**sd_unet_config(1.0, sample_size=64))
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        )
    )
    scheduler = DDIMScheduler(
        **SD_SCHEDULER, clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    return assemble_pipeline(vae, text, tokenizer, unet, scheduler)


def random_delta(pipe, folder: Path) -> Path:
    """A to_k delta for every cross-attention layer (values perturbed, shapes exact)."""
    from sepen.delta import save_delta

    g = torch.Generator().manual_seed(1)
    tensors = {
        n: p.detach().float().cpu() + 1e-3 * torch.randn(p.shape, generator=g)
        for n, p in pipe.unet.named_parameters()
        if n.endswith("attn2.to_k.weight")
    }
    return save_delta(
        folder / "delta.safetensors",
        tensors,
        base_model="random",
        revision=None,
        trainable="to_k",
        config={},
    )


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_interleaved(fns: dict, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of each function, run in turns (after one warm-up each) so that drift of
    the machine's speed affects all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def run(arch: str, steps: int, repeats: int, device: str, dtype: str) -> dict:
    from sepen.attend_excite import attend_excite_pipeline, sample_attend_excite
    from sepen.delta import apply_delta
    from sepen.models import resolve_dtype
    from sepen.models.tiny import build_tiny_pipeline

    def build():
        pipe = sd14_pipeline() if arch == "sd14" else build_tiny_pipeline()
        pipe = pipe.to(device, resolve_dtype(dtype))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    stock_pipe, sepen_pipe = build(), build()
    with tempfile.TemporaryDirectory() as tmp:
        apply_delta(sepen_pipe, random_delta(sepen_pipe, Path(tmp)))
    ae = attend_excite_pipeline(build())
    prompt = {"prompt": "a photo of a cat and a dog", "concepts": ["cat", "dog"]}
    sp = {"steps": steps, "guidance_scale": 6.0}
    from sepen.config import load_config

    # the published settings, the schedule scaled to `steps`
    # (sepen.attend_excite.attend_excite_schedule)
    ae_cfg = load_config(None)["evaluation"]["attend_excite"]

    def plain(pipe):
        def call():
            with torch.no_grad():
                pipe(
                    prompt["prompt"],
                    num_inference_steps=steps,
                    guidance_scale=6.0,
                    generator=torch.Generator().manual_seed(0),
                    output_type="np",
                )

        return call

    seconds = timed_interleaved(
        {
            "stock": plain(stock_pipe),
            "sepen": plain(sepen_pipe),
            "attend_excite": lambda: sample_attend_excite(ae, prompt, [0], sp, ae_cfg),
        },
        repeats,
        device,
    )
    results = {"arch": arch, "device": device, "dtype": dtype, "steps": steps, "repeats": repeats}
    results.update({f"{k}_s": v for k, v in seconds.items()})
    if device == "cuda":
        results["card"] = torch.cuda.get_device_name()
    for k in ("stock", "sepen", "attend_excite"):
        results[f"{k}_images_per_s"] = 1.0 / results[f"{k}_s"]
    for k in ("sepen", "attend_excite"):
        results[f"{k}_vs_stock"] = results[f"{k}_s"] / results["stock_s"]
        results[f"{k}_speed_vs_stock"] = results["stock_s"] / results[f"{k}_s"]
    return results


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=["sd14", "tiny"], default="sd14")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    r = run(args.arch, args.steps, args.repeats, args.device, args.dtype)
    print(
        f"sampling cost per image, {r['arch']} architecture, {r['steps']} steps, "
        f"{r['device']} ({r.get('card', 'cpu')}), {r['dtype']}"
    )
    print(f"{'method':<16}{'s/image':>10}{'images/s':>10}{'x time':>8}{'x speed':>9}")
    for key, label in (
        ("stock", "stock diffusers"),
        ("sepen", "+ SepEn delta"),
        ("attend_excite", "Attend-Excite"),
    ):
        time_ratio = r.get(f"{key}_vs_stock", 1.0)
        speed_ratio = r.get(f"{key}_speed_vs_stock", 1.0)
        print(
            f"{label:<16}{r[key + '_s']:>10.3f}{r[key + '_images_per_s']:>10.3f}"
            f"{time_ratio:>8.2f}{speed_ratio:>9.2f}"
        )
    if args.json:
        from sepen.atomic import write_json

        write_json(args.json, r)
    return r


if __name__ == "__main__":
    main()
